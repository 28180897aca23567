//! Shared test fixtures: a small Debian-layout base tarball made here (not a real Debian),
//! a scratch workspace holding the repository's inventory and boards, and tool runners.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod disk;
pub mod k3s;

pub const KVER: &str = "6.12.0-kiln-test";

/// Deterministic pseudo-random bytes (xorshift), so fixtures are reproducible but not zeros.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub struct Fixture {
    pub kernel: Vec<u8>,
    pub initrd: Vec<u8>,
    pub rk1_dtb: Vec<u8>,
    pub rpi5_dtb: Vec<u8>,
    pub rpi5_d_dtb: Vec<u8>,
    /// Stands in for Debian's systemd-bootx64.efi (not a real EFI program).
    pub efi_loader: Vec<u8>,
}

pub fn fixture() -> Fixture {
    Fixture {
        kernel: bytes(1, 3 << 20),
        initrd: bytes(2, 2 << 20),
        rk1_dtb: bytes(3, 70_000),
        rpi5_dtb: bytes(4, 80_000),
        rpi5_d_dtb: bytes(5, 81_000),
        efi_loader: [b"MZ".as_slice(), &bytes(6, 120_000)].concat(),
    }
}

fn header(ty: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(ty);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

/// Writes the base as an uncompressed tar into `w`. Holds what matters to the image writer:
/// kernel/initramfs/device trees in Debian's layout, odd owners and modes, a setuid binary, a
/// file capability (PAX xattr), symlinks, a hard link, a device node and a long path.
pub fn write_base_tar<W: Write>(w: W) {
    let f = fixture();
    let mut b = tar::Builder::new(w);
    let dir = |b: &mut tar::Builder<W>, p: &str, mode: u32, gid: u64| {
        let mut h = header(tar::EntryType::Directory, mode, 0, gid, 0);
        b.append_data(&mut h, p, std::io::empty()).unwrap();
    };
    dir(&mut b, "./", 0o755, 0);
    for d in [
        "./boot/",
        "./etc/",
        "./etc/ssh/",
        "./etc/systemd/",
        "./etc/systemd/network/",
        "./root/",
        "./usr/",
        "./usr/bin/",
        "./usr/lib/",
        "./usr/lib/linux-image-6.12.0-kiln-test/",
        "./usr/lib/linux-image-6.12.0-kiln-test/rockchip/",
        "./usr/lib/linux-image-6.12.0-kiln-test/broadcom/",
        "./usr/lib/systemd/",
        "./usr/lib/systemd/boot/",
        "./usr/lib/systemd/boot/efi/",
        "./var/",
        "./var/lib/",
        "./dev/",
        "./tmp/",
    ] {
        let mode = match d {
            "./root/" => 0o700,
            "./tmp/" => 0o1777,
            _ => 0o755,
        };
        dir(&mut b, d, mode, 0);
    }
    let file = |b: &mut tar::Builder<W>, p: &str, mode: u32, uid: u64, gid: u64, data: &[u8]| {
        let mut h = header(tar::EntryType::Regular, mode, uid, gid, data.len() as u64);
        b.append_data(&mut h, p, data).unwrap();
    };
    file(
        &mut b,
        &format!("./boot/vmlinuz-{KVER}"),
        0o644,
        0,
        0,
        &f.kernel,
    );
    file(
        &mut b,
        &format!("./boot/initrd.img-{KVER}"),
        0o644,
        0,
        0,
        &f.initrd,
    );
    file(
        &mut b,
        "./usr/lib/systemd/boot/efi/systemd-bootx64.efi",
        0o644,
        0,
        0,
        &f.efi_loader,
    );
    // A base made by a careless bootstrapper: host keys and a machine ID that every node would
    // share. kiln must not carry them into any image.
    file(
        &mut b,
        "./etc/ssh/ssh_host_ed25519_key",
        0o600,
        0,
        0,
        b"-----BEGIN OPENSSH PRIVATE KEY----- base-host-key\n",
    );
    file(
        &mut b,
        "./etc/machine-id",
        0o444,
        0,
        0,
        b"0123456789abcdef0123456789abcdef\n",
    );
    // An older kernel without an initramfs must not be picked.
    file(
        &mut b,
        "./boot/vmlinuz-6.1.0-old",
        0o644,
        0,
        0,
        &bytes(9, 1000),
    );
    let dtb = format!("./usr/lib/linux-image-{KVER}");
    file(
        &mut b,
        &format!("{dtb}/rockchip/rk3588-turing-rk1.dtb"),
        0o644,
        0,
        0,
        &f.rk1_dtb,
    );
    file(
        &mut b,
        &format!("{dtb}/rockchip/rk3588-rock-5b.dtb"),
        0o644,
        0,
        0,
        &bytes(6, 60_000),
    );
    file(
        &mut b,
        &format!("{dtb}/broadcom/bcm2712-rpi-5-b.dtb"),
        0o644,
        0,
        0,
        &f.rpi5_dtb,
    );
    file(
        &mut b,
        &format!("{dtb}/broadcom/bcm2712-d-rpi-5-b.dtb"),
        0o644,
        0,
        0,
        &f.rpi5_d_dtb,
    );
    file(&mut b, "./etc/hostname", 0o644, 0, 0, b"debian\n");
    file(
        &mut b,
        "./etc/passwd",
        0o644,
        0,
        0,
        b"root:x:0:0:root:/root:/bin/sh\n_chrony:x:100:102::/var/lib/chrony:/usr/sbin/nologin\n",
    );
    file(
        &mut b,
        "./etc/shadow",
        0o640,
        0,
        42,
        b"root:*:19000:0:99999:7:::\n",
    );
    file(&mut b, "./usr/bin/su", 0o4755, 0, 0, &bytes(7, 5000));
    file(
        &mut b,
        "./var/lib/chrony-owned",
        0o640,
        100,
        102,
        b"owned by 100:102\n",
    );
    let long = format!("./usr/lib/{}/deep-file", "a-long-directory-name-".repeat(6));
    file(&mut b, &long, 0o644, 0, 0, b"long path\n");
    // Capability like Debian's ping: security.capability as a PAX xattr record.
    let cap: &[u8] = &[
        1, 0, 0, 2, 0x00, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    b.append_pax_extensions([("SCHILY.xattr.security.capability", cap)])
        .unwrap();
    file(&mut b, "./usr/bin/ping", 0o755, 0, 0, &bytes(8, 4000));
    let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
    b.append_link(&mut h, "./bin", "usr/bin").unwrap();
    let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
    b.append_link(
        &mut h,
        "./etc/resolv.conf",
        "../run/systemd/resolve/stub-resolv.conf",
    )
    .unwrap();
    // As GNU tar writes it: a hard link's header repeats the target's mode.
    let mut h = header(tar::EntryType::Link, 0o4755, 0, 0, 0);
    b.append_link(&mut h, "./usr/bin/su-hardlink", "usr/bin/su")
        .unwrap();
    let mut h = header(tar::EntryType::Char, 0o666, 0, 0, 0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "./dev/null", std::io::empty())
        .unwrap();
    b.into_inner().unwrap().flush().unwrap();
}

/// Writes base tarballs in every accepted form into `dir`.
pub struct Bases {
    pub tar: PathBuf,
    pub gz: PathBuf,
    pub zst: PathBuf,
}

pub fn make_bases(dir: &Path) -> Bases {
    let mut raw = Vec::new();
    write_base_tar(&mut raw);
    let tar = dir.join("base.tar");
    std::fs::write(&tar, &raw).unwrap();
    let gz = dir.join("base.tar.gz");
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&raw).unwrap();
    std::fs::write(&gz, e.finish().unwrap()).unwrap();
    let zst = dir.join("base.tar.zst");
    std::fs::write(&zst, zstd::encode_all(raw.as_slice(), 3).unwrap()).unwrap();
    Bases { tar, gz, zst }
}

/// A scratch copy of the repository's inventory, boards and overlays with fresh 0600 tokens.
pub struct Workspace {
    pub dir: PathBuf,
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            copy_tree(&e.path(), &dest);
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), &dest).unwrap();
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

impl Workspace {
    pub fn new(name: &str) -> Workspace {
        let dir = std::env::temp_dir().join(format!("kiln-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(repo().join("kiln.toml"), dir.join("kiln.toml")).unwrap();
        copy_tree(&repo().join("boards"), &dir.join("boards"));
        copy_tree(&repo().join("overlays"), &dir.join("overlays"));
        std::fs::create_dir_all(dir.join("secrets")).unwrap();
        for c in ["staging", "production"] {
            let p = dir.join(format!("secrets/{c}.token"));
            std::fs::write(&p, format!("{c}-token-0123456789abcdef\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        k3s::write_standins(&dir);
        Workspace { dir }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }

    /// `--artifact` arguments for the k3s stand-ins (a test double, see common/k3s.rs).
    pub fn k3s_args(&self) -> Vec<String> {
        k3s::artifact_args(&self.dir)
    }

    /// Runs kiln in the workspace with `args`, with a cache of its own (never the user's, never
    /// the network's).
    pub fn kiln(&self, args: &[&str]) -> Output {
        self.kiln_env(args, &[])
    }

    pub fn kiln_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.current_dir(&self.dir)
            .args(args)
            .env_remove("SOURCE_DATE_EPOCH")
            .env("KILN_CACHE_DIR", self.dir.join("cache"));
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs an independent tool; panics with its output if it cannot be started.
pub fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog} (install it; .ci/run does): {e}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// The arguments of `kiln build NODES --artifact base=... [uboot=...]` with the k3s stand-ins.
pub fn build_args(
    ws: &Workspace,
    nodes: &[&str],
    base: &Path,
    uboot: Option<&Path>,
) -> Vec<String> {
    let mut args = vec!["build".to_string()];
    args.extend(nodes.iter().map(|s| s.to_string()));
    args.push("--artifact".into());
    args.push(format!("base={}", base.display()));
    if let Some(u) = uboot {
        args.push("--artifact".into());
        args.push(format!("uboot={}", u.display()));
    }
    args.extend(ws.k3s_args());
    args
}

/// `kiln build NODES --artifact base=... [uboot=...]` with the k3s stand-ins.
pub fn build(
    ws: &Workspace,
    nodes: &[&str],
    base: &Path,
    uboot: Option<&Path>,
) -> std::process::Output {
    let args = build_args(ws, nodes, base, uboot);
    ws.kiln(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// `kiln build NODES EXTRA...` on the stand-in bases and a stand-in loader, with the k3s
/// stand-ins and `env` set.
pub fn build_with(
    ws: &Workspace,
    nodes: &[&str],
    extra: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let bases = make_bases(&ws.dir);
    let (ub, _) = uboot(ws, 100_000);
    let mut args = build_args(ws, nodes, &bases.tar, Some(&ub));
    args.extend(extra.iter().map(|s| s.to_string()));
    ws.kiln_env(&args.iter().map(String::as_str).collect::<Vec<_>>(), env)
}

/// A stand-in loader file of `len` bytes (test data, not U-Boot): the Rockchip idbloader header
/// magic `RKNS` that kiln checks, random bytes, and a non-zero last byte (kiln drops trailing
/// zeros, so this keeps the loader exactly `len` bytes long).
pub fn uboot(ws: &Workspace, len: usize) -> (std::path::PathBuf, Vec<u8>) {
    let data = loader_bytes(42, len);
    let p = ws.path("u-boot-rockchip.bin");
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

/// Stand-in loader bytes: `RKNS`, then random bytes, ending in a non-zero byte.
pub fn loader_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut data = bytes(seed, len);
    let n = data.len().min(4);
    data[..n].copy_from_slice(&b"RKNS"[..n]);
    if let Some(last) = data.last_mut() {
        *last |= 1;
    }
    data
}

/// `kiln base BOARD` with the user's cache, so CI and later runs reuse the base.
pub fn real_base(ws: &Workspace, board: &str) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(&ws.dir)
        .args(["base", board])
        .output()
        .unwrap();
    assert_ok(&o, &format!("kiln base {board}"));
    let out = stdout(&o);
    out.split_whitespace()
        .find(|w| w.ends_with(".tar.zst"))
        .unwrap_or_else(|| panic!("no base path in: {out}"))
        .to_string()
}

/// An inventory's text with its commented-out example nodes (`# [[node]]` blocks, e.g. the
/// x86-1 worker) uncommented.
pub fn uncomment_examples(text: &str) -> String {
    let mut out = String::new();
    let mut in_example = false;
    for line in text.lines() {
        if line == "# [[node]]" {
            in_example = true;
        } else if !line.starts_with("# ") || line.starts_with("# [[") {
            in_example = false;
        }
        match line.strip_prefix("# ") {
            Some(l) if in_example => out.push_str(l),
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

impl Workspace {
    /// Uncomments the example nodes of the workspace's kiln.toml (see [`uncomment_examples`]).
    pub fn with_examples(self) -> Workspace {
        let p = self.path("kiln.toml");
        let text = uncomment_examples(&std::fs::read_to_string(&p).unwrap());
        assert!(
            text.contains("board = \"x86-uefi\""),
            "no x86 example in kiln.toml"
        );
        std::fs::write(&p, text).unwrap();
        self
    }
}

/// kiln.toml with its commented-out example nodes (`# [[node]]` blocks) uncommented, in a
/// scratch directory beside copies of the boards and overlays: every board gets an example.
pub fn inventory_with_examples() -> PathBuf {
    let out = uncomment_examples(&std::fs::read_to_string(repo().join("kiln.toml")).unwrap());
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kiln-examples-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kiln.toml"), out).unwrap();
    let o = std::process::Command::new("cp")
        .args(["-a"])
        .arg(repo().join("overlays"))
        .arg(repo().join("boards"))
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cp: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    dir
}

/// A TLS server certificate (EC P-256, CN k3s, serverAuth) for `san`, made by openssl in
/// `dir` as `<name>.crt`/`<name>.key`: signed by `ca_dir`'s server CA (as k3s signs its
/// serving certificate), or self-signed (a host that is not of the cluster).
pub fn serving_cert(
    dir: &Path,
    name: &str,
    ca_dir: Option<&Path>,
    san: &str,
) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let crt = dir.join(format!("{name}.crt"));
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    match ca_dir {
        Some(ca) => {
            let req = dir.join(format!("{name}.req"));
            assert_ok(
                &run(
                    "openssl",
                    &[
                        "req",
                        "-new",
                        "-newkey",
                        "ec",
                        "-pkeyopt",
                        "ec_paramgen_curve:P-256",
                        "-nodes",
                        "-subj",
                        "/CN=k3s",
                        "-keyout",
                        &p(&key),
                        "-out",
                        &p(&req),
                    ],
                ),
                "openssl req",
            );
            assert_ok(
                &run(
                    "openssl",
                    &[
                        "x509",
                        "-req",
                        "-in",
                        &p(&req),
                        "-CA",
                        &p(&ca.join("server-ca.pem")),
                        "-CAkey",
                        &p(&ca.join("server-ca.key")),
                        "-set_serial",
                        "9",
                        "-days",
                        "2",
                        "-extfile",
                        &p(&ext),
                        "-out",
                        &p(&crt),
                    ],
                ),
                "openssl x509 -req",
            );
        }
        None => assert_ok(
            &run(
                "openssl",
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-subj",
                    "/CN=k3s",
                    "-days",
                    "2",
                    "-keyout",
                    &p(&key),
                    "-out",
                    &p(&crt),
                    "-addext",
                    &format!("subjectAltName={san}"),
                ],
            ),
            "openssl req -x509",
        ),
    }
    (crt, key)
}
