//! A node whose system is on a drive the BMC cannot write (the RK1 on NVMe, board `loader_on`):
//! one build makes the system image without the loader and a loader-only image for the eMMC;
//! `kiln flash` sends the loader image to a fake BMC (a test double on 127.0.0.1), `kiln
//! reimage` refuses; and the loader image written over an old eMMC system leaves nothing that
//! Linux's partition readers (libblkid: blkid, partx; sfdisk) take for a partition table.
//! The loader is stand-in test data with the Rockchip `RKNS` magic, not U-Boot. Booting the
//! pair under QEMU's U-Boot is in tests/boot.rs.

mod common_bmc;

use common_bmc::bmc::{FakeBmc, Mode};
use common_bmc::fixture::{Workspace, sha256_file, stderr, stdout};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

const LOADER_AT: u64 = 32 * 1024;
/// The test board's first partition: the end of its loader area.
const FIRST_PARTITION: u64 = 1 << 20;

/// The test board with a loader at 32 KiB and an `nvme` target that keeps it on the eMMC.
const LOADER_AND_NVME: &str = r#"
[[blob]]
artifact = "uboot"
offset = "32KiB"
loader = "rockchip"

[[artifact]]
name = "uboot"
description = "test loader"
source = "test data with the RKNS magic"

[target.nvme]
description = "test NVMe drive; the loader stays on the eMMC"
loader_on = "emmc"
"#;

/// Stand-in loader: `RKNS`, pseudo-random bytes, a non-zero last byte.
fn loader(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut d: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    d[..4].copy_from_slice(b"RKNS");
    *d.last_mut().unwrap() |= 1;
    d
}

/// A workspace whose node n2 runs from NVMe; returns it with the loader's bytes.
fn nvme_ws(name: &str, bmc: Option<&FakeBmc>, ip_base: u8) -> (Workspace, Vec<u8>) {
    let host = bmc.map(|b| b.addr.to_string());
    let ws = Workspace::new(
        name,
        bmc.map(|b| {
            (
                host.as_deref().unwrap(),
                Some(b.cert.sha256_colons.as_str()),
            )
        }),
        None,
        ip_base,
    );
    let board = ws.path("boards/tiny.toml");
    let text = std::fs::read_to_string(&board).unwrap() + LOADER_AND_NVME;
    std::fs::write(&board, text).unwrap();
    let inv = ws.path("kiln.toml");
    let text = std::fs::read_to_string(&inv)
        .unwrap()
        .replace("name = \"n2\"\n", "name = \"n2\"\ntarget = \"nvme\"\n");
    std::fs::write(&inv, text).unwrap();
    let data = loader(7, 200_000);
    std::fs::write(ws.path("uboot.bin"), &data).unwrap();
    (ws, data)
}

fn build(ws: &Workspace, nodes: &[&str], uboot: &str) -> std::process::Output {
    let mut args = vec!["build".to_string()];
    args.extend(nodes.iter().map(|s| s.to_string()));
    args.extend(ws.artifact_args());
    args.extend(["--artifact".into(), format!("uboot={uboot}")]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ws.kiln(&refs)
}

fn read_at(p: &Path, at: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    b
}

fn tool(prog: &str, args: &[&str]) -> std::process::Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"))
}

#[test]
fn a_node_on_nvme_gets_a_system_image_without_loader_and_a_loader_only_image() {
    let (ws, data) = nvme_ws("nvme-build", None, 31);
    let o = build(&ws, &["n1", "n2"], "uboot.bin");
    assert!(o.status.success(), "{}", stderr(&o));
    let (sys, emmc) = (ws.path("out/n2.img"), ws.path("out/n2.emmc.img"));
    assert!(
        stdout(&o).contains("n2.emmc.img") && stdout(&o).contains("the loader alone"),
        "the summary names the loader image: {}",
        stdout(&o)
    );

    // The system image: a valid GPT, and nothing of the loader in it.
    let v = tool("sgdisk", &["-v", sys.to_str().unwrap()]);
    assert!(stdout(&v).contains("No problems found"), "{}", stdout(&v));
    let area = read_at(&sys, LOADER_AT, (FIRST_PARTITION - LOADER_AT) as usize);
    assert!(
        area.iter().all(|b| *b == 0),
        "the NVMe image must not carry the loader"
    );
    // n1 (on the eMMC) still has its loader in its own image, and no loader image.
    assert_eq!(read_at(&ws.path("out/n1.img"), LOADER_AT, data.len()), data);
    assert!(!ws.path("out/n1.emmc.img").exists());

    // The loader image: the loader area, the loader at 32 KiB, zeros elsewhere.
    let len = std::fs::metadata(&emmc).unwrap().len();
    assert_eq!(
        len, FIRST_PARTITION,
        "loader image is the board's loader area"
    );
    let all = std::fs::read(&emmc).unwrap();
    assert!(all[..LOADER_AT as usize].iter().all(|b| *b == 0));
    let end = LOADER_AT as usize + data.len();
    assert!(all[LOADER_AT as usize..end] == data[..], "loader differs");
    assert!(all[end..].iter().all(|b| *b == 0));
    // No partition table for any reader.
    let s = tool("sfdisk", &["-d", emmc.to_str().unwrap()]);
    assert!(!s.status.success(), "sfdisk found a table: {}", stdout(&s));
    let b = tool("blkid", &["-p", emmc.to_str().unwrap()]);
    assert_eq!(b.status.code(), Some(2), "blkid found: {}", stdout(&b));

    // Published like the system image: in SHA256SUMS and the manifest.
    let sums = std::fs::read_to_string(ws.path("out/SHA256SUMS")).unwrap();
    assert!(
        sums.contains(&format!("{}  n2.emmc.img", sha256_file(&emmc))),
        "{sums}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.path("out/kiln-manifest.json")).unwrap())
            .unwrap();
    let n2 = m["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["identity"]["node"] == "n2")
        .unwrap();
    assert_eq!(n2["loader_image"]["target"], "emmc");
    assert_eq!(n2["identity"]["loader_on"], "emmc");
    assert!(
        n2["loader_image"]["files"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("n2.emmc.img")
    );

    // inspect shows both files and where each goes, from either one.
    for f in ["out/n2.img", "out/n2.emmc.img"] {
        let i = ws.kiln(&["inspect", f]);
        assert!(i.status.success(), "inspect {f}: {}", stderr(&i));
        let t = stdout(&i);
        assert!(
            t.contains("n2.img") && t.contains("the system -> its nvme (kiln write)"),
            "{f}: {t}"
        );
        assert!(
            t.contains("n2.emmc.img") && t.contains("the loader -> its emmc (kiln flash (BMC))"),
            "{f}: {t}"
        );
        assert!(
            t.contains("loader uboot at byte 32768") && !t.contains("DIFFERS"),
            "{f}: {t}"
        );
    }
    let i = stdout(&ws.kiln(&["inspect", "out/n2.emmc.img"]));
    assert!(i.contains("this is the loader alone"), "{i}");

    // Writing the system to its drive reminds where its loader goes.
    std::fs::write(ws.path("drive.img"), b"").unwrap();
    let o = ws.kiln(&["write", "out/n2.img", "drive.img", "--yes"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("flash n2.emmc.img there (`kiln flash n2`)"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn flash_sends_the_loader_image_and_refuses_one_from_another_build() {
    let bmc = FakeBmc::start(Mode::Normal);
    let (ws, _) = nvme_ws("nvme-flash", Some(&bmc), 32);
    let o = build(&ws, &["n2"], "uboot.bin");
    assert!(o.status.success(), "{}", stderr(&o));
    let emmc = ws.path("out/n2.emmc.img");

    let out = ws.kiln(&["flash", "n2", "--no-power-on"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ups = bmc.uploads();
    assert_eq!(ups.len(), 1);
    assert_eq!(
        ups[0].written_sha256.as_deref(),
        Some(sha256_file(&emmc).as_str()),
        "the eMMC gets the loader image byte for byte"
    );
    let reqs: Vec<_> = bmc
        .requests()
        .into_iter()
        .filter(|r| r.param("type") == Some("flash") && r.param("opt") == Some("set"))
        .collect();
    assert_eq!(reqs[0].param("file"), Some("n2.emmc.img.xz"));

    // A loader image from another build (another loader) is refused before the BMC is asked.
    let other = loader(8, 150_000);
    std::fs::write(ws.path("other.bin"), other).unwrap();
    let o = build(&ws, &["n2"], "other.bin");
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::copy(ws.path("out/n2.img"), ws.path("new-n2.img")).unwrap();
    // The first build's system image with the second build's loader image.
    let o = build(&ws, &["n2"], "uboot.bin");
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::copy(ws.path("new-n2.img"), ws.path("out/n2.img")).unwrap();
    let out = ws.kiln(&["flash", "n2", "--no-power-on"]);
    assert!(!out.status.success(), "a mismatched pair was flashed");
    assert!(
        stderr(&out).contains("a loader image from another build?"),
        "{}",
        stderr(&out)
    );
    assert_eq!(bmc.uploads().len(), 1, "nothing more reached the BMC");

    // A loader image with a partition table in front is refused too.
    std::fs::copy(ws.path("new-n2.img"), ws.path("out/n2.emmc.img")).unwrap();
    let out = ws.kiln(&["flash", "n2", "--no-power-on"]);
    assert!(
        stderr(&out).contains("has data before the loader"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn reimage_refuses_a_node_on_nvme() {
    let (ws, _) = nvme_ws("nvme-reimage", None, 33);
    let out = ws.kiln(&["reimage", "n2"]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("runs from its nvme, which the BMC cannot write") && e.contains("kiln write"),
        "{e}"
    );
}

/// What the BMC does to an eMMC that held a whole system: writes the loader image from byte 0
/// and leaves the rest. The old GPT's backup copy at the end survives, but with no protective
/// MBR neither Linux (block/partitions/efi.c) nor U-Boot (disk/part_efi.c, part_test_efi)
/// reads a GPT, and there is no MBR signature either.
#[test]
fn a_loader_image_written_over_an_old_system_leaves_no_partition_table() {
    let (ws, _) = nvme_ws("nvme-stale", None, 34);
    let o = build(&ws, &["n1", "n2"], "uboot.bin");
    assert!(o.status.success(), "{}", stderr(&o));
    // The old eMMC: n1's whole system, on a device bigger than the image.
    let disk = ws.path("emmc.disk");
    std::fs::copy(ws.path("out/n1.img"), &disk).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.set_len(std::fs::metadata(&disk).unwrap().len() + (64 << 20))
        .unwrap();
    drop(f);
    let before = tool("partx", &["--show", disk.to_str().unwrap()]);
    assert!(before.status.success(), "the old system has partitions");
    let dd = tool(
        "dd",
        &[
            &format!("if={}", ws.path("out/n2.emmc.img").display()),
            &format!("of={}", disk.display()),
            "bs=1M",
            "conv=notrunc",
            "status=none",
        ],
    );
    assert!(dd.status.success());
    let d = disk.to_str().unwrap();
    let p = tool("partx", &["--show", d]);
    assert!(!p.status.success(), "partx: {}", stdout(&p));
    let s = tool("sfdisk", &["-d", d]);
    assert!(!s.status.success(), "sfdisk: {}", stdout(&s));
    let b = tool("blkid", &["-p", d]);
    assert_eq!(b.status.code(), Some(2), "blkid: {}", stdout(&b));
}

fn mcopy(img: &Path, offset: u64, path: &str) -> Vec<u8> {
    let o = tool(
        "mcopy",
        &[
            "-n",
            "-i",
            &format!("{}@@{offset}", img.display()),
            &format!("::{path}"),
            "-",
        ],
    );
    assert!(o.status.success(), "mcopy {path}: {}", stderr(&o));
    o.stdout
}

/// `sfdisk --json` partitions: (start bytes, size bytes, name, uuid, attrs).
fn partitions(img: &Path) -> Vec<(u64, u64, String, String, String)> {
    let o = tool("sfdisk", &["--json", img.to_str().unwrap()]);
    assert!(o.status.success(), "sfdisk: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap_or("").to_string();
            (
                p["start"].as_u64().unwrap() * 512,
                p["size"].as_u64().unwrap() * 512,
                s("name"),
                s("uuid").to_lowercase(),
                s("attrs"),
            )
        })
        .collect()
}

/// `kiln flash --install --prepare` makes the installer image from the build's two images
/// without a BMC; checked with sfdisk, sgdisk, fsck.fat and mtools.
#[test]
fn the_install_image_carries_the_system_the_loader_and_a_bootable_installer() {
    let (ws, data) = nvme_ws("nvme-install", None, 35);
    let o = build(&ws, &["n1", "n2"], "uboot.bin");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = ws.kiln(&["flash", "n2", "--install", "--prepare"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (sys, inst) = (ws.path("out/n2.img"), ws.path("out/n2.install.img"));
    assert!(stdout(&o).contains("n2.install.img"), "{}", stdout(&o));

    let v = tool("sgdisk", &["-v", inst.to_str().unwrap()]);
    assert!(stdout(&v).contains("No problems found"), "{}", stdout(&v));
    let sp = partitions(&sys);
    let ip = partitions(&inst);
    assert_eq!(ip.len(), 3, "{ip:?}");
    for i in 0..2 {
        assert_eq!(
            (ip[i].0, ip[i].1),
            (sp[i].0, sp[i].1),
            "partition {} moved",
            i + 1
        );
        assert_ne!(
            ip[i].3,
            sp[i].3,
            "partition {} keeps the system's GUID",
            i + 1
        );
        assert!(!ip[i].4.contains("LegacyBIOSBootable"), "{:?}", ip[i]);
    }
    assert_eq!(ip[2].2, "kiln-install");
    assert!(ip[2].4.contains("LegacyBIOSBootable"), "{:?}", ip[2]);
    assert_eq!(
        ip[2].0,
        sp[1].0 + sp[1].1,
        "installer right after the system"
    );

    // The system's partitions byte for byte, and the loader at 32 KiB.
    let (first, end) = (sp[0].0, sp[1].0 + sp[1].1);
    let a = read_at(&sys, first, (end - first) as usize);
    let b = read_at(&inst, first, (end - first) as usize);
    let diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert!(
        diff.is_none(),
        "the system's partitions differ in the install image from byte {:?}",
        diff.map(|d| d as u64 + first)
    );
    assert_eq!(read_at(&inst, LOADER_AT, data.len()), data);

    // The installer partition: a clean FAT with the boot chain and what the script needs.
    let fsck = tool(
        "sh",
        &[
            "-c",
            &format!(
                "dd if={} bs=1M skip={} count={} status=none of={0}.fat && fsck.fat -n {0}.fat",
                inst.display(),
                ip[2].0 >> 20,
                ip[2].1 >> 20
            ),
        ],
    );
    assert!(fsck.status.success(), "fsck.fat: {}", stdout(&fsck));
    let conf = String::from_utf8(mcopy(&inst, ip[2].0, "extlinux/extlinux.conf")).unwrap();
    let append = conf
        .lines()
        .find(|l| l.trim_start().starts_with("append "))
        .unwrap();
    assert!(
        append.contains(&format!("root=PARTUUID={}", ip[1].3))
            && append.contains(" ro ")
            && !append.contains(" rw")
            && append.ends_with("init=/usr/lib/kiln/kiln-install"),
        "{conf}"
    );
    assert_eq!(
        mcopy(&inst, ip[2].0, "vmlinuz"),
        mcopy(&sys, sp[0].0, "vmlinuz")
    );
    let env = String::from_utf8(mcopy(&inst, ip[2].0, "kiln/install.env")).unwrap();
    let sys_len = std::fs::metadata(&sys).unwrap().len();
    for want in [
        format!("KILN_SYSTEM_SHA256={}", sha256_file(&sys)),
        format!("KILN_SYSTEM_BYTES={sys_len}"),
        format!("KILN_FIRST={first}"),
        format!("KILN_END={end}"),
        format!(
            "KILN_INSTALL_BYTES={}",
            std::fs::metadata(&inst).unwrap().len()
        ),
        "KILN_OVERWRITE=0".to_string(),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} not in:\n{env}");
    }
    assert_eq!(
        mcopy(&inst, ip[2].0, "kiln/gpt-primary.bin"),
        read_at(&sys, 0, 34 * 512)
    );
    assert_eq!(
        mcopy(&inst, ip[2].0, "kiln/gpt-backup.bin"),
        read_at(&sys, sys_len - 33 * 512, 33 * 512)
    );
    // The script it boots is in the system's root (run from there, read-only).
    let cat = tool(
        "sh",
        &[
            "-c",
            &format!(
                "dd if={} bs=1M skip={} count={} status=none of={0}.root && debugfs -R 'stat /usr/lib/kiln/kiln-install' {0}.root",
                sys.display(),
                sp[1].0 >> 20,
                sp[1].1 >> 20
            ),
        ],
    );
    assert!(
        stdout(&cat).contains("Mode:  0755"),
        "kiln-install not in the root: {}{}",
        stdout(&cat),
        stderr(&cat)
    );

    // --overwrite-nvme reaches the installer; --install is only for such nodes.
    let o = ws.kiln(&["flash", "n2", "--install", "--overwrite-nvme", "--prepare"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let env = String::from_utf8(mcopy(&inst, ip[2].0, "kiln/install.env")).unwrap();
    assert!(env.contains("KILN_OVERWRITE=1\n"), "{env}");
    let o = ws.kiln(&["flash", "n1", "--install", "--prepare"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("flash without --install"),
        "{}",
        stderr(&o)
    );
    let o = ws.kiln(&["flash", "n2", "--overwrite-nvme", "--prepare"]);
    assert!(
        !o.status.success(),
        "--overwrite-nvme alone must be refused"
    );
}
