//! Slow tier: the real Debian bases, built by kiln with mmdebstrap (about 12 minutes per board
//! under emulation, then cached in the user's kiln cache), turned into images whose boot files
//! are where each board's boot path looks for them. Run by `make test` (as `--ignored`).

mod common;

use common::disk::*;
use common::*;
use std::path::Path;

fn build_real(ws: &Workspace, node: &str, base: &str, uboot: &Path) {
    let mut args = vec![
        "build".to_string(),
        node.to_string(),
        "--artifact".into(),
        format!("base={base}"),
        "--artifact".into(),
        format!("uboot={}", uboot.display()),
    ];
    args.extend(ws.k3s_args());
    let o = ws.kiln(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_ok(&o, &format!("build {node} from the real base"));
}

/// The kernel version the image was built with, from its identity-free boot config.
fn kernel_version(img: &Path, root: u64) -> String {
    let ls = debugfs(img, root, "ls /boot");
    ls.split_whitespace()
        .find_map(|w| w.strip_prefix("vmlinuz-"))
        .unwrap_or_else(|| panic!("no /boot/vmlinuz-* in the root:\n{ls}"))
        .to_string()
}

#[test]
#[ignore = "slow tier: real Debian base via mmdebstrap (make test)"]
fn real_bases_put_kernel_initramfs_and_device_trees_where_each_boot_path_looks() {
    let ws = Workspace::new("slow-base");
    let (ub, _) = uboot(&ws, 200_000);

    // RK1: U-Boot extlinux -> /vmlinuz, /initrd.img, fdtdir /dtbs/ + rockchip/<board>.dtb.
    let base = real_base(&ws, "rk1");
    build_real(&ws, "rk1-1", &base, &ub);
    let img = ws.path("out/rk1-1.img");
    let (_, parts) = sfdisk(&img);
    e2fsck(&img, &parts[1]);
    let (boot, root) = (parts[0].start, parts[1].start);
    let ver = kernel_version(&img, root);
    assert!(
        ver.starts_with("6.12."),
        "rk1 kernel {ver}: expected trixie's 6.12"
    );
    let kernel = mcopy(&img, boot, "vmlinuz");
    assert_eq!(
        kernel,
        dump(&img, root, &format!("/boot/vmlinuz-{ver}"), &ws.dir).unwrap()
    );
    // An arm64 Image: "ARM\x64" magic at byte 56.
    assert_eq!(&kernel[56..60], b"ARM\x64", "vmlinuz is not an arm64 Image");
    let initrd = mcopy(&img, boot, "initrd.img");
    assert_eq!(
        initrd,
        dump(&img, root, &format!("/boot/initrd.img-{ver}"), &ws.dir).unwrap()
    );
    assert!(
        initrd.len() > 4 << 20,
        "initramfs only {} bytes",
        initrd.len()
    );
    let dtb = mcopy(&img, boot, "dtbs/rockchip/rk3588-turing-rk1.dtb");
    assert_eq!(
        &dtb[..4],
        &[0xd0, 0x0d, 0xfe, 0xed],
        "not a flattened device tree"
    );
    let conf = String::from_utf8(mcopy(&img, boot, "extlinux/extlinux.conf")).unwrap();
    assert!(
        conf.contains("fdtdir /dtbs/") && conf.contains("kernel /vmlinuz"),
        "{conf}"
    );
    // The drivers the RK1 needs to reach its root and network are modules of this kernel.
    let mods = format!("/usr/lib/modules/{ver}/kernel/drivers");
    for m in [
        "mmc/host/sdhci-of-dwcmshc.ko.xz",
        "net/ethernet/stmicro/stmmac/dwmac-rk.ko.xz",
        "nvme/host/nvme.ko.xz",
    ] {
        assert!(
            exists(&img, root, &format!("{mods}/{m}")),
            "missing module {m}"
        );
    }

    // Pi 5: firmware reads config.txt -> kernel_2712.img, initramfs_2712, device_tree=.
    let base = real_base(&ws, "rpi5");
    build_real(&ws, "pi5-staging", &base, &ub);
    let img = ws.path("out/pi5-staging.img");
    let (_, parts) = sfdisk(&img);
    e2fsck(&img, &parts[1]);
    let (boot, root) = (parts[0].start, parts[1].start);
    let ver = kernel_version(&img, root);
    let major: u32 = ver.split('.').next().unwrap().parse().unwrap();
    assert!(
        major >= 7,
        "pi5 kernel {ver}: expected the trixie-backports kernel (7.x)"
    );
    let kernel = mcopy(&img, boot, "kernel_2712.img");
    assert_eq!(
        &kernel[56..60],
        b"ARM\x64",
        "kernel_2712.img is not an arm64 Image"
    );
    assert_eq!(
        mcopy(&img, boot, "initramfs_2712"),
        dump(&img, root, &format!("/boot/initrd.img-{ver}"), &ws.dir).unwrap()
    );
    let dtb = mcopy(&img, boot, "bcm2712-rpi-5-b.dtb");
    assert_eq!(&dtb[..4], &[0xd0, 0x0d, 0xfe, 0xed]);
    let config = String::from_utf8(mcopy(&img, boot, "config.txt")).unwrap();
    for line in [
        "kernel=kernel_2712.img",
        "initramfs initramfs_2712 followkernel",
        "device_tree=bcm2712-rpi-5-b.dtb",
    ] {
        assert!(
            config.lines().any(|l| l == line),
            "config.txt lacks `{line}`:\n{config}"
        );
    }
    let mods = format!("/usr/lib/modules/{ver}/kernel/drivers");
    for m in [
        "mmc/host/sdhci-brcmstb.ko.xz",
        "net/ethernet/cadence/macb.ko.xz",
        "misc/rp1/rp1_pci.ko.xz",
    ] {
        assert!(
            exists(&img, root, &format!("{mods}/{m}")),
            "missing module {m}"
        );
    }
}

/// `[debian]` list `key` of a shipped board profile (what the slow tier holds the base to).
fn profile_list(board: &str, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join(format!("boards/{board}.toml"))).unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    v["debian"][key]
        .as_array()
        .unwrap_or_else(|| panic!("boards/{board}.toml has no [debian] {key}"))
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect()
}

/// Module names compare with `-` and `_` alike (modprobe treats them the same).
fn norm(m: &str) -> String {
    m.replace('-', "_")
}

/// The initramfs on the boot partition, checked with initramfs-tools' own tools: every module
/// of the board's `initramfs_modules` is in it (lsinitramfs) and loaded at boot (listed in the
/// unpacked `conf/modules`, which the initramfs's init modprobes before it looks for root).
fn check_initramfs(ws: &Workspace, board: &str, initrd: &[u8]) {
    let f = ws.path(&format!("{board}-initrd.img"));
    std::fs::write(&f, initrd).unwrap();
    let o = run("lsinitramfs", &[f.to_str().unwrap()]);
    assert_ok(&o, "lsinitramfs");
    let listed: Vec<String> = stdout(&o)
        .lines()
        .filter_map(|l| {
            let name = l.rsplit('/').next()?;
            let stem = name.split(".ko").next()?;
            name.contains(".ko").then(|| norm(stem))
        })
        .collect();
    let dir = ws.path(&format!("{board}-initrd"));
    let o = run(
        "unmkinitramfs",
        &[f.to_str().unwrap(), dir.to_str().unwrap()],
    );
    assert_ok(&o, "unmkinitramfs");
    let conf = ["main/conf/modules", "conf/modules"]
        .iter()
        .find_map(|p| std::fs::read_to_string(dir.join(p)).ok())
        .unwrap_or_else(|| panic!("{board}: no conf/modules in the initramfs"));
    let loaded: Vec<String> = conf.split_whitespace().map(norm).collect();
    let wanted = profile_list(board, "initramfs_modules");
    assert!(!wanted.is_empty());
    for m in &wanted {
        assert!(
            listed.contains(&norm(m)),
            "{board}: module {m} is not in the initramfs (lsinitramfs)"
        );
        assert!(
            loaded.contains(&norm(m)),
            "{board}: module {m} is not loaded by the initramfs (conf/modules: {conf})"
        );
    }
}

/// Longhorn's prerequisites (longhorn.io "Installation Requirements"): open-iscsi with iscsid
/// running, an NFSv4 client, and the modules it loads; plus a per-node iSCSI initiator name.
fn check_longhorn(img: &Path, root: u64, ver: &str) {
    for f in [
        "/usr/sbin/iscsid",
        "/usr/sbin/iscsiadm",
        "/usr/sbin/mount.nfs",
    ] {
        assert!(exists(img, root, f), "missing {f}");
    }
    assert_eq!(
        link_target(
            img,
            root,
            "/etc/systemd/system/sysinit.target.wants/iscsid.service"
        ),
        "/usr/lib/systemd/system/iscsid.service",
        "iscsid.service is not enabled"
    );
    let load = cat(img, root, "/etc/modules-load.d/kiln.conf");
    let mods = format!("/usr/lib/modules/{ver}/kernel/drivers");
    for (m, file) in [
        ("iscsi_tcp", "scsi/iscsi_tcp.ko.xz"),
        ("dm_crypt", "md/dm-crypt.ko.xz"),
    ] {
        assert!(
            load.lines().any(|l| l == m),
            "{m} not in modules-load.d:\n{load}"
        );
        assert!(exists(img, root, &format!("{mods}/{file}")), "no {file}");
    }
    // One base, many nodes: the name the package made at install time would be shared.
    let iname = cat(img, root, "/etc/iscsi/initiatorname.iscsi");
    assert!(
        iname.contains("GenerateName=yes") && !iname.contains("InitiatorName="),
        "{iname}"
    );
}

/// What the RK1's kernel command line relies on (it names no `console=`): the device tree's
/// stdout-path is the BMC's UART, serial9, and the 8250 driver that serves it is built in with
/// enough lines for every enabled 8250 UART of the tree, so uart9 gets a ttyS line at all.
fn check_rk1_console(ws: &Workspace, img: &Path, root: u64, ver: &str, dtb: &[u8]) {
    let f = ws.path("rk1.dtb");
    std::fs::write(&f, dtb).unwrap();
    let o = run(
        "dtc",
        &["-q", "-I", "dtb", "-O", "dts", f.to_str().unwrap()],
    );
    assert_ok(&o, "dtc");
    let dts = stdout(&o);
    assert!(
        dts.contains("stdout-path = \"serial9:115200n8\""),
        "stdout-path is not serial9 in the RK1's device tree"
    );
    let enabled_8250 = dts
        .split("serial@")
        .skip(1)
        .filter(|node| {
            let body = &node[..node.find("};").unwrap_or(node.len())];
            body.contains("snps,dw-apb-uart") && body.contains("status = \"okay\"")
        })
        .count();
    let config = cat(img, root, &format!("/boot/config-{ver}"));
    let opt = |k: &str| {
        config
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} not set in /boot/config-{ver}"))
            .to_string()
    };
    let lines: usize = opt("CONFIG_SERIAL_8250_RUNTIME_UARTS").parse().unwrap();
    assert!(
        (1..=lines).contains(&enabled_8250),
        "{enabled_8250} enabled 8250 UARTs but the kernel registers {lines}"
    );
    assert_eq!(opt("CONFIG_SERIAL_8250_DW"), "y");
    assert_eq!(opt("CONFIG_SERIAL_EARLYCON"), "y");
}

#[test]
#[ignore = "slow tier: real Debian base via mmdebstrap (make test)"]
fn real_bases_are_ready_for_the_real_boards() {
    let ws = Workspace::new("slow-boards");
    let (ub, _) = uboot(&ws, 200_000);

    let base = real_base(&ws, "rk1");
    build_real(&ws, "rk1-1", &base, &ub);
    let img = ws.path("out/rk1-1.img");
    let (_, parts) = sfdisk(&img);
    let (boot, root) = (parts[0].start, parts[1].start);
    let ver = kernel_version(&img, root);
    check_initramfs(&ws, "rk1", &mcopy(&img, boot, "initrd.img"));
    check_longhorn(&img, root, &ver);
    let dtb = mcopy(&img, boot, "dtbs/rockchip/rk3588-turing-rk1.dtb");
    check_rk1_console(&ws, &img, root, &ver, &dtb);

    let base = real_base(&ws, "rpi5");
    // The staging node as shipped (USB target) and as a D0 board.
    let inv = ws.path("kiln.toml");
    let s = std::fs::read_to_string(&inv).unwrap();
    let node = "name = \"pi5-staging\"";
    std::fs::write(
        &inv,
        s.replacen(node, &format!("{node}\nvariant = \"d0\""), 1),
    )
    .unwrap();
    build_real(&ws, "pi5-staging", &base, &ub);
    let img = ws.path("out/pi5-staging.img");
    let (_, parts) = sfdisk(&img);
    let (boot, root) = (parts[0].start, parts[1].start);
    let ver = kernel_version(&img, root);
    check_initramfs(&ws, "rpi5", &mcopy(&img, boot, "initramfs_2712"));
    check_longhorn(&img, root, &ver);
    let config = String::from_utf8(mcopy(&img, boot, "config.txt")).unwrap();
    assert!(
        config
            .lines()
            .any(|l| l == "device_tree=bcm2712-d-rpi-5-b.dtb"),
        "{config}"
    );
    let dtb = mcopy(&img, boot, "bcm2712-d-rpi-5-b.dtb");
    assert_eq!(&dtb[..4], &[0xd0, 0x0d, 0xfe, 0xed], "D0 tree is not a DTB");

    // x86-uefi (the commented-out x86-1 example): the amd64 base's storage and NIC drivers
    // in the initramfs, Longhorn's prerequisites, and systemd-boot as a PE32+ x86-64 EFI
    // program at the removable-media path.
    let ws = ws.with_examples();
    let base = real_base(&ws, "x86-uefi");
    build_real(&ws, "x86-1", &base, &ub);
    let img = ws.path("out/x86-1.img");
    let (_, parts) = sfdisk(&img);
    let (boot, root) = (parts[0].start, parts[1].start);
    let ver = kernel_version(&img, root);
    assert!(ver.ends_with("-amd64"), "x86 kernel {ver}");
    check_initramfs(&ws, "x86-uefi", &mcopy(&img, boot, "initrd.img"));
    check_longhorn(&img, root, &ver);
    let efi = ws.path("BOOTX64.EFI");
    std::fs::write(&efi, mcopy(&img, boot, "EFI/BOOT/BOOTX64.EFI")).unwrap();
    let f = stdout(&run("file", &["-b", efi.to_str().unwrap()]));
    assert!(
        f.contains("PE32+") && f.contains("x86-64") && f.contains("EFI application"),
        "EFI/BOOT/BOOTX64.EFI: {f}"
    );
}
