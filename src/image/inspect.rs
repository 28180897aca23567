//! `kiln inspect`: reads an image back — partition table, partitions, boot files and the node
//! it was built for — without mounting anything.

use super::fat;
use crate::fetch::loader::LoaderRecord;
use crate::rootfs::identity::Identity;
use crate::util::Guid;
use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct PartitionInfo {
    pub number: u32,
    pub name: String,
    pub start: u64,
    pub size: u64,
    /// GPT type GUID or MBR type byte.
    #[serde(rename = "type")]
    pub type_: String,
    /// GPT partition GUID or MBR `<signature>-NN`.
    pub partuuid: String,
    pub bootable: bool,
    pub filesystem: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct BootFile {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Serialize)]
pub struct ImageInfo {
    pub image: String,
    pub size: u64,
    pub table: String,
    /// GPT disk GUID or MBR disk signature.
    pub disk_id: String,
    pub partitions: Vec<PartitionInfo>,
    pub boot_files: Vec<BootFile>,
    pub identity: Option<Identity>,
    /// Boot loaders the build recorded, each measured from the image itself.
    pub loaders: Vec<LoaderInfo>,
    /// What does not add up: partitions past the end of the file or overlapping, a damaged
    /// table or boot filesystem. The image is read as untrusted; these never stop inspect.
    pub warnings: Vec<String>,
    /// The files this node's build made and where each goes: the system image, and for a
    /// target that cannot hold the loader, the loader-only image beside it.
    pub artifacts: Vec<ArtifactInfo>,
}

#[derive(Debug, Serialize)]
pub struct ArtifactInfo {
    pub file: String,
    /// The board target it is written to.
    pub target: String,
    /// `system` or `loader`.
    pub kind: &'static str,
    /// How it gets there.
    pub how: &'static str,
    /// Whether the file is beside the inspected one.
    pub present: bool,
}

/// A boot loader in the image: its bytes as they are now, and where the build took them from.
#[derive(Debug, Serialize)]
pub struct LoaderInfo {
    pub artifact: String,
    pub offset: u64,
    /// Bytes from `offset` to the last non-zero byte before the first partition, read from the
    /// image (None when the image cannot hold them: truncated, or no partition after them).
    pub size: Option<u64>,
    pub sha256: Option<String>,
    /// What the build recorded in kiln.json: file, form, compression, size and sha256.
    pub recorded: LoaderRecord,
    /// Whether the image holds the loader the build recorded.
    pub matches_record: bool,
}

impl LoaderInfo {
    /// The loader `recorded` as it is in `file` now: its bytes from its offset to the last
    /// non-zero byte before `end` (the first partition, or the end of a loader-only image).
    fn measure(file: &File, recorded: LoaderRecord, end: u64) -> LoaderInfo {
        let m = crate::fetch::loader::measure(file, recorded.offset, end).ok();
        LoaderInfo {
            artifact: recorded.artifact.clone(),
            offset: recorded.offset,
            matches_record: m
                .as_ref()
                .is_some_and(|(n, sha)| *n == recorded.size && *sha == recorded.sha256),
            size: m.as_ref().map(|(n, _)| *n),
            sha256: m.map(|(_, sha)| sha),
            recorded,
        }
    }
}

fn fs_type(file: &File, start: u64) -> Option<String> {
    let mut sb = [0u8; 2048];
    file.read_exact_at(&mut sb, start).ok()?;
    if &sb[1024 + 56..1024 + 58] == b"\x53\xef" {
        return Some("ext4".into());
    }
    if &sb[82..90] == b"FAT32   " {
        return Some("vfat".into());
    }
    if &sb[54..59] == b"FAT16" || &sb[54..59] == b"FAT12" {
        return Some("vfat".into());
    }
    None
}

/// Most GPT partition entries read. Every tool writes 128; the bound keeps a header that claims
/// 2^32 entries from costing gigabytes.
const MAX_GPT_ENTRIES: u64 = 4096;
/// Largest GPT entry accepted (the specification allows 128 × 2^n).
const MAX_GPT_ENTRY_SIZE: u64 = 4096;
/// Warnings of one kind listed before the rest are only counted.
const MAX_WARNINGS: usize = 20;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn crc32(b: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(b);
    c.sum()
}

/// A GPT read from an untrusted image: (disk GUID, partitions, the backup header's LBA).
struct Gpt {
    disk_guid: [u8; 16],
    partitions: Vec<PartitionInfo>,
    alternate_lba: u64,
}

/// Checks the primary GPT of an image or disk of `size` bytes with the same bounded reader
/// `inspect` uses, before a table library that trusts the header's numbers reads it.
pub fn check_gpt(file: &File, size: u64) -> Result<()> {
    read_gpt(file, size, 1, &mut Vec::new()).map(|_| ())
}

/// Reads the GPT header at `lba` and its entries, every number range-checked before use.
fn read_gpt(file: &File, size: u64, lba: u64, warnings: &mut Vec<String>) -> Result<Gpt> {
    let at = lba
        .checked_mul(512)
        .ok_or_else(|| anyhow!("GPT header LBA {lba} is past any disk"))?;
    let mut h = [0u8; 512];
    file.read_exact_at(&mut h, at)
        .map_err(|e| anyhow!("reading the GPT header at byte {at}: {e}"))?;
    if &h[..8] != b"EFI PART" {
        bail!("no GPT header at byte {at} (no `EFI PART` signature)");
    }
    let hdr_size = le32(&h, 12) as usize;
    if !(92..=512).contains(&hdr_size) {
        bail!("GPT header at byte {at} claims {hdr_size} bytes; expected 92 to 512");
    }
    let mut hdr = h[..hdr_size].to_vec();
    hdr[16..20].fill(0);
    if crc32(&hdr) != le32(&h, 16) {
        bail!("GPT header at byte {at} fails its CRC32");
    }
    let (entries_lba, count, entry_size) = (
        le64(&h, 72),
        u64::from(le32(&h, 80)),
        u64::from(le32(&h, 84)),
    );
    if count > MAX_GPT_ENTRIES {
        bail!(
            "GPT header at byte {at} claims {count} partition entries; expected at most {MAX_GPT_ENTRIES}"
        );
    }
    if !(128..=MAX_GPT_ENTRY_SIZE).contains(&entry_size) || !entry_size.is_power_of_two() {
        bail!(
            "GPT header at byte {at} claims entries of {entry_size} bytes; expected 128, 256, ... up to {MAX_GPT_ENTRY_SIZE}"
        );
    }
    let start = entries_lba
        .checked_mul(512)
        .filter(|s| *s < size)
        .ok_or_else(|| {
            anyhow!("GPT entries at LBA {entries_lba} lie past the end of the file ({size} bytes)")
        })?;
    // count × entry_size ≤ 4096 × 4096 = 16 MiB, by the checks above.
    let len = count * entry_size;
    let mut arr = vec![0u8; len as usize];
    file.read_exact_at(&mut arr, start).map_err(|e| {
        anyhow!("reading {count} GPT entries at byte {start}: {e} (is the image truncated?)")
    })?;
    if crc32(&arr) != le32(&h, 88) {
        bail!("GPT partition entries at byte {start} fail their CRC32");
    }
    let mut partitions = Vec::new();
    let mut skipped = 0;
    for (i, e) in arr.chunks_exact(entry_size as usize).enumerate() {
        if e[..16].iter().all(|b| *b == 0) {
            continue;
        }
        let number = i as u32 + 1;
        let (first, last) = (le64(e, 32), le64(e, 40));
        let bytes = last
            .checked_sub(first)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| n.checked_mul(512))
            .zip(first.checked_mul(512));
        let Some((len, start)) = bytes else {
            skipped += 1;
            if skipped <= MAX_WARNINGS {
                warnings.push(format!(
                    "GPT partition {number} runs from LBA {first} to LBA {last}, which is not a disk range; skipped"
                ));
            }
            continue;
        };
        let mut type_guid = [0u8; 16];
        type_guid.copy_from_slice(&e[..16]);
        let mut part_guid = [0u8; 16];
        part_guid.copy_from_slice(&e[16..32]);
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        let name: String = String::from_utf16_lossy(&units)
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        partitions.push(PartitionInfo {
            number,
            name,
            start,
            size: len,
            type_: Guid::from_gpt_bytes(type_guid).to_string().to_uppercase(),
            partuuid: Guid::from_gpt_bytes(part_guid).to_string(),
            bootable: le64(e, 48) & (1 << 2) != 0,
            filesystem: None,
        });
    }
    if skipped > MAX_WARNINGS {
        warnings.push(format!(
            "{} more GPT partitions with no disk range; skipped",
            skipped - MAX_WARNINGS
        ));
    }
    let mut disk_guid = [0u8; 16];
    disk_guid.copy_from_slice(&h[56..72]);
    Ok(Gpt {
        disk_guid,
        partitions,
        alternate_lba: le64(&h, 32),
    })
}

/// Warnings about partitions that do not fit the file or each other.
fn check_partitions(parts: &[PartitionInfo], size: u64, warnings: &mut Vec<String>) {
    let mut past = 0;
    for p in parts {
        let end = p.end();
        if end > size {
            past += 1;
            if past <= MAX_WARNINGS {
                warnings.push(format!(
                    "partition {} (bytes {} to {end}) {} past the end of the file ({size} bytes): is the image truncated?",
                    p.number,
                    p.start,
                    if p.start >= size { "lies" } else { "runs" }
                ));
            }
        }
    }
    if past > MAX_WARNINGS {
        warnings.push(format!(
            "{} more partitions past the end of the file",
            past - MAX_WARNINGS
        ));
    }
    let mut sorted: Vec<&PartitionInfo> = parts.iter().filter(|p| p.size > 0).collect();
    sorted.sort_by_key(|p| p.start);
    let mut overlaps = 0;
    // The partition reaching furthest so far: any later one starting before its end overlaps it.
    let mut reach: Option<&PartitionInfo> = None;
    for p in sorted {
        if let Some(r) = reach {
            let r_end = r.start.saturating_add(r.size);
            if p.start < r_end {
                overlaps += 1;
                if overlaps <= MAX_WARNINGS {
                    warnings.push(format!(
                        "partitions {} and {} overlap (bytes {} to {})",
                        r.number,
                        p.number,
                        p.start,
                        r_end.min(p.start.saturating_add(p.size))
                    ));
                }
            }
            if p.start.saturating_add(p.size) > r_end {
                reach = Some(p);
            }
        } else {
            reach = Some(p);
        }
    }
    if overlaps > MAX_WARNINGS {
        warnings.push(format!(
            "{} more overlapping partitions",
            overlaps - MAX_WARNINGS
        ));
    }
}

pub fn inspect(path: &Path) -> Result<ImageInfo> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // Seek to the end rather than stat: a block device (an image written to a disk) stats as
    // 0 bytes.
    let size = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))
        .with_context(|| format!("reading the size of {}", path.display()))?;
    let mut warnings = Vec::new();
    let mut mbr = [0u8; 512];
    file.read_exact_at(&mut mbr, 0)
        .with_context(|| format!("{} is too small to hold a partition table", path.display()))?;
    if mbr[510..512] != [0x55, 0xaa]
        && let Some(info) = as_loader_image(path, size)?
    {
        return Ok(info);
    }
    if mbr[510..512] != [0x55, 0xaa] {
        return Err(anyhow!(
            "{}: no partition table (no 0x55AA signature in sector 0); expected a kiln image",
            path.display()
        ));
    }
    let protective = mbr[446 + 4] == 0xee;
    let (table, disk_id, mut partitions) = if protective {
        // The primary header; if it is unusable, the backup in the file's last sector.
        let gpt = match read_gpt(&file, size, 1, &mut warnings) {
            Ok(g) => {
                let backup_end = g.alternate_lba.saturating_add(1).saturating_mul(512);
                if backup_end > size {
                    warnings.push(format!(
                        "the backup GPT header belongs at LBA {}, past the end of the file ({size} bytes): is the image truncated?",
                        g.alternate_lba
                    ));
                }
                g
            }
            Err(primary) => {
                let last = (size / 512).saturating_sub(1);
                let g = read_gpt(&file, size, last, &mut warnings).map_err(|backup| {
                    anyhow!(
                        "{}: no usable GPT: {primary:#}; and the backup: {backup:#}",
                        path.display()
                    )
                })?;
                warnings.push(format!(
                    "primary GPT unusable ({primary:#}); showing the backup"
                ));
                g
            }
        };
        (
            "gpt".to_string(),
            Guid::from_gpt_bytes(gpt.disk_guid).to_string(),
            gpt.partitions,
        )
    } else {
        let sig = u32::from_le_bytes([mbr[440], mbr[441], mbr[442], mbr[443]]);
        let mut parts = Vec::new();
        for i in 0..4usize {
            let e = &mbr[446 + i * 16..446 + (i + 1) * 16];
            if e[4] == 0 {
                continue;
            }
            let lba = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
            let n = u32::from_le_bytes([e[12], e[13], e[14], e[15]]);
            parts.push(PartitionInfo {
                number: i as u32 + 1,
                name: String::new(),
                start: u64::from(lba) * 512,
                size: u64::from(n) * 512,
                type_: format!("0x{:02x}", e[4]),
                partuuid: format!("{sig:08x}-{:02x}", i + 1),
                bootable: e[0] == 0x80,
                filesystem: None,
            });
        }
        ("mbr".to_string(), format!("{sig:08x}"), parts)
    };
    check_partitions(&partitions, size, &mut warnings);
    let mut boot_files = Vec::new();
    let mut identity = None;
    let mut read_fat = false;
    for p in &mut partitions {
        p.filesystem = fs_type(&file, p.start);
        if p.filesystem.as_deref() == Some("vfat") && !read_fat {
            read_fat = true;
            // Only the part of the partition the file holds.
            let len = p.size.min(size.saturating_sub(p.start));
            match fat::read_files(&file, p.start, len) {
                Ok(l) => {
                    if let Some(j) = &l.kiln_json {
                        identity = serde_json::from_slice(j).ok();
                    }
                    warnings.extend(
                        l.warnings
                            .into_iter()
                            .map(|w| format!("partition {}: {w}", p.number)),
                    );
                    boot_files = l
                        .files
                        .into_iter()
                        .map(|(path, f)| BootFile {
                            path,
                            size: f.size,
                            sha256: f.sha256,
                        })
                        .collect();
                }
                Err(e) => warnings.push(format!(
                    "partition {}: the FAT boot filesystem is unreadable: {e:#}",
                    p.number
                )),
            }
        }
    }
    // Measured from the image, so a loader written over afterwards shows, not only the record.
    // A node whose loader lives on another device has it measured from that device's image.
    let first = partitions.iter().map(|p| p.start).min().unwrap_or(size);
    let artifacts = identity
        .as_ref()
        .map_or_else(Vec::new, |id| artifacts(path, id));
    let loaders = match identity.as_ref() {
        Some(id) if id.loader_on.is_some() => {
            match artifacts.iter().find(|a| a.kind == "loader" && a.present) {
                Some(a) => inspect_loader_image(&path.with_file_name(&a.file), id)?.loaders,
                None => {
                    warnings.push(format!(
                        "the loader is not in this image but in {}, which is not beside it",
                        id.loader_image_name().unwrap_or_default()
                    ));
                    Vec::new()
                }
            }
        }
        _ => identity
            .as_ref()
            .map(|id: &Identity| id.loaders.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|r| LoaderInfo::measure(&file, r, first))
            .collect(),
    };
    Ok(ImageInfo {
        image: path.display().to_string(),
        size,
        table,
        disk_id,
        partitions,
        boot_files,
        identity,
        loaders,
        warnings,
        artifacts,
    })
}

/// The files a node's build made, from its identity: the system image, and the loader-only
/// image when its target cannot hold the loader.
fn artifacts(path: &Path, id: &Identity) -> Vec<ArtifactInfo> {
    let present = |f: &str| path.with_file_name(f).is_file();
    let system = format!("{}.img", id.node);
    let mut v = vec![ArtifactInfo {
        present: present(&system),
        file: system,
        target: id.target.clone(),
        kind: "system",
        how: if id.loader_on.is_some() || id.slot.is_none() {
            "kiln write"
        } else {
            "kiln flash (BMC) or kiln write"
        },
    }];
    if let (Some(on), Some(name)) = (&id.loader_on, id.loader_image_name()) {
        v.push(ArtifactInfo {
            present: present(&name),
            file: name,
            target: on.clone(),
            kind: "loader",
            how: "kiln flash (BMC)",
        });
    }
    v
}

/// `path` read as a loader-only image: a file without a partition table named
/// `<node>.<target>.img` beside a system image `<node>.img` whose build made it.
fn as_loader_image(path: &Path, size: u64) -> Result<Option<ImageInfo>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(None);
    };
    let Some((node, target)) = name.strip_suffix(".img").and_then(|s| s.rsplit_once('.')) else {
        return Ok(None);
    };
    let system = path.with_file_name(format!("{node}.img"));
    let Ok(id) = identity(&system) else {
        return Ok(None);
    };
    if id.loader_on.as_deref() != Some(target) {
        return Ok(None);
    }
    let l = inspect_loader_image(path, &id)?;
    let mut warnings = Vec::new();
    warnings.extend(l.problem());
    Ok(Some(ImageInfo {
        image: path.display().to_string(),
        size,
        table: "none".into(),
        disk_id: String::new(),
        partitions: Vec::new(),
        boot_files: Vec::new(),
        artifacts: artifacts(path, &id),
        identity: Some(id),
        loaders: l.loaders,
        warnings,
    }))
}

/// A loader-only image (`<node>.<target>.img`, boards with `loader_on`) read against the
/// identity of the node's system image: it must hold exactly the loaders that build recorded,
/// and nothing before them (no partition table, so nothing bootable).
#[derive(Debug, Serialize)]
pub struct LoaderImageInfo {
    pub image: String,
    pub size: u64,
    pub loaders: Vec<LoaderInfo>,
    /// Non-zero bytes before the first loader (a partition table, or another file).
    pub leading_data: bool,
}

impl LoaderImageInfo {
    /// Why this is not the loader image `id`'s build made, if it is not.
    pub fn problem(&self) -> Option<String> {
        if self.leading_data {
            return Some(format!(
                "{} has data before the loader (a partition table?); expected zeros, so that nothing on that device is bootable",
                self.image
            ));
        }
        if self.loaders.is_empty() {
            return Some(format!(
                "{}: its system image records no loader",
                self.image
            ));
        }
        self.loaders.iter().find(|l| !l.matches_record).map(|l| {
            format!(
                "{}: the {} at byte {} is {} bytes with sha256 {}; the system image's build recorded {} bytes with sha256 {} (a loader image from another build?)",
                self.image,
                l.artifact,
                l.offset,
                l.size.map_or("unreadable".into(), |n| n.to_string()),
                l.sha256.as_deref().unwrap_or("?"),
                l.recorded.size,
                l.recorded.sha256
            )
        })
    }
}

/// Reads a loader-only image; `id` is the identity of the system image it belongs with.
pub fn inspect_loader_image(path: &Path, id: &Identity) -> Result<LoaderImageInfo> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))
        .with_context(|| format!("reading the size of {}", path.display()))?;
    let first = id.loaders.iter().map(|l| l.offset).min().unwrap_or(size);
    let mut lead = vec![0u8; usize::try_from(first.min(size)).unwrap_or(0).min(1 << 20)];
    file.read_exact_at(&mut lead, 0)
        .with_context(|| format!("reading {}", path.display()))?;
    let loaders = id
        .loaders
        .iter()
        .map(|r| LoaderInfo::measure(&file, r.clone(), size))
        .collect();
    Ok(LoaderImageInfo {
        image: path.display().to_string(),
        size,
        loaders,
        leading_data: lead.iter().any(|b| *b != 0),
    })
}

/// The identity kiln embedded in an image (for `kiln flash` to refuse the wrong node's image).
pub fn identity(path: &Path) -> Result<Identity> {
    inspect(path)?.into_identity()
}

impl PartitionInfo {
    /// Byte just past the partition (saturating: a hostile table cannot overflow it).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }
}

impl ImageInfo {
    /// The first partition that runs past the end of the file: the image is truncated.
    pub fn partition_past_end(&self) -> Option<&PartitionInfo> {
        self.partitions.iter().find(|p| p.end() > self.size)
    }

    /// The identity kiln embedded, or an error saying the image is not kiln's.
    pub fn into_identity(self) -> Result<Identity> {
        let image = self.image;
        self.identity.ok_or_else(|| {
            anyhow!("{image}: no kiln.json on the boot partition; expected an image built by kiln")
        })
    }
}

pub fn render_text(info: &ImageInfo) -> String {
    use crate::config::size::human;
    let mut s = format!(
        "image {} ({}), {} table, disk id {}\n",
        info.image,
        human(info.size),
        info.table,
        info.disk_id
    );
    if let Some(id) = &info.identity {
        s.push_str(&format!(
            "built for node {} (cluster {}, board {}, ip {}, {:?}{}), kiln {}\n",
            id.node,
            id.cluster,
            id.board,
            id.ip,
            id.role,
            if id.bootstrap { ", bootstrap" } else { "" },
            id.kiln_version
        ));
        s.push_str(&format!(
            "boots from {}{}\n",
            id.target,
            id.variant
                .as_deref()
                .map(|v| format!(", board variant {v}"))
                .unwrap_or_default()
        ));
        if info.table == "none" {
            s.push_str(&format!(
                "this is the loader alone, for its {}: no partition table, nothing bootable\n",
                id.loader_on.as_deref().unwrap_or("?")
            ));
        }
        if info.artifacts.len() > 1 {
            s.push_str("its build made:\n");
            for a in &info.artifacts {
                s.push_str(&format!(
                    "  {:24} the {:6} -> its {} ({}){}\n",
                    a.file,
                    a.kind,
                    a.target,
                    a.how,
                    if a.present {
                        ""
                    } else {
                        "; not beside this file"
                    }
                ));
            }
        }
        if !id.firmware_settings.is_empty() {
            s.push_str(&format!(
                "needs these one-time firmware settings: {}\n",
                id.firmware_settings.join(" ")
            ));
        }
    }
    s.push_str("partitions:\n");
    for p in &info.partitions {
        s.push_str(&format!(
            "  {} {:8} start {:>12} size {:>10}  {:6} type {} partuuid {}{}\n",
            p.number,
            p.name,
            p.start,
            human(p.size),
            p.filesystem.as_deref().unwrap_or("?"),
            p.type_,
            p.partuuid,
            if p.bootable { " bootable" } else { "" }
        ));
    }
    for l in &info.loaders {
        let found = match (l.size, &l.sha256) {
            (Some(n), Some(sha)) => format!("{} ({n} bytes), sha256 {sha}", human(n)),
            _ => "unreadable".to_string(),
        };
        s.push_str(&format!(
            "loader {} at byte {}: {found}, from {}{}\n",
            l.artifact,
            l.offset,
            l.recorded.describe(),
            if l.matches_record {
                String::new()
            } else {
                format!(
                    "; DIFFERS from the build record ({} bytes, sha256 {})",
                    l.recorded.size, l.recorded.sha256
                )
            }
        ));
    }
    s.push_str("boot files:\n");
    for f in &info.boot_files {
        s.push_str(&format!(
            "  {:50} {:>10}  {}\n",
            f.path,
            human(f.size),
            f.sha256.get(..16).unwrap_or(&f.sha256)
        ));
    }
    for w in &info.warnings {
        s.push_str(&format!("warning: {w}\n"));
    }
    // Names and kiln.json come from the image: no escape sequences reach the terminal.
    s.chars()
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect()
}
