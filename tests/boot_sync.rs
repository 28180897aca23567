//! `kiln-boot-sync` (firstboot/kiln-boot-sync.sh), the script Debian's kernel hooks run on a
//! node, run under dash against a fake root (its /boot and /usr/lib) and a directory standing
//! in for the mounted boot partition. Its board data is what kiln writes into images
//! (`rootfs::boot::boot_env`) for the example inventory's nodes. Covered: a new kernel, a
//! second and third kernel (newest two kept), a removal, a rerun that changes nothing, a
//! failed copy (the configuration untouched), a missing device tree, and the Pi firmware's
//! config.txt with os_prefix (the D0 variant's tree survives).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Node {
    dir: PathBuf,
    root: PathBuf,
    boot: PathBuf,
    /// A directory put first on PATH (for the failing `cp` test double).
    bin: PathBuf,
}

fn plan(node: &str) -> kiln::plan::NodePlan {
    // kiln.toml with its commented-out examples (x86-1) too.
    let inv = common::inventory_with_examples();
    let cfg = kiln::config::load(&inv.join("kiln.toml"), &inv.join("boards"), false)
        .expect("example inventory loads");
    let _ = std::fs::remove_dir_all(&inv);
    let mut supplied: BTreeMap<String, PathBuf> = BTreeMap::new();
    supplied.insert("base".into(), PathBuf::from("/nonexistent/base.tar"));
    supplied.insert("uboot".into(), PathBuf::from("/nonexistent/uboot"));
    kiln::plan::plan_node(&cfg, node, &supplied, kiln::plan::JoinMode::Init).expect("plan")
}

impl Node {
    /// A fake node of `node` (from kiln.toml) with `variant` (if any) and no kernel yet.
    fn new(test: &str, node: &str, variant: Option<&str>) -> Node {
        let dir = std::env::temp_dir().join(format!("kiln-bootsync-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (root, boot, bin) = (dir.join("root"), dir.join("boot"), dir.join("bin"));
        for d in [&root, &boot, &bin] {
            std::fs::create_dir_all(d).unwrap();
        }
        let mut p = plan(node);
        if variant.is_some() {
            p.node.variant = variant.map(str::to_string);
        }
        std::fs::create_dir_all(root.join("etc/kiln/boot")).unwrap();
        std::fs::write(
            root.join("etc/kiln/boot.env"),
            kiln::rootfs::boot::boot_env(&p),
        )
        .unwrap();
        std::fs::write(
            root.join("etc/kiln/boot/config.txt"),
            kiln::plan::boot::rpi_config_txt(&p),
        )
        .unwrap();
        Node {
            dir,
            root,
            boot,
            bin,
        }
    }

    /// Installs kernel `v` as a Debian package would: /boot/vmlinuz-V, initrd.img-V and its
    /// device trees under /usr/lib/linux-image-V/.
    fn install(&self, v: &str, dtbs: &[&str]) {
        let b = self.root.join("boot");
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join(format!("vmlinuz-{v}")), format!("kernel {v}\n")).unwrap();
        std::fs::write(b.join(format!("initrd.img-{v}")), format!("initrd {v}\n")).unwrap();
        for d in dtbs {
            let p = self.root.join(format!("usr/lib/linux-image-{v}/{d}"));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, format!("dtb {d} of {v}\n")).unwrap();
        }
    }

    fn remove(&self, v: &str) {
        let b = self.root.join("boot");
        std::fs::remove_file(b.join(format!("vmlinuz-{v}"))).unwrap();
        std::fs::remove_file(b.join(format!("initrd.img-{v}"))).unwrap();
        let _ = std::fs::remove_dir_all(self.root.join(format!("usr/lib/linux-image-{v}")));
    }

    fn sync(&self) -> Output {
        let path = format!("{}:{}", self.bin.display(), std::env::var("PATH").unwrap());
        Command::new("dash")
            .arg(repo().join("firstboot/kiln-boot-sync.sh"))
            .env("KILN_ROOT", &self.root)
            .env("KILN_BOOT_DIR_OVERRIDE", &self.boot)
            .env("PATH", path)
            .output()
            .unwrap()
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.boot.join(rel))
            .unwrap_or_else(|e| panic!("{rel} on the boot partition: {e}"))
    }

    /// The kernel directories on the boot partition.
    fn dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.boot.join("k"))
            .map(|r| {
                r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn ok(o: &Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "kiln-boot-sync failed: {e}");
    e
}

/// `kernel /k/<dir>/vmlinuz` lines of extlinux.conf, in order.
fn kernels(conf: &str) -> Vec<String> {
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("kernel /k/"))
        .map(|k| k.split('/').next().unwrap().to_string())
        .collect()
}

const RK1_DTB: &str = "rockchip/rk3588-turing-rk1.dtb";

#[test]
fn extlinux_gets_the_newest_kernel_and_the_previous_as_a_second_entry() {
    let n = Node::new("extlinux", "rk1-1", None);
    n.install("6.12.118+deb13-arm64", &[RK1_DTB]);
    let log = ok(&n.sync());
    assert!(log.contains("booting kernel 6.12.118+deb13-arm64"), "{log}");
    let conf = n.read("extlinux/extlinux.conf");
    let ks = kernels(&conf);
    assert_eq!(ks.len(), 1, "{conf}");
    assert!(ks[0].starts_with("6.12.118+deb13-arm64-"), "{conf}");
    // The files are the installed ones, under the board's names.
    assert_eq!(
        n.read(&format!("k/{}/vmlinuz", ks[0])),
        "kernel 6.12.118+deb13-arm64\n"
    );
    assert_eq!(
        n.read(&format!("k/{}/initrd.img", ks[0])),
        "initrd 6.12.118+deb13-arm64\n"
    );
    assert_eq!(
        n.read(&format!("k/{}/dtbs/{RK1_DTB}", ks[0])),
        format!("dtb {RK1_DTB} of 6.12.118+deb13-arm64\n")
    );
    assert!(
        conf.contains(&format!("fdtdir /k/{}/dtbs/", ks[0])),
        "{conf}"
    );
    assert!(conf.contains("append root=PARTUUID="), "{conf}");

    // A newer kernel (sorted by version, not by name): it boots first, the old one second.
    n.install("7.3.4+deb13-arm64", &[RK1_DTB]);
    ok(&n.sync());
    let conf = n.read("extlinux/extlinux.conf");
    let ks = kernels(&conf);
    assert_eq!(ks.len(), 2, "{conf}");
    assert!(
        ks[0].starts_with("7.3.4+deb13-arm64-") && ks[1].starts_with("6.12.118"),
        "{conf}"
    );
    assert!(
        conf.contains("default kiln\n") && conf.contains("label kiln-previous"),
        "{conf}"
    );

    // Run again: nothing changes (same directories, same file).
    let before = (n.dirs(), conf.clone());
    let log = ok(&n.sync());
    assert!(!log.contains("wrote") && !log.contains("staged"), "{log}");
    assert_eq!((n.dirs(), n.read("extlinux/extlinux.conf")), before);

    // A third kernel: the newest two stay, the oldest directory goes.
    n.install("7.4.1+deb13-arm64", &[RK1_DTB]);
    ok(&n.sync());
    let ks = kernels(&n.read("extlinux/extlinux.conf"));
    assert!(
        ks[0].starts_with("7.4.1") && ks[1].starts_with("7.3.4"),
        "{ks:?}"
    );
    assert_eq!(n.dirs(), ks.iter().rev().cloned().collect::<Vec<_>>());

    // The newest removed (apt remove): back to the two before it.
    n.remove("7.4.1+deb13-arm64");
    ok(&n.sync());
    let ks = kernels(&n.read("extlinux/extlinux.conf"));
    assert!(
        ks[0].starts_with("7.3.4") && ks[1].starts_with("6.12.118"),
        "{ks:?}"
    );

    // An initramfs rebuilt for the same version (update-initramfs): a new directory, never
    // the booted one rewritten in place.
    let old = ks[0].clone();
    std::fs::write(
        n.root.join("boot/initrd.img-7.3.4+deb13-arm64"),
        "initrd 7.3.4 rebuilt\n",
    )
    .unwrap();
    ok(&n.sync());
    let ks = kernels(&n.read("extlinux/extlinux.conf"));
    assert!(ks[0].starts_with("7.3.4") && ks[0] != old, "{ks:?}");
    assert_eq!(
        n.read(&format!("k/{}/initrd.img", ks[0])),
        "initrd 7.3.4 rebuilt\n"
    );
}

#[test]
fn a_failed_copy_leaves_the_configuration_as_it_was() {
    let n = Node::new("failcopy", "rk1-1", None);
    n.install("6.12.118+deb13-arm64", &[RK1_DTB]);
    ok(&n.sync());
    let conf = n.read("extlinux/extlinux.conf");
    let dirs = n.dirs();
    // TEST DOUBLE: a `cp` that fails on an initramfs, as a full or failing disk would.
    let cp = n.bin.join("cp");
    std::fs::write(
        &cp,
        "#!/bin/sh\ncase \"$*\" in *initrd.img*) echo 'cp: No space left on device' >&2; exit 1;; esac\nexec /bin/cp \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&cp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    n.install("7.3.4+deb13-arm64", &[RK1_DTB]);
    let o = n.sync();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a failed copy was reported as success: {e}"
    );
    assert!(
        e.contains("copying kernel 7.3.4+deb13-arm64") && e.contains("left as it was"),
        "{e}"
    );
    assert_eq!(n.read("extlinux/extlinux.conf"), conf);
    assert_eq!(n.dirs(), dirs, "a half-copied kernel directory is visible");
    // With the disk fixed, the next run finishes the job and clears the leftovers.
    std::fs::remove_file(&cp).unwrap();
    ok(&n.sync());
    assert!(kernels(&n.read("extlinux/extlinux.conf"))[0].starts_with("7.3.4"));
    assert!(!std::fs::read_dir(n.boot.join("k")).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".tmp-")
    }));
}

#[test]
fn a_kernel_without_the_boards_device_tree_is_not_made_the_default() {
    let n = Node::new("nodtb", "rk1-1", None);
    n.install("6.12.118+deb13-arm64", &[RK1_DTB]);
    ok(&n.sync());
    let conf = n.read("extlinux/extlinux.conf");
    n.install("7.3.4+deb13-arm64", &[]);
    let o = n.sync();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("has no device tree rockchip"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(n.read("extlinux/extlinux.conf"), conf);
}

#[test]
fn no_kernel_with_an_initramfs_changes_nothing() {
    let n = Node::new("nokernel", "rk1-1", None);
    let b = n.root.join("boot");
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(b.join("vmlinuz-7.3.4+deb13-arm64"), "k").unwrap();
    let o = n.sync();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no kernel in"));
    assert!(!n.boot.join("extlinux").exists());
}

#[test]
fn the_pi_firmware_gets_os_prefix_and_keeps_the_variants_tree() {
    let n = Node::new("pi5", "pi5-staging", Some("d0"));
    let trees = [
        "broadcom/bcm2712-rpi-5-b.dtb",
        "broadcom/bcm2712-d-rpi-5-b.dtb",
        "overlays/foo.dtbo",
    ];
    n.install("7.3.4+deb13-arm64", &trees);
    ok(&n.sync());
    let cfg = n.read("config.txt");
    let prefix = cfg
        .lines()
        .find_map(|l| l.strip_prefix("os_prefix=k/"))
        .unwrap_or_else(|| panic!("no os_prefix in:\n{cfg}"))
        .trim_end_matches('/')
        .to_string();
    assert!(prefix.starts_with("7.3.4+deb13-arm64-"), "{cfg}");
    // The image's own lines, with the D0 tree, then the prefix they are read under.
    assert!(cfg.contains("device_tree=bcm2712-d-rpi-5-b.dtb\n"), "{cfg}");
    assert!(cfg.contains("kernel=kernel_2712.img\n"), "{cfg}");
    let d = format!("k/{prefix}");
    assert_eq!(
        n.read(&format!("{d}/kernel_2712.img")),
        "kernel 7.3.4+deb13-arm64\n"
    );
    assert_eq!(
        n.read(&format!("{d}/initramfs_2712")),
        "initrd 7.3.4+deb13-arm64\n"
    );
    assert!(
        n.read(&format!("{d}/bcm2712-d-rpi-5-b.dtb"))
            .contains("bcm2712-d-rpi-5-b")
    );
    assert!(
        n.read(&format!("{d}/cmdline.txt"))
            .starts_with("root=PARTUUID=")
    );
    assert_eq!(n.read(&format!("{d}/overlays/README")), "");
    assert!(
        n.read(&format!("{d}/overlays/foo.dtbo"))
            .contains("foo.dtbo")
    );
    assert!(!n.boot.join("config-previous.txt").exists());

    // A second kernel: config.txt names it; config-previous.txt is the one-line way back.
    n.install("7.4.1+deb13-arm64", &trees);
    ok(&n.sync());
    assert!(
        n.read("config.txt")
            .contains("os_prefix=k/7.4.1+deb13-arm64-")
    );
    let prev = n.read("config-previous.txt");
    assert!(prev.contains(&format!("os_prefix=k/{prefix}/")), "{prev}");
    assert!(
        prev.contains("device_tree=bcm2712-d-rpi-5-b.dtb\n"),
        "{prev}"
    );
}

#[test]
fn systemd_boot_gets_a_bls_entry_per_kernel_the_newest_the_default() {
    let n = Node::new("systemd-boot", "x86-1", None);
    n.install("6.12.118+deb13-amd64", &[]);
    let log = ok(&n.sync());
    assert!(log.contains("booting kernel 6.12.118+deb13-amd64"), "{log}");
    let entry = n.read("loader/entries/kiln.conf");
    let dir = entry
        .lines()
        .find_map(|l| l.strip_prefix("linux /k/"))
        .and_then(|l| l.split('/').next())
        .unwrap_or_else(|| panic!("no linux line in\n{entry}"))
        .to_string();
    assert!(dir.starts_with("6.12.118+deb13-amd64-"), "{entry}");
    assert!(
        entry.contains(&format!("initrd /k/{dir}/initrd.img\n")),
        "{entry}"
    );
    assert!(entry.contains("version 6.12.118+deb13-amd64\n"), "{entry}");
    assert!(
        entry.contains("options root=PARTUUID=") && entry.contains("console=ttyS0,115200n8"),
        "{entry}"
    );
    assert_eq!(
        n.read(&format!("k/{dir}/vmlinuz")),
        "kernel 6.12.118+deb13-amd64\n"
    );
    assert!(!n.boot.join("loader/entries/kiln-previous.conf").exists());

    // A newer kernel is the default (kiln.conf, which loader.conf names); the old one is the
    // entry below it.
    n.install("7.3.4+deb13-amd64", &[]);
    ok(&n.sync());
    let new = n.read("loader/entries/kiln.conf");
    let prev = n.read("loader/entries/kiln-previous.conf");
    assert!(new.contains("linux /k/7.3.4+deb13-amd64-"), "{new}");
    assert!(prev.contains(&format!("linux /k/{dir}/vmlinuz")), "{prev}");
    assert!(prev.contains(" - previous"), "{prev}");

    // Removed again: one entry, the other file gone.
    n.remove("7.3.4+deb13-amd64");
    ok(&n.sync());
    assert!(
        n.read("loader/entries/kiln.conf")
            .contains(&format!("linux /k/{dir}/vmlinuz"))
    );
    assert!(!n.boot.join("loader/entries/kiln-previous.conf").exists());
    assert_eq!(n.dirs(), vec![dir]);
}
