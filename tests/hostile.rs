//! What a careless or hostile user, profile, tarball or image can feed kiln: each rule has a
//! failing fixture (an error naming the file, the line, the field path and what was expected),
//! hostile inputs give clear errors or warnings instead of panics, hangs or huge allocations,
//! and a bounded mutation loop checks that no input makes kiln panic (exit 101) or hang.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

// ---- helpers ----

/// Replaces `from` (which must occur) in a workspace file.
fn edit_file(ws: &Workspace, file: &str, from: &str, to: &str) {
    let p = ws.path(file);
    let s = std::fs::read_to_string(&p).unwrap();
    assert!(s.contains(from), "fixture text `{from}` not in {file}");
    std::fs::write(&p, s.replacen(from, to, 1)).unwrap();
}

/// 1-based line of the `nth` line of `file` containing `needle`.
fn line_in(ws: &Workspace, file: &str, needle: &str, nth: usize) -> usize {
    let s = std::fs::read_to_string(ws.path(file)).unwrap();
    s.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .nth(nth)
        .map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("`{needle}` #{nth} not in {file}"))
}

/// A workspace name no other test of this binary uses (they run in parallel).
fn unique(name: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("{name}-{n}")
}

/// Runs `kiln check`, expects a failure (not a panic) with an error line that starts with
/// `<file>:<line>:` and contains every one of `parts`.
fn expect_check_error(ws: &Workspace, file: &str, line: usize, parts: &[&str]) {
    let o = ws.kiln(&["check"]);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit 1 with {parts:?}:\n{err}"
    );
    let name = Path::new(file).file_name().unwrap().to_str().unwrap();
    let prefix = format!("{name}:{line}:");
    assert!(
        err.lines()
            .any(|l| l.contains(&prefix) && parts.iter().all(|p| l.contains(p))),
        "no error line with `{prefix}` and {parts:?} in:\n{err}"
    );
}

/// Edits a board profile in a fresh workspace and expects `kiln check` to refuse it at the line
/// of `at` (a text the edited profile contains; `(text, n)` for its n-th line), with `parts`.
fn board_rule(board: &str, from: &str, to: &str, at: impl Into<At>, parts: &[&str]) {
    let ws = Workspace::new(&unique("hostile-board"));
    let file = format!("boards/{board}.toml");
    edit_file(&ws, &file, from, to);
    let at = at.into();
    let line = line_in(&ws, &file, at.0, at.1);
    expect_check_error(&ws, &file, line, parts);
}

/// Where an error is expected: the `n`-th line containing a text.
struct At(&'static str, usize);

impl From<&'static str> for At {
    fn from(s: &'static str) -> At {
        At(s, 0)
    }
}

impl From<(&'static str, usize)> for At {
    fn from((s, n): (&'static str, usize)) -> At {
        At(s, n)
    }
}

/// Runs a command with a deadline; a command still running then is killed and the test fails
/// (kiln must never hang, whatever the input).
fn run_bounded(mut cmd: Command, limit: Duration, what: &str) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "{what}: still running after {limit:?} (a hang)\nstderr:\n{}",
                stderr(&o)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn kiln_cmd(ws: &Workspace, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.current_dir(&ws.dir)
        .args(args)
        .env_remove("SOURCE_DATE_EPOCH")
        .env("KILN_CACHE_DIR", ws.dir.join("cache"));
    c
}

/// Exit 0 or 1, never a panic (101), a usage error or a signal (an abort on a huge allocation).
fn assert_no_panic(o: &Output, what: &str) {
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "{what}: exit {:?}\nstderr:\n{}",
        o.status,
        stderr(o)
    );
}

fn inspect(ws: &Workspace, img: &Path) -> Output {
    let o = run_bounded(
        kiln_cmd(ws, &["inspect", img.to_str().unwrap()]),
        Duration::from_secs(60),
        "kiln inspect",
    );
    assert_no_panic(&o, "kiln inspect");
    o
}

fn crc32(b: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(b);
    c.sum()
}

// ---- board profiles: ranges, names and what the build would trip on ----

#[test]
fn board_numbers_are_range_checked() {
    // Before: 2^62 * 512 overflowed (a panic in a debug build).
    board_rule(
        "rk1",
        "first_usable_lba = 34",
        "first_usable_lba = 4611686018427387904",
        "first_usable_lba",
        &[
            "partition_table.first_usable_lba",
            "out of range",
            "expected 34 to",
        ],
    );
    board_rule(
        "rk1",
        "size = \"512MiB\"",
        "size = 1000",
        "[[partition]]",
        &["partition[0].size", "out of range", "512-byte sectors"],
    );
    board_rule(
        "rk1",
        "start = \"16MiB\"",
        "start = \"17000GiB\"",
        "[[partition]]",
        &["partition[0].start", "out of range", "at most 16384GiB"],
    );
    board_rule(
        "rk1",
        "headroom = \"64MiB\"",
        "headroom = \"9999999GiB\"",
        ("[[partition]]", 1),
        &["partition[1].headroom", "out of range"],
    );
    board_rule(
        "rk1",
        "offset = \"32KiB\"",
        "offset = \"17000GiB\"",
        "[[blob]]",
        &["blob[0].offset", "out of range"],
    );
    board_rule(
        "rpi5",
        "start = \"8MiB\"",
        "start = \"3072GiB\"",
        "[[partition]]",
        &["partition[0].start", "an MBR addresses at most 2 TiB"],
    );
    board_rule(
        "rk1",
        "size = \"512MiB\"",
        "size = \"600GiB\"",
        "[[partition]]",
        &["partition[0].size", "too large for FAT32"],
    );
}

#[test]
fn board_partition_table_limits() {
    // Five partitions on an MBR: three more copies of the root partition's table.
    let ws = Workspace::new("hostile-mbr-count");
    let p = ws.path("boards/rpi5.toml");
    let s = std::fs::read_to_string(&p).unwrap();
    let root = "[[partition]]\nname = \"root\"\nfs = \"ext4\"\ncontent = \"rootfs\"\nsize = \"1GiB\"\nlabel = \"x\"\ntype = \"0x83\"\n";
    let more = format!("{root}{root}{root}");
    std::fs::write(&p, s.replacen("[kernel]", &format!("{more}\n[kernel]"), 1)).unwrap();
    let o = ws.kiln(&["check"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.lines().any(|l| l.contains("rpi5.toml:")
            && l.contains("partition[4]")
            && l.contains("an MBR holds at most 4")),
        "{err}"
    );

    board_rule(
        "rk1",
        "name = \"boot\"",
        "name = \"a-partition-name-longer-than-36-characters\"",
        "[[partition]]",
        &["partition[0].name", "GPT partition name", "at most 36"],
    );
    board_rule(
        "rk1",
        "label = \"BOOT\"",
        "label = \"BOOT/EFI.PART\"",
        "[[partition]]",
        &["partition[0].label", "Vfat label", "at most 11"],
    );
    board_rule(
        "rk1",
        "label = \"rootfs\"",
        "label = \"a-label-over-16-bytes\"",
        ("[[partition]]", 1),
        &["partition[1].label", "Ext4 label", "at most 16"],
    );
}

#[test]
fn boot_file_names_are_plain_and_distinct() {
    board_rule(
        "rk1",
        "file = \"vmlinuz\"",
        "file = \"\"",
        "file = ",
        &["kernel.file", "not a boot partition file name", "expected"],
    );
    // A newline would add a line to extlinux.conf.
    board_rule(
        "rk1",
        "initrd = \"initrd.img\"",
        "initrd = \"initrd.img\\nfdt /evil.dtb\"",
        "initrd = ",
        &["kernel.initrd", "not a boot partition file name"],
    );
    // FAT names ignore case: the initramfs would overwrite the kernel.
    board_rule(
        "rk1",
        "initrd = \"initrd.img\"",
        "initrd = \"VMLINUZ\"",
        "initrd = ",
        &[
            "kernel.initrd",
            "collides with `vmlinuz`",
            "FAT names ignore case",
        ],
    );
    // kiln writes extlinux/extlinux.conf itself.
    board_rule(
        "rk1",
        "file = \"vmlinuz\"",
        "file = \"extlinux\"",
        "file = ",
        &["kernel.file", "collides with `extlinux/extlinux.conf`"],
    );
    board_rule(
        "rpi5",
        "to = \"bcm2712-d-rpi-5-b.dtb\"",
        "to = \"config.txt\"",
        "copy = [",
        &["devicetree.copy[1].to", "collides with `config.txt`"],
    );
    board_rule(
        "rpi5",
        "to = \"bcm2712-d-rpi-5-b.dtb\"",
        "to = \"BCM2712-rpi-5-b.dtb\"",
        "copy = [",
        &[
            "devicetree.copy[1].to",
            "collides with `bcm2712-rpi-5-b.dtb`",
        ],
    );
    board_rule(
        "rk1",
        "to = \"dtbs/rockchip\"",
        "to = \"kiln.json\"",
        "copy = [",
        &["devicetree.copy[0].to", "collides with `kiln.json`"],
    );
    board_rule(
        "rk1",
        "to = \"dtbs/rockchip\"",
        "to = \"dtbs/../../x\"",
        "copy = [",
        &["devicetree.copy[0].to", "not a boot partition path"],
    );
    board_rule(
        "rk1",
        "from = \"rockchip\"",
        "from = \"../../../etc\"",
        "copy = [",
        &["devicetree.copy[0].from", "no `..`"],
    );
}

#[test]
fn boot_configuration_values_cannot_inject_lines() {
    board_rule(
        "rk1",
        "cmdline = [\"rw\", \"rootwait\", \"earlycon\"]",
        "cmdline = [\"rw\", \"rootwait\\n    kernel /evil\", \"earlycon\"]",
        "cmdline = ",
        &["kernel.cmdline[1]", "not one command-line word"],
    );
    board_rule(
        "rpi5",
        "consoles = [\"ttyAMA10,115200\"]",
        "consoles = [\"ttyAMA10,115200 init=/bin/sh\"]",
        "consoles = ",
        &["kernel.consoles[0]", "not a console"],
    );
    board_rule(
        "rk1",
        "fdtdir = \"/dtbs/\"",
        "fdtdir = \"/dtbs/\\n    fdt /evil.dtb\"",
        "fdtdir = ",
        &["devicetree.fdtdir", "not a directory name"],
    );
    board_rule(
        "rpi5",
        "device_tree = \"bcm2712-rpi-5-b.dtb\"",
        "device_tree = \"bcm2712-rpi-5-b.dtb\\ndtoverlay=evil\"",
        "device_tree = \"bcm2712-rpi-5-b.dtb",
        &["devicetree.device_tree", "not a boot partition file name"],
    );
    board_rule(
        "rpi5",
        "config = []",
        "config = [\"arm_boost=1\\nkernel=evil.img\"]",
        "config = [",
        &["rpi.config[0]", "not one line"],
    );
    board_rule(
        "rpi5",
        "eeprom_tool = \"sudo rpi-eeprom-config --edit\"",
        "eeprom_tool = \"sudo rpi-eeprom-config\\u001b[2J --edit\"",
        "eeprom_tool",
        &["eeprom_tool", "not one line"],
    );
}

#[test]
fn board_type_errors_name_the_field_path() {
    board_rule(
        "rk1",
        "size = \"512MiB\"",
        "size = true",
        "size = true",
        &["partition[0].size", "expected a size"],
    );
    board_rule(
        "rpi5",
        "optional = true },\n  { from = \"overlays\"",
        "optional = 3 },\n  { from = \"overlays\"",
        "optional = 3",
        &["devicetree.copy[1].optional", "expected a boolean"],
    );
    board_rule(
        "rk1",
        "slots = 4",
        "slots = 400",
        "slots = 400",
        &["slots", "u8"],
    );
}

// ---- --artifact ----

#[test]
fn empty_artifact_is_refused() {
    let ws = Workspace::new("hostile-empty-artifact");
    let empty = ws.path("empty.tar.zst");
    std::fs::write(&empty, b"").unwrap();
    let o = build(&ws, &["pi5-staging"], &empty, None);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--artifact base")
            && err.contains(&empty.display().to_string())
            && err.contains("empty (0 bytes)"),
        "{err}"
    );
    assert!(!ws.path("out").exists(), "an output directory was made");
}

// ---- hostile base tarballs ----

/// A tar header with raw name (and link name) bytes: the tar crate's own setters refuse `..`
/// and absolute paths, which is what these fixtures need.
fn raw_header(name: &str, ty: tar::EntryType, size: u64, link: Option<&str>) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(ty);
    h.set_mode(0o644);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    let old = h.as_old_mut();
    old.name[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(l) = link {
        old.linkname[..l.len()].copy_from_slice(l.as_bytes());
    }
    h.set_cksum();
    h
}

/// The fixture base with one extra member appended (before the end-of-archive blocks).
fn base_with(extra: &tar::Header, data: &[u8]) -> Vec<u8> {
    let mut raw = Vec::new();
    write_base_tar(&mut raw);
    // write_base_tar ends with two zero blocks (Builder::into_inner); put the member before.
    let mut b = tar::Builder::new(Vec::new());
    let mut a = tar::Archive::new(raw.as_slice());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let mut h = e.header().clone();
        if h.entry_type().is_symlink() || h.entry_type().is_hard_link() {
            let link = e.link_name().unwrap().unwrap().into_owned();
            let path = e.path().unwrap().into_owned();
            b.append_link(&mut h, path, link).unwrap();
        } else {
            let path = e.path().unwrap().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            b.append_data(&mut h, path, data.as_slice()).unwrap();
        }
    }
    b.append(extra, data).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn hostile_tar_members_are_refused_by_name() {
    let ws = Workspace::new("hostile-tar");
    let cases: Vec<(&str, tar::Header, Vec<u8>, &[&str])> = vec![
        (
            "dotdot",
            raw_header("./../../etc/cron.d/evil", tar::EntryType::Regular, 4, None),
            b"evil".to_vec(),
            &["`./../../etc/cron.d/evil`", "`..` component"],
        ),
        (
            "absolute",
            raw_header("/etc/cron.d/evil", tar::EntryType::Regular, 4, None),
            b"evil".to_vec(),
            &["`/etc/cron.d/evil`", "absolute path"],
        ),
        (
            "hardlink",
            raw_header(
                "./usr/bin/x",
                tar::EntryType::Link,
                0,
                Some("../../etc/shadow"),
            ),
            Vec::new(),
            &["`../../etc/shadow`", "`..` component"],
        ),
        // A header claiming 1 TiB (and 4 bytes of data): never allocated or added up.
        (
            "huge",
            raw_header("./var/huge", tar::EntryType::Regular, 1 << 40, None),
            b"huge".to_vec(),
            &[
                "member `var/huge`",
                "claims 1099511627776 bytes",
                "expected at most",
            ],
        ),
        // A kernel claiming 1 GiB: read into memory for the boot partition, so bounded.
        (
            "kernel",
            raw_header(
                "./boot/vmlinuz-99.0.0",
                tar::EntryType::Regular,
                1 << 30,
                None,
            ),
            b"kern".to_vec(),
            &["boot file `boot/vmlinuz-99.0.0`", "expected at most"],
        ),
    ];
    for (name, h, data, parts) in cases {
        let tarball = ws.path(&format!("{name}.tar"));
        std::fs::write(&tarball, base_with(&h, &data)).unwrap();
        let o = run_bounded(
            {
                let mut args = vec![
                    "build".to_string(),
                    "pi5-staging".into(),
                    "--artifact".into(),
                    format!("base={}", tarball.display()),
                ];
                args.extend(ws.k3s_args());
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                kiln_cmd(&ws, &refs)
            },
            Duration::from_secs(120),
            name,
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains(&tarball.display().to_string()) && parts.iter().all(|p| err.contains(p)),
            "{name}: error does not name the tarball and {parts:?}:\n{err}"
        );
        let left: Vec<String> = std::fs::read_dir(ws.path("out"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "{name}: files left in out/: {left:?}");
    }
}

// ---- hostile images ----

/// A 4 MiB file with a protective MBR and a primary GPT header whose entry count and size are
/// given (header CRC valid, so only the numbers are wrong).
fn gpt_image(ws: &Workspace, name: &str, count: u32, entry_size: u32) -> std::path::PathBuf {
    let mut d = vec![0u8; 4 << 20];
    d[446 + 4] = 0xee;
    d[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    d[446 + 12..446 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    d[510] = 0x55;
    d[511] = 0xaa;
    let mut h = vec![0u8; 92];
    h[..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&[0, 0, 1, 0]);
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&1u64.to_le_bytes());
    h[32..40].copy_from_slice(&((d.len() as u64 / 512) - 1).to_le_bytes());
    h[40..48].copy_from_slice(&34u64.to_le_bytes());
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&count.to_le_bytes());
    h[84..88].copy_from_slice(&entry_size.to_le_bytes());
    let c = crc32(&h);
    h[16..20].copy_from_slice(&c.to_le_bytes());
    d[512..604].copy_from_slice(&h);
    let p = ws.path(name);
    std::fs::write(&p, &d).unwrap();
    p
}

/// A 2 MiB file with an MBR holding `parts` as (start LBA, sectors).
fn mbr_image(ws: &Workspace, name: &str, parts: &[(u32, u32)]) -> std::path::PathBuf {
    let mut d = vec![0u8; 2 << 20];
    for (i, (lba, n)) in parts.iter().enumerate() {
        let e = 446 + i * 16;
        d[e + 4] = 0x83;
        d[e + 8..e + 12].copy_from_slice(&lba.to_le_bytes());
        d[e + 12..e + 16].copy_from_slice(&n.to_le_bytes());
    }
    d[510] = 0x55;
    d[511] = 0xaa;
    let p = ws.path(name);
    std::fs::write(&p, &d).unwrap();
    p
}

#[test]
fn gpt_claiming_absurd_entries_is_a_clear_error() {
    let ws = Workspace::new("hostile-gpt");
    // 2^32 - 1 entries: gptman would reserve ~hundreds of GiB for them.
    let img = gpt_image(&ws, "many.img", u32::MAX, 128);
    let o = inspect(&ws, &img);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("4294967295 partition entries") && err.contains("expected at most"),
        "{err}"
    );
    let img = gpt_image(&ws, "huge-entries.img", 128, 1 << 31);
    let o = inspect(&ws, &img);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("entries of 2147483648 bytes") && err.contains("expected 128"),
        "{err}"
    );
}

#[test]
fn partitions_past_the_end_or_overlapping_are_warnings() {
    let ws = Workspace::new("hostile-mbr");
    // 2 MiB file; partition 1 claims 512 MiB from 1 MiB.
    let img = mbr_image(&ws, "past.img", &[(2048, 1 << 20), (1 << 30, 8)]);
    let o = inspect(&ws, &img);
    assert_ok(&o, "inspect past.img");
    let out = stdout(&o);
    assert!(
        out.contains("warning: partition 1 (bytes 1048576 to 537919488) runs past the end of the file (2097152 bytes)")
            && out.contains("warning: partition 2")
            && out.contains("lies past the end"),
        "{out}"
    );
    let img = mbr_image(&ws, "overlap.img", &[(100, 1000), (600, 100), (2000, 10)]);
    let o = inspect(&ws, &img);
    assert_ok(&o, "inspect overlap.img");
    assert!(
        stdout(&o).contains("warning: partitions 1 and 2 overlap (bytes 307200 to 358400)"),
        "{}",
        stdout(&o)
    );
    assert!(!stdout(&o).contains("partitions 1 and 3"), "{}", stdout(&o));
}

/// An image built by kiln, its FAT partition's start, and the FAT's geometry:
/// (path, partition start, FAT start, bytes per cluster, root cluster, data start).
struct Built {
    img: std::path::PathBuf,
    part: u64,
    fat: u64,
    cluster: u64,
    root: u32,
    data: u64,
}

fn build_rk1(ws: &Workspace) -> Built {
    let bases = make_bases(&ws.dir);
    let (ub, _) = uboot(ws, 64 << 10);
    assert_ok(
        &build(ws, &["rk1-2"], &bases.tar, Some(&ub)),
        "kiln build rk1-2",
    );
    let img = ws.path("out/rk1-2.img");
    let f = std::fs::File::open(&img).unwrap();
    let part = 16u64 << 20;
    let mut bs = [0u8; 512];
    f.read_exact_at(&mut bs, part).unwrap();
    let le16 = |at: usize| u64::from(u16::from_le_bytes([bs[at], bs[at + 1]]));
    let le32 = |at: usize| u32::from_le_bytes([bs[at], bs[at + 1], bs[at + 2], bs[at + 3]]);
    let bps = le16(11);
    let fat = part + le16(14) * bps;
    let fats = u64::from(bs[16]);
    let data = fat + fats * u64::from(le32(36)) * bps;
    Built {
        img,
        part,
        fat,
        cluster: u64::from(bs[13]) * bps,
        root: le32(44),
        data,
    }
}

#[test]
fn truncated_image_and_looping_fat_are_warnings_not_hangs() {
    let ws = Workspace::new("hostile-fat");
    let b = build_rk1(&ws);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&b.img)
        .unwrap();

    // The root directory's cluster chain loops onto itself: lamfat would read it forever.
    let at = b.fat + 4 * u64::from(b.root);
    let mut orig = [0u8; 4];
    f.read_exact_at(&mut orig, at).unwrap();
    f.write_all_at(&b.root.to_le_bytes(), at).unwrap();
    let o = inspect(&ws, &b.img);
    assert_ok(&o, "inspect (root loop)");
    assert!(
        stdout(&o).contains(
            "warning: partition 1: FAT directory /: its cluster chain loops back to cluster"
        ),
        "{}",
        stdout(&o)
    );
    f.write_all_at(&orig, at).unwrap();

    // A file's chain loops (the kernel, the largest file): found, reported, the rest listed.
    let json = ws.kiln(&["inspect", "--json", b.img.to_str().unwrap()]);
    assert_ok(&json, "inspect --json");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["warnings"].as_array().unwrap().len(), 0, "{v}");
    // The root directory's entries: find vmlinuz's first cluster.
    let mut dir = vec![0u8; b.cluster as usize];
    f.read_exact_at(&mut dir, b.data + (u64::from(b.root) - 2) * b.cluster)
        .unwrap();
    let first = dir
        .chunks_exact(32)
        .find(|e| &e[..8] == b"VMLINUZ ")
        .map(|e| {
            u32::from(u16::from_le_bytes([e[20], e[21]])) << 16
                | u32::from(u16::from_le_bytes([e[26], e[27]]))
        })
        .expect("VMLINUZ in the root directory");
    let third = {
        let mut x = [0u8; 4];
        f.read_exact_at(&mut x, b.fat + 4 * u64::from(first))
            .unwrap();
        let second = u32::from_le_bytes(x);
        f.read_exact_at(&mut x, b.fat + 4 * u64::from(second))
            .unwrap();
        (second, u32::from_le_bytes(x))
    };
    let at = b.fat + 4 * u64::from(third.1);
    f.read_exact_at(&mut orig, at).unwrap();
    f.write_all_at(&third.0.to_le_bytes(), at).unwrap();
    let o = inspect(&ws, &b.img);
    assert_ok(&o, "inspect (file loop)");
    let out = stdout(&o);
    assert!(
        out.contains(
            "warning: partition 1: FAT file /vmlinuz: its cluster chain loops back to cluster"
        ) && out.contains("extlinux/extlinux.conf")
            && out.contains("built for node rk1-2"),
        "{out}"
    );
    f.write_all_at(&orig, at).unwrap();

    // A subdirectory that is the root again: a loop in the tree, not followed.
    let root_at = b.data + (u64::from(b.root) - 2) * b.cluster;
    let i = dir
        .chunks_exact(32)
        .position(|e| &e[..11] == b"EXTLINUX   ")
        .expect("EXTLINUX in the root directory");
    let at = root_at + i as u64 * 32;
    let mut entry = [0u8; 32];
    f.read_exact_at(&mut entry, at).unwrap();
    let mut looped = entry;
    looped[20..22].copy_from_slice(&((b.root >> 16) as u16).to_le_bytes());
    looped[26..28].copy_from_slice(&(b.root as u16).to_le_bytes());
    f.write_all_at(&looped, at).unwrap();
    let o = inspect(&ws, &b.img);
    assert_ok(&o, "inspect (directory loop)");
    assert!(
        stdout(&o).contains(&format!(
            "warning: partition 1: FAT directory /extlinux starts at cluster {}, which another directory already uses",
            b.root
        )),
        "{}",
        stdout(&o)
    );
    f.write_all_at(&entry, at).unwrap();

    // Truncated in the middle of the boot partition: warnings, and what can be read is shown.
    let cut = ws.path("cut.img");
    std::fs::copy(&b.img, &cut).unwrap();
    let cf = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
    cf.set_len(b.part + (2 << 20)).unwrap();
    let o = inspect(&ws, &cut);
    assert_ok(&o, "inspect (truncated)");
    let out = stdout(&o);
    assert!(
        out.contains("warning: the backup GPT header belongs at LBA")
            && out.contains(
                "warning: partition 1 (bytes 16777216 to 553648128) runs past the end of the file"
            )
            && out.contains("warning: partition 2")
            && out.contains("is the image truncated?"),
        "{out}"
    );
}

// ---- bounded mutation loops ----

/// Deterministic pseudo-random numbers for the mutation loops.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that break arithmetic and parsers when they reach them unchecked.
const NASTY: &[&str] = &[
    "0",
    "-1",
    "9223372036854775807",
    "4611686018427387904",
    "\"18446744073709551615\"",
    "\"17179869184GiB\"",
    "\"\"",
    "\"..\"",
    "\"a\\nb\"",
    "true",
    "[]",
    "{}",
    "1.5",
    "\"auto\"",
    "\"0x00\"",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
];

/// One mutation of a TOML text: a byte flip, a line dropped or doubled, a value replaced by a
/// nasty one, or a truncation.
fn mutate_toml(text: &str, rng: &mut Rng) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        return NASTY[rng.below(NASTY.len())].to_string();
    }
    match rng.below(5) {
        0 => {
            let mut b = text.as_bytes().to_vec();
            let i = rng.below(b.len());
            b[i] = (rng.next() >> 24) as u8;
            return String::from_utf8_lossy(&b).into_owned();
        }
        1 => {
            let i = rng.below(lines.len());
            lines.remove(i);
        }
        2 => {
            let i = rng.below(lines.len());
            let l = lines[i].clone();
            lines.insert(i, l);
        }
        3 => {
            let with_value: Vec<usize> = (0..lines.len())
                .filter(|&i| lines[i].contains(" = "))
                .collect();
            if let Some(&i) = with_value.get(rng.below(with_value.len())) {
                let key = lines[i].split(" = ").next().unwrap_or("").to_string();
                lines[i] = format!("{key} = {}", NASTY[rng.below(NASTY.len())]);
            }
        }
        _ => {
            let mut n = rng.below(text.len());
            while !text.is_char_boundary(n) {
                n -= 1;
            }
            return text[..n].to_string();
        }
    }
    lines.join("\n") + "\n"
}

/// Board profiles mangled thousands of times, in-process: each loads or gives diagnostics with
/// a field and a message; none panics or takes more than a few seconds.
#[test]
fn no_panic_on_mangled_board_profiles() {
    let ws = Workspace::new("mangle-boards");
    let deadline = Instant::now() + fuzz_budget(20);
    let mut rng = Rng(0x5eed_b0a4d);
    let mut cases = 0;
    let mut errors = 0;
    'outer: for board in ["rk1", "rpi5"] {
        let text = std::fs::read_to_string(ws.path(&format!("boards/{board}.toml"))).unwrap();
        let dir = ws.path(&format!("m-{board}"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{board}.toml"));
        for _ in 0..1500 {
            if Instant::now() > deadline {
                break 'outer;
            }
            let mut t = text.clone();
            for _ in 0..=rng.below(3) {
                t = mutate_toml(&t, &mut rng);
            }
            std::fs::write(&path, &t).unwrap();
            let started = Instant::now();
            let r = std::panic::catch_unwind(|| kiln::config::board::load_file(&path));
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "slow profile:\n{t}"
            );
            match r {
                Err(_) => panic!("board profile loader panicked on:\n{t}"),
                Ok(Ok(_)) => {}
                Ok(Err(d)) => {
                    assert!(!d.is_empty());
                    for x in &d {
                        assert!(!x.message.is_empty() && !x.field.is_empty(), "{x}");
                        assert_ne!(x.field, "document", "no field path for {x} in:\n{t}");
                    }
                    errors += 1;
                }
            }
            cases += 1;
        }
    }
    eprintln!("board profiles: {cases} cases, {errors} refused");
    assert!(cases >= 200, "only {cases} cases ran");
    assert!(errors * 2 > cases, "mangling should break most profiles");
}

/// How long each in-process mutation loop may run: `KILN_FUZZ_SECS` (for a longer run by
/// hand), else the CI budget.
fn fuzz_budget(default_secs: u64) -> Duration {
    let secs = std::env::var("KILN_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_secs);
    Duration::from_secs(secs)
}

/// Inventories mangled thousands of times, in-process, against the shipped board profiles:
/// each loads or gives diagnostics that name a field; none panics or is slow.
#[test]
fn no_panic_on_mangled_inventories() {
    let ws = Workspace::new("mangle-inventory");
    let deadline = Instant::now() + fuzz_budget(15);
    let mut rng = Rng(0x1a7e_0b0b);
    let text = std::fs::read_to_string(ws.path("kiln.toml")).unwrap();
    let path = ws.path("mangled.toml");
    let boards = ws.path("boards");
    let (mut cases, mut errors) = (0, 0);
    while Instant::now() < deadline && cases < 5000 {
        let mut t = text.clone();
        for _ in 0..=rng.below(3) {
            t = mutate_toml(&t, &mut rng);
        }
        std::fs::write(&path, &t).unwrap();
        let started = Instant::now();
        let r = std::panic::catch_unwind(|| kiln::config::load(&path, &boards, false));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "slow inventory:\n{t}"
        );
        match r {
            Err(_) => panic!("inventory loader panicked on:\n{t}"),
            Ok(Ok(_)) => {}
            Ok(Err(d)) => {
                assert!(!d.0.is_empty());
                for x in &d.0 {
                    assert!(!x.message.is_empty() && !x.field.is_empty(), "{x}");
                    assert_ne!(x.field, "document", "no field path for {x} in:\n{t}");
                }
                errors += 1;
            }
        }
        cases += 1;
    }
    eprintln!("inventories: {cases} cases, {errors} refused");
    assert!(cases >= 200, "only {cases} cases ran");
    assert!(errors * 3 > cases, "mangling should break many inventories");
}

/// The binary, end to end: mangled inventories and profiles through `kiln check`, each with a
/// deadline; exit 0 or 1, never a panic.
#[test]
fn kiln_check_never_panics_or_hangs_on_mangled_input() {
    let ws = Workspace::new("mangle-check");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut rng = Rng(0xc0ffee);
    let files = ["kiln.toml", "boards/rk1.toml", "boards/rpi5.toml"];
    let orig: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(ws.path(f)).unwrap())
        .collect();
    let mut cases = 0;
    while Instant::now() < deadline && cases < 400 {
        let k = rng.below(files.len());
        let t = mutate_toml(&orig[k], &mut rng);
        std::fs::write(ws.path(files[k]), &t).unwrap();
        let o = run_bounded(
            kiln_cmd(&ws, &["check"]),
            Duration::from_secs(20),
            "kiln check",
        );
        assert!(
            matches!(o.status.code(), Some(0 | 1)),
            "kiln check exit {:?} on mangled {}:\n{t}\nstderr:\n{}",
            o.status,
            files[k],
            stderr(&o)
        );
        std::fs::write(ws.path(files[k]), &orig[k]).unwrap();
        cases += 1;
    }
    eprintln!("kiln check: {cases} cases");
    assert!(cases >= 30, "only {cases} cases ran");
}

/// A built image mangled in its first MiB (MBR, GPT, loader) and its FAT (boot sector, FSInfo,
/// the allocation table, the root directory), in place and restored after each case:
/// `kiln inspect` exits 0 or 1 within its deadline, never 101.
#[test]
fn kiln_inspect_never_panics_or_hangs_on_mangled_images() {
    let ws = Workspace::new("mangle-image");
    let b = build_rk1(&ws);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&b.img)
        .unwrap();
    let root_dir = b.data + (u64::from(b.root) - 2) * b.cluster;
    // (start, length) of each region worth mangling.
    let regions: [(u64, u64); 6] = [
        (0, 512),
        (512, 512),
        (1024, 16 << 10),
        (b.part, 1024),
        (b.fat, 64 << 10),
        (root_dir, b.cluster),
    ];
    let deadline = Instant::now() + fuzz_budget(25);
    let mut rng = Rng(0xfa7_1dea);
    let mut cases = 0;
    while Instant::now() < deadline && cases < 2000 {
        let (start, len) = regions[rng.below(regions.len())];
        let mut edits = Vec::new();
        for _ in 0..=rng.below(8) {
            let at = start + rng.below(len as usize) as u64;
            // Mostly single bytes; sometimes a whole 32-bit field set to an extreme.
            let new: Vec<u8> = match rng.below(4) {
                0 => u32::MAX.to_le_bytes().to_vec(),
                1 => 0u32.to_le_bytes().to_vec(),
                _ => vec![(rng.next() >> 16) as u8],
            };
            let mut old = vec![0u8; new.len()];
            f.read_exact_at(&mut old, at).unwrap();
            f.write_all_at(&new, at).unwrap();
            edits.push((at, old));
        }
        // Half the GPT cases get valid checksums again, so the numbers themselves are read.
        if start < (17 << 10) && rng.below(2) == 0 {
            let mut h = [0u8; 92];
            f.read_exact_at(&mut h, 512).unwrap();
            let mut arr = vec![0u8; 128 * 128];
            f.read_exact_at(&mut arr, 1024).unwrap();
            let old_h = h;
            h[88..92].copy_from_slice(&crc32(&arr).to_le_bytes());
            h[16..20].fill(0);
            let c = crc32(&h);
            h[16..20].copy_from_slice(&c.to_le_bytes());
            f.write_all_at(&h, 512).unwrap();
            edits.push((512, old_h.to_vec()));
        }
        // In-process every time (the parsers themselves, fast); through the binary every
        // fourth case (exit status and output on top).
        let started = Instant::now();
        let r = std::panic::catch_unwind(|| {
            kiln::image::inspect::inspect(&b.img).map(|i| kiln::image::inspect::render_text(&i))
        });
        let at: Vec<u64> = edits.iter().map(|(a, _)| *a).collect();
        assert!(r.is_ok(), "inspect panicked after edits at {at:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "inspect took {:?} after edits at {at:?}",
            started.elapsed()
        );
        if cases % 4 == 0 {
            let o = run_bounded(
                kiln_cmd(&ws, &["inspect", b.img.to_str().unwrap()]),
                Duration::from_secs(20),
                "kiln inspect",
            );
            assert!(
                matches!(o.status.code(), Some(0 | 1)),
                "kiln inspect exit {:?} after edits at {at:?}:\n{}",
                o.status,
                stderr(&o)
            );
        }
        for (at, old) in edits.iter().rev() {
            f.write_all_at(old, *at).unwrap();
        }
        cases += 1;
    }
    eprintln!(
        "images: {cases} cases in-process, {} through the binary",
        (cases + 3) / 4
    );
    assert!(cases >= 20, "only {cases} cases ran");
    assert_ok(
        &ws.kiln(&["inspect", b.img.to_str().unwrap()]),
        "restored image",
    );
}
