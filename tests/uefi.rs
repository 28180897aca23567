//! x86_64 UEFI workers (boards/x86-uefi.toml): the image's GPT, EFI system partition, loader
//! and Boot Loader Specification entry, checked with sgdisk, sfdisk, fsck.fat, mtools and
//! e2fsck. The base is the test fixture (tests/common), whose `systemd-bootx64.efi` stands in
//! for Debian's (the slow tier boots the real one under OVMF).

mod common;

use common::disk::*;
use common::*;
use std::path::Path;

const ESP_GUID: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const ROOT_AMD64_GUID: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";

/// A workspace whose inventory has the commented-out x86-1 example uncommented.
fn x86_workspace(name: &str) -> Workspace {
    Workspace::new(name).with_examples()
}

fn mtype(img: &Path, fat_offset: u64, path: &str) -> String {
    String::from_utf8(mcopy(img, fat_offset, path)).unwrap()
}

#[test]
fn an_x86_image_boots_systemd_boot_from_the_esp_removable_path() {
    let ws = x86_workspace("uefi-image");
    let bases = make_bases(&ws.dir);
    assert_ok(&build(&ws, &["x86-1"], &bases.tar, None), "build x86-1");
    let img = ws.path("out/x86-1.img");

    let o = run("sgdisk", &["-v", img.to_str().unwrap()]);
    assert_ok(&o, "sgdisk -v");
    assert!(stdout(&o).contains("No problems found"), "{}", stdout(&o));
    let (table, parts) = sfdisk(&img);
    assert_eq!(table["partitiontable"]["label"], "gpt", "{table}");
    let ty = |i: usize| {
        table["partitiontable"]["partitions"][i]["type"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        ty(0),
        ESP_GUID,
        "partition 1 is not the EFI system partition"
    );
    assert_eq!(ty(1), ROOT_AMD64_GUID);
    assert_eq!(parts[0].start, 1 << 20);

    let work = ws.path("fsck");
    std::fs::create_dir_all(&work).unwrap();
    fsck_fat(&img, &parts[0], &work);
    e2fsck(&img, &parts[1]);

    // The loader where UEFI looks without an NVRAM entry, byte for byte from the base.
    let f = fixture();
    assert_eq!(
        mcopy(&img, parts[0].start, "EFI/BOOT/BOOTX64.EFI"),
        f.efi_loader
    );
    assert_eq!(mcopy(&img, parts[0].start, "vmlinuz"), f.kernel);
    assert_eq!(mcopy(&img, parts[0].start, "initrd.img"), f.initrd);
    let conf = mtype(&img, parts[0].start, "loader/loader.conf");
    for l in ["default kiln.conf", "editor no"] {
        assert!(conf.lines().any(|x| x == l), "{conf}");
    }
    let entry = mtype(&img, parts[0].start, "loader/entries/kiln.conf");
    let partuuid = table["partitiontable"]["partitions"][1]["uuid"]
        .as_str()
        .unwrap()
        .to_lowercase();
    for l in [
        "linux /vmlinuz".to_string(),
        "initrd /initrd.img".to_string(),
        format!("options root=PARTUUID={partuuid} rw rootwait console=tty0 console=ttyS0,115200n8"),
    ] {
        assert!(entry.lines().any(|x| x == l), "no `{l}` in\n{entry}");
    }
    assert!(entry.contains("title x86-1 (x86-uefi, kernel "), "{entry}");

    // Day two: kiln-boot-sync knows the board as systemd-boot.
    let root = parts[1].start;
    let env = cat(&img, root, "/etc/kiln/boot.env");
    assert!(env.contains("KILN_BOOT_STYLE='systemd-boot'"), "{env}");
    // An agent: the pinned token, no CA directory of k3s.
    assert!(!exists(&img, root, "/var/lib/rancher/k3s/server"));

    // Not in a Turing Pi slot: `kiln flash` sends it to `kiln write`.
    let o = ws.kiln(&["flash", "x86-1"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("has no `slot`") && stderr(&o).contains("kiln write"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_base_without_systemd_boot_fails_the_build_naming_the_package() {
    let ws = x86_workspace("uefi-no-loader");
    let bases = make_bases(&ws.dir);
    // The board copies a file no base has.
    let board = ws.path("boards/x86-uefi.toml");
    let b = std::fs::read_to_string(&board)
        .unwrap()
        .replace("systemd-bootx64.efi\"", "systemd-bootx64-missing.efi\"");
    std::fs::write(&board, b).unwrap();
    let o = build(&ws, &["x86-1"], &bases.tar, None);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("systemd-bootx64-missing.efi") && err.contains("systemd-boot-efi"),
        "{err}"
    );
    assert!(!ws.path("out/x86-1.img").exists());
}
