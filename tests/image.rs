//! Image writer tests: images built from a small base made here, checked by independent tools
//! (sgdisk, sfdisk, fsck.fat, e2fsck, debugfs, mtools) rather than by kiln reading itself.

mod common;

use common::disk::*;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;

#[test]
fn rk1_image_passes_independent_checks() {
    let ws = Workspace::new("rk1");
    let bases = make_bases(&ws.dir);
    let (ub, ub_data) = uboot(&ws, 9 << 20);
    let o = build(&ws, &["rk1-1"], &bases.zst, Some(&ub));
    assert_ok(&o, "kiln build rk1-1");
    assert!(
        stdout(&o).contains("rk1-1:"),
        "no summary line: {}",
        stdout(&o)
    );
    let img = ws.path("out/rk1-1.img");

    // GPT as sgdisk sees it.
    let v = run("sgdisk", &["-v", img.to_str().unwrap()]);
    assert_ok(&v, "sgdisk -v");
    assert!(stdout(&v).contains("No problems found"), "{}", stdout(&v));
    let p = run("sgdisk", &["-p", img.to_str().unwrap()]);
    assert!(
        stdout(&p).contains("First usable sector is 34"),
        "{}",
        stdout(&p)
    );
    let info1 = stdout(&run("sgdisk", &["-i", "1", img.to_str().unwrap()]));
    assert!(
        info1.contains("Attribute flags: 0000000000000004"),
        "boot not legacy-bootable:\n{info1}"
    );
    let info2 = stdout(&run("sgdisk", &["-i", "2", img.to_str().unwrap()]));
    let root_guid = info2
        .lines()
        .find_map(|l| l.strip_prefix("Partition unique GUID: "))
        .unwrap()
        .trim()
        .to_lowercase();
    let (table, parts) = sfdisk(&img);
    assert_eq!(table["partitiontable"]["label"], "gpt");
    assert_eq!(
        parts[0].start,
        16 << 20,
        "first partition must start at 16 MiB"
    );
    assert_eq!(parts[0].size, 512 << 20);

    // Loader at 32 KiB, byte for byte, and nothing of it past the first partition.
    let mut at = vec![0u8; ub_data.len()];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut at, 32768)
        .unwrap();
    assert!(at == ub_data, "u-boot-rockchip.bin differs at byte 32768");

    fsck_fat(&img, &parts[0], &ws.dir);
    e2fsck(&img, &parts[1]);

    // Boot files, read back with mtools.
    let f = fixture();
    assert!(
        mcopy(&img, parts[0].start, "vmlinuz") == f.kernel,
        "kernel differs"
    );
    assert!(
        mcopy(&img, parts[0].start, "initrd.img") == f.initrd,
        "initrd differs"
    );
    assert!(
        mcopy(&img, parts[0].start, "dtbs/rockchip/rk3588-turing-rk1.dtb") == f.rk1_dtb,
        "RK1 dtb differs"
    );
    let conf = String::from_utf8(mcopy(&img, parts[0].start, "extlinux/extlinux.conf")).unwrap();
    assert!(conf.lines().any(|l| l.trim() == "fdtdir /dtbs/"), "{conf}");
    assert!(
        !conf.lines().any(|l| l.trim_start().starts_with("fdt ")),
        "extlinux.conf must not use `fdt`:\n{conf}"
    );
    assert!(
        conf.contains(&format!("root=PARTUUID={root_guid} ")),
        "root PARTUUID does not match sgdisk's partition 2 GUID {root_guid}:\n{conf}"
    );
    // The console comes from the device tree's stdout-path (ttyS9 does not exist on the RK1:
    // Debian's 8250 driver has 4 lines), so no `console=` at all, and bare `earlycon`.
    let append = conf
        .lines()
        .find(|l| l.trim_start().starts_with("append "))
        .unwrap_or_else(|| panic!("no append line:\n{conf}"));
    assert!(!append.contains("console="), "{append}");
    assert!(
        append.split_whitespace().any(|w| w == "earlycon"),
        "{append}"
    );
    assert!(
        conf.contains(&format!("kernel {KVER}")),
        "newest kernel with an initramfs not chosen:\n{conf}"
    );

    // Root filesystem contents, owners and modes, via debugfs.
    let off = parts[1].start;
    assert_eq!(cat(&img, off, "/etc/hostname"), "rk1-1\n");
    let hosts = cat(&img, off, "/etc/hosts");
    assert!(hosts.contains("192.168.100.12\trk1-2"), "{hosts}");
    let net = cat(&img, off, "/etc/systemd/network/10-kiln-wired.network");
    assert!(net.contains("Type=ether"), "{net}");
    assert!(net.contains("Address=192.168.100.11/24"), "{net}");
    assert!(net.contains("Gateway=192.168.100.1"), "{net}");
    assert!(net.contains("DNS=192.168.100.1"), "{net}");
    assert_eq!(stat(&img, off, "/etc/hostname"), (0o644, 0, 0));
    assert_eq!(stat(&img, off, "/etc/shadow"), (0o640, 0, 42));
    assert_eq!(stat(&img, off, "/usr/bin/su"), (0o4755, 0, 0));
    assert_eq!(stat(&img, off, "/var/lib/chrony-owned"), (0o640, 100, 102));
    assert_eq!(stat(&img, off, "/root"), (0o700, 0, 0));
    assert_eq!(stat(&img, off, "/tmp"), (0o1777, 0, 0));
    assert_eq!(stat(&img, off, "/dev/null").0, 0o666);
    let null = debugfs(&img, off, "stat /dev/null");
    assert!(null.contains("Type: character special"), "{null}");
    assert!(null.contains("Device major/minor number: 01:03"), "{null}");
    assert_eq!(
        stat(&img, off, "/etc/ssh/sshd_config.d/50-kiln.conf"),
        (0o644, 0, 0)
    );
    let su = stat(&img, off, "/usr/bin/su");
    let su_link = debugfs(&img, off, "stat /usr/bin/su-hardlink");
    assert!(su_link.contains("Links: 2"), "hard link lost:\n{su_link}");
    assert_eq!(su.0, 0o4755);
    let bin = debugfs(&img, off, "stat /bin");
    assert!(bin.contains("Fast link dest: \"usr/bin\""), "{bin}");
    let ea = debugfs(&img, off, "ea_list /usr/bin/ping");
    assert!(
        ea.contains("security.capability"),
        "file capability lost:\n{ea}"
    );
    let long = format!("/usr/lib/{}/deep-file", "a-long-directory-name-".repeat(6));
    assert_eq!(cat(&img, off, &long), "long path\n");
    let ident = cat(&img, off, "/etc/kiln/node.json");
    assert!(ident.contains("\"node\": \"rk1-1\""), "{ident}");

    // The image is sparse: far less on disk than its size.
    let meta = std::fs::metadata(&img).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < meta.len() / 4, "image is not sparse");
    // No temporary files left next to it: only the image and its published companions.
    assert_eq!(
        out_names(&ws),
        [
            "SHA256SUMS",
            "kiln-manifest.json",
            "rk1-1.img",
            "rk1-1.img.bmap",
            "rk1-1.img.zst"
        ]
    );
}

#[test]
fn rpi5_image_passes_independent_checks() {
    let ws = Workspace::new("rpi5");
    let bases = make_bases(&ws.dir);
    let o = build(&ws, &["pi5-staging"], &bases.gz, None);
    assert_ok(&o, "kiln build pi5-staging");
    let img = ws.path("out/pi5-staging.img");
    let (table, parts) = sfdisk(&img);
    let t = &table["partitiontable"];
    assert_eq!(t["label"], "dos");
    let p = t["partitions"].as_array().unwrap();
    assert_eq!(p[0]["type"], "c");
    assert_eq!(p[0]["bootable"], true);
    assert_eq!(p[1]["type"], "83");
    assert_eq!(parts[0].start, 8 << 20, "FAT must start at 8 MiB");
    assert_eq!(parts[0].size, 512 << 20);
    let sig = t["id"]
        .as_str()
        .unwrap()
        .trim_start_matches("0x")
        .to_string();

    fsck_fat(&img, &parts[0], &ws.dir);
    e2fsck(&img, &parts[1]);

    let f = fixture();
    let boot = parts[0].start;
    assert!(mcopy(&img, boot, "kernel_2712.img") == f.kernel);
    assert!(mcopy(&img, boot, "initramfs_2712") == f.initrd);
    assert!(mcopy(&img, boot, "bcm2712-rpi-5-b.dtb") == f.rpi5_dtb);
    assert!(mcopy(&img, boot, "bcm2712-d-rpi-5-b.dtb") == f.rpi5_d_dtb);
    let config = String::from_utf8(mcopy(&img, boot, "config.txt")).unwrap();
    assert!(
        config.lines().any(|l| l == "kernel=kernel_2712.img"),
        "{config}"
    );
    assert!(
        config
            .lines()
            .any(|l| l == "initramfs initramfs_2712 followkernel"),
        "{config}"
    );
    assert!(
        config
            .lines()
            .any(|l| l == "device_tree=bcm2712-rpi-5-b.dtb"),
        "{config}"
    );
    assert!(!config.contains("arm_64bit"), "{config}");
    let cmdline = String::from_utf8(mcopy(&img, boot, "cmdline.txt")).unwrap();
    assert_eq!(cmdline.lines().count(), 1, "cmdline.txt must be one line");
    assert!(
        cmdline.starts_with(&format!("root=PARTUUID={sig}-02 ")),
        "cmdline {cmdline:?} does not name sfdisk's disk id {sig}"
    );
    assert!(cmdline.contains("console=ttyAMA10,115200"), "{cmdline}");
    assert_eq!(cat(&img, parts[1].start, "/etc/hostname"), "pi5-staging\n");
    let net = cat(
        &img,
        parts[1].start,
        "/etc/systemd/network/10-kiln-wired.network",
    );
    assert!(net.contains("Address=192.168.100.10/24"), "{net}");
}

/// The file names in the workspace's output directory, sorted.
fn out_names(ws: &Workspace) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(ws.path("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn sha(p: &Path) -> String {
    use sha2::Digest;
    kiln::util::hex(&sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

#[test]
fn builds_are_reproducible_and_nodes_differ_only_where_they_should() {
    let ws = Workspace::new("repro");
    let bases = make_bases(&ws.dir);
    let (ub, _) = uboot(&ws, 1 << 20);
    assert_ok(
        &build(&ws, &["rk1-2", "rk1-3"], &bases.tar, Some(&ub)),
        "first build",
    );
    std::fs::rename(ws.path("out"), ws.path("first")).unwrap();
    // Let a second pass over the clock go by: timestamps must not leak into the image.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_ok(
        &build(&ws, &["rk1-2", "rk1-3"], &bases.tar, Some(&ub)),
        "second build",
    );
    for n in ["rk1-2", "rk1-3"] {
        assert_eq!(
            sha(&ws.path(&format!("first/{n}.img"))),
            sha(&ws.path(&format!("out/{n}.img"))),
            "{n}: two builds differ"
        );
    }
    // Two nodes: same size, different identity, few differing blocks.
    let a = std::fs::read(ws.path("out/rk1-2.img")).unwrap();
    let b = std::fs::read(ws.path("out/rk1-3.img")).unwrap();
    assert_eq!(a.len(), b.len());
    let differing = a
        .chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .count();
    assert!(differing > 0, "two nodes produced identical images");
    assert!(
        differing < 200,
        "{differing} 4 KiB blocks differ between two nodes; expected only tables, superblocks, identity files"
    );
    let (_, pa) = sfdisk(&ws.path("out/rk1-2.img"));
    let f = fixture();
    assert!(mcopy(&ws.path("out/rk1-3.img"), pa[0].start, "vmlinuz") == f.kernel);
}

#[test]
fn corrupt_or_truncated_base_fails_cleanly_and_keeps_the_previous_image() {
    let ws = Workspace::new("corrupt");
    let bases = make_bases(&ws.dir);
    assert_ok(
        &build(&ws, &["pi5-staging"], &bases.zst, None),
        "good build",
    );
    let img = ws.path("out/pi5-staging.img");
    let before = sha(&img);

    let raw = std::fs::read(&bases.tar).unwrap();
    let truncated = ws.path("truncated.tar");
    std::fs::write(&truncated, &raw[..raw.len() / 2]).unwrap();
    let gz = std::fs::read(&bases.gz).unwrap();
    let truncated_gz = ws.path("truncated.tar.gz");
    std::fs::write(&truncated_gz, &gz[..gz.len() / 2]).unwrap();
    let mut garbage = raw.clone();
    for b in garbage.iter_mut().take(4096) {
        *b = 0xa5;
    }
    let garbled = ws.path("garbled.tar");
    std::fs::write(&garbled, &garbage).unwrap();
    let empty = ws.path("empty.tar");
    std::fs::write(&empty, vec![0u8; 10240]).unwrap();

    for bad in [&truncated, &truncated_gz, &garbled, &empty] {
        let o = build(&ws, &["pi5-staging"], bad, None);
        assert!(!o.status.success(), "{} was accepted", bad.display());
        assert_ne!(o.status.code(), Some(101), "kiln panicked:\n{}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains(&bad.display().to_string()) && err.contains("expected"),
            "error does not name the tarball and what was expected:\n{err}"
        );
        assert_eq!(
            sha(&img),
            before,
            "previous image changed after a failed build"
        );
        assert_eq!(
            out_names(&ws),
            [
                "SHA256SUMS",
                "kiln-manifest.json",
                "pi5-staging.img",
                "pi5-staging.img.bmap",
                "pi5-staging.img.zst"
            ],
            "leftover files"
        );
    }
}

#[test]
fn missing_or_oversized_loader_is_a_clear_error() {
    let ws = Workspace::new("loader");
    let bases = make_bases(&ws.dir);
    let o = build(&ws, &["rk1-1"], &bases.tar, None);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("uboot") && err.contains("--artifact uboot=") && err.contains("Armbian"),
        "{err}"
    );

    // make image's mode: skip with a one-line reason, build the rest.
    let mut args = vec![
        "build".to_string(),
        "--all".into(),
        "--skip-missing".into(),
        "--artifact".into(),
        format!("base={}", bases.tar.display()),
    ];
    args.extend(ws.k3s_args());
    let o = ws.kiln(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_ok(&o, "build --all --skip-missing");
    for n in ["rk1-1", "rk1-2", "rk1-3", "rk1-4"] {
        assert!(
            stderr(&o).contains(&format!("skip {n}: board rk1 needs --artifact uboot")),
            "{}",
            stderr(&o)
        );
    }
    assert!(ws.path("out/pi5-staging.img").exists());

    // A loader that would run into the first partition (16 MiB) is refused.
    let (big, _) = uboot(&ws, (16 << 20) - 32768 + 1);
    let o = build(&ws, &["rk1-1"], &bases.tar, Some(&big));
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("into the first partition"), "{err}");
    assert!(!ws.path("out/rk1-1.img").exists());
}

#[test]
fn missing_dtb_is_a_clear_error() {
    let ws = Workspace::new("nodtb");
    // A base whose kernel has no Pi 5 device tree.
    let mut b = tar::Builder::new(Vec::new());
    for (p, d) in [
        ("boot/vmlinuz-7.0.0", bytes(1, 1000)),
        ("boot/initrd.img-7.0.0", bytes(2, 1000)),
        ("etc/hostname", b"x\n".to_vec()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(d.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, p, d.as_slice()).unwrap();
    }
    let base = ws.path("nodtb.tar");
    std::fs::write(&base, b.into_inner().unwrap()).unwrap();
    let o = build(&ws, &["pi5-staging"], &base, None);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("broadcom/bcm2712-rpi-5-b.dtb"), "{err}");
}

#[test]
fn inspect_reports_table_partitions_boot_files_and_node() {
    let ws = Workspace::new("inspect");
    let bases = make_bases(&ws.dir);
    let (ub, _) = uboot(&ws, 1 << 20);
    assert_ok(&build(&ws, &["rk1-3"], &bases.tar, Some(&ub)), "build");
    let img = ws.path("out/rk1-3.img");
    let o = ws.kiln(&["inspect", "--json", img.to_str().unwrap()]);
    assert_ok(&o, "inspect --json");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["table"], "gpt");
    assert_eq!(v["identity"]["node"], "rk1-3");
    assert_eq!(v["identity"]["ip"], "192.168.100.13");
    assert_eq!(v["identity"]["slot"], 3);
    let parts = v["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0]["filesystem"], "vfat");
    assert_eq!(parts[1]["filesystem"], "ext4");
    assert_eq!(parts[0]["bootable"], true);
    let info2 = stdout(&run("sgdisk", &["-i", "2", img.to_str().unwrap()]));
    assert!(
        info2
            .to_lowercase()
            .contains(parts[1]["partuuid"].as_str().unwrap())
    );
    let files: Vec<&str> = v["boot_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(files.contains(&"extlinux/extlinux.conf"), "{files:?}");
    assert!(
        files.contains(&"dtbs/rockchip/rk3588-turing-rk1.dtb"),
        "{files:?}"
    );
    let text = ws.kiln(&["inspect", img.to_str().unwrap()]);
    assert_ok(&text, "inspect");
    assert!(
        stdout(&text).contains("built for node rk1-3"),
        "{}",
        stdout(&text)
    );
    // Not an image: a clear error, not a panic.
    let o = ws.kiln(&["inspect", ws.path("kiln.toml").to_str().unwrap()]);
    assert!(!o.status.success());
    assert_ne!(o.status.code(), Some(101));
}
