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
