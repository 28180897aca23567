//! The RK1 loader from what users have: a bare `u-boot-rockchip.bin` or a whole vendor disk
//! image (GPT or MBR; plain, xz, gzip or zstd). The disk images are made here with sgdisk and
//! sfdisk, the loader written into them with dd and compressed with the xz, gzip and zstd tools,
//! so kiln's reader is checked against independent writers; the stand-in loader is test data
//! with the `RKNS` header, not U-Boot.

mod common;

use common::k3s::sha256;
use common::*;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Where the RK1 board profile writes U-Boot, and where vendor images hold it.
const LOADER_AT: u64 = 32 * KIB;
/// The RK1 profile's first partition: the loader must end before it.
const FIRST_PARTITION: u64 = 16 * MIB;

/// A vendor-style loader: idbloader (`RKNS` first) at 0, u-boot.itb at 8 MiB - 32 KiB (so at
/// 8 MiB on the disk), zeros between; ends in a non-zero byte.
fn vendor_loader() -> Vec<u8> {
    let mut l = loader_bytes(7, 300_000);
    l.resize((8 * MIB - LOADER_AT) as usize, 0);
    l.extend(loader_bytes(8, 200_000));
    l
}

fn sh(prog: &str, args: &[&str]) {
    let o = run(prog, args);
    assert_ok(&o, &format!("{prog} {}", args.join(" ")));
}

/// Writes `data` into `file` at `offset` with dd (not kiln, not std).
fn dd_at(ws: &Workspace, file: &Path, offset: u64, data: &[u8]) {
    let tmp = ws.path("dd-input");
    std::fs::write(&tmp, data).unwrap();
    sh(
        "dd",
        &[
            &format!("if={}", tmp.display()),
            &format!("of={}", file.display()),
            "bs=512",
            &format!("seek={}", offset / 512),
            "conv=notrunc",
            "status=none",
        ],
    );
}

/// A GPT disk image made by sgdisk: first partition at `first`, 2 MiB of data in it, and
/// `at_32k` written at 32 KiB.
fn gpt_disk(ws: &Workspace, name: &str, first: u64, at_32k: &[u8]) -> PathBuf {
    let p = ws.path(name);
    sh(
        "truncate",
        &["-s", &(first + 4 * MIB).to_string(), p.to_str().unwrap()],
    );
    sh(
        "sgdisk",
        &[
            "-n",
            &format!("1:{}:+2M", first / 512),
            "-t",
            "1:8300",
            p.to_str().unwrap(),
        ],
    );
    dd_at(ws, &p, LOADER_AT, at_32k);
    // The partition holds data: a reader that went past the first partition would take it.
    dd_at(ws, &p, first, &bytes(99, 1 << 20));
    p
}

/// An MBR (DOS) disk image made by sfdisk, first partition at 16 MiB, the loader at 32 KiB.
fn mbr_disk(ws: &Workspace, name: &str, at_32k: &[u8]) -> PathBuf {
    let p = ws.path(name);
    sh(
        "truncate",
        &[
            "-s",
            &(FIRST_PARTITION + 4 * MIB).to_string(),
            p.to_str().unwrap(),
        ],
    );
    let mut c = Command::new("sfdisk")
        .args(["--quiet", p.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sfdisk");
    c.stdin
        .take()
        .unwrap()
        .write_all(
            format!(
                "label: dos\nstart={}, size=4096, type=83\n",
                FIRST_PARTITION / 512
            )
            .as_bytes(),
        )
        .unwrap();
    let o = c.wait_with_output().unwrap();
    assert_ok(&o, "sfdisk");
    dd_at(ws, &p, LOADER_AT, at_32k);
    dd_at(ws, &p, FIRST_PARTITION, &bytes(98, 1 << 20));
    p
}

/// Compresses `file` with the command-line tool; returns the compressed file.
fn compress(tool: &str, file: &Path) -> PathBuf {
    let f = file.to_str().unwrap();
    let (out, args): (String, Vec<&str>) = match tool {
        "xz" => (format!("{f}.xz"), vec!["-k", "-f", "-T1", f]),
        "gzip" => (format!("{f}.gz"), vec!["-k", "-f", f]),
        "zstd" => (format!("{f}.zst"), vec!["-q", "-f", f]),
        _ => panic!("no tool {tool}"),
    };
    sh(tool, &args);
    PathBuf::from(out)
}

fn build_rk1(ws: &Workspace, uboot: &Path) -> Output {
    let base = ws.path("base.tar");
    if !base.exists() {
        make_bases(&ws.dir);
    }
    build(ws, &["rk1-1"], &base, Some(uboot))
}

/// The built image holds `loader` at 32 KiB and zeros from its end to the first partition;
/// `kiln inspect` (text and JSON) and the manifest name the file and the loader's sha256.
fn check_loader(ws: &Workspace, given: &Path, loader: &[u8], form: &str, compression: &str) {
    let img = ws.path("out/rk1-1.img");
    let mut area = vec![0u8; (FIRST_PARTITION - LOADER_AT) as usize];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut area, LOADER_AT)
        .unwrap();
    assert!(
        area[..loader.len()] == *loader,
        "the image's bytes at 32 KiB are not the loader"
    );
    assert!(
        area[loader.len()..].iter().all(|&b| b == 0),
        "data after the loader, before the first partition"
    );
    let want = sha256(loader);
    let file_name = given.file_name().unwrap().to_str().unwrap();

    let o = ws.kiln(&["inspect", "--json", img.to_str().unwrap()]);
    assert_ok(&o, "inspect --json");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let l = &v["loaders"][0];
    assert_eq!(l["artifact"], "uboot", "{v}");
    assert_eq!(l["offset"], LOADER_AT, "{l}");
    assert_eq!(l["sha256"], want.as_str(), "measured sha256: {l}");
    assert_eq!(l["size"], loader.len() as u64, "{l}");
    assert_eq!(l["matches_record"], true, "{l}");
    assert_eq!(l["recorded"]["file"], file_name, "{l}");
    assert_eq!(l["recorded"]["form"], form, "{l}");
    assert_eq!(l["recorded"]["compression"], compression, "{l}");
    assert_eq!(l["recorded"]["sha256"], want.as_str(), "{l}");
    assert_eq!(v["identity"]["loaders"][0]["sha256"], want.as_str());
    let text = stdout(&ws.kiln(&["inspect", img.to_str().unwrap()]));
    let line = text
        .lines()
        .find(|l| l.starts_with("loader uboot at byte 32768:"))
        .unwrap_or_else(|| panic!("no loader line in inspect:\n{text}"));
    assert!(
        line.contains(&want) && line.contains(file_name) && !line.contains("DIFFERS"),
        "{line}"
    );

    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ws.path("out/kiln-manifest.json")).unwrap()).unwrap();
    let inputs = m["inputs"].as_array().unwrap();
    let u = inputs
        .iter()
        .find(|i| i["name"] == "uboot")
        .unwrap_or_else(|| panic!("no uboot input: {inputs:?}"));
    assert_eq!(
        u["source"],
        format!("--artifact uboot={}", given.display()),
        "the path as given"
    );
    assert_eq!(
        u["sha256"],
        sha256(&std::fs::read(given).unwrap()),
        "file sha256"
    );
    assert_eq!(u["loader"]["sha256"], want.as_str(), "{u}");
    assert_eq!(u["loader"]["size"], loader.len() as u64, "{u}");
    assert_eq!(u["loader"]["form"], form, "{u}");
    assert_eq!(u["loader"]["compression"], compression, "{u}");
}

/// The build failed cleanly (no panic, no image) with a message naming `file`, containing each
/// of `want`.
fn assert_refused(ws: &Workspace, o: &Output, file: &Path, want: &[&str]) {
    assert!(!o.status.success(), "{} was accepted", file.display());
    assert_ne!(o.status.code(), Some(101), "kiln panicked:\n{}", stderr(o));
    let err = stderr(o);
    assert!(
        err.contains(&format!("--artifact uboot={}", file.display())),
        "error does not name the file:\n{err}"
    );
    for w in want {
        assert!(err.contains(w), "error lacks `{w}`:\n{err}");
    }
    assert!(!ws.path("out/rk1-1.img").exists(), "an image was written");
}

#[test]
fn bare_loader_goes_in_without_its_trailing_zeros() {
    let ws = Workspace::new("uboot-bare");
    let loader = loader_bytes(3, 700_000);
    let mut file = loader.clone();
    file.extend(vec![0u8; 5000]);
    let p = ws.path("u-boot-rockchip.bin");
    std::fs::write(&p, &file).unwrap();
    assert_ok(&build_rk1(&ws, &p), "build with a bare loader");
    check_loader(&ws, &p, &loader, "bare", "none");
}

fn gpt_case(name: &str, tool: Option<&str>, compression: &str) {
    let ws = Workspace::new(name);
    let loader = vendor_loader();
    let mut p = gpt_disk(&ws, "ubuntu-rk1.img", FIRST_PARTITION, &loader);
    if let Some(t) = tool {
        p = compress(t, &p);
    }
    assert_ok(&build_rk1(&ws, &p), &format!("build from {}", p.display()));
    check_loader(&ws, &p, &loader, "gpt-disk-image", compression);
}

#[test]
fn gpt_disk_image_plain() {
    gpt_case("uboot-gpt", None, "none");
}

#[test]
fn gpt_disk_image_xz() {
    gpt_case("uboot-gpt-xz", Some("xz"), "xz");
}

#[test]
fn gpt_disk_image_gz() {
    gpt_case("uboot-gpt-gz", Some("gzip"), "gzip");
}

#[test]
fn gpt_disk_image_zst() {
    gpt_case("uboot-gpt-zst", Some("zstd"), "zstd");
}

#[test]
fn mbr_disk_image() {
    let ws = Workspace::new("uboot-mbr");
    let loader = vendor_loader();
    let p = mbr_disk(&ws, "armbian-rk1.img", &loader);
    assert_ok(&build_rk1(&ws, &p), "build from an MBR image");
    check_loader(&ws, &p, &loader, "mbr-disk-image", "none");
}

/// A gzip file named `.xz`: the bytes decide, not the name.
#[test]
fn compression_is_told_by_magic_bytes_not_the_name() {
    let ws = Workspace::new("uboot-misnamed");
    let loader = vendor_loader();
    let disk = gpt_disk(&ws, "vendor.img", FIRST_PARTITION, &loader);
    let gz = compress("gzip", &disk);
    let misnamed = ws.path("vendor.img.xz");
    std::fs::rename(&gz, &misnamed).unwrap();
    assert_ok(&build_rk1(&ws, &misnamed), "build from a misnamed gzip");
    check_loader(&ws, &misnamed, &loader, "gpt-disk-image", "gzip");
}

/// A vendor image whose first partition lies past the RK1's 16 MiB is taken when its loader
/// fits (trailing zeros dropped), and refused when the loader itself runs past 16 MiB.
#[test]
fn loader_must_end_before_the_boards_first_partition() {
    let ws = Workspace::new("uboot-overlap");
    let loader = vendor_loader();
    let fits = gpt_disk(&ws, "first-at-32m.img", 32 * MIB, &loader);
    assert_ok(
        &build_rk1(&ws, &fits),
        "build from an image with its first partition at 32 MiB",
    );
    check_loader(&ws, &fits, &loader, "gpt-disk-image", "none");
    std::fs::remove_dir_all(ws.path("out")).unwrap();

    // One byte too many: the loader's last byte would land on the first partition's first.
    let mut big = loader_bytes(5, 1000);
    big.resize((FIRST_PARTITION - LOADER_AT) as usize, 0);
    big.push(0x5a);
    let over = gpt_disk(&ws, "overlap.img", 32 * MIB, &big);
    let o = build_rk1(&ws, &over);
    assert_refused(
        &ws,
        &o,
        &over,
        &[
            "into the first partition at byte 16777216",
            "16744449 bytes",
            "at most",
        ],
    );
    // The same loader as a bare file.
    let bare = ws.path("too-big.bin");
    std::fs::write(&bare, &big).unwrap();
    let o = build_rk1(&ws, &bare);
    assert_refused(&ws, &o, &bare, &["into the first partition", "bare loader"]);
}

#[test]
fn disk_image_without_rkns_at_32k_or_without_a_table_is_refused() {
    let ws = Workspace::new("uboot-nomagic");
    // A disk image with something else at 32 KiB: here the RC4-encoded header older Rockchip
    // SoCs (RK3399...) use.
    let mut other = bytes(11, 400_000);
    other[..4].copy_from_slice(&[0x3b, 0x8c, 0xdc, 0xfc]);
    let p = gpt_disk(&ws, "not-rk3588.img", FIRST_PARTITION, &other);
    let o = build_rk1(&ws, &p);
    assert_refused(
        &ws,
        &o,
        &p,
        &[
            "GPT disk image without a Rockchip loader",
            "found 3b 8c dc fc (the RC4-encoded header of Rockchip SoCs before the RK35xx",
            "expected the idbloader header `RKNS`",
        ],
    );
    // Compressed, the same.
    let xz = compress("xz", &p);
    let o = build_rk1(&ws, &xz);
    assert_refused(
        &ws,
        &o,
        &xz,
        &["found 3b 8c dc fc", "at byte 32768", "RKNS"],
    );

    // Neither a loader nor a disk image.
    let junk = ws.path("junk.bin");
    std::fs::write(&junk, bytes(12, 100_000)).unwrap();
    let o = build_rk1(&ws, &junk);
    assert_refused(
        &ws,
        &o,
        &junk,
        &[
            "neither a Rockchip loader",
            "`RKNS` at byte 0",
            "no partition table",
        ],
    );
    // A disk image with a partition table but no partitions.
    let empty = ws.path("empty.img");
    sh("truncate", &["-s", "20M", empty.to_str().unwrap()]);
    sh("sgdisk", &["-o", empty.to_str().unwrap()]);
    let o = build_rk1(&ws, &empty);
    assert_refused(&ws, &o, &empty, &["with no partitions"]);
}

#[test]
fn truncated_or_corrupt_compressed_image_is_refused() {
    let ws = Workspace::new("uboot-truncated");
    let loader = vendor_loader();
    let disk = gpt_disk(&ws, "rk1.img", FIRST_PARTITION, &loader);
    for (tool, ext, name) in [
        ("xz", "xz", "xz"),
        ("zstd", "zst", "zstd"),
        ("gzip", "gz", "gzip"),
    ] {
        let c = std::fs::read(compress(tool, &disk)).unwrap();
        // Cut inside the loader's compressed bytes: its 500 KB of random bytes come first and
        // are a third of the file (the partition's 1 MiB follows, and is never read).
        let cut = ws.path(&format!("truncated.img.{ext}"));
        std::fs::write(&cut, &c[..c.len() / 4]).unwrap();
        let o = build_rk1(&ws, &cut);
        assert_refused(
            &ws,
            &o,
            &cut,
            &[
                &format!("not a valid {name} stream"),
                "truncated or corrupt",
            ],
        );
    }
    // Corrupt: the xz stream flags, which their CRC32 covers.
    let mut c = std::fs::read(compress("xz", &disk)).unwrap();
    c[7] ^= 0x01;
    let bad = ws.path("corrupt.img.xz");
    std::fs::write(&bad, &c).unwrap();
    let o = build_rk1(&ws, &bad);
    assert_refused(&ws, &o, &bad, &["not a valid xz stream"]);
    // A plain image cut before its first partition.
    let raw = std::fs::read(&disk).unwrap();
    let short = ws.path("short.img");
    std::fs::write(&short, &raw[..(4 * MIB) as usize]).unwrap();
    let o = build_rk1(&ws, &short);
    assert_refused(
        &ws,
        &o,
        &short,
        &["ends at byte 4194304", "is it truncated?"],
    );
}
