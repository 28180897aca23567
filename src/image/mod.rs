//! Image stage: lays out the disk and writes table, loader, boot FAT and ext4 root into one
//! sparse file, under a temporary name renamed into place only when complete.

pub mod bootcfg;
pub mod ext4;
pub mod fat;
pub mod inspect;
pub mod layout;
pub mod shared;
pub mod slice;
pub mod sparse;
pub mod table;

use crate::config::board::{Content, PartSize};
use crate::config::size::MIB;
use crate::fetch::k3s::K3sFiles;
use crate::fetch::loader;
use crate::plan::NodePlan;
use crate::rootfs::identity::Identity;
use crate::rootfs::{NodeContents, base};
use crate::util::AtomicFile;
use anyhow::{Context, Result, anyhow, bail};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Free space left in the root filesystem when the profile does not say.
pub const DEFAULT_HEADROOM: u64 = 64 * MIB;

/// What a finished image is, for the summary line.
#[derive(Debug, Clone)]
pub struct ImageReport {
    pub node: String,
    pub path: PathBuf,
    /// Apparent size of the raw image.
    pub size: u64,
    /// Bytes actually allocated (the image is sparse).
    pub allocated: u64,
    pub kernel_version: String,
    pub k3s_version: String,
    pub seconds: f64,
    pub identity: Identity,
    /// The loader-only image for another device, when the node's target cannot hold the
    /// loader (board `loader_on`).
    pub loader_image: Option<LoaderImage>,
}

/// `<node>.<target>.img`: the board's loader blobs at their offsets and zeros everywhere else,
/// up to where the board's first partition would start. No partition table: a loader scanning
/// this device finds nothing to boot on it and goes on to the next device.
#[derive(Debug, Clone)]
pub struct LoaderImage {
    /// The target it is for (`[target.NAME]`, e.g. the RK1's eMMC).
    pub target: String,
    pub path: PathBuf,
    pub size: u64,
}

/// The resolved inputs of a node: files on disk, fetched or built by the earlier stages, and
/// the scan of its base (shared by every node of a board).
#[derive(Debug, Clone)]
pub struct Inputs {
    pub base: PathBuf,
    pub scan: std::sync::Arc<base::BaseScan>,
    pub k3s: K3sFiles,
}

/// One pass over a base: boot files and the numbers that size the root filesystem.
pub fn scan_base(plan: &NodePlan, base_path: &Path) -> Result<base::BaseScan> {
    let base_len = std::fs::metadata(base_path)
        .with_context(|| format!("reading base tarball {}", base_path.display()))?
        .len();
    let pb = crate::progress::bytes(base_len, format!("{}: scanning base", plan.board.name()));
    let scan = base::scan(
        base_path,
        &plan.board.spec.devicetree.copy,
        &plan.board.spec.boot_files,
        &|n| pb.set_position(n),
    );
    pb.finish_and_clear();
    scan
}

/// A blob's bytes, and for a loader where they came from.
pub struct BlobData {
    pub artifact: String,
    pub data: Vec<u8>,
    pub record: Option<loader::LoaderRecord>,
}

/// The loader records of a node's blobs, for its identity.
pub fn loader_records(blobs: &[BlobData]) -> Vec<loader::LoaderRecord> {
    blobs.iter().filter_map(|b| b.record.clone()).collect()
}

/// Reads the board's blobs from their artifacts, in profile order, each bounded by the room
/// between its offset and the first partition.
pub fn read_blobs(plan: &NodePlan) -> Result<Vec<BlobData>> {
    let first = layout::first_partition_start(plan)?;
    let mut blobs = Vec::new();
    for b in &plan.board.spec.blobs {
        let p = plan.artifacts.get(&b.artifact).ok_or_else(|| {
            anyhow!(
                "--artifact {}=FILE was not given (the plan requires it)",
                b.artifact
            )
        })?;
        let offset = b.offset.0;
        let room = first.checked_sub(offset).ok_or_else(|| {
            anyhow!(
                "board {}: {} at byte {offset} is past the first partition at byte {first}",
                plan.board.name(),
                b.artifact
            )
        })?;
        let (data, record) = match b.loader {
            Some(kind) => {
                let l = loader::read(&b.artifact, p, kind, offset, room)?;
                (l.data, Some(l.record))
            }
            None => {
                // Raw blob: read at most one byte past the room; layout::place refuses it then.
                let f = std::fs::File::open(p)
                    .with_context(|| format!("opening artifact {}={}", b.artifact, p.display()))?;
                let mut data = Vec::new();
                f.take(room.saturating_add(1))
                    .read_to_end(&mut data)
                    .with_context(|| format!("reading artifact {}={}", b.artifact, p.display()))?;
                (data, None)
            }
        };
        blobs.push(BlobData {
            artifact: b.artifact.clone(),
            data,
            record,
        });
    }
    Ok(blobs)
}

/// What a node's root filesystem is made of before its own files: the shared filesystem it
/// takes (nodes of a build with the same key share one) and its size.
#[derive(Debug, Clone)]
pub struct SharedSpec {
    pub key: shared::Key,
    pub size: u64,
    pub inodes: u64,
    pub label: String,
}

fn root_spec(plan: &NodePlan) -> Result<&crate::config::board::Partition> {
    plan.board
        .spec
        .partitions
        .iter()
        .find(|p| p.content == Content::Rootfs)
        .ok_or_else(|| anyhow!("board {} has no root partition", plan.board.name()))
}

/// The shared root filesystem a node needs: from its board, base and shared files alone.
pub fn shared_spec(
    plan: &NodePlan,
    inputs: &Inputs,
    contents: &NodeContents,
) -> Result<SharedSpec> {
    let spec = root_spec(plan)?;
    let headroom = spec.headroom.map_or(DEFAULT_HEADROOM, |h| h.0);
    let (auto_size, inodes) = shared::size_for(
        inputs.scan.blocks,
        inputs.scan.entries,
        &contents.shared,
        headroom,
    );
    let size = match spec.size {
        PartSize::Fixed(s) => s.0,
        PartSize::Auto => auto_size,
    };
    // The headroom is in the size; the key needs no more of the profile than the geometry.
    let key = shared::Key::of(
        plan.board.name(),
        &inputs.scan.sha256,
        contents.epoch,
        shared::Geometry { size, inodes },
        &contents.shared,
    );
    Ok(SharedSpec {
        key,
        size,
        inodes,
        label: spec.label.clone(),
    })
}

/// Writes the shared root filesystem of `spec` into `dir` (the build's staging directory).
pub fn make_shared_root(
    plan: &NodePlan,
    inputs: &Inputs,
    contents: &NodeContents,
    spec: &SharedSpec,
    dir: &Path,
) -> Result<shared::SharedRoot> {
    let base_len = std::fs::metadata(&inputs.base)
        .with_context(|| format!("reading base tarball {}", inputs.base.display()))?
        .len();
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating output directory {}", dir.display()))?;
    shared::make(&shared::SharedParams {
        key: spec.key.clone(),
        uuid: shared::seed(plan.board.name(), &inputs.scan.sha256, contents.epoch),
        base: &inputs.base,
        base_len,
        shared: &contents.shared,
        size: spec.size,
        inodes: spec.inodes,
        label: &spec.label,
        epoch: contents.epoch,
        dir,
        name: plan.board.name(),
    })
}

/// Builds one node's image into `out_dir/<node>.img` from the shared root filesystem of its
/// board, the files the rootfs stage made for it alone (`contents.own`: identity, address,
/// secrets, first boot) and its boot blobs.
pub fn build_node(
    plan: &NodePlan,
    inputs: &Inputs,
    contents: &NodeContents,
    root_fs: &shared::SharedRoot,
    blobs: &[BlobData],
    out_dir: &Path,
) -> Result<ImageReport> {
    let started = Instant::now();
    let node = &plan.node.name;

    // 1. The base's scan (done once per board by the caller).
    let scan = &inputs.scan;
    let (epoch, own, identity) = (contents.epoch, &contents.own, &contents.identity);
    for r in blobs.iter().filter_map(|b| b.record.as_ref()) {
        crate::progress::note(format!(
            "{node}: {} from {}: {} bytes, sha256 {}",
            r.artifact,
            r.describe(),
            r.size,
            r.sha256
        ));
    }
    let own_blocks = own.blocks();
    if own_blocks.saturating_mul(4096) > shared::NODE_ROOM
        || own.entries.len() as u64 > shared::NODE_ENTRIES
    {
        bail!(
            "{node}: its own files need {} KiB in {} entries; the root filesystem its board's nodes \
share keeps {} KiB and {} entries for them",
            own_blocks.saturating_mul(4),
            own.entries.len(),
            shared::NODE_ROOM / 1024,
            shared::NODE_ENTRIES
        );
    }

    // 2. Layout, checked before any byte is written.
    let blob_lens: Vec<(String, u64)> = blobs
        .iter()
        .map(|b| (b.artifact.clone(), b.data.len() as u64))
        .collect();
    let layout = layout::place(plan, root_fs.size, &blob_lens)?;
    let boot_files = bootcfg::boot_files(plan, &scan.kernel, &contents.identity_json)?;

    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("creating output directory {}", out_dir.display()))?;
    let dest = out_dir.join(format!("{node}.img"));
    let mut out = AtomicFile::create(&dest)?;
    out.file()
        .set_len(layout.disk_size)
        .with_context(|| format!("sizing {}", out.path().display()))?;

    // 3. Root filesystem first: the largest and likeliest step to fail.
    let root = layout
        .by_content(Content::Rootfs)
        .ok_or_else(|| anyhow!("layout has no root partition"))?;
    let pb = crate::progress::spinner(format!("{node}: writing root filesystem"));
    // Private to this node: the files debugfs reads, secrets among them (0700/0600), in the
    // staging directory beside the image and removed with it.
    let work = out_dir.join(format!(".{node}.own.partial-{}", std::process::id()));
    let handle = out
        .file()
        .try_clone()
        .with_context(|| format!("opening {}", out.path().display()))?;
    let written = root_fs.write_node(
        &handle,
        out.path(),
        root.start,
        own,
        plan.ids.fs_uuids[root.index],
        &work,
    );
    crate::cleanup::remove_tree(&work);
    written?;
    pb.finish_and_clear();

    // 4. Boot partition.
    let boot = layout
        .by_content(Content::Boot)
        .ok_or_else(|| anyhow!("layout has no boot partition"))?;
    let pb = crate::progress::spinner(format!("{node}: writing boot partition"));
    fat::write(
        out.file(),
        &fat::FatParams {
            offset: boot.start,
            size: boot.size,
            label: &boot.label,
            volume_id: plan.ids.fat_volume_ids[boot.index],
            epoch,
        },
        &boot_files,
    )?;
    pb.finish_and_clear();

    // 5. Loader blobs and the partition table last, so an interrupted write never looks bootable.
    // A target that cannot hold the loader gets it in an image of its own instead.
    let loader_image = match plan.loader_on() {
        Some(target) => Some(write_loader_image(
            target,
            &out_dir.join(format!("{node}.{target}.img")),
            blobs,
            &layout,
        )?),
        None => {
            write_blobs(out.file(), blobs, &layout)?;
            None
        }
    };
    table::write(out.file(), &layout, &plan.ids)?;
    // The root came sparse from the shared filesystem (its zeros already holes); the rest is
    // the table, the loader and the FAT.
    sparse::punch_zeros(out.file(), 0, root.start)?;
    sparse::punch_zeros(out.file(), root.end(), layout.disk_size)?;

    let allocated = out.file().metadata()?.blocks() * 512;
    let path = out.commit()?;
    Ok(ImageReport {
        node: node.clone(),
        path,
        size: layout.disk_size,
        allocated,
        kernel_version: scan.kernel.version.clone(),
        k3s_version: inputs.k3s.version.clone(),
        identity: identity.clone(),
        seconds: started.elapsed().as_secs_f64(),
        loader_image,
    })
}

fn write_blobs(file: &std::fs::File, blobs: &[BlobData], layout: &layout::Layout) -> Result<()> {
    for (b, placed) in blobs.iter().zip(&layout.blobs) {
        file.write_all_at(&b.data, placed.offset)
            .with_context(|| format!("writing {} at byte {}", b.artifact, placed.offset))?;
    }
    Ok(())
}

/// The loader-only image: as long as the board's loader area (up to its first partition), so
/// the BMC writes a few MiB. It starts with zeros: no MBR signature and no GPT, so neither
/// U-Boot (part_test_efi wants a protective MBR) nor Linux sees the partition table an earlier
/// system left further down the device, and U-Boot's scan goes on to the next boot target.
fn write_loader_image(
    target: &str,
    dest: &Path,
    blobs: &[BlobData],
    layout: &layout::Layout,
) -> Result<LoaderImage> {
    let size = layout
        .partitions
        .first()
        .map_or(layout.disk_size, |p| p.start);
    let mut out = AtomicFile::create(dest)?;
    out.file()
        .set_len(size)
        .with_context(|| format!("sizing {}", out.path().display()))?;
    write_blobs(out.file(), blobs, layout)?;
    sparse::punch_zeros(out.file(), 0, size)?;
    let path = out.commit()?;
    Ok(LoaderImage {
        target: target.to_string(),
        path,
        size,
    })
}
