//! Reading images with independent tools (sfdisk, debugfs, mtools, fsck.fat, e2fsck), never
//! with kiln's own code.

use super::{assert_ok, run, stderr, stdout};
use std::os::unix::fs::FileExt;
use std::path::Path;

pub struct Part {
    pub start: u64,
    pub size: u64,
}

/// Partitions as sfdisk (util-linux) reads them.
pub fn sfdisk(img: &Path) -> (serde_json::Value, Vec<Part>) {
    let o = run("sfdisk", &["--json", img.to_str().unwrap()]);
    assert_ok(&o, "sfdisk --json");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let parts = v["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Part {
            start: p["start"].as_u64().unwrap() * 512,
            size: p["size"].as_u64().unwrap() * 512,
        })
        .collect();
    (v, parts)
}

pub fn debugfs(img: &Path, offset: u64, cmd: &str) -> String {
    let spec = format!("{}?offset={offset}", img.display());
    let o = run("debugfs", &["-R", cmd, &spec]);
    assert_ok(&o, &format!("debugfs -R '{cmd}'"));
    stdout(&o)
}

/// (mode, uid, gid) of a path in the ext4 root, from `debugfs stat`.
pub fn stat(img: &Path, offset: u64, path: &str) -> (u32, u32, u32) {
    let out = debugfs(img, offset, &format!("stat {path}"));
    let field = |name: &str| -> String {
        let i = out
            .find(name)
            .unwrap_or_else(|| panic!("no {name} in debugfs stat {path}:\n{out}"));
        out[i + name.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let mode = u32::from_str_radix(&field("Mode:"), 8).unwrap();
    (
        mode,
        field("User:").parse().unwrap(),
        field("Group:").parse().unwrap(),
    )
}

pub fn cat(img: &Path, offset: u64, path: &str) -> String {
    debugfs(img, offset, &format!("cat {path}"))
}

pub fn mcopy(img: &Path, fat_offset: u64, path: &str) -> Vec<u8> {
    let spec = format!("{}@@{fat_offset}", img.display());
    let o = run("mcopy", &["-n", "-i", &spec, &format!("::/{path}"), "-"]);
    assert_ok(&o, &format!("mcopy ::/{path}"));
    o.stdout
}

pub fn fsck_fat(img: &Path, p: &Part, work: &Path) {
    let mut buf = vec![0u8; p.size as usize];
    std::fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut buf, p.start)
        .unwrap();
    let fat = work.join("boot.fat");
    std::fs::write(&fat, &buf).unwrap();
    let o = run("fsck.fat", &["-n", "-v", fat.to_str().unwrap()]);
    assert_ok(&o, "fsck.fat -n");
    let out = stdout(&o) + &stderr(&o);
    assert!(
        out.contains("32 bit entries"),
        "boot partition is not FAT32:\n{out}"
    );
    // Hidden sectors = the partition's start LBA, as mkfs.fat writes for a partition.
    assert!(
        out.contains(&format!(" {} hidden sectors", p.start / 512)),
        "hidden sectors do not match the partition start:\n{out}"
    );
    // fsck.fat -n exits 0 even for some fixable problems; it prints them, so none may appear.
    for bad in [
        "Free cluster summary",
        "differ",
        "Bad",
        "Dirty bit",
        "invalid",
        "Unable",
    ] {
        assert!(!out.contains(bad), "fsck.fat reported `{bad}`:\n{out}");
    }
    std::fs::remove_file(fat).unwrap();
}

pub fn e2fsck(img: &Path, p: &Part) {
    let spec = format!("{}?offset={}", img.display(), p.start);
    let o = run("e2fsck", &["-fn", &spec]);
    assert_ok(&o, "e2fsck -fn");
}

/// A file's bytes from the ext4 root (debugfs `dump`), or `None` if it does not exist.
pub fn dump(img: &Path, offset: u64, path: &str, work: &Path) -> Option<Vec<u8>> {
    let dest = work.join(format!("dump-{}", path.replace('/', "_")));
    let _ = std::fs::remove_file(&dest);
    let spec = format!("{}?offset={offset}", img.display());
    let cmd = format!("dump {path} {}", dest.display());
    let o = run("debugfs", &["-R", &cmd, &spec]);
    assert_ok(&o, &format!("debugfs -R '{cmd}'"));
    let data = std::fs::read(&dest).ok();
    let _ = std::fs::remove_file(&dest);
    data
}

/// Whether a path exists in the ext4 root.
pub fn exists(img: &Path, offset: u64, path: &str) -> bool {
    let spec = format!("{}?offset={offset}", img.display());
    let o = run("debugfs", &["-R", &format!("stat {path}"), &spec]);
    !stderr(&o).contains("File not found") && stdout(&o).contains("Inode:")
}

/// Target of a symlink in the ext4 root.
pub fn link_target(img: &Path, offset: u64, path: &str) -> String {
    let out = debugfs(img, offset, &format!("stat {path}"));
    let i = out
        .find("Fast link dest:")
        .unwrap_or_else(|| panic!("{path} is not a fast symlink:\n{out}"));
    out[i + 15..]
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_matches('"')
        .to_string()
}

/// The bytes of an image's first partition (the boot partition), read directly.
pub fn fat_bytes(img: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let (_, parts) = sfdisk(img);
    let mut buf = vec![0u8; parts[0].size as usize];
    std::fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut buf, parts[0].start)
        .unwrap();
    buf
}
