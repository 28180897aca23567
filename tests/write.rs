//! `kiln write IMAGE DEVICE` onto regular files and (as root) loop devices the test creates
//! and removes itself.

mod common_bmc;

use common_bmc::fixture::{Workspace, sha256_file, stderr};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

fn image(ws: &Workspace) -> std::path::PathBuf {
    ws.build("n1")
}

/// A file of `len` bytes full of 0xA5, so anything kiln leaves unwritten shows.
fn garbage(p: &Path, len: u64) {
    let f = File::create(p).unwrap();
    let chunk = vec![0xa5u8; MIB as usize];
    for i in 0..len / MIB {
        f.write_all_at(&chunk, i * MIB).unwrap();
    }
}

fn gpt(p: &Path) -> gptman::GPT {
    gptman::GPT::read_from(&mut File::open(p).unwrap(), 512).unwrap()
}

/// The target reads back as the image over every partition, and the GPT describes the same
/// partitions with its backup at the target's last sector.
fn assert_written(img: &Path, target: &Path) {
    let (gi, gt) = (gpt(img), gpt(target));
    let tlen = File::open(target).unwrap().metadata().unwrap().len();
    let tlen = if tlen == 0 {
        // block device
        std::fs::read_to_string(format!(
            "/sys/class/block/{}/size",
            target.file_name().unwrap().to_string_lossy()
        ))
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap()
            * 512
    } else {
        tlen
    };
    assert_eq!(
        gt.header.backup_lba,
        tlen / 512 - 1,
        "GPT backup header at the end of the target"
    );
    assert!(gt.header.last_usable_lba >= gi.header.last_usable_lba);
    let parts = |g: &gptman::GPT| {
        g.iter()
            .filter(|(_, p)| p.is_used())
            .map(|(i, p)| (i, p.starting_lba, p.ending_lba, p.unique_partition_guid))
            .collect::<Vec<_>>()
    };
    assert_eq!(parts(&gi), parts(&gt));
    let (fi, ft) = (File::open(img).unwrap(), File::open(target).unwrap());
    let mut a = vec![0u8; 4 * MIB as usize];
    let mut b = vec![0u8; 4 * MIB as usize];
    for (_, p) in gi.iter().filter(|(_, p)| p.is_used()) {
        let (start, end) = (p.starting_lba * 512, (p.ending_lba + 1) * 512);
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(a.len());
            fi.read_exact_at(&mut a[..n], pos).unwrap();
            ft.read_exact_at(&mut b[..n], pos).unwrap();
            assert!(a[..n] == b[..n], "partition data differs near byte {pos}");
            pos += n as u64;
        }
    }
    let id_img = kiln::image::inspect::identity(img).unwrap();
    let id_dev = kiln::image::inspect::identity(target).unwrap();
    assert_eq!(id_img, id_dev);
}

#[test]
fn whole_write_to_a_larger_file_verifies_and_moves_the_gpt_backup() {
    let ws = Workspace::new("write-whole", None, None, 20);
    let img = image(&ws);
    let len = std::fs::metadata(&img).unwrap().len();
    let target = ws.path("disk.raw");
    garbage(&target, len + 64 * MIB);
    let out = ws.kiln(&[
        "write",
        img.to_str().unwrap(),
        target.to_str().unwrap(),
        "--yes",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("verified"));
    assert_written(&img, &target);
    // Holes of the image were written as zeros (no 0xA5 left inside the image's span).
    let f = File::open(&target).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    f.read_exact_at(&mut buf, len - 40 * MIB).unwrap();
    assert!(!buf.contains(&0xa5));
}

#[test]
fn bmap_write_zeroes_the_holes_instead_of_writing_them() {
    let ws = Workspace::new("write-bmap", None, None, 21);
    let img = image(&ws);
    let len = std::fs::metadata(&img).unwrap().len();
    let target = ws.path("disk.raw");
    garbage(&target, len + 8 * MIB);
    let out = ws.kiln(&[
        "write",
        img.to_str().unwrap(),
        target.to_str().unwrap(),
        "--yes",
        "--bmap",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("mapped ranges only"));
    assert_written(&img, &target);
    let f = File::open(&target).unwrap();
    assert!(
        f.metadata().unwrap().blocks() * 512 < len,
        "holes were punched, not written"
    );
}

#[test]
fn an_empty_file_gets_an_exact_sparse_copy() {
    let ws = Workspace::new("write-empty", None, None, 22);
    let img = image(&ws);
    let target = ws.path("copy.img");
    File::create(&target).unwrap();
    let out = ws.kiln(&[
        "write",
        img.to_str().unwrap(),
        target.to_str().unwrap(),
        "--yes",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        sha256_file(&img),
        sha256_file(&target),
        "same size: a byte-identical copy"
    );
    let m = std::fs::metadata(&target).unwrap();
    assert!(m.blocks() * 512 < m.len(), "only data ranges were written");
}

#[test]
fn refuses_small_missing_unconfirmed_and_self_targets_without_writing() {
    let ws = Workspace::new("write-refuse", None, None, 23);
    let img = image(&ws);
    let len = std::fs::metadata(&img).unwrap().len();
    let small = ws.path("small.raw");
    garbage(&small, len - MIB);
    let before = sha256_file(&small);
    let i = img.to_str().unwrap();

    let out = ws.kiln(&["write", i, small.to_str().unwrap(), "--yes"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("expected a device at least as large as the image"),
        "{}",
        stderr(&out)
    );
    assert_eq!(sha256_file(&small), before);

    let out = ws.kiln(&["write", i, ws.path("nope").to_str().unwrap(), "--yes"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert!(
        !ws.path("nope").exists(),
        "a missing target is never created"
    );

    let big = ws.path("big.raw");
    garbage(&big, len + MIB);
    let before = sha256_file(&big);
    let out = ws.kiln(&["write", i, big.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    assert_eq!(sha256_file(&big), before);

    let out = ws.kiln(&["write", i, i, "--yes"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the image itself"),
        "{}",
        stderr(&out)
    );
}

/// Loop device attached for the test's duration (and, if mounted, unmounted) on drop.
struct Loop {
    dev: String,
    mnt: Option<std::path::PathBuf>,
}

impl Loop {
    fn attach(file: &Path) -> Loop {
        let o = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("running losetup");
        assert!(
            o.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Loop {
            dev: String::from_utf8_lossy(&o.stdout).trim().to_string(),
            mnt: None,
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(m) = &self.mnt {
            let _ = Command::new("umount").arg(m).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

#[test]
fn loop_devices_are_written_and_mounted_or_attached_ones_refused() {
    assert!(
        std::fs::metadata("/proc/self").unwrap().uid() == 0,
        "this test attaches loop devices and needs root (CI runs it as root)"
    );
    let ws = Workspace::new("write-loop", None, None, 24);
    let img = image(&ws);
    let len = std::fs::metadata(&img).unwrap().len();
    let i = img.to_str().unwrap();

    let backing = ws.path("loop.raw");
    garbage(&backing, len + 32 * MIB);
    let lo = Loop::attach(&backing);
    // The backing file of an attached loop device is refused.
    let out = ws.kiln(&["write", i, backing.to_str().unwrap(), "--yes"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is attached to"), "{}", stderr(&out));
    // The block device itself is written (zeroing the holes with --bmap) and verified.
    let out = ws.kiln(&["write", i, &lo.dev, "--yes", "--bmap"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_written(&img, Path::new(&lo.dev));

    // A mounted device is refused and left alone.
    let fsfile = ws.path("fs.raw");
    File::create(&fsfile).unwrap().set_len(len + MIB).unwrap();
    let mut m = Loop::attach(&fsfile);
    assert!(
        Command::new("mkfs.ext4")
            .args(["-q", &m.dev])
            .status()
            .unwrap()
            .success()
    );
    let mnt = ws.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    assert!(
        Command::new("mount")
            .arg(&m.dev)
            .arg(&mnt)
            .status()
            .unwrap()
            .success()
    );
    m.mnt = Some(mnt.clone());
    let out = ws.kiln(&["write", i, &m.dev, "--yes"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is mounted"), "{}", stderr(&out));
    assert!(
        mnt.join("lost+found").is_dir(),
        "the mounted filesystem is untouched"
    );
}

/// Whether the first MiB of `p` is all zeros: no partition table, no loader, nothing boots.
fn head_is_zero(p: &Path) -> bool {
    let mut buf = vec![0u8; MIB as usize];
    File::open(p).unwrap().read_exact_at(&mut buf, 0).unwrap();
    buf.iter().all(|b| *b == 0)
}

/// A target file that holds another bootable image (`old`, n2's), with room to spare.
fn previous_disk(ws: &Workspace, old: &Path, len: u64) -> std::path::PathBuf {
    let target = ws.path("disk.raw");
    std::fs::copy(old, &target).unwrap();
    let f = File::options().write(true).open(&target).unwrap();
    f.set_len(f.metadata().unwrap().len().max(len) + 8 * MIB)
        .unwrap();
    assert!(
        !head_is_zero(&target),
        "the previous disk has a partition table"
    );
    target
}

#[test]
fn without_yes_and_without_a_terminal_nothing_is_touched() {
    let ws = Workspace::new("write-notty", None, None, 25);
    let img = image(&ws);
    // A new, empty file would otherwise be sized to the image before anything else.
    let empty = ws.path("empty.img");
    File::create(&empty).unwrap();
    let out = ws
        .kiln_command(
            &["write", img.to_str().unwrap(), empty.to_str().unwrap()],
            &[],
        )
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("pass --yes"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("stdin is not a terminal"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::metadata(&empty).unwrap().len(),
        0,
        "target touched"
    );
}

/// Starts `kiln write ... --yes` paused at `stage` (test hook, debug builds: `write-data` after
/// the first data was written, `write-head` once the image's first MiB is written) and returns
/// it once it reports the pause, with a thread collecting the rest of its stderr.
fn paused_write(
    ws: &Workspace,
    img: &Path,
    target: &Path,
    stage: &str,
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    use std::io::BufRead;
    let mut child = ws
        .kiln_command(
            &[
                "write",
                img.to_str().unwrap(),
                target.to_str().unwrap(),
                "--yes",
            ],
            &[("KILN_TEST_PAUSE_AT", stage)],
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let l = lines
            .next()
            .unwrap_or_else(|| panic!("kiln write ended before pausing:\n{}", seen.join("\n")))
            .unwrap();
        if l.starts_with(&format!("kiln: test hook: paused at {stage}")) {
            break;
        }
        seen.push(l);
    }
    // Keep draining stderr so kiln never blocks on it.
    let rest =
        std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>().join("\n"));
    (child, rest)
}

#[test]
fn an_interrupted_write_leaves_the_first_mib_zeroed() {
    use std::os::unix::process::ExitStatusExt;
    let ws = Workspace::new("write-interrupt", None, None, 26);
    let img = image(&ws);
    let len = std::fs::metadata(&img).unwrap().len();
    let old = ws.build("n2");
    // Terminated just after the image's first MiB was written but before it was synced and
    // verified (kiln finishes that write, then zeroes it again), and killed or terminated while
    // the data is written (the first MiB was zeroed first).
    for (stage, sig) in [
        ("write-head", "TERM"),
        ("write-data", "KILL"),
        ("write-data", "TERM"),
    ] {
        let target = previous_disk(&ws, &old, len);
        let (mut child, rest) = paused_write(&ws, &img, &target, stage);
        let o = Command::new("kill")
            .args([format!("-{sig}"), child.id().to_string()])
            .output()
            .unwrap();
        assert!(o.status.success());
        let status = child.wait().unwrap();
        let log = rest.join().unwrap();
        assert_eq!(
            status.signal(),
            Some(if sig == "KILL" { 9 } else { 15 }),
            "{stage}/SIG{sig}: {status}\n{log}"
        );
        assert!(
            head_is_zero(&target),
            "{stage}/SIG{sig} left a partition table in the first MiB\n{log}"
        );
        // Neither the old disk's table nor the new image's: nothing for a tool to read.
        assert!(
            gptman::GPT::read_from(&mut File::open(&target).unwrap(), 512).is_err(),
            "{stage}/SIG{sig}: a GPT is still readable"
        );
        if sig == "TERM" {
            assert!(
                log.contains("interrupted: zeroed the first MiB of"),
                "{stage}: {log}"
            );
        }
    }
}

/// `kiln write IMAGE TARGET --yes` where writes past `limit` bytes fail (RLIMIT_FSIZE via
/// util-linux `prlimit`: EFBIG; SIGXFSZ ignored so kiln sees the error instead of dying).
fn write_with_size_limit(img: &Path, target: &Path, limit: u64) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; exec prlimit --fsize=\"$0\" \"$@\"")
        .arg(limit.to_string())
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "write",
            img.to_str().unwrap(),
            target.to_str().unwrap(),
            "--yes",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running sh and prlimit (util-linux)")
}

#[test]
fn a_write_error_zeroes_the_first_mib_and_says_so() {
    let ws = Workspace::new("write-error", None, None, 27);
    let img = image(&ws);
    let len = std::fs::metadata(&img).unwrap().len();
    let old = ws.build("n2");
    assert!(len > 64 * MIB);
    // Failing while the data is written (16 MiB in), and failing after the image's first MiB
    // was written: moving the GPT backup to the end of the larger target hits the limit.
    for (when, limit) in [("data", 16 * MIB), ("gpt", len + 4 * MIB)] {
        let target = previous_disk(&ws, &old, len);
        let out = write_with_size_limit(&img, &target, limit);
        assert!(!out.status.success(), "{when}: the write did not fail");
        let err = stderr(&out);
        assert!(
            head_is_zero(&target),
            "{when}: a failed write left a partition table in the first MiB\n{err}"
        );
        assert!(
            err.contains("its first MiB was zeroed so the partly written disk does not boot"),
            "{when}: {err}"
        );
        // gptman reports the second case as a generic I/O error.
        if when == "data" {
            assert!(err.contains("File too large"), "{when}: {err}");
        }
    }
}

/// An image whose protective MBR says GPT but whose GPT header claims about four billion
/// entries (with a valid CRC): written and verified byte for byte, with a warning that its
/// backup header stays where it is; the claim never reaches the table library's allocator.
#[test]
fn a_gpt_claiming_absurd_entries_is_written_as_is_with_a_warning() {
    let ws = Workspace::new("write-absurd-gpt", None, None, 20);
    let img = ws.path("absurd.img");
    let len = 8 * MIB;
    let f = File::create(&img).unwrap();
    f.set_len(len).unwrap();
    let mut mbr = [0u8; 512];
    mbr[446 + 4] = 0xee;
    mbr[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&((len / 512 - 1) as u32).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    f.write_all_at(&mbr, 0).unwrap();
    let mut h = [0u8; 92];
    h[..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&1u64.to_le_bytes());
    h[32..40].copy_from_slice(&(len / 512 - 1).to_le_bytes());
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&u32::MAX.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    let crc = crc32fast_like(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&h, 512).unwrap();
    drop(f);
    let target = ws.path("disk.raw");
    garbage(&target, len + 4 * MIB);
    let out = ws.kiln(&[
        "write",
        img.to_str().unwrap(),
        target.to_str().unwrap(),
        "--yes",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("its backup header was left where the image has it"),
        "{}",
        stderr(&out)
    );
    // The image's bytes, exactly (the header was not rewritten).
    let mut got = vec![0u8; 1024];
    File::open(&target)
        .unwrap()
        .read_exact_at(&mut got, 0)
        .unwrap();
    assert_eq!(&got[..512], &mbr[..]);
    assert_eq!(&got[512..604], &h[..]);
}

/// CRC-32 (IEEE), as the GPT uses.
fn crc32fast_like(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c ^= u32::from(x);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}
