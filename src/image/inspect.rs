//! `kiln inspect`: reads an image back — partition table, partitions, boot files and the node
//! it was built for — without mounting anything.

use super::fat;
use crate::plan::Identity;
use crate::util::{Guid, hex};
use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use sha2::{Digest, Sha256};
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

pub fn inspect(path: &Path) -> Result<ImageInfo> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata()?.len();
    let mut mbr = [0u8; 512];
    file.read_exact_at(&mut mbr, 0)
        .with_context(|| format!("{} is too small to hold a partition table", path.display()))?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Err(anyhow!(
            "{}: no partition table (no 0x55AA signature in sector 0); expected a kiln image",
            path.display()
        ));
    }
    let protective = mbr[446 + 4] == 0xee;
    let (table, disk_id, mut partitions) = if protective {
        let gpt = gptman::GPT::read_from(&mut file, 512)
            .map_err(|e| anyhow!("{}: reading the GPT: {e}", path.display()))?;
        let parts = gpt
            .iter()
            .filter(|(_, p)| p.is_used())
            .map(|(n, p)| PartitionInfo {
                number: n,
                name: p.partition_name.as_str().to_string(),
                start: p.starting_lba * 512,
                size: (p.ending_lba + 1 - p.starting_lba) * 512,
                type_: Guid::from_gpt_bytes(p.partition_type_guid)
                    .to_string()
                    .to_uppercase(),
                partuuid: Guid::from_gpt_bytes(p.unique_partition_guid).to_string(),
                bootable: p.attribute_bits & (1 << 2) != 0,
                filesystem: None,
            })
            .collect();
        (
            "gpt".to_string(),
            Guid::from_gpt_bytes(gpt.header.disk_guid).to_string(),
            parts,
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
    let mut boot_files = Vec::new();
    let mut identity = None;
    for p in &mut partitions {
        p.filesystem = fs_type(&file, p.start);
        if p.filesystem.as_deref() == Some("vfat") && boot_files.is_empty() {
            let files = fat::read_all(&file, p.start, p.size)?;
            if let Some(j) = files.get("kiln.json") {
                identity = serde_json::from_slice(j).ok();
            }
            boot_files = files
                .into_iter()
                .map(|(path, data)| BootFile {
                    path,
                    size: data.len() as u64,
                    sha256: hex(&Sha256::digest(&data)),
                })
                .collect();
        }
    }
    Ok(ImageInfo {
        image: path.display().to_string(),
        size,
        table,
        disk_id,
        partitions,
        boot_files,
        identity,
    })
}

/// The identity kiln embedded in an image (for `kiln flash` to refuse the wrong node's image).
pub fn identity(path: &Path) -> Result<Identity> {
    inspect(path)?.identity.ok_or_else(|| {
        anyhow!(
            "{}: no kiln.json on the boot partition; expected an image built by kiln",
            path.display()
        )
    })
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
    s.push_str("boot files:\n");
    for f in &info.boot_files {
        s.push_str(&format!(
            "  {:50} {:>10}  {}\n",
            f.path,
            human(f.size),
            &f.sha256[..16]
        ));
    }
    s
}
