//! Where every byte goes, decided and checked before anything is written.

use crate::config::board::{Content, FsKind, PartSize, TableKind, gpt_primary_end};
use crate::config::size::{MAX_DISK, MIB, human};
use crate::plan::NodePlan;
use anyhow::{Result, anyhow, bail};

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
        // `place` checked that start + size stays within MAX_DISK.
        self.start.saturating_add(self.size)
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

/// `a + b`, or an error when the disk would be larger than kiln makes (the profile's numbers
/// are range-checked by `kiln check`; this keeps an unchecked one from wrapping around).
fn add(a: u64, b: u64, what: &str) -> Result<u64> {
    a.checked_add(b).filter(|s| *s <= MAX_DISK).ok_or_else(|| {
        anyhow!(
            "{what} would end past {}; expected a disk of at most that",
            human(MAX_DISK)
        )
    })
}

/// `x` rounded up to whole MiB, within MAX_DISK.
fn round_mib(x: u64, what: &str) -> Result<u64> {
    add(x.div_ceil(MIB).saturating_mul(MIB), 0, what)
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
            None => round_mib(cursor, &format!("partition `{}`", p.name))?,
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
            (PartSize::Auto, _) => round_mib(root_size, &format!("partition `{}`", p.name))?,
        };
        cursor = add(start, size, &format!("partition `{}`", p.name))?;
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
    let disk_size = round_mib(add(cursor, trailer, "the disk")?, "the disk")?;

    let first_start = parts.first().map_or(disk_size, |p| p.start);
    let mut placed_blobs = Vec::new();
    for blob in &spec.blobs {
        let len = blobs
            .iter()
            .find(|(a, _)| *a == blob.artifact)
            .map(|(_, l)| *l)
            .unwrap_or(0);
        let (off, end) = (blob.offset.0, add(blob.offset.0, len, &blob.artifact)?);
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
                human(first_start.saturating_sub(off))
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

/// Byte where the board's first partition starts: the end of the room for loader blobs. It
/// does not depend on the root filesystem's size (only later partitions move with it), so it is
/// known before the root is sized.
pub fn first_partition_start(plan: &NodePlan) -> Result<u64> {
    let l = place(plan, 0, &[])?;
    Ok(l.partitions.first().map_or(l.disk_size, |p| p.start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::size::ByteSize;
    use std::path::Path;

    /// The shipped configuration's Pi 5 plan, for layouts with hand-broken numbers.
    fn pi5_plan() -> NodePlan {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cfg = crate::config::load(&repo.join("kiln.toml"), &repo.join("boards"), false)
            .expect("shipped configuration loads");
        let supplied = [("base".to_string(), repo.join("kiln.toml"))].into();
        crate::plan::plan_node(&cfg, "pi5-staging", &supplied, crate::plan::JoinMode::Init)
            .expect("pi5-staging plans")
    }

    #[test]
    fn absurd_numbers_are_errors_not_overflows() {
        let ok = place(&pi5_plan(), 1 << 30, &[]).expect("shipped layout");
        assert!(ok.disk_size > 1 << 30);

        // Validation refuses these; layout must not wrap around if one slips through.
        let mut p = pi5_plan();
        p.board.spec.partitions[0].size = PartSize::Fixed(ByteSize(u64::MAX));
        let e = place(&p, 1 << 30, &[]).unwrap_err().to_string();
        assert!(e.contains("would end past"), "{e}");

        let e = place(&pi5_plan(), u64::MAX, &[]).unwrap_err().to_string();
        assert!(e.contains("would end past"), "{e}");

        let mut p = pi5_plan();
        p.board.spec.partitions[0].start = Some(ByteSize(u64::MAX - 10));
        assert!(place(&p, 1 << 30, &[]).is_err());
    }
}
