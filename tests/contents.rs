//! Node contents (issue: real node contents): k3s fetched through kiln's real download path from
//! a loopback release server (a test double serving stand-in files), secrets, identity and
//! first boot, all checked from outside the image with debugfs and mtools.

mod common;

use common::disk::*;
use common::k3s::{Release, set_release, sha256, standin_binary, standin_images};
use common::*;
use std::path::{Path, PathBuf};

const VERSION_PATH: &str = "v1.33.5%2Bk3s1";

/// Root partition offset of a built image.
fn root_offset(img: &Path) -> u64 {
    let (_, parts) = sfdisk(img);
    parts[1].start
}

/// A workspace whose inventory downloads k3s from `release`.
fn release_workspace(name: &str, release: &Release) -> (Workspace, Bases, PathBuf) {
    let ws = Workspace::new(name);
    set_release(&ws.path("kiln.toml"), &release.url);
    let bases = make_bases(&ws.dir);
    let (ub, _) = uboot(&ws, 100_000);
    (ws, bases, ub)
}

/// `kiln build` with the base and loader but no k3s override: k3s comes from the release.
fn build_from_release(
    ws: &Workspace,
    nodes: &[&str],
    base: &Path,
    ub: &Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec!["build".to_string()];
    args.extend(nodes.iter().map(|s| s.to_string()));
    args.extend([
        "--artifact".to_string(),
        format!("base={}", base.display()),
        "--artifact".to_string(),
        format!("uboot={}", ub.display()),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    ws.kiln(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn k3s_is_downloaded_verified_cached_and_installed_like_the_installer() {
    let rel = Release::start(VERSION_PATH);
    let (ws, bases, ub) = release_workspace("k3s-release", &rel);
    let o = build_from_release(
        &ws,
        &["rk1-1", "rk1-4", "pi5-staging"],
        &bases.tar,
        &ub,
        &[],
    );
    assert_ok(&o, "build from the release");
    assert!(stdout(&o).contains("k3s v1.33.5+k3s1"), "{}", stdout(&o));

    // The `+` travels encoded; each asset fetched once for the shared architecture.
    let hits = rel.hits();
    let paths: Vec<&str> = hits.iter().map(|h| h.path.as_str()).collect();
    for asset in [
        "sha256sum-arm64.txt",
        "k3s-arm64",
        "k3s-airgap-images-arm64.tar.zst",
    ] {
        let want = format!("/{VERSION_PATH}/{asset}");
        assert_eq!(
            paths.iter().filter(|p| **p == want).count(),
            1,
            "{want} not fetched exactly once: {paths:?}"
        );
    }

    let bin = standin_binary();
    let img_bytes = standin_images();
    for node in ["rk1-1", "rk1-4", "pi5-staging"] {
        let img = ws.path(&format!("out/{node}.img"));
        let off = root_offset(&img);
        let k3s = dump(&img, off, "/usr/local/bin/k3s", &ws.dir).expect("k3s installed");
        assert_eq!(sha256(&k3s), sha256(&bin), "{node}: k3s binary differs");
        assert_eq!(stat(&img, off, "/usr/local/bin/k3s"), (0o755, 0, 0));
        for tool in ["kubectl", "crictl", "ctr"] {
            assert_eq!(
                link_target(&img, off, &format!("/usr/local/bin/{tool}")),
                "/usr/local/bin/k3s",
                "{node}: {tool}"
            );
        }
        let images = dump(
            &img,
            off,
            "/var/lib/rancher/k3s/agent/images/k3s-airgap-images-arm64.tar.zst",
            &ws.dir,
        )
        .expect("airgap images installed");
        assert_eq!(sha256(&images), sha256(&img_bytes), "{node}: images differ");

        // The unit for the role; k3s is not enabled until first boot wrote its config.
        let (unit, other) = if node == "rk1-4" {
            ("k3s-agent.service", "k3s.service")
        } else {
            ("k3s.service", "k3s-agent.service")
        };
        let u = cat(&img, off, &format!("/etc/systemd/system/{unit}"));
        assert!(
            u.contains("After=") && u.contains("time-sync.target"),
            "{u}"
        );
        assert!(u.contains("kiln-firstboot.service"), "{u}");
        assert!(
            u.contains(if node == "rk1-4" {
                "k3s agent"
            } else {
                "k3s server"
            }),
            "{u}"
        );
        assert!(!exists(&img, off, &format!("/etc/systemd/system/{other}")));
        assert!(!exists(
            &img,
            off,
            &format!("/etc/systemd/system/multi-user.target.wants/{unit}")
        ));
        // What is enabled: first boot, networkd, timesyncd and kiln's bounded wait for the first
        // NTP answer (not systemd's unbounded one).
        for (wants, unit, target) in [
            (
                "multi-user.target.wants",
                "kiln-firstboot.service",
                "/etc/systemd/system/kiln-firstboot.service",
            ),
            (
                "sysinit.target.wants",
                "kiln-time-wait.service",
                "/etc/systemd/system/kiln-time-wait.service",
            ),
            (
                "sysinit.target.wants",
                "systemd-timesyncd.service",
                "/usr/lib/systemd/system/systemd-timesyncd.service",
            ),
        ] {
            assert_eq!(
                link_target(&img, off, &format!("/etc/systemd/system/{wants}/{unit}")),
                target,
                "{node}: {unit} not enabled"
            );
        }
        assert!(!exists(
            &img,
            off,
            "/etc/systemd/system/sysinit.target.wants/systemd-time-wait-sync.service"
        ));
        // Day two: the boot partition is mounted by PARTUUID, and every kernel hook runs
        // kiln-boot-sync with the board's data.
        let fstab = cat(&img, off, "/etc/fstab");
        assert!(
            fstab.contains("\t/boot/firmware\tvfat\t") && fstab.contains("PARTUUID="),
            "{fstab}"
        );
        assert!(exists(&img, off, "/boot/firmware"));
        for hook in [
            "/etc/kernel/postinst.d/zz-kiln-boot-sync",
            "/etc/kernel/postrm.d/zz-kiln-boot-sync",
            "/etc/initramfs/post-update.d/zz-kiln-boot-sync",
        ] {
            assert!(
                cat(&img, off, hook).contains("exec /usr/lib/kiln/kiln-boot-sync"),
                "{node}: {hook}"
            );
        }
        // apt itself reads the Post-Invoke hook (syntax checked by apt-config).
        let hook = cat(&img, off, "/etc/apt/apt.conf.d/99kiln-boot-sync");
        let conf = ws.dir.join(format!("{node}-apt.conf"));
        std::fs::write(&conf, &hook).unwrap();
        let o = std::process::Command::new("apt-config")
            .arg("-c")
            .arg(&conf)
            .arg("dump")
            .output()
            .unwrap();
        assert!(
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("/usr/lib/kiln/kiln-boot-sync"),
            "{node}: apt does not read the hook: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let env = cat(&img, off, "/etc/kiln/boot.env");
        assert!(
            env.contains(if node.starts_with("pi5") {
                "KILN_BOOT_STYLE='rpi-firmware'"
            } else {
                "KILN_BOOT_STYLE='extlinux'"
            }) && env.contains("KILN_CMDLINE='root=PARTUUID="),
            "{env}"
        );
        assert!(exists(&img, off, "/usr/lib/clock-epoch"));
        let ntp = cat(&img, off, "/etc/systemd/timesyncd.conf.d/50-kiln.conf");
        assert!(ntp.contains("NTP=192.168.100.1 pool.ntp.org"), "{ntp}");
        let fb = dump(&img, off, "/usr/lib/kiln/kiln-firstboot.sh", &ws.dir).unwrap();
        assert_eq!(
            fb,
            std::fs::read(repo().join("firstboot/kiln-firstboot.sh")).unwrap()
        );
        assert_eq!(stat(&img, off, "/usr/lib/kiln/kiln-join.sh").0, 0o755);
    }

    // A second build downloads nothing: the release's files come from the cache.
    let before = rel.hits().len();
    let o = build_from_release(&ws, &["rk1-2"], &bases.tar, &ub, &[]);
    assert_ok(&o, "rebuild from the cache");
    assert_eq!(
        rel.hits().len(),
        before,
        "a cached release was fetched again"
    );
}

#[test]
fn a_tampered_download_is_refused_and_nothing_is_cached() {
    let rel = Release::start(VERSION_PATH);
    rel.replace("/k3s-arm64", b"#!/bin/sh\necho tampered\n".to_vec());
    let (ws, bases, ub) = release_workspace("k3s-tampered", &rel);
    let o = build_from_release(&ws, &["rk1-1"], &bases.tar, &ub, &[]);
    assert!(!o.status.success(), "a tampered k3s was accepted");
    let err = stderr(&o);
    assert!(
        err.contains("sha256 mismatch")
            && err.contains("k3s-arm64")
            && err.contains("nothing was cached"),
        "{err}"
    );
    assert!(!ws.path("out/rk1-1.img").exists());
    let cached: Vec<_> = std::fs::read_dir(ws.path("cache/sha256"))
        .map(|d| d.filter_map(|e| e.ok()).collect())
        .unwrap_or_default();
    assert!(
        cached
            .iter()
            .all(|e| e.file_name().to_string_lossy() != sha256(b"#!/bin/sh\necho tampered\n")),
        "the tampered file was cached"
    );
    let partial: Vec<_> = std::fs::read_dir(ws.path("cache/partial"))
        .map(|d| d.filter_map(|e| e.ok()).collect())
        .unwrap_or_default();
    assert!(partial.is_empty(), "a tampered partial download was kept");

    // The genuine file is accepted afterwards.
    rel.replace("/k3s-arm64", standin_binary());
    let o = build_from_release(&ws, &["rk1-1"], &bases.tar, &ub, &[]);
    assert_ok(&o, "build after the release was fixed");
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    let rel = Release::start(VERSION_PATH);
    let total = standin_images().len();
    *rel.cut_after.lock().unwrap() = Some(("k3s-airgap-images-arm64.tar.zst".into(), total / 2));
    let (ws, bases, ub) = release_workspace("k3s-resume", &rel);
    let o = build_from_release(&ws, &["rk1-1"], &bases.tar, &ub, &[]);
    assert!(!o.status.success(), "a cut download passed");
    assert!(stderr(&o).contains("run again to resume"), "{}", stderr(&o));
    assert!(!ws.path("out/rk1-1.img").exists());

    let o = build_from_release(&ws, &["rk1-1"], &bases.tar, &ub, &[]);
    assert_ok(&o, "resumed build");
    let resumed = rel
        .hits()
        .into_iter()
        .filter(|h| h.path.ends_with("k3s-airgap-images-arm64.tar.zst"))
        .nth(1)
        .expect("a second request for the images");
    assert_eq!(
        resumed.range.as_deref(),
        Some(format!("bytes={}-", total / 2).as_str())
    );
    assert_eq!(resumed.status, 206);
    let img = ws.path("out/rk1-1.img");
    let images = dump(
        &img,
        root_offset(&img),
        "/var/lib/rancher/k3s/agent/images/k3s-airgap-images-arm64.tar.zst",
        &ws.dir,
    )
    .unwrap();
    assert_eq!(sha256(&images), sha256(&standin_images()));
}

fn token(ws: &Workspace, cluster: &str) -> String {
    std::fs::read_to_string(ws.path(&format!("secrets/{cluster}.token")))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn secrets_are_root_only_in_the_root_filesystem_and_nowhere_else() {
    let ws = Workspace::new("secrets");
    let bases = make_bases(&ws.dir);
    let (ub, _) = uboot(&ws, 100_000);
    let o = build(
        &ws,
        &["rk1-1", "rk1-2", "rk1-4", "pi5-staging"],
        &bases.tar,
        Some(&ub),
    );
    assert_ok(&o, "build");
    let mut passwords = Vec::new();
    for (node, cluster) in [
        ("rk1-1", "production"),
        ("rk1-2", "production"),
        ("rk1-4", "production"),
        ("pi5-staging", "staging"),
    ] {
        let tok = token(&ws, cluster);
        let img = ws.path(&format!("out/{node}.img"));
        let off = root_offset(&img);
        assert_eq!(stat(&img, off, "/etc/kiln/token"), (0o600, 0, 0), "{node}");
        assert_eq!(cat(&img, off, "/etc/kiln/token").trim(), tok, "{node}");
        assert_eq!(stat(&img, off, "/etc/rancher/node").0, 0o700, "{node}");
        assert_eq!(
            stat(&img, off, "/etc/rancher/node/password"),
            (0o600, 0, 0),
            "{node}"
        );
        let pw = cat(&img, off, "/etc/rancher/node/password")
            .trim()
            .to_string();
        assert_eq!(pw.len(), 64, "{node}: {pw}");
        assert!(!pw.contains(&tok));
        passwords.push(pw);

        // Not on the FAT partition, which any machine can read.
        let fat = fat_bytes(&img);
        assert!(
            !fat.windows(tok.len()).any(|w| w == tok.as_bytes()),
            "{node}: token bytes on the boot partition"
        );
        let j = mcopy(&img, sfdisk(&img).1[0].start, "kiln.json");
        assert!(!String::from_utf8_lossy(&j).contains(&tok));
        let insp = ws.kiln(&["inspect", "--json", img.to_str().unwrap()]);
        assert_ok(&insp, "inspect");
        assert!(!stdout(&insp).contains(&tok) && !stderr(&insp).contains(&tok));

        // No SSH host keys (the base had one), and no machine ID shared by every node.
        let ssh = debugfs(&img, off, "ls -l /etc/ssh");
        assert!(
            !ssh.contains("ssh_host_"),
            "{node}: host keys in the image:\n{ssh}"
        );
        assert_eq!(cat(&img, off, "/etc/machine-id"), "", "{node}");
        let dropin = cat(
            &img,
            off,
            "/etc/systemd/system/ssh.service.d/50-kiln-host-keys.conf",
        );
        assert!(dropin.contains("ssh-keygen -A"));
    }
    // Never in the build's own output.
    for tok in [token(&ws, "production"), token(&ws, "staging")] {
        assert!(!stdout(&o).contains(&tok) && !stderr(&o).contains(&tok));
    }
    // Distinct per node.
    let mut uniq = passwords.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), passwords.len(), "node passwords repeat");

    // Stable across rebuilds (in another directory): a reimaged node presents the same one.
    let o = ws.kiln(
        &{
            let mut a = vec![
                "build".to_string(),
                "rk1-1".into(),
                "--rejoin".into(),
                "--out".into(),
                "again".into(),
                "--artifact".into(),
                format!("base={}", bases.tar.display()),
                "--artifact".into(),
                format!("uboot={}", ub.display()),
            ];
            a.extend(ws.k3s_args());
            a
        }
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert_ok(&o, "rebuild");
    let img = ws.path("again/rk1-1.img");
    let pw = cat(&img, root_offset(&img), "/etc/rancher/node/password");
    assert_eq!(pw.trim(), passwords[0]);
}

#[test]
fn a_bad_token_file_is_named_without_showing_the_token() {
    let ws = Workspace::new("badtoken");
    let bases = make_bases(&ws.dir);
    std::fs::write(ws.path("secrets/staging.token"), "short\"q\n").unwrap();
    let o = build(&ws, &["pi5-staging"], &bases.tar, None);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("staging.token"), "{err}");
    assert!(!err.contains("short\"q"), "the token was printed: {err}");
    assert!(!ws.path("out/pi5-staging.img").exists());
}

fn node_env(img: &Path) -> String {
    cat(img, root_offset(img), "/etc/kiln/node.env")
}

#[test]
fn join_inputs_follow_the_inventory_and_rejoin_images_never_initialise() {
    let ws = Workspace::new("join-inputs");
    let bases = make_bases(&ws.dir);
    let (ub, _) = uboot(&ws, 100_000);
    assert_ok(
        &build(
            &ws,
            &["rk1-1", "rk1-3", "rk1-4", "pi5-staging"],
            &bases.tar,
            Some(&ub),
        ),
        "build",
    );
    let e = node_env(&ws.path("out/rk1-1.img"));
    for line in [
        "KILN_NODE=rk1-1",
        "KILN_IP=192.168.100.11",
        "KILN_ROLE=server",
        "KILN_BOOTSTRAP=1",
        "KILN_MODE=init",
        "KILN_PEERS=\"192.168.100.12 192.168.100.13\"",
    ] {
        assert!(e.lines().any(|l| l == line), "rk1-1: no `{line}` in\n{e}");
    }
    let e = node_env(&ws.path("out/rk1-3.img"));
    assert!(
        e.contains("KILN_BOOTSTRAP=0")
            && e.contains("KILN_PEERS=\"192.168.100.11 192.168.100.12\""),
        "{e}"
    );
    let e = node_env(&ws.path("out/rk1-4.img"));
    assert!(
        e.contains("KILN_ROLE=agent")
            && e.contains("KILN_PEERS=\"192.168.100.11 192.168.100.12 192.168.100.13\""),
        "{e}"
    );
    let e = node_env(&ws.path("out/pi5-staging.img"));
    assert!(
        e.contains("KILN_PEERS=\"\"") && e.contains("KILN_BOOTSTRAP=1"),
        "{e}"
    );

    // --rejoin: the same node, told never to initialise; the identity says so too.
    let mut a = vec!["build", "rk1-1", "--rejoin", "--out", "rejoin"];
    let base = format!("base={}", bases.tar.display());
    let ubs = format!("uboot={}", ub.display());
    a.extend(["--artifact", &base, "--artifact", &ubs]);
    let k = ws.k3s_args();
    a.extend(k.iter().map(String::as_str));
    let o = ws.kiln(&a);
    assert_ok(&o, "build --rejoin");
    let img = ws.path("rejoin/rk1-1.img");
    let env = node_env(&img);
    assert!(env.lines().any(|l| l == "KILN_MODE=rejoin"), "{env}");
    let id: serde_json::Value =
        serde_json::from_slice(&mcopy(&img, sfdisk(&img).1[0].start, "kiln.json")).unwrap();
    assert_eq!(id["join"], "rejoin");

    // Run the image's own join script with its own inputs, every peer down and no init wait:
    // the rejoin image keeps waiting; the init image initialises.
    for (image, expect_init) in [(ws.path("out/rk1-1.img"), true), (img, false)] {
        let dir = ws.path("run");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let off = root_offset(&image);
        let script = dir.join("kiln-join.sh");
        std::fs::write(
            &script,
            dump(&image, off, "/usr/lib/kiln/kiln-join.sh", &dir).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.join("node.env"), node_env(&image)).unwrap();
        let o = std::process::Command::new("timeout")
            .args(["3", "dash", "-c"])
            .arg(format!(
                "set -a; . {d}/node.env; KILN_INIT_WAIT=0 KILN_RETRY_INTERVAL=1 KILN_PROBE=false exec dash {d}/kiln-join.sh",
                d = dir.display()
            ))
            .output()
            .unwrap();
        let out = stdout(&o);
        if expect_init {
            assert!(
                o.status.success() && out.trim() == "init",
                "{out}\n{}",
                stderr(&o)
            );
        } else {
            assert_eq!(
                o.status.code(),
                Some(124),
                "rejoin image stopped waiting: {out}"
            );
            assert!(!out.contains("init"), "rejoin image initialised: {out}");
        }
    }
}

/// Stand-ins (test doubles) for the system tools first boot calls, recording each call.
fn fake_tools(dir: &Path, fail_systemctl: bool) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = dir.join("calls.log");
    let tool = |name: &str, body: &str| {
        let p = bin.join(name);
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\n# TEST DOUBLE for {name}\necho \"{name} $*\" >> {}\n{body}\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    };
    tool("stat", "echo 254:2");
    tool("growpart", "exit 0");
    tool("resize2fs", "exit 0");
    tool("curl", "exit 7");
    tool(
        "systemctl",
        if fail_systemctl { "exit 1" } else { "exit 0" },
    );
    bin
}

#[test]
fn first_boot_is_idempotent_step_by_step() {
    let ws = Workspace::new("firstboot");
    let root = ws.path("root");
    let sys = ws.path("sys");
    // A sysfs shaped like a virtio disk: /sys/dev/block/254:2 -> .../vda/vda2.
    std::fs::create_dir_all(sys.join("devices/virtual/block/vda/vda2")).unwrap();
    std::fs::write(sys.join("devices/virtual/block/vda/vda2/partition"), "2\n").unwrap();
    std::fs::create_dir_all(sys.join("dev/block")).unwrap();
    std::os::unix::fs::symlink(
        "../../devices/virtual/block/vda/vda2",
        sys.join("dev/block/254:2"),
    )
    .unwrap();
    for d in ["etc/kiln", "etc/ssh", "usr/lib/kiln"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(
        root.join("etc/kiln/node.env"),
        "KILN_NODE=pi5-staging\nKILN_IP=192.168.100.10\nKILN_ROLE=server\nKILN_BOOTSTRAP=1\nKILN_MODE=init\nKILN_PEERS=\"\"\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/kiln/token"), "staging-token-0123456789\n").unwrap();
    // A power cut during an earlier key generation left an empty key.
    std::fs::write(root.join("etc/ssh/ssh_host_ed25519_key"), "").unwrap();

    let run_once = |fail_systemctl: bool| {
        let bin = fake_tools(&ws.dir, fail_systemctl);
        std::process::Command::new("dash")
            .arg(repo().join("firstboot/kiln-firstboot.sh"))
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .env("KILN_ROOT", &root)
            .env("KILN_SYS", &sys)
            .env("KILN_LIB", repo().join("firstboot"))
            .output()
            .unwrap()
    };
    // First run: k3s cannot be enabled (power cut, broken systemctl): it fails after step 3.
    let o = run_once(true);
    assert!(!o.status.success(), "{}", stderr(&o));
    let calls = std::fs::read_to_string(ws.path("calls.log")).unwrap();
    assert!(calls.contains("growpart /dev/vda 2"), "{calls}");
    assert!(calls.contains("resize2fs /dev/vda2"), "{calls}");
    let key = std::fs::read(root.join("etc/ssh/ssh_host_ed25519_key")).unwrap();
    assert!(!key.is_empty(), "the empty host key was not replaced");
    let cfg = root.join("etc/rancher/k3s/config.yaml");
    let c = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        c.contains("cluster-init: true") && c.contains("node-name: pi5-staging"),
        "{c}"
    );
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cfg).unwrap().permissions())
            & 0o777,
        0o600
    );
    assert!(!root.join("var/lib/kiln/firstboot.done").exists());

    // Second run: the finished steps are skipped, the rest completes.
    std::fs::remove_file(ws.path("calls.log")).unwrap();
    let o = run_once(false);
    assert_ok(&o, "second first-boot run");
    let err = stderr(&o);
    for s in ["grow-root", "ssh-host-keys", "join-config"] {
        assert!(
            err.contains(&format!("step {s}: done on an earlier boot")),
            "{err}"
        );
    }
    let calls = std::fs::read_to_string(ws.path("calls.log")).unwrap();
    assert!(!calls.contains("growpart"), "grew again: {calls}");
    assert!(calls.contains("systemctl enable k3s.service"), "{calls}");
    assert!(
        calls.contains("systemctl start --no-block k3s.service"),
        "{calls}"
    );
    assert_eq!(
        std::fs::read(root.join("etc/ssh/ssh_host_ed25519_key")).unwrap(),
        key
    );
    assert!(root.join("var/lib/kiln/firstboot.done").exists());
    assert!(
        !err.contains("staging-token"),
        "the token reached the log: {err}"
    );
}

#[test]
fn a_missing_bootstrapper_or_binfmt_handler_is_named_with_its_fix() {
    let ws = Workspace::new("preflight");
    let (ub, _) = uboot(&ws, 100_000);
    let mut args = vec![
        "build".to_string(),
        "rk1-1".into(),
        "--artifact".into(),
        format!("uboot={}", ub.display()),
    ];
    args.extend(ws.k3s_args());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();

    // No mmdebstrap on PATH (an empty directory; mke2fs is found by its full path check).
    let empty = ws.path("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let sbin = format!("{}:/usr/sbin:/sbin", empty.display());
    let o = ws.kiln_env(&argv, &[("PATH", &sbin)]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("mmdebstrap is not installed") && err.contains("apt-get install mmdebstrap"),
        "{err}"
    );

    // mmdebstrap present, but no qemu-aarch64 handler registered (an empty binfmt_misc).
    // Only a foreign architecture needs one; on an arm64 host this would really bootstrap.
    if std::env::consts::ARCH == "x86_64" {
        let binfmt = ws.path("binfmt_misc");
        std::fs::create_dir_all(&binfmt).unwrap();
        let o = ws.kiln_env(&argv, &[("KILN_BINFMT_DIR", binfmt.to_str().unwrap())]);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(
            err.contains("qemu-aarch64") && err.contains("apt-get install qemu-user-static"),
            "{err}"
        );
    }
    assert!(!ws.path("out/rk1-1.img").exists());
    assert!(
        std::fs::read_dir(ws.path("cache/bases"))
            .map(|d| d
                .filter_map(|e| e.ok())
                .all(|e| !e.file_name().to_string_lossy().ends_with(".tar.zst")))
            .unwrap_or(true),
        "a base was cached without being built"
    );
}
