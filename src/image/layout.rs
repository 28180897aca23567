//! Where every byte goes, decided and checked before anything is written.

use crate::config::board::{Content, FsKind, PartSize, TableKind, gpt_primary_end};
use crate::config::size::{MIB, human};
use crate::plan::NodePlan;
use anyhow::{Result, bail};

/// Sectors the backup GPT needs at the end of the disk (header + 128 × 128-byte entries).
pub const GPT_BACKUP_SECTORS: u64 = 33;

#[derive(Debug, Clone)]
pub struct PlacedPartition {
    /// 0-based position in the table (partition number - 1).
    pub index: usize,
    pub name: String,
    pub start: u64,
    pub size: u64,
    pub fs: FsKind,
    pub content: Content,
    pub bootable: bool,
    pub label: String,
    pub type_: String,
}

impl PlacedPartition {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

#[derive(Debug, Clone)]
pub struct PlacedBlob {
    pub artifact: String,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone)]
pub struct Layout {
    pub table: TableKind,
    pub disk_size: u64,
    pub partitions: Vec<PlacedPartition>,
    pub blobs: Vec<PlacedBlob>,
}

impl Layout {
    pub fn by_content(&self, c: Content) -> Option<&PlacedPartition> {
        self.partitions.iter().find(|p| p.content == c)
    }
}

/// Places the board's partitions with the root filesystem `root_size` bytes long, and the blobs
/// (`(artifact, length)`), refusing any overlap.
pub fn place(plan: &NodePlan, root_size: u64, blobs: &[(String, u64)]) -> Result<Layout> {
    let spec = &plan.board.spec;
    let table_end = match spec.partition_table.kind {
        TableKind::Gpt => gpt_primary_end(spec.partition_table.first_usable_lba),
        TableKind::Mbr => 512,
    };
    let mut cursor = table_end;
    let mut parts = Vec::new();
    for (i, p) in spec.partitions.iter().enumerate() {
        let start = match p.start {
            Some(s) => s.0,
            None => cursor.div_ceil(MIB) * MIB,
        };
        if start < cursor {
            bail!(
                "board {}: partition `{}` would start at byte {start}, inside what comes before it (ends at {cursor})",
                plan.board.name(),
                p.name
            );
        }
        let size = match (p.size, p.content) {
            (PartSize::Fixed(s), _) => s.0,
            (PartSize::Auto, _) => root_size.div_ceil(MIB) * MIB,
        };
        cursor = start + size;
        parts.push(PlacedPartition {
            index: i,
            name: p.name.clone(),
            start,
            size,
            fs: p.fs,
            content: p.content,
            bootable: p.bootable,
            label: p.label.clone(),
            type_: p.type_.clone(),
        });
    }
    let trailer = match spec.partition_table.kind {
        TableKind::Gpt => GPT_BACKUP_SECTORS * 512,
        TableKind::Mbr => 0,
    };
    // Round the disk to whole MiB so it maps cleanly onto eMMC/SD erase blocks.
    let disk_size = (cursor + trailer).div_ceil(MIB) * MIB;

    let first_start = parts.first().map_or(disk_size, |p| p.start);
    let mut placed_blobs = Vec::new();
    for blob in &spec.blobs {
        let len = blobs
            .iter()
            .find(|(a, _)| *a == blob.artifact)
            .map(|(_, l)| *l)
            .unwrap_or(0);
        let (off, end) = (blob.offset.0, blob.offset.0 + len);
        if off < table_end {
            bail!(
                "{} at byte {off} would overwrite the partition table (ends at byte {table_end})",
                blob.artifact
            );
        }
        if end > first_start {
            bail!(
                "{} is {} and would run from byte {off} to {end}, into the first partition at byte {first_start}; expected a loader of at most {}",
                blob.artifact,
                human(len),
                human(first_start - off)
            );
        }
        placed_blobs.push(PlacedBlob {
            artifact: blob.artifact.clone(),
            offset: off,
            len,
        });
    }
    Ok(Layout {
        table: spec.partition_table.kind,
        disk_size,
        partitions: parts,
        blobs: placed_blobs,
    })
}
