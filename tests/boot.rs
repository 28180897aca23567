//! Slow tier: proof of boot. Images kiln writes from the real Debian bases boot under QEMU
//! (software emulation, no KVM), configure themselves on first boot and start k3s with the
//! configuration the join decision chose.
//!
//! k3s itself is replaced by a stand-in (tests/standin/k3s, a TEST DOUBLE that answers /ping on
//! 6443 and reports its configuration) and NTP by another (tests/standin/sntp.py). Guests are
//! reached only through the serial console, ports forwarded on 127.0.0.1, or a network
//! namespace the test creates; no guest traffic leaves the machine.

mod common;

use common::disk::*;
use common::k3s::sha256;
use common::*;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const UBOOT_QEMU: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";
/// Disk size the tests give each VM: the image is smaller, so first boot must grow the root.
const DISK: u64 = 3 << 30;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A QEMU guest whose serial console goes to a file; killed when dropped.
struct Vm {
    name: String,
    child: std::cell::RefCell<Child>,
    serial: PathBuf,
    /// Byte offset in the serial log where this boot's output starts.
    from: usize,
    started: Instant,
}

impl Vm {
    fn start(name: &str, serial: &Path, args: &[String]) -> Vm {
        let mut argv = vec!["qemu-system-aarch64".to_string()];
        argv.extend_from_slice(args);
        Vm::start_with(name, serial, &argv)
    }

    /// `argv`: the QEMU command, possibly behind a prefix such as `ip netns exec NS`.
    fn start_with(name: &str, serial: &Path, argv: &[String]) -> Vm {
        let from = std::fs::metadata(serial)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        let q = argv
            .iter()
            .position(|a| a.starts_with("qemu-system-"))
            .expect("a qemu-system-* command");
        let mut all: Vec<String> = argv[..=q].to_vec();
        // arm64 boards on `virt`; x86 on q35 (the args bring its UEFI firmware).
        if argv[q] == "qemu-system-x86_64" {
            all.extend(["-M".into(), "q35".into()]);
        } else {
            all.extend(["-M".into(), "virt".into(), "-cpu".into(), "max".into()]);
        }
        all.extend([
            "-m".into(),
            "1024".into(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            "-no-reboot".into(),
            "-chardev".into(),
            format!("file,id=s0,path={},append=on", serial.display()),
            "-serial".into(),
            "chardev:s0".into(),
        ]);
        all.extend_from_slice(&argv[q + 1..]);
        let child = Command::new(&all[0])
            .args(&all[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-system-aarch64/x86_64 (qemu-system-arm, qemu-system-x86; .ci/run installs them)");
        Vm {
            name: name.to_string(),
            child: std::cell::RefCell::new(child),
            serial: serial.to_path_buf(),
            from,
            started: Instant::now(),
        }
    }

    /// This boot's console output so far.
    fn log(&self) -> String {
        let b = std::fs::read(&self.serial).unwrap_or_default();
        String::from_utf8_lossy(&b[self.from.min(b.len())..]).into_owned()
    }

    fn tail(&self, n: usize) -> String {
        let l = self.log();
        let lines: Vec<&str> = l.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits until the console shows `pat`. Fails early, with the reason, on a console line
    /// that means the boot cannot succeed, or if QEMU exits.
    fn wait_for(&self, pat: &str, timeout: Duration) -> Result<Duration, String> {
        const FATAL: &[&str] = &[
            "Dropping to a shell",
            "Kernel panic",
            "ALERT!",
            "Gave up waiting for root",
            "Failed to start kiln-firstboot.service",
            "No bootable device",
            "Unable to mount root",
        ];
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(pat) || without_console_records(&log).contains(pat) {
                return Ok(self.started.elapsed());
            }
            if let Some(f) = FATAL.iter().find(|f| log.contains(*f)) {
                let line = log.lines().find(|l| l.contains(f)).unwrap_or(f).trim();
                return Err(format!(
                    "{}: boot failed before `{pat}`: console says `{line}`",
                    self.name
                ));
            }
            let mut child = self.child.borrow_mut();
            if let Ok(Some(st)) = child.try_wait() {
                let mut err = String::new();
                if let Some(e) = child.stderr.as_mut() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!(
                    "{}: QEMU exited ({st}) before `{pat}`: {}",
                    self.name,
                    err.trim()
                ));
            }
            drop(child);
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: no `{pat}` on the console within {} s",
                    self.name,
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits for QEMU to exit (after a poweroff inside the guest).
    fn wait_exit(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.borrow_mut().try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(format!(
            "{}: did not power off within {} s",
            self.name,
            timeout.as_secs()
        ))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let c = self.child.get_mut();
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The console log without the records the kernel and systemd write straight to the console
/// (kernel messages `[  12.345678] ...`, systemd's `[  OK  ] ...`, `Starting ...` and job
/// lines). They bypass the tty that getty writes through, so one can land in the middle of
/// the `NAME login:` prompt (the console logs show them right after it); each runs to the end
/// of its line, so cutting it out joins the prompt again.
fn without_console_records(log: &str) -> String {
    fn record_at(s: &str) -> bool {
        if s.starts_with("[\x1b[")
            || s.starts_with("\x1b[K[")
            || s.starts_with("         Starting ")
        {
            return true;
        }
        // `[`, spaces, digits, `.`, digits, `]`: a kernel timestamp.
        let Some(rest) = s.strip_prefix('[') else {
            return false;
        };
        let rest = rest.trim_start_matches(' ');
        let (secs, rest) = rest.split_at(rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(0));
        let Some(rest) = rest.strip_prefix('.') else {
            return false;
        };
        let frac = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(0);
        !secs.is_empty() && frac > 0 && rest[frac..].starts_with(']')
    }
    let mut out = String::with_capacity(log.len());
    let mut i = 0;
    while i < log.len() {
        let rest = &log[i..];
        if record_at(rest) {
            i += rest.find('\n').map_or(rest.len(), |n| n + 1);
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

#[test]
fn a_prompt_cut_by_a_console_record_is_found_again() {
    let log = "Debian GNU/Linux 13 pi5-staging ttyAMA0\n\npi5-stag[   39.958197] kiln-firstboot.sh[349]: step\r\ning lo[\x1b[0;32m  OK  \x1b[0m] Started x.\ngin: ";
    assert!(!log.contains("pi5-staging login:"));
    assert!(without_console_records(log).contains("pi5-staging login:"));
    // Text that only looks like a record start is kept.
    assert_eq!(
        without_console_records("a [1] b [x.y] c"),
        "a [1] b [x.y] c"
    );
}

/// Panics with `msg` and the last console lines of every VM.
fn fail(vms: &[&Vm], msg: &str) -> ! {
    let mut s = format!("{msg}\n");
    // The VM the message names first: CI keeps only part of a long failure.
    let mut vms = vms.to_vec();
    vms.sort_by_key(|v| !msg.starts_with(&format!("{}:", v.name)));
    for v in vms {
        s.push_str(&format!(
            "\n----- last console lines of {} -----\n{}\n",
            v.name,
            v.tail(40)
        ));
    }
    panic!("{s}");
}

fn must<T>(vms: &[&Vm], r: Result<T, String>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => fail(vms, &e),
    }
}

/// A background helper process (the SNTP stand-in); killed when dropped.
struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sntp(prefix: &[&str], addr: &str) -> Helper {
    let script = repo().join("tests/standin/sntp.py");
    let mut argv: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
    argv.extend(["python3".into(), script.display().to_string(), addr.into()]);
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 for the SNTP stand-in");
    std::thread::sleep(Duration::from_millis(300));
    Helper(child)
}

/// Workspace for booting: root's SSH key for the tests, the stand-in k3s, and an overlay that
/// lets the stand-in signal readiness from a child process (k3s.service is Type=notify).
struct BootWs {
    ws: Workspace,
    key: PathBuf,
    rk1_base: String,
    rpi5_base: String,
    uboot: PathBuf,
    images: PathBuf,
}

fn boot_workspace(name: &str) -> BootWs {
    let ws = Workspace::new(name);
    let key = ws.path("id_test");
    assert_ok(
        &run(
            "ssh-keygen",
            &["-q", "-t", "ed25519", "-N", "", "-f", key.to_str().unwrap()],
        ),
        "ssh-keygen",
    );
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    for unit in ["k3s.service", "k3s-agent.service"] {
        let d = ws.path(&format!("overlays/k3s-standin/etc/systemd/system/{unit}.d"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("50-standin.conf"),
            "# TEST DOUBLE support: the k3s stand-in notifies from a child process.\n[Service]\nNotifyAccess=all\n",
        )
        .unwrap();
    }
    let inv = std::fs::read_to_string(ws.path("kiln.toml")).unwrap();
    let inv = inv
        .replace(
            "overlays = [\"hardening\"]",
            "overlays = [\"hardening\", \"k3s-standin\"]",
        )
        .replace(
            "ssh_authorized_keys = []",
            &format!("ssh_authorized_keys = [\"{}\"]", pubkey.trim()),
        );
    std::fs::write(ws.path("kiln.toml"), inv).unwrap();
    // The clusters' CAs and pinned tokens, as `kiln secrets init` makes them for a new cluster.
    for c in ["staging", "production"] {
        std::fs::remove_file(ws.path(&format!("secrets/{c}.token"))).unwrap();
    }
    assert_ok(&ws.kiln(&["secrets", "init"]), "secrets init");
    sign_standin_serving_cert(&ws);
    let (uboot, _) = uboot(&ws, 200_000);
    let images = ws.path("standin-images.tar.zst");
    std::fs::write(&images, common::k3s::standin_images()).unwrap();
    let rk1_base = real_base(&ws, "rk1");
    let rpi5_base = real_base(&ws, "rpi5");
    BootWs {
        ws,
        key,
        rk1_base,
        rpi5_base,
        uboot,
        images,
    }
}

/// The certificate a joined production server's k3s stand-in serves: signed here with the
/// cluster's server CA (a real joined server's k3s signs its own with the CA it takes from the
/// datastore), naming every production address.
fn sign_standin_serving_cert(ws: &Workspace) {
    let (crt, key) = serving_cert(
        &ws.dir,
        "serving",
        Some(&ws.path("secrets/production.ca")),
        "IP:192.168.100.11,IP:192.168.100.12,IP:192.168.100.13,IP:192.168.100.14",
    );
    let d = ws.path("overlays/k3s-standin/usr/lib/k3s-standin");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(crt, d.join("serving.crt")).unwrap();
    std::fs::copy(key, d.join("serving.key")).unwrap();
}

impl BootWs {
    fn build(&self, node: &str, out: &str, extra: &[&str]) -> PathBuf {
        let x86;
        let base = if node.starts_with("pi5") {
            &self.rpi5_base
        } else if node.starts_with("x86") {
            // Built (natively) only by the test that boots it; cached by recipe.
            x86 = real_base(&self.ws, "x86-uefi");
            &x86
        } else {
            &self.rk1_base
        };
        let mut args = vec![
            "build".to_string(),
            node.into(),
            "--out".into(),
            out.into(),
            "--artifact".into(),
            format!("base={base}"),
            "--artifact".into(),
            format!("uboot={}", self.uboot.display()),
            "--artifact".into(),
            format!("k3s={}", repo().join("tests/standin/k3s").display()),
            "--artifact".into(),
            format!("k3s-images={}", self.images.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = self
            .ws
            .kiln(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_ok(&o, &format!("build {node}"));
        self.ws.path(&format!("{out}/{node}.img"))
    }

    /// A VM disk: a sparse copy of the image, grown as a bigger eMMC or NVMe would be.
    fn disk(&self, img: &Path, name: &str) -> PathBuf {
        let d = self.ws.path(&format!("{name}.disk"));
        assert_ok(
            &run(
                "cp",
                &[
                    "--sparse=always",
                    img.to_str().unwrap(),
                    d.to_str().unwrap(),
                ],
            ),
            "cp",
        );
        let f = std::fs::OpenOptions::new().write(true).open(&d).unwrap();
        f.set_len(DISK).unwrap();
        d
    }

    /// Options for ssh and scp: the test key, no host-key checks (every boot makes new keys).
    fn ssh_opts(&self) -> Vec<String> {
        [
            "-i",
            self.key.to_str().unwrap(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn ssh(&self, port: u16, cmd: &str) -> Result<String, String> {
        let o = Command::new("ssh")
            .args(self.ssh_opts())
            .args(["-p", &port.to_string(), "root@127.0.0.1", cmd])
            .output()
            .map_err(|e| format!("ssh: {e}"))?;
        if !o.status.success() {
            return Err(format!("ssh `{cmd}` failed: {}", stderr(&o)));
        }
        Ok(stdout(&o))
    }

    /// Waits until sshd answers: the login prompt can come before it listens (on first boot
    /// `ssh-keygen -A` runs before sshd starts, and RSA keys take a while under TCG); until
    /// then QEMU's forwarder accepts and resets the connection.
    fn wait_ssh(&self, port: u16, timeout: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            match self.ssh(port, "true") {
                Ok(_) => return Ok(start.elapsed()),
                Err(e) if start.elapsed() >= timeout => {
                    return Err(format!(
                        "sshd did not answer within {} s: {e}",
                        timeout.as_secs()
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_secs(2)),
            }
        }
    }
}

/// QEMU arguments for a user-mode network shaped like ServerLAN: the guest keeps its static
/// address, the gateway is this machine (SNTP stand-in on loopback), and only SSH and 6443 are
/// forwarded, to 127.0.0.1.
fn user_net(ip: &str, ssh: u16, api: u16, mac: u8) -> Vec<String> {
    vec![
        "-netdev".into(),
        format!(
            "user,id=n0,net=192.168.100.0/24,host=192.168.100.1,dns=192.168.100.3,\
             hostfwd=tcp:127.0.0.1:{ssh}-{ip}:22,hostfwd=tcp:127.0.0.1:{api}-{ip}:6443"
        ),
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,mac=52:54:00:00:64:{mac:02x}"),
    ]
}

/// RK1 image as flashed: QEMU's U-Boot finds extlinux.conf on the bootable partition.
fn rk1_args(disk: &Path) -> Vec<String> {
    vec![
        "-smp".into(),
        "2".into(),
        "-bios".into(),
        UBOOT_QEMU.into(),
        "-drive".into(),
        format!("file={},if=virtio,format=raw", disk.display()),
    ]
}

/// Pi 5 image: kernel, initramfs and command line from its own FAT partition (QEMU has no Pi 5),
/// the console moved to virt's UART.
fn pi5_args(bw: &BootWs, img: &Path, disk: &Path) -> Vec<String> {
    let (_, parts) = sfdisk(img);
    let boot = parts[0].start;
    let kernel = bw.ws.path("pi5-kernel");
    let initrd = bw.ws.path("pi5-initrd");
    std::fs::write(&kernel, mcopy(img, boot, "kernel_2712.img")).unwrap();
    std::fs::write(&initrd, mcopy(img, boot, "initramfs_2712")).unwrap();
    let cmdline = String::from_utf8(mcopy(img, boot, "cmdline.txt"))
        .unwrap()
        .trim()
        .replace("ttyAMA10", "ttyAMA0");
    vec![
        "-smp".into(),
        "2".into(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        cmdline,
        "-drive".into(),
        format!("file={},if=virtio,format=raw", disk.display()),
    ]
}

const LOGIN_WAIT: Duration = Duration::from_secs(420);
/// First boot of a bootstrap server with peers waits up to 120 s for them before initialising.
const FIRSTBOOT_WAIT: Duration = Duration::from_secs(600);

/// Checks a running single node from outside: SSH on the forwarded port, /ping on the other.
fn check_node(bw: &BootWs, vm: &Vm, ssh: u16, api: u16, name: &str, ip: &str) -> String {
    let vms = [vm];
    let host = must(&vms, bw.ssh(ssh, "hostname"));
    assert_eq!(host.trim(), name);
    let addr = must(&vms, bw.ssh(ssh, "ip -4 -o addr show"));
    assert!(
        addr.lines().any(|l| l.contains(&format!("inet {ip}/24"))
            && l.split_whitespace()
                .nth(1)
                .is_some_and(|i| i.starts_with("en") || i.starts_with("eth"))),
        "{name}: {ip}/24 not on the wired interface:\n{addr}"
    );
    // Grown: images are built with about 1 GiB of root; the 3 GiB disk leaves it 2.4 GiB or more.
    let size: u64 = must(&vms, bw.ssh(ssh, "df -B1 --output=size / | tail -n1"))
        .trim()
        .parse()
        .unwrap();
    assert!(
        size > 2_300_000_000,
        "{name}: root is {size} bytes, not grown"
    );
    // The boot partition is mounted where the kernel hooks write (by PARTUUID, /etc/fstab).
    let mnt = must(
        &vms,
        bw.ssh(
            ssh,
            "findmnt -n -o FSTYPE /boot/firmware; ls /boot/firmware",
        ),
    );
    assert!(
        mnt.starts_with("vfat\n") && mnt.contains("kiln.json"),
        "{name}: /boot/firmware: {mnt}"
    );
    let done = must(&vms, bw.ssh(ssh, "ls /var/lib/kiln/"));
    assert!(done.contains("firstboot.done"), "{name}: {done}");
    let active = must(&vms, bw.ssh(ssh, "systemctl is-active k3s.service"));
    assert_eq!(active.trim(), "active", "{name}: k3s stand-in not running");
    let o = Command::new("curl")
        .args([
            "-sk",
            "--max-time",
            "10",
            &format!("https://127.0.0.1:{api}/ping"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        stdout(&o),
        "pong",
        "{name}: /ping through the forwarded port"
    );
    // The host key the node made for itself.
    let keys = Command::new("ssh-keyscan")
        .args(["-t", "ed25519", "-p", &ssh.to_string(), "127.0.0.1"])
        .output()
        .unwrap();
    let key = stdout(&keys);
    assert!(key.contains("ssh-ed25519"), "{name}: no host key: {key}");
    key.split_whitespace().last().unwrap_or("").to_string()
}

#[test]
#[ignore = "slow tier: boots real images under QEMU (make test)"]
fn rk1_and_pi5_images_boot_configure_themselves_and_start_k3s_once() {
    let bw = boot_workspace("boot-single");
    let ntp = sntp(&[], "127.0.0.1");
    let rk1 = bw.build("rk1-1", "out", &[]);
    let pi5 = bw.build("pi5-staging", "out", &[]);
    let rk1_disk = bw.disk(&rk1, "rk1-1");
    let pi5_disk = bw.disk(&pi5, "pi5-staging");
    let (rk1_ssh, rk1_api, pi5_ssh, pi5_api) = (free_port(), free_port(), free_port(), free_port());

    let mut args = rk1_args(&rk1_disk);
    args.extend(user_net("192.168.100.11", rk1_ssh, rk1_api, 0x11));
    let a = Vm::start("rk1-1", &bw.ws.path("rk1-1.console"), &args);
    let mut args = pi5_args(&bw, &pi5, &pi5_disk);
    args.extend(user_net("192.168.100.10", pi5_ssh, pi5_api, 0x10));
    let b = Vm::start("pi5-staging", &bw.ws.path("pi5-staging.console"), &args);

    let t_rk1 = must(&[&a, &b], a.wait_for("rk1-1 login:", LOGIN_WAIT));
    let t_pi5 = must(&[&a, &b], b.wait_for("pi5-staging login:", LOGIN_WAIT));
    // Staging has no other server: it initialises at once. rk1-1 is production's bootstrap
    // server and its peers are not running: it waits (120 s), then initialises.
    let t_pi5_k3s = must(
        &[&a, &b],
        b.wait_for("K3S-STANDIN: server node-name=pi5-staging", FIRSTBOOT_WAIT),
    );
    let t_rk1_k3s = must(
        &[&a, &b],
        a.wait_for("K3S-STANDIN: server node-name=rk1-1", FIRSTBOOT_WAIT),
    );
    eprintln!(
        "first boot: rk1-1 login {:.0} s, k3s {:.0} s; pi5-staging login {:.0} s, k3s {:.0} s",
        t_rk1.as_secs_f64(),
        t_rk1_k3s.as_secs_f64(),
        t_pi5.as_secs_f64(),
        t_pi5_k3s.as_secs_f64()
    );
    for (vm, ip) in [(&a, "192.168.100.11"), (&b, "192.168.100.10")] {
        let l = vm.log();
        let line = l
            .lines()
            .find(|x| x.contains("K3S-STANDIN: server"))
            .unwrap();
        assert!(
            line.contains(&format!("node-ip={ip}"))
                && line.contains("cluster-init=yes")
                && line.contains("server=none"),
            "{}: {line}",
            vm.name
        );
        assert!(
            l.contains("kiln-firstboot: first boot complete"),
            "{}",
            vm.name
        );
        // First boot waited for the clock, and NTP answered.
        assert!(
            l.contains("kiln-time-wait: clock synchronised by NTP after"),
            "{}: no NTP wait on first boot",
            vm.name
        );
    }
    let rk1_key = check_node(&bw, &a, rk1_ssh, rk1_api, "rk1-1", "192.168.100.11");
    let pi5_key = check_node(&bw, &b, pi5_ssh, pi5_api, "pi5-staging", "192.168.100.10");
    assert_ne!(rk1_key, pi5_key, "two nodes share an SSH host key");

    // The Pi 5's kernel hook, run by hand on the real image with its real kernel: the kernel,
    // initramfs, device trees and cmdline.txt go to k/<dir>/ and config.txt names it.
    let sync = must(
        &[&a, &b],
        bw.ssh(pi5_ssh, "/usr/lib/kiln/kiln-boot-sync 2>&1"),
    );
    assert!(sync.contains("kiln-boot-sync: staged kernel"), "{sync}");

    for (vm, port) in [(&a, rk1_ssh), (&b, pi5_ssh)] {
        let _ = bw.ssh(port, "systemctl poweroff");
        must(&[], vm.wait_exit(Duration::from_secs(180)));
    }
    // Read back from outside with mtools, as the firmware would find it.
    let (_, parts) = sfdisk(&pi5_disk);
    let fat = format!("{}@@{}", pi5_disk.display(), parts[0].start);
    let o = run("mtype", &["-i", &fat, "::config.txt"]);
    assert_ok(&o, "mtype config.txt");
    let config = stdout(&o);
    let dir = config
        .lines()
        .find_map(|l| l.strip_prefix("os_prefix="))
        .unwrap_or_else(|| panic!("no os_prefix in config.txt:\n{config}"))
        .to_string();
    assert!(
        config.contains("device_tree=bcm2712-rpi-5-b.dtb") && dir.starts_with("k/"),
        "{config}"
    );
    let o = run(
        "mdir",
        &[
            "-i",
            &fat,
            "-b",
            &format!("::{}", dir.trim_end_matches('/')),
        ],
    );
    assert_ok(&o, "mdir");
    let listed = stdout(&o);
    for f in [
        "kernel_2712.img",
        "initramfs_2712",
        "cmdline.txt",
        "bcm2712-rpi-5-b.dtb",
    ] {
        assert!(listed.contains(f), "{dir}: no {f}:\n{listed}");
    }
    let o = run("mtype", &["-i", &fat, &format!("::{dir}cmdline.txt")]);
    assert!(stdout(&o).starts_with("root=PARTUUID="), "{}", stdout(&o));

    // Second boot of the RK1, with no NTP server answering (a power cut while the internet is
    // down): first boot does not run again, and k3s starts without waiting for the clock.
    drop(ntp);
    let mut args = rk1_args(&rk1_disk);
    args.extend(user_net("192.168.100.11", rk1_ssh, rk1_api, 0x11));
    let a = Vm::start("rk1-1 (second boot)", &bw.ws.path("rk1-1.console"), &args);
    let t2 = must(
        &[&a],
        a.wait_for("K3S-STANDIN: server node-name=rk1-1", LOGIN_WAIT),
    );
    must(&[&a], a.wait_for("rk1-1 login:", LOGIN_WAIT));
    eprintln!("second boot: rk1-1 k3s at {:.0} s", t2.as_secs_f64());
    let second = a.log();
    assert!(
        !second.contains("kiln-firstboot: step"),
        "first boot ran again:\n{second}"
    );
    assert!(
        second.contains("kiln-time-wait: not the first boot; not waiting for NTP")
            && !second.contains("kiln-time-wait: clock synchronised"),
        "the second boot waited for NTP:\n{}",
        a.tail(40)
    );
    let again = check_node(&bw, &a, rk1_ssh, rk1_api, "rk1-1", "192.168.100.11");
    assert_eq!(again, rk1_key, "host key changed on the second boot");
    let _ = bw.ssh(rk1_ssh, "systemctl poweroff");
    must(&[], a.wait_exit(Duration::from_secs(180)));

    // From outside: the root partition reaches the end of the disk and its filesystem is clean.
    let (v, parts) = sfdisk(&rk1_disk);
    let last = v["partitiontable"]["lastlba"].as_u64().unwrap();
    assert_eq!(
        (parts[1].start + parts[1].size) / 512 - 1,
        last,
        "root not grown to the end"
    );
    e2fsck(&rk1_disk, &parts[1]);
}

#[test]
#[ignore = "slow tier: boots real images under QEMU (make test)"]
fn a_broken_image_fails_the_boot_test_with_a_clear_message() {
    let bw = boot_workspace("boot-broken");
    let pi5 = bw.build("pi5-staging", "out", &[]);
    // Break it: the command line names a root partition no disk has.
    let (_, parts) = sfdisk(&pi5);
    let spec = format!("{}@@{}", pi5.display(), parts[0].start);
    let cmdline = String::from_utf8(mcopy(&pi5, parts[0].start, "cmdline.txt")).unwrap();
    let start = cmdline.find("root=PARTUUID=").unwrap() + "root=PARTUUID=".len();
    let end = start + cmdline[start..].find(' ').unwrap();
    let broken = format!("{}deadbeef-02{}", &cmdline[..start], &cmdline[end..]);
    let f = bw.ws.path("cmdline.txt");
    std::fs::write(&f, broken).unwrap();
    assert_ok(
        &run(
            "mcopy",
            &["-o", "-i", &spec, f.to_str().unwrap(), "::/cmdline.txt"],
        ),
        "mcopy",
    );
    let disk = bw.disk(&pi5, "broken");
    let mut args = pi5_args(&bw, &pi5, &disk);
    args.extend(user_net("192.168.100.10", free_port(), free_port(), 0x10));
    let vm = Vm::start("pi5-staging (broken)", &bw.ws.path("broken.console"), &args);
    let err = vm
        .wait_for("pi5-staging login:", LOGIN_WAIT)
        .expect_err("an image with a wrong root PARTUUID reached login");
    eprintln!("expected failure: {err}");
    assert!(
        err.contains("boot failed") && err.contains("deadbeef-02"),
        "unclear failure: {err}"
    );
}

/// A network namespace with a bridge holding the gateway address (where the SNTP stand-in
/// listens) and one tap per VM: one L2 segment for the cluster that nothing leaves. Needs root.
struct Lan {
    ns: String,
}

impl Lan {
    fn new(name: &str) -> Lan {
        let ns = format!("kiln-{name}-{}", std::process::id());
        let ip = |args: &[&str]| {
            let o = run("ip", args);
            assert_ok(&o, &format!("ip {}", args.join(" ")));
        };
        ip(&["netns", "add", &ns]);
        let lan = Lan { ns };
        lan.exec_ok(&["ip", "link", "set", "lo", "up"]);
        lan.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        lan.exec_ok(&["ip", "addr", "add", "192.168.100.1/24", "dev", "br0"]);
        lan.exec_ok(&["ip", "link", "set", "br0", "up"]);
        lan
    }

    fn exec_ok(&self, argv: &[&str]) {
        let mut a = vec!["netns", "exec", &self.ns];
        a.extend_from_slice(argv);
        assert_ok(&run("ip", &a), &argv.join(" "));
    }

    /// A tap on the bridge, for one VM.
    fn tap(&self, name: &str) {
        self.exec_ok(&["ip", "tuntap", "add", name, "mode", "tap"]);
        self.exec_ok(&["ip", "link", "set", name, "master", "br0"]);
        self.exec_ok(&["ip", "link", "set", name, "up"]);
    }

    fn prefix(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.ns.clone()]
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// QEMU in the namespace, on its tap, with a MAC of its own.
fn start_on_lan(lan: &Lan, bw: &BootWs, name: &str, disk: &Path, tap: &str, mac: u8) -> Vm {
    let mut args = lan.prefix();
    args.push("qemu-system-aarch64".into());
    args.extend(rk1_args(disk));
    // One vCPU each: four guests share this machine's two cores.
    if let Some(i) = args.iter().position(|a| a == "-smp") {
        args[i + 1] = "1".into();
    }
    args.extend([
        "-netdev".into(),
        format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,mac=52:54:00:00:65:{mac:02x}"),
    ]);
    Vm::start_with(name, &bw.ws.path(&format!("{name}.console")), &args)
}

/// TEST DOUBLE: a host that is not of the cluster, answering `GET /ping` with `pong` over TLS
/// on `ip`:6443 with a self-signed certificate (what an impostor or a device that took a
/// server's address would present). Runs in the LAN namespace until dropped.
fn foreign_peer(lan: &Lan, bw: &BootWs, ip: &str) -> Helper {
    lan.exec_ok(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "br0"]);
    let d = bw.ws.path("foreign");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("ping"), "pong").unwrap();
    let (crt, key) = serving_cert(&d, "foreign", None, &format!("IP:{ip}"));
    let mut argv = lan.prefix();
    argv.extend(["openssl", "s_server", "-quiet", "-WWW", "-accept"].map(String::from));
    argv.push(format!("{ip}:6443"));
    argv.extend(["-cert".into(), crt.display().to_string()]);
    argv.extend(["-key".into(), key.display().to_string()]);
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(&d)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Helper(child)
}

/// The stand-in's report line for `node`, once it started.
fn standin_line(vm: &Vm, node: &str) -> String {
    let l = vm.log();
    l.lines()
        .find(|x| x.contains("K3S-STANDIN: ") && x.contains(&format!("node-name={node} ")))
        .unwrap_or_default()
        .to_string()
}

#[test]
#[ignore = "slow tier: boots a four-node cluster under QEMU (make test); needs root"]
fn a_cluster_forms_and_a_reimaged_server_rejoins_without_splitting_it() {
    let bw = boot_workspace("boot-cluster");
    let lan = Lan::new("cluster");
    let _ntp = sntp(
        &lan.prefix().iter().map(String::as_str).collect::<Vec<_>>(),
        "192.168.100.1",
    );
    let nodes = ["rk1-1", "rk1-2", "rk1-3", "rk1-4"];
    let mut vms = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let img = bw.build(n, "out", &[]);
        let disk = bw.disk(&img, n);
        let tap = format!("tap{}", i + 1);
        lan.tap(&tap);
        vms.push(start_on_lan(&lan, &bw, n, &disk, &tap, 0x11 + i as u8));
    }
    let all: Vec<&Vm> = vms.iter().collect();
    // rk1-1 (bootstrap, peers not yet serving) initialises after its bounded wait; the other
    // servers wait for it and join it; the agent joins a server.
    let t = must(
        &all,
        vms[0].wait_for("K3S-STANDIN: server node-name=rk1-1", FIRSTBOOT_WAIT),
    );
    eprintln!("cluster: rk1-1 initialised at {:.0} s", t.as_secs_f64());
    let l = standin_line(&vms[0], "rk1-1");
    // It started with the CA kiln baked into k3s's data directory (`cert=baked-ca`: the
    // stand-in signed its serving certificate with /var/lib/rancher/k3s/server/tls/server-ca.key).
    assert!(
        l.contains("cluster-init=yes") && l.contains("server=none") && l.contains("cert=baked-ca"),
        "{l}"
    );
    for (i, n) in nodes.iter().enumerate().skip(1) {
        let role = if *n == "rk1-4" { "agent" } else { "server" };
        let t = must(
            &all,
            vms[i].wait_for(
                &format!("K3S-STANDIN: {role} node-name={n}"),
                FIRSTBOOT_WAIT,
            ),
        );
        let l = standin_line(&vms[i], n);
        eprintln!("cluster: {n} joined at {:.0} s: {l}", t.as_secs_f64());
        assert!(l.contains("cluster-init=no"), "{n} initialised: {l}");
        assert!(l.contains("server=https://192.168.100.1"), "{n}: {l}");
        // The pinned token's hash is the root of the bundle the server serves at /cacerts.
        assert!(l.contains("ca-pin=match"), "{n}: {l}");
        if role == "server" {
            assert!(
                l.contains("server=https://192.168.100.11:6443"),
                "{n} joined a server that was not serving yet: {l}"
            );
        }
    }

    // rk1-1 fails and is reimaged: a rejoin image on a fresh disk, while rk1-3 runs. rk1-2 is
    // gone too, and a foreign host answers at its address (the first peer rk1-1 probes) with a
    // certificate of its own: rk1-1 must not hand it the token, and joins rk1-3.
    let first = vms.remove(0);
    drop(first);
    let second = vms.remove(0);
    drop(second);
    let foreign = foreign_peer(&lan, &bw, "192.168.100.12");
    let rejoin = bw.build("rk1-1", "rejoin", &["--rejoin"]);
    let disk = bw.disk(&rejoin, "rk1-1-reimaged");
    let re = start_on_lan(&lan, &bw, "rk1-1-reimaged", &disk, "tap1", 0x11);
    let mut all: Vec<&Vm> = vms.iter().collect();
    all.push(&re);
    let t = must(
        &all,
        re.wait_for("K3S-STANDIN: server node-name=rk1-1", FIRSTBOOT_WAIT),
    );
    let l = standin_line(&re, "rk1-1");
    eprintln!(
        "cluster: reimaged rk1-1 joined at {:.0} s: {l}",
        t.as_secs_f64()
    );
    let log = re.log();
    let refused = log
        .lines()
        .find(|x| {
            x.contains(
                "peer 192.168.100.12 refused: its certificate does not chain to the cluster CA",
            )
        })
        .unwrap_or_else(|| {
            fail(
                &all,
                "the reimaged server did not log refusing the foreign peer",
            )
        });
    eprintln!("cluster: {}", refused.trim());
    assert!(
        l.contains("cluster-init=no")
            && l.contains("server=https://192.168.100.13:6443")
            && l.contains("ca-pin=match"),
        "the reimaged bootstrap server did not join the peer with the cluster's certificate: {l}"
    );
    assert!(
        !log.contains("server=https://192.168.100.12"),
        "joined the foreign peer"
    );
    drop(re);
    drop(vms);
    drop(foreign);

    // Every peer down: the reimaged server waits (well past the 120 s a fresh bootstrap server
    // waits before initialising) and never initialises.
    let disk = bw.disk(&rejoin, "rk1-1-alone");
    let alone = start_on_lan(&lan, &bw, "rk1-1-alone", &disk, "tap1", 0x11);
    let t = must(
        &[&alone],
        alone.wait_for("no peer answers yet (round 15,", FIRSTBOOT_WAIT),
    );
    let log = alone.log();
    eprintln!(
        "cluster: reimaged rk1-1 alone still waiting at {:.0} s",
        t.as_secs_f64()
    );
    assert!(!log.contains("K3S-STANDIN"), "started k3s without a peer");
    assert!(!log.contains("initialising"), "initialised without a peer");
}

impl BootWs {
    fn scp(&self, port: u16, from: &[PathBuf], to: &str) -> Result<(), String> {
        let mut args = self.ssh_opts();
        args.extend(["-P".to_string(), port.to_string()]);
        args.extend(from.iter().map(|p| p.display().to_string()));
        args.push(format!("root@127.0.0.1:{to}"));
        let o = Command::new("scp")
            .args(&args)
            .output()
            .map_err(|e| format!("scp: {e}"))?;
        if !o.status.success() {
            return Err(format!("scp failed: {}", stderr(&o)));
        }
        Ok(())
    }
}

/// Powers a guest off from inside and waits for QEMU to exit.
fn power_off(bw: &BootWs, vm: &Vm, ssh: u16) {
    let _ = bw.ssh(ssh, "systemctl poweroff");
    must(&[], vm.wait_exit(Duration::from_secs(180)));
}

/// Powers `vm` off and boots the disk again; returns the new VM and its `uname -r`.
fn rk1_reboot(bw: &BootWs, vm: Vm, disk: &Path, what: &str, ports: (u16, u16)) -> (Vm, String) {
    power_off(bw, &vm, ports.0);
    drop(vm);
    rk1_boot_and_uname(bw, disk, what, ports.0, ports.1)
}

/// kiln's cache (as `kiln` finds it), where the downloaded kernel packages are kept too.
fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("kiln");
    }
    PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/kiln")
}

/// Boots the RK1 image once more (QEMU's U-Boot reads extlinux.conf from the FAT partition)
/// and returns `uname -r`.
fn rk1_boot_and_uname(bw: &BootWs, disk: &Path, what: &str, ssh: u16, api: u16) -> (Vm, String) {
    let mut args = rk1_args(disk);
    args.extend(user_net("192.168.100.11", ssh, api, 0x11));
    let vm = Vm::start(what, &bw.ws.path("rk1-kernel.console"), &args);
    let t = must(&[&vm], vm.wait_for("rk1-1 login:", LOGIN_WAIT));
    eprintln!("{what}: login at {:.0} s", t.as_secs_f64());
    let w = must(&[&vm], bw.wait_ssh(ssh, Duration::from_secs(180)));
    eprintln!("{what}: sshd answered {:.0} s after login", w.as_secs_f64());
    let uname = must(&[&vm], bw.ssh(ssh, "uname -r")).trim().to_string();
    (vm, uname)
}

/// Day two: a real second Debian kernel (trixie-backports' linux-image-arm64, downloaded by
/// tools/kernel-debs.sh from the Debian mirror; the guest has no network) installed inside a
/// booted RK1 image reaches the boot partition through the kernel hooks, and the node boots it
/// through U-Boot and extlinux.conf; removed again (apt, whose Post-Invoke hook finishes the
/// sync once dpkg is done), the node boots the kernel it was built with.
#[test]
#[ignore = "slow tier: boots real images under QEMU (make test)"]
fn an_installed_kernel_is_booted_and_a_removed_one_is_not() {
    let bw = boot_workspace("boot-kernel");
    let debs = std::env::var_os("KILN_KERNEL_DEBS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("kernel-debs"));
    let o = Command::new("bash")
        .arg(repo().join("tools/kernel-debs.sh"))
        .arg(&debs)
        .output()
        .unwrap();
    assert_ok(&o, "tools/kernel-debs.sh");
    let new_version = stdout(&o).trim().to_string();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&debs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 5, "{files:?}");

    let _ntp = sntp(&[], "127.0.0.1");
    let img = bw.build("rk1-1", "out", &[]);
    let disk = bw.disk(&img, "rk1-kernel");
    let (ssh, api) = (free_port(), free_port());
    let started = Instant::now();
    let (vm, baked) = rk1_boot_and_uname(&bw, &disk, "rk1-1 (built kernel)", ssh, api);
    assert_ne!(baked, new_version, "the base already runs {new_version}");
    // Room for the new kernel's modules: wait until first boot has grown the root.
    must(
        &[&vm],
        vm.wait_for("kiln-firstboot: step grow-root: done", FIRSTBOOT_WAIT),
    );
    must(&[&vm], bw.scp(ssh, &files, "/root/"));
    let t = Instant::now();
    let out = must(
        &[&vm],
        bw.ssh(
            ssh,
            "export DEBIAN_FRONTEND=noninteractive; dpkg -i /root/linux-base_*.deb && dpkg -i /root/linux-base-7*.deb /root/linux-binary-*.deb /root/linux-modules-*.deb /root/linux-image-*.deb 2>&1",
        ),
    );
    eprintln!("install: {:.0} s", t.elapsed().as_secs_f64());
    assert!(
        out.contains(&format!("kiln-boot-sync: staged kernel {new_version}")),
        "the kernel hooks did not stage {new_version}:\n{out}"
    );
    let conf = must(
        &[&vm],
        bw.ssh(ssh, "cat /boot/firmware/extlinux/extlinux.conf"),
    );
    let first = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("kernel /k/"))
        .unwrap_or("");
    assert!(first.starts_with(&new_version), "{conf}");
    assert!(
        conf.contains(&format!("kernel {baked})")),
        "no way back in:\n{conf}"
    );
    let (vm, running) = rk1_reboot(&bw, vm, &disk, "rk1-1 (new kernel)", (ssh, api));
    assert_eq!(
        running, new_version,
        "U-Boot did not boot the installed kernel"
    );
    // Removing the running kernel needs its question answered; apt's Post-Invoke hook syncs
    // once all four packages are gone.
    let out = must(
        &[&vm],
        bw.ssh(
            ssh,
            &format!(
                "echo 'linux-base linux-base/removing-running-kernel boolean false' | debconf-set-selections; \
                 DEBIAN_FRONTEND=noninteractive apt-get -y remove linux-image-{v} linux-binary-{v} linux-modules-{v} linux-base-{v} 2>&1",
                v = new_version
            ),
        ),
    );
    let conf = must(
        &[&vm],
        bw.ssh(
            ssh,
            "cat /boot/firmware/extlinux/extlinux.conf; ls /boot/firmware/k",
        ),
    );
    assert!(
        !conf.contains(&new_version) && conf.contains(&format!("kernel {baked})")),
        "after the removal:\n{conf}\napt said:\n{out}"
    );
    let (vm, running) = rk1_reboot(&bw, vm, &disk, "rk1-1 (after removal)", (ssh, api));
    assert_eq!(
        running, baked,
        "the node does not boot its remaining kernel"
    );
    power_off(&bw, &vm, ssh);
    eprintln!(
        "kernel update round trip: {:.0} s",
        started.elapsed().as_secs_f64()
    );

    // From outside: the FAT partition holds the remaining kernel's directory and a clean FAT.
    let (_, parts) = sfdisk(&disk);
    let fat = format!("{}@@{}", disk.display(), parts[0].start);
    let o = run("mdir", &["-i", &fat, "-b", "::/k"]);
    assert_ok(&o, "mdir");
    let listed = stdout(&o);
    assert!(
        listed.contains(&baked) && !listed.contains(&new_version),
        "{listed}"
    );
}

/// OVMF (Debian's `ovmf`): the firmware code read-only, and a copy of its variable store per VM.
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// An x86_64 UEFI machine on the LAN: OVMF with an empty variable store (no boot entry, so
/// the firmware takes the disk's removable-media path), the image as a virtio disk.
fn start_x86_on_lan(lan: &Lan, bw: &BootWs, name: &str, disk: &Path, tap: &str, mac: u8) -> Vm {
    let vars = bw.ws.path(&format!("{name}.vars.fd"));
    std::fs::copy(OVMF_VARS, &vars).expect("OVMF (install ovmf; .ci/run does)");
    let mut args = lan.prefix();
    args.push("qemu-system-x86_64".into());
    args.extend([
        "-smp".into(),
        "1".into(),
        "-drive".into(),
        format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
        "-drive".into(),
        format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
        "-drive".into(),
        format!("file={},if=virtio,format=raw", disk.display()),
        "-netdev".into(),
        format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,mac=52:54:00:00:66:{mac:02x}"),
    ]);
    Vm::start_with(name, &bw.ws.path(&format!("{name}.console")), &args)
}

impl BootWs {
    /// A command on a LAN guest, over SSH from inside the namespace.
    fn ssh_lan(&self, lan: &Lan, ip: &str, cmd: &str) -> Result<String, String> {
        let mut argv = lan.prefix();
        argv.push("ssh".into());
        argv.extend(self.ssh_opts());
        argv.push(format!("root@{ip}"));
        argv.push(cmd.into());
        let o = Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .map_err(|e| format!("ssh: {e}"))?;
        if !o.status.success() {
            return Err(format!("ssh `{cmd}` failed: {}", stderr(&o)));
        }
        Ok(stdout(&o))
    }
}

#[test]
#[ignore = "slow tier: builds the amd64 base and boots an x86 UEFI worker beside an RK1 server under QEMU (make test); needs root"]
fn an_x86_uefi_worker_boots_under_ovmf_and_joins_an_rk1_server() {
    let bw = boot_workspace("boot-x86");
    // The example x86-1 agent, and rk1-1 the production cluster's only server (it starts the
    // cluster at once instead of waiting 120 s for peers this test does not boot).
    let mut inv =
        common::uncomment_examples(&std::fs::read_to_string(bw.ws.path("kiln.toml")).unwrap());
    // rk1-2 and rk1-3 become staging agents: not peers of rk1-1 any more.
    for (n, ip) in [("rk1-2", "12"), ("rk1-3", "13")] {
        let before = inv.clone();
        inv = inv
            .replace(
                &format!("name = \"{n}\"\ncluster = \"production\""),
                &format!("name = \"{n}\"\ncluster = \"staging\""),
            )
            .replace(
                &format!("ip = \"192.168.100.{ip}\"\nrole = \"server\""),
                &format!("ip = \"192.168.100.{ip}\"\nrole = \"agent\""),
            );
        assert_ne!(inv, before, "kiln.toml's {n} block changed shape");
    }
    std::fs::write(bw.ws.path("kiln.toml"), inv).unwrap();

    let t0 = Instant::now();
    let x86_img = bw.build("x86-1", "out", &[]);
    eprintln!(
        "x86: amd64 base (cached or built) and image in {:.0} s; image {} MiB",
        t0.elapsed().as_secs_f64(),
        std::fs::metadata(&x86_img).unwrap().len() >> 20
    );
    let lan = Lan::new("x86");
    let _ntp = sntp(
        &lan.prefix().iter().map(String::as_str).collect::<Vec<_>>(),
        "192.168.100.1",
    );
    let rk1_img = bw.build("rk1-1", "out", &[]);
    let rk1_disk = bw.disk(&rk1_img, "rk1-1");
    lan.tap("tap1");
    let rk1 = start_on_lan(&lan, &bw, "rk1-1", &rk1_disk, "tap1", 0x11);
    let x86_disk = bw.disk(&x86_img, "x86-1");
    lan.tap("tap2");
    let x86 = start_x86_on_lan(&lan, &bw, "x86-1", &x86_disk, "tap2", 0x20);
    let all = [&rk1, &x86];
    let t = must(&all, x86.wait_for("x86-1 login:", LOGIN_WAIT));
    eprintln!("x86: login prompt at {:.0} s (TCG, OVMF)", t.as_secs_f64());
    let t = must(
        &all,
        x86.wait_for("K3S-STANDIN: agent node-name=x86-1", FIRSTBOOT_WAIT),
    );
    let l = standin_line(&x86, "x86-1");
    eprintln!("x86: joined at {:.0} s: {l}", t.as_secs_f64());
    assert!(
        l.contains("server=https://192.168.100.11:6443") && l.contains("ca-pin=match"),
        "{l}"
    );

    // Booted by UEFI and systemd-boot (it sets LoaderInfo), grown, its own host keys.
    let out = must(
        &all,
        bw.ssh_lan(
            &lan,
            "192.168.100.20",
            "hostname; findmnt -n -o SOURCE /; lsblk -b -n -d -o SIZE /dev/vda2; \
             ls /sys/firmware/efi/efivars | grep -c '^LoaderInfo-'; \
             ls /etc/ssh/ssh_host_ed25519_key; systemctl is-system-running || true",
        ),
    );
    eprintln!("x86: {}", out.replace('\n', " | "));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "x86-1");
    assert_eq!(lines[1], "/dev/vda2");
    let root: u64 = lines[2].trim().parse().unwrap();
    assert!(
        root > DISK - (600 << 20),
        "root not grown to the disk: {root}"
    );
    assert_eq!(
        lines[3], "1",
        "no LoaderInfo variable: not started by systemd-boot"
    );
    assert!(lines[4].ends_with("ssh_host_ed25519_key"));
}

/// Moves `node` to its NVMe drive in the inventory (`target = "nvme"`).
fn on_nvme(bw: &BootWs, node: &str) {
    let inv = std::fs::read_to_string(bw.ws.path("kiln.toml")).unwrap();
    let from = format!("name = \"{node}\"\n");
    let moved = inv.replacen(&from, &format!("{from}target = \"nvme\"\n"), 1);
    assert_ne!(inv, moved);
    std::fs::write(bw.ws.path("kiln.toml"), moved).unwrap();
}

/// An RK1 with an eMMC (virtio, scanned by QEMU's U-Boot before NVMe) and an NVMe drive.
fn rk1_emmc_nvme(bw: &BootWs, what: &str, emmc: &Path, nvme: &Path, ssh: u16, api: u16) -> Vm {
    let mut args = vec![
        "-smp".to_string(),
        "2".into(),
        "-bios".into(),
        UBOOT_QEMU.into(),
        "-drive".into(),
        format!("file={},if=virtio,format=raw", emmc.display()),
        "-drive".into(),
        format!("file={},if=none,id=nvme0,format=raw", nvme.display()),
        "-device".into(),
        "nvme,drive=nvme0,serial=kiln-nvme".into(),
    ];
    args.extend(user_net("192.168.100.11", ssh, api, 0x11));
    Vm::start(what, &bw.ws.path("rk1-1-nvme.console"), &args)
}

/// `kiln flash --install` (made here with --prepare; the flash itself is tests/nvme.rs's and
/// tests/flash.rs's): the eMMC gets the installer image. First boot with a drive that holds a
/// filesystem: the installer refuses, powers off, and changes neither drive. With an empty
/// drive: it writes the system, reads it back against the image's sha256, erases its own
/// partition table and reboots; the host then finds `<node>.img` on the drive byte for byte and
/// no partition table on the eMMC; the next boot runs the system from NVMe.
#[test]
#[ignore = "slow tier: boots real images under QEMU (make test)"]
fn an_rk1_installs_itself_onto_its_nvme_drive_and_boots_from_it() {
    let bw = boot_workspace("boot-install");
    let _ntp = sntp(&[], "127.0.0.1");
    on_nvme(&bw, "rk1-1");
    let img = bw.build("rk1-1", "out", &[]);
    let o = bw.ws.kiln(&["flash", "rk1-1", "--install", "--prepare"]);
    assert_ok(&o, "kiln flash --install --prepare");
    let inst = bw.ws.path("out/rk1-1.install.img");
    let (img_len, inst_len) = (
        std::fs::metadata(&img).unwrap().len(),
        std::fs::metadata(&inst).unwrap().len(),
    );
    let du = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    eprintln!(
        "rk1-1.install.img: {inst_len} bytes ({} allocated); rk1-1.img: {img_len} bytes ({} allocated)",
        du(&inst),
        du(&img)
    );
    let emmc = bw.disk(&inst, "emmc");
    let nvme = bw.ws.path("nvme.disk");
    let blank = |p: &Path| {
        let _ = std::fs::remove_file(p);
        let f = std::fs::File::create(p).unwrap();
        f.set_len(DISK).unwrap();
    };
    let head = |p: &Path, n: u64| -> Vec<u8> {
        use std::io::Read;
        let mut b = vec![0u8; n as usize];
        std::fs::File::open(p).unwrap().read_exact(&mut b).unwrap();
        b
    };
    let (ssh, api) = (free_port(), free_port());

    // 1. A drive with a filesystem on it: refused, nothing changed.
    blank(&nvme);
    assert_ok(
        &run(
            "mkfs.ext4",
            &["-q", "-F", "-L", "foreign", nvme.to_str().unwrap()],
        ),
        "mkfs.ext4",
    );
    let foreign = sha256(&head(&nvme, 4 << 20));
    let table = head(&emmc, 34 * 512);
    let vm = rk1_emmc_nvme(&bw, "rk1-1 (installer, full drive)", &emmc, &nvme, ssh, api);
    must(
        &[&vm],
        vm.wait_for(
            "kiln-install: FAILED: /dev/nvme0n1 is not empty",
            LOGIN_WAIT,
        ),
    );
    must(&[&vm], vm.wait_exit(Duration::from_secs(120)));
    drop(vm);
    assert_eq!(
        sha256(&head(&nvme, 4 << 20)),
        foreign,
        "the full drive was written"
    );
    assert!(
        head(&emmc, 34 * 512) == table,
        "the eMMC changed after a refusal"
    );

    // 2. An empty drive: installed, verified, the installer erased, rebooted.
    blank(&nvme);
    let vm = rk1_emmc_nvme(&bw, "rk1-1 (installer)", &emmc, &nvme, ssh, api);
    let t = must(
        &[&vm],
        vm.wait_for(
            "kiln-install: installed; rebooting",
            Duration::from_secs(1500),
        ),
    );
    must(&[&vm], vm.wait_exit(Duration::from_secs(120)));
    eprintln!("installer: done at {:.0} s", t.as_secs_f64());
    let log = vm.log();
    assert!(
        log.contains("/dev/nvme0n1 verified: sha256"),
        "{}",
        vm.tail(30)
    );
    drop(vm);
    let o = run(
        "sh",
        &[
            "-c",
            &format!("head -c {img_len} {} | sha256sum", nvme.display()),
        ],
    );
    assert_eq!(
        stdout(&o).split_whitespace().next().unwrap(),
        stdout(&run("sha256sum", &[img.to_str().unwrap()]))
            .split_whitespace()
            .next()
            .unwrap(),
        "the NVMe drive does not hold rk1-1.img byte for byte"
    );
    let s = run("sfdisk", &["-d", emmc.to_str().unwrap()]);
    assert!(
        !s.status.success(),
        "the eMMC still has a table: {}",
        stdout(&s)
    );
    let loader = std::fs::read(bw.ws.path("out/rk1-1.emmc.img")).unwrap();
    assert!(
        head(&emmc, loader.len() as u64)[32768..] == loader[32768..],
        "the loader on the eMMC changed"
    );

    // 3. The next power-on runs the system from the drive. The eMMC is now what the BMC
    // leaves when it flashes the loader image over an old system: zeros, the loader, and the
    // old partitions (the same filesystem UUIDs as the drive's) with no table in front. QEMU's
    // U-Boot (boot_targets "qfw usb0 scsi0 virtio0 nvme0 dhcp": NVMe after the eMMC stand-in,
    // as in mainline's RK3588 order) must find nothing on it and boot the drive.
    let vm = rk1_emmc_nvme(&bw, "rk1-1 (installed)", &emmc, &nvme, ssh, api);
    let t = must(&[&vm], vm.wait_for("rk1-1 login:", LOGIN_WAIT));
    let t_k3s = must(
        &[&vm],
        vm.wait_for("K3S-STANDIN: server node-name=rk1-1", FIRSTBOOT_WAIT),
    );
    eprintln!(
        "rk1-1 from NVMe: login {:.0} s, k3s {:.0} s",
        t.as_secs_f64(),
        t_k3s.as_secs_f64()
    );
    let log = vm.log();
    let uboot = &log[..log.find("Starting kernel").unwrap_or(log.len())];
    assert!(
        uboot.contains("No partition table - virtio 0") && uboot.contains("Scanning nvme 0:1"),
        "U-Boot did not pass over the eMMC to NVMe:\n{uboot}"
    );
    let vms = [&vm];
    let root = must(&vms, bw.ssh(ssh, "findmnt -n -o SOURCE /"));
    assert_eq!(
        root.trim(),
        "/dev/nvme0n1p2",
        "root is not the NVMe partition"
    );
    let boot = must(&vms, bw.ssh(ssh, "findmnt -n -o SOURCE /boot/firmware"));
    assert_eq!(
        boot.trim(),
        "/dev/nvme0n1p1",
        "boot partition not from NVMe"
    );
    let parts = must(&vms, bw.ssh(ssh, "lsblk -n -o NAME -r /dev/vda"));
    assert_eq!(parts.trim(), "vda", "the eMMC shows partitions: {parts}");
    // Grown to the drive, k3s stand-in running, reachable: as on the eMMC.
    check_node(&bw, &vm, ssh, api, "rk1-1", "192.168.100.11");
    assert!(
        vm.log()
            .contains("partition 2 grown to the end of /dev/nvme0n1"),
        "first boot did not grow the NVMe root:\n{}",
        vm.tail(40)
    );
}
