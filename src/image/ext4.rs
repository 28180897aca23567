//! The ext4 root filesystem: `mke2fs -d -` reading kiln's tar stream on stdin and writing in
//! place at the partition's offset. No root, no loop device, no extraction to the host.

use crate::config::size::MIB;
use crate::tool::Tool;
use crate::util::Guid;
use anyhow::{Context, Result, anyhow, bail};
use std::io::Write;
use std::path::Path;

/// Journal size. Fixed, so the layout does not depend on the host's mke2fs defaults; resize2fs
/// keeps it when the filesystem grows on first boot.
pub const JOURNAL_MIB: u64 = 64;
const INODE_SIZE: u64 = 256;

/// Pinned mke2fs configuration: features must not depend on the build host's
/// /etc/mke2fs.conf, or two hosts would make different (or unbootable) filesystems.
/// orphan_file is left out for older e2fsck on rescue systems (it came in 1.47).
/// metadata_csum_seed (e2fsprogs 1.43, Linux 4.4; Debian since stretch) keeps the checksum
/// seed in the superblock, so a node's copy of its board's shared root filesystem gets its own
/// UUID by rewriting the superblocks alone (`image::shared`). No boot loader kiln uses reads
/// the root: extlinux.conf, config.txt and the ESP are on the FAT boot partition.
const MKE2FS_CONF: &str = "\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,metadata_csum_seed,64bit,dir_nlink,extra_isize
\t}
\tsmall = {
\t\tinode_size = 256
\t}
\tfloppy = {
\t\tinode_size = 256
\t}
";

/// Checks that mke2fs can read a tarball (`-d` with tar input came in e2fsprogs 1.47.1).
pub fn check_mke2fs() -> Result<()> {
    let out = Tool::new("checking mke2fs", "mke2fs").arg("-V").output().map_err(|e| {
        anyhow!("{e:#}\nkiln needs mke2fs from e2fsprogs >= 1.47.1: apt-get install e2fsprogs libarchive13")
    })?;
    let version = out
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("cannot read the mke2fs version from `{}`", out.trim()))?;
    let nums: Vec<u32> = version
        .split('.')
        .map(|p| {
            p.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    let v = (
        nums.first().copied().unwrap_or(0),
        nums.get(1).copied().unwrap_or(0),
        nums.get(2).copied().unwrap_or(0),
    );
    if v < (1, 47, 1) {
        bail!(
            "mke2fs {version} cannot read a tarball (needs e2fsprogs >= 1.47.1). On Debian 12: \
add the bookworm-backports suite, then `apt-get install -t bookworm-backports e2fsprogs` and \
`apt-get install libarchive13`"
        );
    }
    Ok(())
}

/// Bytes the root filesystem needs for `blocks` 4 KiB data blocks and `entries` inodes, plus
/// `headroom` free space.
///
/// Saturating: the counts come from an untrusted tarball, and an absurd one must give a size
/// that layout refuses (past the largest disk), not wrap around to a small one.
pub fn estimate_size(blocks: u64, entries: u64, headroom: u64) -> (u64, u64) {
    let inodes = entries.saturating_add(entries / 10).saturating_add(2048);
    let data = blocks.saturating_mul(4096);
    let meta = inodes
        .saturating_mul(INODE_SIZE)
        .saturating_add(JOURNAL_MIB * MIB);
    // Bitmaps, group descriptors, reserved GDT blocks and directory/extent growth: a few percent.
    let size = (data
        .saturating_add(meta)
        .saturating_add(headroom)
        .saturating_mul(104)
        / 100)
        .saturating_add(16 * MIB);
    (size.div_ceil(MIB).saturating_mul(MIB), inodes)
}

pub struct Ext4Params<'a> {
    pub image: &'a Path,
    pub offset: u64,
    pub size: u64,
    pub inodes: u64,
    pub uuid: Guid,
    pub label: &'a str,
    pub epoch: u64,
}

/// Runs mke2fs, handing `feed` its stdin to write the tar stream into.
pub fn make<T>(p: &Ext4Params<'_>, feed: impl FnOnce(&mut dyn Write) -> Result<T>) -> Result<T> {
    // Beside the image (a build's staging directory), one per image: removed with it on any
    // failure or interrupt, never shared by two nodes built at once, nothing left in /tmp.
    let mut conf = p.image.as_os_str().to_owned();
    conf.push(".mke2fs.conf");
    let conf = std::path::PathBuf::from(conf);
    std::fs::write(&conf, MKE2FS_CONF).with_context(|| format!("writing {}", conf.display()))?;
    let blocks = p.size / 4096;
    let tool = Tool::new("creating the ext4 root filesystem", "mke2fs")
        .env("MKE2FS_CONFIG", &conf.to_string_lossy())
        .env("SOURCE_DATE_EPOCH", &p.epoch.to_string())
        .arg("-q")
        .arg("-F")
        .arg("-t")
        .arg("ext4")
        .arg("-b")
        .arg("4096")
        .arg("-N")
        .arg(p.inodes.to_string())
        .arg("-m")
        .arg("1")
        .arg("-J")
        .arg(format!("size={JOURNAL_MIB}"))
        .arg("-L")
        .arg(p.label)
        .arg("-U")
        .arg(p.uuid.to_string())
        .arg("-E")
        .arg(format!(
            "offset={},hash_seed={},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard",
            p.offset, p.uuid
        ))
        .arg("-d")
        .arg("-")
        .arg(p.image)
        .arg(blocks.to_string());
    let mut run = tool.spawn_with_stdin()?;
    let fed = {
        let stdin = run
            .child
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("mke2fs has no stdin"))?;
        let mut buffered = std::io::BufWriter::with_capacity(1 << 20, stdin);
        let r = feed(&mut buffered);
        let flushed = buffered.flush();
        r.and_then(|v| flushed.map(|_| v).map_err(Into::into))
    };
    let finished = run.finish();
    let _ = std::fs::remove_file(&conf);
    // If mke2fs died, the feeder sees a broken pipe; mke2fs's own message is the useful one.
    match (fed, finished) {
        (Ok(v), Ok(())) => Ok(v),
        (_, Err(e)) => Err(e.context(hint(p))),
        (Err(e), Ok(())) => Err(e),
    }
}

fn hint(p: &Ext4Params<'_>) -> String {
    format!(
        "the root filesystem ({} MiB, {} inodes) could not be created; if mke2fs ran out of space, \
raise the root partition's `headroom` in the board profile; if it says it cannot read the tarball, \
install libarchive13",
        p.size / MIB,
        p.inodes
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_counts_saturate_past_any_disk() {
        let (size, inodes) = estimate_size(u64::MAX, u64::MAX, u64::MAX);
        assert!(size > crate::config::size::MAX_DISK && inodes == u64::MAX);
        let (size, _) = estimate_size(1000, 100, 256 * MIB);
        assert!(size > 256 * MIB && size < 512 * MIB);
    }
}
