//! `kiln-time-wait` (firstboot/kiln-time-wait.sh), the bounded wait for NTP before k3s starts,
//! run under dash against a fake root: later boots never wait, first boot waits for
//! timesyncd's `synchronized` flag, and without one it goes on after its bound and says so.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

fn run(root: &Path, limit: &str) -> (Output, Duration) {
    let started = Instant::now();
    let o = std::process::Command::new("dash")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("firstboot/kiln-time-wait.sh"))
        .arg(limit)
        .env("KILN_ROOT", root)
        .output()
        .unwrap();
    (o, started.elapsed())
}

fn root(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-timewait-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn out(o: &Output) -> String {
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_later_boot_does_not_wait() {
    let r = root("later");
    std::fs::create_dir_all(r.join("var/lib/kiln")).unwrap();
    std::fs::write(r.join("var/lib/kiln/firstboot.done"), "").unwrap();
    let (o, took) = run(&r, "30");
    assert!(out(&o).contains("not the first boot; not waiting for NTP"));
    assert!(took < Duration::from_secs(5), "waited {took:?}");
    std::fs::remove_dir_all(&r).unwrap();
}

#[test]
fn first_boot_goes_on_once_ntp_answered() {
    let r = root("synced");
    std::fs::create_dir_all(r.join("run/systemd/timesync")).unwrap();
    std::fs::write(r.join("run/systemd/timesync/synchronized"), "").unwrap();
    let (o, took) = run(&r, "30");
    assert!(out(&o).contains("clock synchronised by NTP after 0 s"));
    assert!(took < Duration::from_secs(5), "waited {took:?}");
    std::fs::remove_dir_all(&r).unwrap();
}

#[test]
fn first_boot_without_ntp_waits_its_bound_then_goes_on() {
    let r = root("nontp");
    let (o, took) = run(&r, "2");
    assert!(
        out(&o).contains("no NTP answer in 2 s; going on with the clock at"),
        "{o:?}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "took {took:?}"
    );
    std::fs::remove_dir_all(&r).unwrap();
}
