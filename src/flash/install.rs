//! `kiln flash NODE --install`: the eMMC image that installs a node's system onto a drive the
//! BMC cannot write (the RK1's NVMe), made from the two images of one build.
//!
//! Layout of `<node>.install.img` on the eMMC:
//! - the loader, from `<node>.<target>.img`, at its offsets;
//! - the system's partitions, byte for byte from `<node>.img` at the same offsets, under new
//!   partition GUIDs (so `root=PARTUUID=` names these even if the NVMe drive holds a copy);
//! - after them, the bootable partition `kiln-install` (FAT): the system's kernel, initramfs
//!   and device trees, an extlinux.conf that boots them with the system's root read-only and
//!   `init=/usr/lib/kiln/kiln-install` (firstboot/kiln-install.sh), and what that script needs
//!   to rebuild `<node>.img` on the drive exactly: the system's own GPT (primary and backup),
//!   where its partitions lie, its length and sha256.
//!
//! Why this and not a downloaded image: the eMMC holds the whole system anyway (32 GB), no
//! network or BMC service is involved on the node, and the drive can be checked against the
//! very sha256 of `<node>.img`.

use crate::config::size::{MIB, human};
use crate::image::fat;
use crate::image::inspect::{self, ImageInfo};
use crate::image::layout::{Layout, PlacedPartition};
use crate::image::{sparse, table};
use crate::plan::DiskIds;
use crate::rootfs::identity::Identity;
use crate::util::{AtomicFile, Guid};
use anyhow::{Context, Result, anyhow, bail};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Primary GPT: protective MBR, header, 128 entries (LBA 0..=33).
const GPT_PRIMARY: u64 = 34 * 512;
/// Backup GPT: 128 entries and the header, the last 33 sectors.
const GPT_BACKUP: u64 = 33 * 512;
/// Room on the installer partition beyond its files (FAT tables, directories, slack).
const FAT_MARGIN: u64 = 16 * MIB;
/// Partition name the installer looks for.
pub const PART_NAME: &str = "kiln-install";

/// What was made.
#[derive(Debug)]
pub struct InstallImage {
    pub path: PathBuf,
    pub size: u64,
    /// The system image it installs: its length and sha256 (checked on the drive).
    pub system_bytes: u64,
    pub system_sha256: String,
}

/// Makes `dest` from the system image and the loader image of one build (already checked
/// against each other by the caller). `overwrite`: the installer may write over a drive that
/// holds data (otherwise it refuses and powers off).
pub fn compose(
    system: &Path,
    loader_image: &Path,
    id: &Identity,
    dest: &Path,
    overwrite: bool,
) -> Result<InstallImage> {
    let info = inspect::inspect(system)?;
    let (first, end) = system_span(&info)?;
    let (system_bytes, system_sha256) = crate::flash::xz::hash_file(system)?;
    let src = File::open(system).with_context(|| format!("opening {}", system.display()))?;

    // The installer partition's files: the system's boot files, booted differently.
    let boot = &info.partitions[0];
    let mut files = fat::read_all(&src, boot.start, boot.size)
        .with_context(|| format!("reading the boot partition of {}", system.display()))?;
    let install_root = Guid::derive(&["kiln-install", &info.disk_id, "partition", "2"]);
    let root_partuuid = &info.partitions[1].partuuid;
    let conf = files
        .get("extlinux/extlinux.conf")
        .ok_or_else(|| {
            anyhow!(
                "{} has no /extlinux/extlinux.conf on its boot partition; the installer boots through U-Boot's extlinux",
                system.display()
            )
        })?
        .clone();
    let conf = installer_extlinux(
        &String::from_utf8_lossy(&conf),
        root_partuuid,
        &install_root,
    )?;
    files.insert("extlinux/extlinux.conf".into(), conf.into_bytes());
    let mut head = vec![0u8; GPT_PRIMARY as usize];
    src.read_exact_at(&mut head, 0)
        .with_context(|| format!("reading the GPT of {}", system.display()))?;
    let mut tail = vec![0u8; GPT_BACKUP as usize];
    src.read_exact_at(&mut tail, system_bytes - GPT_BACKUP)
        .with_context(|| format!("reading the backup GPT of {}", system.display()))?;
    files.insert("kiln/gpt-primary.bin".into(), head);
    files.insert("kiln/gpt-backup.bin".into(), tail);

    let used: u64 = files.values().map(|d| d.len() as u64 + 4096).sum();
    let fat_size = round_mib((used + used / 4).max(48 * MIB) + FAT_MARGIN);
    let fat_start = end;
    let size = round_mib(fat_start + fat_size + GPT_BACKUP);
    files.insert(
        "kiln/install.env".into(),
        format!(
            "# Written by kiln flash --install: what /usr/lib/kiln/kiln-install writes and checks.\n\
             KILN_NODE={node}\n\
             KILN_SYSTEM_BYTES={system_bytes}\n\
             KILN_SYSTEM_SHA256={system_sha256}\n\
             KILN_FIRST={first}\n\
             KILN_END={end}\n\
             KILN_INSTALL_BYTES={size}\n\
             KILN_OVERWRITE={}\n",
            u8::from(overwrite),
            node = id.node,
        )
        .into_bytes(),
    );

    let mut out = AtomicFile::create(dest)?;
    out.file()
        .set_len(size)
        .with_context(|| format!("sizing {}", out.path().display()))?;
    copy_data(&src, out.file(), first, end, system)?;
    let loader =
        File::open(loader_image).with_context(|| format!("opening {}", loader_image.display()))?;
    let loader_len = loader.metadata()?.len().min(first);
    copy_data(&loader, out.file(), 0, loader_len, loader_image)?;
    fat::write(
        out.file(),
        &fat::FatParams {
            offset: fat_start,
            size: fat_size,
            label: "KILNINSTALL",
            volume_id: u32::from_le_bytes(
                install_root.to_gpt_bytes()[..4]
                    .try_into()
                    .map_err(|_| anyhow!("GUID bytes"))?,
            ),
            epoch: id.build_epoch,
        },
        &files,
    )?;
    table::write(
        out.file(),
        &install_layout(&info, fat_start, fat_size, size)?,
        &install_ids(&info, install_root),
    )?;
    sparse::punch_zeros(out.file(), 0, size)?;
    let path = out.commit()?;
    Ok(InstallImage {
        path,
        size,
        system_bytes,
        system_sha256,
    })
}

fn round_mib(x: u64) -> u64 {
    x.div_ceil(MIB).saturating_mul(MIB)
}

/// Where the system's partitions begin and end; the installer copies whole MiB.
fn system_span(info: &ImageInfo) -> Result<(u64, u64)> {
    if info.table != "gpt" || info.partitions.len() != 2 || !info.warnings.is_empty() {
        bail!(
            "{}: expected kiln's GPT image with a boot and a root partition and no warnings from inspect; found a {} table with {} partitions{}",
            info.image,
            info.table,
            info.partitions.len(),
            info.warnings
                .first()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default()
        );
    }
    let first = info.partitions.iter().map(|p| p.start).min().unwrap_or(0);
    let end = info.partitions.iter().map(|p| p.end()).max().unwrap_or(0);
    if !first.is_multiple_of(MIB)
        || !end.is_multiple_of(MIB)
        || !info.size.is_multiple_of(MIB)
        || first < GPT_PRIMARY
    {
        bail!(
            "{}: partitions from byte {first} to {end} in {} bytes; expected whole MiB (kiln's layout)",
            info.image,
            info.size
        );
    }
    Ok((first, end))
}

/// The system's extlinux.conf with its root on the eMMC copy, read-only, and the installer
/// as init. Everything else (kernel, initramfs, device trees, console) stays the system's.
fn installer_extlinux(conf: &str, root_partuuid: &str, install_root: &Guid) -> Result<String> {
    let from = format!("root=PARTUUID={root_partuuid}");
    let mut seen = false;
    let mut out = String::from(
        "# Written by kiln flash --install: boots the installer (kiln-install), once.\n",
    );
    for l in conf.lines() {
        let t = l.trim_start();
        if let Some(args) = t.strip_prefix("append ") {
            let words: Vec<String> = args
                .split_whitespace()
                .filter(|w| *w != "rw" && *w != "ro")
                .map(|w| {
                    if w.eq_ignore_ascii_case(&from) {
                        seen = true;
                        format!("root=PARTUUID={install_root}")
                    } else {
                        w.to_string()
                    }
                })
                .collect();
            let indent = &l[..l.len() - t.len()];
            out.push_str(&format!(
                "{indent}append {} ro fsck.mode=skip init=/usr/lib/kiln/kiln-install\n",
                words.join(" ")
            ));
        } else if let Some(label) = t.strip_prefix("menu label ") {
            let indent = &l[..l.len() - t.len()];
            out.push_str(&format!("{indent}menu label kiln-install: {label}\n"));
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    if !seen {
        bail!("extlinux.conf has no `{from}`; expected the one kiln wrote for this image");
    }
    Ok(out)
}

/// Copies the data (not the holes) of `[start, end)` from `src` to the same offsets in `dst`.
fn copy_data(src: &File, dst: &File, start: u64, end: u64, what: &Path) -> Result<()> {
    let mut buf = vec![0u8; 4 << 20];
    for (a, len) in sparse::data_ranges(src, start, end)? {
        let b = a.saturating_add(len);
        let mut pos = a;
        while pos < b {
            let n = usize::try_from(b - pos).map_or(buf.len(), |l| l.min(buf.len()));
            src.read_exact_at(&mut buf[..n], pos)
                .with_context(|| format!("reading {} at byte {pos}", what.display()))?;
            dst.write_all_at(&buf[..n], pos)
                .with_context(|| format!("writing the install image at byte {pos}"))?;
            pos += n as u64;
        }
    }
    Ok(())
}

/// The installer's table: the system's partitions where they are (not bootable), then the
/// bootable installer partition.
fn install_layout(info: &ImageInfo, fat_start: u64, fat_size: u64, size: u64) -> Result<Layout> {
    use crate::config::board::{Content, FsKind, TableKind};
    let mut partitions: Vec<PlacedPartition> = info
        .partitions
        .iter()
        .enumerate()
        .map(|(i, p)| PlacedPartition {
            index: i,
            name: p.name.clone(),
            start: p.start,
            size: p.size,
            fs: if i == 0 { FsKind::Vfat } else { FsKind::Ext4 },
            content: if i == 0 {
                Content::Boot
            } else {
                Content::Rootfs
            },
            bootable: false,
            label: String::new(),
            type_: p.type_.clone(),
        })
        .collect();
    partitions.push(PlacedPartition {
        index: partitions.len(),
        name: PART_NAME.into(),
        start: fat_start,
        size: fat_size,
        fs: FsKind::Vfat,
        content: Content::Boot,
        bootable: true,
        label: "KILNINSTALL".into(),
        type_: "basic-data".into(),
    });
    if fat_start + fat_size + GPT_BACKUP > size {
        bail!(
            "installer partition would end past the install image ({})",
            human(size)
        );
    }
    Ok(Layout {
        table: TableKind::Gpt,
        disk_size: size,
        partitions,
        blobs: Vec::new(),
    })
}

/// GUIDs of the installer's table, derived from the system's disk GUID: stable for one
/// system image, and never those of the system (which the NVMe drive may hold already).
fn install_ids(info: &ImageInfo, install_root: Guid) -> DiskIds {
    let g = |what: &str| Guid::derive(&["kiln-install", &info.disk_id, what]);
    DiskIds {
        disk_guid: g("disk"),
        mbr_signature: 0,
        partition_guids: vec![
            Guid::derive(&["kiln-install", &info.disk_id, "partition", "1"]),
            install_root,
            g("installer"),
        ],
        fs_uuids: Vec::new(),
        fat_volume_ids: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_installer_boots_the_systems_kernel_read_only_into_kiln_install() {
        let conf = "default kiln\nlabel kiln\n    menu label rk1-1 (rk1)\n    kernel /vmlinuz\n    append root=PARTUUID=AA-BB rw rootwait earlycon\n";
        let g = Guid::derive(&["t"]);
        let out = installer_extlinux(conf, "aa-bb", &g).expect("rewrites");
        assert!(out.contains(&format!(
            "    append root=PARTUUID={g} rootwait earlycon ro fsck.mode=skip init=/usr/lib/kiln/kiln-install\n"
        )), "{out}");
        assert!(
            out.contains("menu label kiln-install: rk1-1 (rk1)"),
            "{out}"
        );
        assert!(!out.contains(" rw"), "{out}");
        let e = installer_extlinux(conf, "cc-dd", &g)
            .unwrap_err()
            .to_string();
        assert!(e.contains("root=PARTUUID=cc-dd"), "{e}");
    }
}
