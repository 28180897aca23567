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

#[test]
fn one_build_fetches_each_architectures_k3s_once_and_each_node_gets_its_own() {
    use common::k3s::{Release, set_release, sha256, standin_binary, standin_images};
    const V: &str = "v1.33.5%2Bk3s1";
    // The release (a test double) serves both architectures, with different bytes.
    let arm = (standin_binary(), standin_images());
    let amd = (
        [standin_binary(), b"# amd64\n".to_vec()].concat(),
        [standin_images(), b"amd64".to_vec()].concat(),
    );
    let sums = |arch: &str, bin_name: &str, f: &(Vec<u8>, Vec<u8>)| {
        format!(
            "{}  {bin_name}\n{}  k3s-airgap-images-{arch}.tar.zst\n",
            sha256(&f.0),
            sha256(&f.1)
        )
        .into_bytes()
    };
    let rel = Release::serve(vec![
        (format!("/{V}/k3s-arm64"), arm.0.clone()),
        (
            format!("/{V}/k3s-airgap-images-arm64.tar.zst"),
            arm.1.clone(),
        ),
        (
            format!("/{V}/sha256sum-arm64.txt"),
            sums("arm64", "k3s-arm64", &arm),
        ),
        (format!("/{V}/k3s"), amd.0.clone()),
        (
            format!("/{V}/k3s-airgap-images-amd64.tar.zst"),
            amd.1.clone(),
        ),
        (
            format!("/{V}/sha256sum-amd64.txt"),
            sums("amd64", "k3s", &amd),
        ),
    ]);
    let ws = x86_workspace("uefi-release");
    set_release(&ws.path("kiln.toml"), &rel.url);
    let bases = make_bases(&ws.dir);
    let (ub, _) = uboot(&ws, 100_000);
    let o = ws.kiln(&[
        "build",
        "rk1-1",
        "rk1-4",
        "x86-1",
        "--artifact",
        &format!("base={}", bases.tar.display()),
        "--artifact",
        &format!("uboot={}", ub.display()),
    ]);
    assert_ok(&o, "build rk1-1 rk1-4 x86-1 from the release");
    let hits = rel.hits();
    for asset in [
        "sha256sum-arm64.txt",
        "k3s-arm64",
        "k3s-airgap-images-arm64.tar.zst",
        "sha256sum-amd64.txt",
        "k3s",
        "k3s-airgap-images-amd64.tar.zst",
    ] {
        let want = format!("/{V}/{asset}");
        let n = hits.iter().filter(|h| h.path == want).count();
        assert_eq!(n, 1, "{want} fetched {n} times");
    }
    for (node, arch, f) in [("rk1-1", "arm64", &arm), ("x86-1", "amd64", &amd)] {
        let img = ws.path(&format!("out/{node}.img"));
        let (_, parts) = sfdisk(&img);
        let root = parts[1].start;
        let bin = dump(&img, root, "/usr/local/bin/k3s", &ws.dir).unwrap();
        assert_eq!(
            sha256(&bin),
            sha256(&f.0),
            "{node}: k3s of the wrong architecture"
        );
        let images = format!("/var/lib/rancher/k3s/agent/images/k3s-airgap-images-{arch}.tar.zst");
        assert_eq!(
            sha256(&dump(&img, root, &images, &ws.dir).expect("airgap images")),
            sha256(&f.1),
            "{node}"
        );
    }
}
