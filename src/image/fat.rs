//! The FAT32 boot partition, written from Rust (lamfat) straight into the image file.
//!
//! lamfat is chosen over `fatfs` 0.3.6, whose subdirectories fail `fsck.fat` (bad `.`/`..`
//! entries); lamfat republishes fatfs's fixed code. Every FAT kiln writes is checked by
//! `fsck.fat -n` in the tests.

use super::slice::Slice;
use anyhow::{Result, anyhow, bail};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
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
    file.read_exact_at(&mut bs, offset)?;
    let backup = u16::from_le_bytes([bs[0x32], bs[0x33]]);
    file.write_all_at(&lba.to_le_bytes(), offset + 0x1c)?;
    if backup != 0 && backup != 0xffff {
        file.write_all_at(&lba.to_le_bytes(), offset + u64::from(backup) * 512 + 0x1c)?;
    }
    Ok(())
}

/// Reads every file of a FAT partition (for `kiln inspect`).
pub fn read_all(file: &File, offset: u64, size: u64) -> Result<BootFiles> {
    let fs = lamfat::FileSystem::new(Slice::new(file, offset, size), lamfat::FsOptions::new())
        .map_err(|e| anyhow!("reading the FAT boot partition: {e:?}"))?;
    let mut out = BootFiles::new();
    type Io<'a> = lamfat::StdIoWrapper<Slice<'a>>;
    fn walk(
        dir: lamfat::Dir<'_, Io<'_>, lamfat::DefaultTimeProvider, lamfat::LossyOemCpConverter>,
        prefix: &str,
        out: &mut BootFiles,
    ) -> Result<()> {
        for e in dir.iter() {
            let e = e.map_err(|e| anyhow!("reading a FAT directory: {e:?}"))?;
            let name = e.file_name();
            if name == "." || name == ".." {
                continue;
            }
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            if e.is_dir() {
                walk(e.to_dir(), &path, out)?;
            } else {
                let mut data = Vec::new();
                e.to_file()
                    .read_to_end(&mut data)
                    .map_err(|err| anyhow!("reading /{path}: {err:?}"))?;
                out.insert(path, data);
            }
        }
        Ok(())
    }
    walk(fs.root_dir(), "", &mut out)?;
    Ok(out)
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
