//! The FAT32 boot partition, written from Rust (lamfat) straight into the image file.
//!
//! lamfat is chosen over `fatfs` 0.3.6, whose subdirectories fail `fsck.fat` (bad `.`/`..`
//! entries); lamfat republishes fatfs's fixed code. Every FAT kiln writes is checked by
//! `fsck.fat -n` in the tests.

use super::slice::Slice;
use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

/// Files of the boot partition by path (`extlinux/extlinux.conf`), sorted for determinism.
pub type BootFiles = BTreeMap<String, Vec<u8>>;

/// Fixed timestamps for every directory entry: the build epoch (clamped to FAT's 1980..2107).
#[derive(Debug, Clone, Copy)]
struct FixedTime(lamfat::DateTime);

impl FixedTime {
    fn from_unix(t: u64) -> FixedTime {
        let (y, mo, d, h, mi, s) = crate::util::civil_from_unix(t);
        let (y, mo, d, h, mi, s) = if y < 1980 {
            (1980, 1, 1, 0, 0, 0)
        } else if y > 2107 {
            (2107, 12, 31, 23, 59, 58)
        } else {
            (y as u16, mo as u16, d as u16, h as u16, mi as u16, s as u16)
        };
        FixedTime(lamfat::DateTime::new(
            lamfat::Date::new(y, mo, d),
            // FAT stores seconds in 2 s steps.
            lamfat::Time::new(h, mi, s & !1, 0),
        ))
    }
}

impl lamfat::TimeProvider for FixedTime {
    fn get_current_date(&self) -> lamfat::Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> lamfat::DateTime {
        self.0
    }
}

pub struct FatParams<'a> {
    pub offset: u64,
    pub size: u64,
    pub label: &'a str,
    pub volume_id: u32,
    pub epoch: u64,
}

fn label_bytes(label: &str) -> Result<[u8; 11]> {
    if label.len() > 11 || !label.is_ascii() {
        bail!("FAT label `{label}` must be at most 11 ASCII characters");
    }
    let mut b = [b' '; 11];
    for (i, c) in label.bytes().enumerate() {
        b[i] = c.to_ascii_uppercase();
    }
    Ok(b)
}

/// The largest cluster (up to 4 KiB) that still leaves FAT32's minimum of 65525 clusters with
/// a margin: a FAT32 with fewer clusters is read as FAT16 by firmware.
fn cluster_size(partition: u64) -> u32 {
    let mut c: u32 = 4096;
    while c > 512 && partition / u64::from(c) < 70_000 {
        c /= 2;
    }
    c
}

/// Formats FAT32 at `offset` and writes `files`.
pub fn write(file: &File, p: &FatParams<'_>, files: &BootFiles) -> Result<()> {
    let used: u64 = files.values().map(|d| d.len() as u64 + 4096).sum();
    if used > p.size * 95 / 100 {
        bail!(
            "the boot files need {} but the boot partition is {}; expected a larger `size` in the board profile",
            crate::config::size::human(used),
            crate::config::size::human(p.size)
        );
    }
    let mut slice = Slice::new(file, p.offset, p.size);
    let opts = lamfat::FormatVolumeOptions::new()
        .fat_type(lamfat::FatType::Fat32)
        .bytes_per_cluster(cluster_size(p.size))
        .volume_id(p.volume_id)
        .volume_label(label_bytes(p.label)?);
    lamfat::format_volume(&mut lamfat::StdIoWrapper::new(&mut slice), opts)
        .map_err(|e| anyhow!("formatting the FAT32 boot partition: {e:?}"))?;
    slice.rewind();
    let fs = lamfat::FileSystem::new(
        slice,
        lamfat::FsOptions::new().time_provider(FixedTime::from_unix(p.epoch)),
    )
    .map_err(|e| anyhow!("opening the new FAT32 boot partition: {e:?}"))?;
    {
        let root = fs.root_dir();
        let mut made = std::collections::BTreeSet::new();
        for (path, data) in files {
            let parts: Vec<&str> = path.split('/').collect();
            for i in 1..parts.len() {
                let dir = parts[..i].join("/");
                if made.insert(dir.clone()) {
                    root.create_dir(&dir)
                        .map_err(|e| anyhow!("creating /{dir} on the boot partition: {e:?}"))?;
                }
            }
            let mut f = root
                .create_file(path)
                .map_err(|e| anyhow!("creating /{path} on the boot partition: {e:?}"))?;
            f.truncate()
                .map_err(|e| anyhow!("truncating /{path}: {e:?}"))?;
            f.write_all(data)
                .map_err(|e| anyhow!("writing /{path} on the boot partition: {e}"))?;
            f.flush()
                .map_err(|e| anyhow!("writing /{path} on the boot partition: {e}"))?;
        }
    }
    fs.unmount()
        .map_err(|e| anyhow!("closing the FAT32 boot partition: {e:?}"))?;
    set_hidden_sectors(file, p.offset)?;
    Ok(())
}

/// The BPB's "hidden sectors" is the partition's start LBA, as mkfs.fat writes it for a
/// partition; lamfat leaves 0. Patched in the boot sector and its FAT32 backup copy so both stay
/// identical (fsck.fat compares them).
fn set_hidden_sectors(file: &File, offset: u64) -> Result<()> {
    let lba =
        u32::try_from(offset / 512).map_err(|_| anyhow!("boot partition starts beyond 2 TiB"))?;
    let mut bs = [0u8; 512];
    file.read_exact_at(&mut bs, offset)
        .with_context(|| format!("reading the boot sector at byte {offset}"))?;
    let backup = u16::from_le_bytes([bs[0x32], bs[0x33]]);
    file.write_all_at(&lba.to_le_bytes(), offset + 0x1c)
        .with_context(|| format!("writing the boot sector at byte {offset}"))?;
    if backup != 0 && backup != 0xffff {
        let at = offset + u64::from(backup) * 512;
        file.write_all_at(&lba.to_le_bytes(), at + 0x1c)
            .with_context(|| format!("writing the backup boot sector at byte {at}"))?;
    }
    Ok(())
}

/// A file of a FAT partition as `kiln inspect` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSum {
    pub size: u64,
    pub sha256: String,
}

/// What [`read_files`] found: every file with its size and sha256, `kiln.json` itself, and
/// what did not add up (loops, chains that end early, entries past the limits).
#[derive(Debug, Default)]
pub struct Listing {
    pub files: BTreeMap<String, FileSum>,
    pub kiln_json: Option<Vec<u8>>,
    pub warnings: Vec<String>,
}

/// The most of a FAT (the allocation table itself) held in memory: 64 MiB is 16 M clusters of
/// FAT32, 64 GiB at 4 KiB clusters, far past any boot partition.
const MAX_FAT_TABLE: u64 = 64 * 1024 * 1024;
/// Directory nesting followed; kiln writes 3 levels.
const MAX_DEPTH: usize = 16;
/// Files and directories listed.
const MAX_ENTRIES: usize = 65_536;
/// kiln.json is kept only up to this size.
const MAX_KILN_JSON: u64 = 1024 * 1024;

/// The geometry of a FAT volume, from its boot sector, every number range-checked.
struct Volume<'a> {
    file: &'a File,
    offset: u64,
    size: u64,
    cluster: u64,
    /// Byte (in the partition) where cluster 2 starts.
    data: u64,
    /// Highest valid cluster number + 1.
    end_cluster: u32,
    kind: u8,
    fat: Vec<u8>,
    root: Root,
}

enum Root {
    /// FAT12/16: a fixed region (byte offset in the partition, length).
    Fixed(u64, u64),
    /// FAT32: a cluster chain.
    Chain(u32),
}

fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

impl<'a> Volume<'a> {
    fn open(file: &'a File, offset: u64, size: u64) -> Result<Self> {
        let mut bs = [0u8; 512];
        file.read_exact_at(&mut bs, offset)
            .map_err(|e| anyhow!("reading the FAT boot sector at byte {offset}: {e}"))?;
        let bps = le16(&bs, 11);
        let spc = u64::from(bs[13]);
        let reserved = le16(&bs, 14);
        let fats = u64::from(bs[16]);
        let root_entries = le16(&bs, 17);
        let total = match le16(&bs, 19) {
            0 => le32(&bs, 32),
            n => n,
        };
        let fat_sectors = match le16(&bs, 22) {
            0 => le32(&bs, 36),
            n => n,
        };
        if ![512, 1024, 2048, 4096].contains(&bps)
            || !spc.is_power_of_two()
            || spc > 128
            || reserved == 0
            || fats == 0
            || fats > 4
            || fat_sectors == 0
        {
            bail!(
                "not a FAT boot sector (bytes per sector {bps}, sectors per cluster {spc}, reserved {reserved}, FATs {fats}, FAT sectors {fat_sectors})"
            );
        }
        // All u16/u32 values times at most 4096: no overflow in u64.
        let root_bytes = root_entries * 32;
        let fat_start = reserved * bps;
        let root_start = fat_start + fats * fat_sectors * bps;
        let data = root_start + root_bytes.div_ceil(bps) * bps;
        let claimed = total * bps;
        if claimed < data {
            bail!("the FAT boot sector claims {total} sectors, fewer than its own tables need");
        }
        let cluster = spc * bps;
        let clusters = (claimed - data) / cluster;
        let kind = match clusters {
            0..4085 => 12,
            4085..65525 => 16,
            _ => 32,
        };
        let end_cluster = u32::try_from(clusters + 2)
            .map_err(|_| anyhow!("the FAT claims {clusters} clusters; expected fewer than 2^28"))?;
        let table = (u64::from(end_cluster) * kind).div_ceil(8);
        if table > fat_sectors * bps {
            bail!(
                "the FAT holds {} bytes but its {clusters} clusters need {table}",
                fat_sectors * bps
            );
        }
        if table > MAX_FAT_TABLE {
            bail!(
                "the FAT is {table} bytes; expected at most {MAX_FAT_TABLE} for a boot partition"
            );
        }
        if table > size.saturating_sub(fat_start) {
            bail!("the FAT runs past the end of the partition ({size} bytes)");
        }
        // Bounded by MAX_FAT_TABLE just above.
        let mut fat = vec![0u8; usize::try_from(table).unwrap_or(0)];
        file.read_exact_at(&mut fat, offset + fat_start)
            .map_err(|e| anyhow!("reading the FAT at byte {}: {e}", offset + fat_start))?;
        let root = if kind == 32 {
            Root::Chain(u32::try_from(le32(&bs, 44)).unwrap_or(0))
        } else {
            Root::Fixed(root_start, root_bytes)
        };
        Ok(Volume {
            file,
            offset,
            size,
            cluster,
            data,
            end_cluster,
            kind: kind as u8,
            fat,
            root,
        })
    }

    /// The FAT entry of `c`: Some(next) or None at the end of the chain.
    fn next(&self, c: u32) -> Result<Option<u32>> {
        let i = c as usize;
        let v = match self.kind {
            32 => {
                let at = i * 4;
                let b = self
                    .fat
                    .get(at..at + 4)
                    .ok_or_else(|| anyhow!("cluster {c} is outside the FAT"))?;
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x0fff_ffff
            }
            16 => {
                let at = i * 2;
                let b = self
                    .fat
                    .get(at..at + 2)
                    .ok_or_else(|| anyhow!("cluster {c} is outside the FAT"))?;
                u32::from(u16::from_le_bytes([b[0], b[1]]))
            }
            _ => {
                let at = i + i / 2;
                let b = self
                    .fat
                    .get(at..at + 2)
                    .ok_or_else(|| anyhow!("cluster {c} is outside the FAT"))?;
                let w = u32::from(u16::from_le_bytes([b[0], b[1]]));
                if c.is_multiple_of(2) {
                    w & 0xfff
                } else {
                    w >> 4
                }
            }
        };
        let eoc = match self.kind {
            32 => 0x0fff_fff8,
            16 => 0xfff8,
            _ => 0xff8,
        };
        if v >= eoc {
            Ok(None)
        } else if v < 2 || v >= self.end_cluster {
            bail!(
                "cluster {c} links to {v:#x}, which is not a data cluster (free, bad or out of range)"
            )
        } else {
            Ok(Some(v))
        }
    }

    /// The clusters of a chain from `first`, at most `limit` of them; an error on a loop.
    fn chain(&self, first: u32, limit: u64) -> Result<Vec<u32>> {
        if first < 2 || first >= self.end_cluster {
            bail!("starts at cluster {first}, which is not a data cluster");
        }
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let mut c = Some(first);
        while let Some(x) = c {
            if out.len() as u64 >= limit {
                break;
            }
            if !seen.insert(x) {
                bail!("its cluster chain loops back to cluster {x}");
            }
            out.push(x);
            c = self.next(x)?;
        }
        Ok(out)
    }

    /// Reads `len` bytes of the partition at `at`, refusing to leave it.
    fn read(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        let end = at.checked_add(buf.len() as u64).filter(|e| *e <= self.size);
        if end.is_none() {
            bail!(
                "data at byte {at} lies past the end of the partition ({} bytes)",
                self.size
            );
        }
        self.file.read_exact_at(buf, self.offset + at).map_err(|e| {
            anyhow!(
                "reading byte {} of the image: {e} (is it truncated?)",
                self.offset + at
            )
        })
    }

    fn cluster_at(&self, c: u32) -> u64 {
        // c < end_cluster, so this is within the claimed volume (checked against u64 above).
        self.data + u64::from(c - 2) * self.cluster
    }

    /// The raw bytes of a directory (`None`: the root), at most 65536 entries, the FAT limit
    /// for one directory.
    fn dir_bytes(&self, first: Option<u32>) -> Result<Vec<u8>> {
        let max: u64 = 65_536 * 32;
        let c = match (first, &self.root) {
            (None, Root::Fixed(at, len)) => {
                // At most 2 MiB (`max`).
                let mut b = vec![0u8; usize::try_from((*len).min(max)).unwrap_or(0)];
                self.read(*at, &mut b)?;
                return Ok(b);
            }
            (Some(c), _) => c,
            (None, Root::Chain(c)) => *c,
        };
        let mut out = Vec::new();
        for run in self.runs(&self.chain(c, max.div_ceil(self.cluster))?) {
            let at = out.len();
            out.resize(at + run.1, 0);
            self.read(run.0, &mut out[at..])?;
        }
        Ok(out)
    }

    /// Byte ranges (start in the partition, length) of a chain, contiguous clusters joined up
    /// to 1 MiB, so a file is read in few calls.
    fn runs(&self, chain: &[u32]) -> Vec<(u64, usize)> {
        let cl = self.cluster as usize;
        let mut out: Vec<(u64, usize)> = Vec::new();
        for &c in chain {
            let at = self.cluster_at(c);
            match out.last_mut() {
                Some((s, l)) if *s + *l as u64 == at && *l + cl <= 1 << 20 => *l += cl,
                _ => out.push((at, cl)),
            }
        }
        out
    }

    /// Size and sha256 of a file's first `size` bytes, and its bytes when `keep`.
    fn hash_file(&self, first: u32, size: u64, keep: bool) -> Result<(FileSum, Option<Vec<u8>>)> {
        let mut h = Sha256::new();
        let mut kept = keep.then(Vec::new);
        if size > 0 {
            let want = size.div_ceil(self.cluster);
            let chain = self.chain(first, want)?;
            if (chain.len() as u64) < want {
                bail!(
                    "its cluster chain ends after {} of the {want} clusters its size needs",
                    chain.len()
                );
            }
            let mut left = size;
            let mut buf = Vec::new();
            for (at, len) in self.runs(&chain) {
                let k = (len as u64).min(left) as usize;
                buf.resize(k, 0);
                self.read(at, &mut buf)?;
                h.update(&buf);
                if let Some(v) = kept.as_mut() {
                    v.extend_from_slice(&buf);
                }
                left -= k as u64;
            }
        }
        Ok((
            FileSum {
                size,
                sha256: crate::util::hex(&h.finalize()),
            },
            kept,
        ))
    }
}

/// One directory entry, long name resolved.
struct Entry {
    name: String,
    dir: bool,
    first: u32,
    size: u64,
}

/// LFN checksum of a short name (the FAT specification's rotate-and-add).
fn lfn_checksum(short: &[u8]) -> u8 {
    short
        .iter()
        .fold(0u8, |s, b| (s >> 1 | (s & 1) << 7).wrapping_add(*b))
}

/// A name safe to print: no `/`, no control characters (a hostile image must not write
/// escape sequences to the terminal or fake a path).
fn clean(name: String) -> String {
    name.chars()
        .map(|c| if c == '/' || c.is_control() { '?' } else { c })
        .collect()
}

fn parse_dir(raw: &[u8], fat32: bool) -> Vec<Entry> {
    let mut out = Vec::new();
    // Long-name parts: (order, 13 UTF-16 units), and the checksum they carry.
    let mut lfn: Vec<(u8, [u16; 13])> = Vec::new();
    let mut lfn_sum = 0u8;
    for e in raw.chunks_exact(32) {
        match e[0] {
            0 => break,
            0xe5 => {
                lfn.clear();
                continue;
            }
            _ => {}
        }
        let attr = e[11];
        if attr & 0x3f == 0x0f {
            if e[0] & 0x40 != 0 {
                lfn.clear();
            }
            let mut units = [0u16; 13];
            for (k, at) in [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]
                .iter()
                .enumerate()
            {
                units[k] = u16::from_le_bytes([e[*at], e[*at + 1]]);
            }
            lfn.push((e[0] & 0x1f, units));
            lfn_sum = e[13];
            continue;
        }
        if attr & 0x08 != 0 {
            lfn.clear();
            continue;
        }
        let mut short = [0u8; 11];
        short.copy_from_slice(&e[..11]);
        let long = long_name(&mut lfn, lfn_sum, &short);
        let name = long.unwrap_or_else(|| short_name(&short, e[12]));
        if name == "." || name == ".." || name.is_empty() {
            continue;
        }
        let hi = if fat32 { le16(e, 20) << 16 } else { 0 };
        out.push(Entry {
            name: clean(name),
            dir: attr & 0x10 != 0,
            first: u32::try_from(hi | le16(e, 26)).unwrap_or(0),
            size: le32(e, 28),
        });
    }
    out
}

/// The long name the collected parts spell, if they are complete and belong to `short`.
fn long_name(lfn: &mut Vec<(u8, [u16; 13])>, sum: u8, short: &[u8; 11]) -> Option<String> {
    let mut parts = std::mem::take(lfn);
    if parts.is_empty() || sum != lfn_checksum(short) {
        return None;
    }
    parts.sort_by_key(|(o, _)| *o);
    if parts
        .iter()
        .enumerate()
        .any(|(i, (o, _))| usize::from(*o) != i + 1)
    {
        return None;
    }
    let units: Vec<u16> = parts
        .iter()
        .flat_map(|(_, u)| u.iter().copied())
        .take_while(|u| *u != 0 && *u != 0xffff)
        .collect();
    Some(String::from_utf16_lossy(&units))
}

fn short_name(short: &[u8; 11], case: u8) -> String {
    let text = |b: &[u8], lower: bool| -> String {
        b.iter()
            .map(|&c| {
                let c = if c.is_ascii() { c as char } else { '\u{fffd}' };
                if lower { c.to_ascii_lowercase() } else { c }
            })
            .collect::<String>()
            .trim_end()
            .to_string()
    };
    let mut base = short[..8].to_vec();
    if base[0] == 0x05 {
        base[0] = 0xe5;
    }
    let b = text(&base, case & 0x08 != 0);
    let x = text(&short[8..], case & 0x10 != 0);
    if x.is_empty() { b } else { format!("{b}.{x}") }
}

/// Lists every file of the FAT at `offset` (for `kiln inspect`): path, size and sha256, and
/// kiln.json's bytes. The image is untrusted: every number of the boot sector is range-checked,
/// the FAT held in memory is bounded, cluster chains are followed with loop detection, the
/// directory tree with a depth limit and a visited set, and file data is hashed as it streams
/// by, at most the partition's size in all. What does not add up is a warning, not a failure.
pub fn read_files(file: &File, offset: u64, size: u64) -> Result<Listing> {
    let v = Volume::open(file, offset, size)?;
    let fat32 = v.kind == 32;
    let mut out = Listing::default();
    let mut budget = size;
    let mut entries = 0usize;
    let mut seen_dirs = std::collections::HashSet::new();
    if let Root::Chain(c) = v.root {
        seen_dirs.insert(c);
    }
    let mut stack: Vec<(Option<u32>, String, usize)> = vec![(None, String::new(), 0)];
    while let Some((first, prefix, depth)) = stack.pop() {
        let shown = if prefix.is_empty() {
            "/".to_string()
        } else {
            format!("/{prefix}")
        };
        let raw = match v.dir_bytes(first) {
            Ok(b) => b,
            Err(e) => {
                out.warnings.push(format!("FAT directory {shown}: {e:#}"));
                continue;
            }
        };
        for e in parse_dir(&raw, fat32) {
            entries += 1;
            if entries > MAX_ENTRIES {
                out.warnings.push(format!(
                    "FAT holds more than {MAX_ENTRIES} files and directories; the listing stops there"
                ));
                return Ok(out);
            }
            let path = if prefix.is_empty() {
                e.name.clone()
            } else {
                format!("{prefix}/{}", e.name)
            };
            if e.dir {
                if depth + 1 > MAX_DEPTH {
                    out.warnings.push(format!(
                        "FAT directory /{path} is nested more than {MAX_DEPTH} deep; not followed"
                    ));
                } else if !seen_dirs.insert(e.first) {
                    out.warnings.push(format!(
                        "FAT directory /{path} starts at cluster {}, which another directory already uses (a loop?); not followed",
                        e.first
                    ));
                } else {
                    stack.push((Some(e.first), path, depth + 1));
                }
                continue;
            }
            if e.size > budget {
                out.warnings.push(format!(
                    "FAT file /{path} claims {} bytes, more than the partition has left to hold; not read",
                    e.size
                ));
                continue;
            }
            let keep = path == "kiln.json" && e.size <= MAX_KILN_JSON;
            match v.hash_file(e.first, e.size, keep) {
                Ok((sum, data)) => {
                    budget -= e.size;
                    if keep {
                        out.kiln_json = data;
                    }
                    out.files.insert(path, sum);
                }
                Err(err) => out.warnings.push(format!("FAT file /{path}: {err:#}")),
            }
        }
    }
    Ok(out)
}

/// Every file of a FAT kiln wrote (a built image's boot partition), with its bytes: what an
/// installer partition copies. At most `size` bytes in all and MAX_DEPTH levels deep; the file is
/// opened read-only by the caller, so nothing here can write to it.
pub fn read_all(file: &File, offset: u64, size: u64) -> Result<BootFiles> {
    use std::io::Read;
    let fs = lamfat::FileSystem::new(Slice::new(file, offset, size), lamfat::FsOptions::new())
        .map_err(|e| anyhow!("opening the FAT at byte {offset}: {e:?}"))?;
    let mut files = BootFiles::new();
    let mut budget = size;
    let mut stack = vec![(fs.root_dir(), String::new(), 0usize)];
    while let Some((dir, prefix, depth)) = stack.pop() {
        for e in dir.iter() {
            let e = e.map_err(|e| anyhow!("reading FAT directory /{prefix}: {e:?}"))?;
            let name = e.file_name();
            if name == "." || name == ".." {
                continue;
            }
            let path = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            if e.is_dir() {
                if depth >= MAX_DEPTH {
                    bail!("FAT directory /{path} is nested more than {MAX_DEPTH} deep");
                }
                stack.push((e.to_dir(), path, depth + 1));
                continue;
            }
            let len = e.len();
            budget = budget.checked_sub(len).ok_or_else(|| {
                anyhow!("FAT file /{path} claims more bytes than the partition holds")
            })?;
            let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            e.to_file()
                .read_to_end(&mut data)
                .map_err(|err| anyhow!("reading FAT file /{path}: {err}"))?;
            files.insert(path, data);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cluster_size_keeps_fat32_cluster_count() {
        use super::cluster_size;
        const MIB: u64 = 1 << 20;
        assert_eq!(cluster_size(512 * MIB), 4096);
        assert_eq!(cluster_size(256 * MIB), 2048);
        assert_eq!(cluster_size(64 * MIB), 512);
        for mib in [64, 100, 256, 300, 512, 1024] {
            assert!(mib * MIB / u64::from(cluster_size(mib * MIB)) >= 65_525 + 1000);
        }
    }
}
