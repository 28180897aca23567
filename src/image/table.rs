//! Partition tables: GPT (gptman, caller-chosen GUIDs) and DOS/MBR (mbrman).

use super::layout::Layout;
use crate::config::board::{TableKind, gpt_type_guid, mbr_type_byte};
use crate::plan::DiskIds;
use crate::util::parse_guid;
use anyhow::{Context, Result, anyhow};
use std::fs::File;

/// GPT attribute bit 2: "legacy BIOS bootable", which U-Boot's distro boot looks for.
const GPT_ATTR_LEGACY_BOOTABLE: u64 = 1 << 2;

pub fn write(file: &mut File, layout: &Layout, ids: &DiskIds) -> Result<()> {
    match layout.table {
        TableKind::Gpt => write_gpt(file, layout, ids),
        TableKind::Mbr => write_mbr(file, layout, ids),
    }
}

fn write_gpt(file: &mut File, layout: &Layout, ids: &DiskIds) -> Result<()> {
    // gptman sizes the table from the file's length: it must already be the final size.
    let mut gpt = gptman::GPT::new_from(file, 512, ids.disk_guid.to_gpt_bytes())
        .map_err(|e| anyhow!("creating the GPT: {e}"))?;
    for p in &layout.partitions {
        let type_guid = gpt_type_guid(&p.type_)
            .and_then(|g| parse_guid(&g))
            .ok_or_else(|| anyhow!("partition {}: bad GPT type {}", p.name, p.type_))?;
        gpt[(p.index + 1) as u32] = gptman::GPTPartitionEntry {
            partition_type_guid: type_guid.to_gpt_bytes(),
            unique_partition_guid: ids.partition_guids[p.index].to_gpt_bytes(),
            starting_lba: p.start / 512,
            // Sizes are validated to be whole sectors, more than 0.
            ending_lba: (p.end() / 512).saturating_sub(1),
            attribute_bits: if p.bootable {
                GPT_ATTR_LEGACY_BOOTABLE
            } else {
                0
            },
            partition_name: p.name.as_str().into(),
        };
    }
    gpt.write_into(file)
        .map_err(|e| anyhow!("writing the GPT: {e}"))?;
    gptman::GPT::write_protective_mbr_into(file, 512)
        .map_err(|e| anyhow!("writing the protective MBR: {e}"))?;
    Ok(())
}

fn write_mbr(file: &mut File, layout: &Layout, ids: &DiskIds) -> Result<()> {
    // The signature is read back little-endian by the kernel and blkid for PARTUUIDs.
    let mut header = mbrman::MBRHeader::new(ids.mbr_signature.to_le_bytes());
    for p in &layout.partitions {
        let sys = mbr_type_byte(&p.type_)
            .ok_or_else(|| anyhow!("partition {}: bad MBR type {}", p.name, p.type_))?;
        let lba = |b: u64, what: &str| -> Result<u32> {
            u32::try_from(b / 512).with_context(|| {
                format!(
                    "partition {} {what} is beyond 2 TiB, which an MBR cannot address",
                    p.name
                )
            })
        };
        let entry = mbrman::MBRPartitionEntry {
            boot: if p.bootable { 0x80 } else { 0 },
            first_chs: mbrman::CHS::empty(),
            sys,
            last_chs: mbrman::CHS::empty(),
            starting_lba: lba(p.start, "start")?,
            sectors: lba(p.size, "size")?,
        };
        match p.index {
            0 => header.partition_1 = entry,
            1 => header.partition_2 = entry,
            2 => header.partition_3 = entry,
            3 => header.partition_4 = entry,
            _ => return Err(anyhow!("an MBR holds at most 4 primary partitions")),
        }
    }
    header
        .write_into(file)
        .map_err(|e| anyhow!("writing the MBR: {e}"))?;
    Ok(())
}
