//! `<node>.bmap`: bmaptool's format 2.0, so `bmaptool copy` (and `kiln write --bmap`) write only
//! the blocks that hold data, each range checked by its sha256.

use sha2::{Digest, Sha256};

pub const BLOCK: u64 = 4096;

/// A run of mapped blocks, inclusive, with the sha256 of its bytes.
#[derive(Debug, Clone)]
pub struct Range {
    pub first: u64,
    pub last: u64,
    pub sha256: String,
}

/// Mapped byte ranges (from SEEK_DATA) widened to whole blocks and merged where they touch.
pub fn block_ranges(data: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(off, len) in data {
        if len == 0 {
            continue;
        }
        let first = off / BLOCK;
        let last = (off + len).div_ceil(BLOCK) - 1;
        match out.last_mut() {
            Some(prev) if first <= prev.1 + 1 => prev.1 = prev.1.max(last),
            _ => out.push((first, last)),
        }
    }
    out
}

/// The bmap XML. `BmapFileChecksum` is the sha256 of the file with that field set to 64 zeros.
pub fn render(image_size: u64, ranges: &[Range]) -> String {
    let blocks = image_size.div_ceil(BLOCK);
    let mapped: u64 = ranges.iter().map(|r| r.last - r.first + 1).sum();
    let mut s = String::new();
    s.push_str("<?xml version=\"1.0\" ?>\n");
    // (No double hyphen may appear inside an XML comment.)
    s.push_str("<!-- Block map of a kiln image, bmaptool format 2.0: write the image\n");
    s.push_str("     with bmaptool copy IMAGE DEVICE, or kiln write with its bmap option. -->\n");
    s.push_str("<bmap version=\"2.0\">\n");
    s.push_str(&format!("    <ImageSize> {image_size} </ImageSize>\n"));
    s.push_str(&format!("    <BlockSize> {BLOCK} </BlockSize>\n"));
    s.push_str(&format!("    <BlocksCount> {blocks} </BlocksCount>\n"));
    s.push_str(&format!(
        "    <MappedBlocksCount> {mapped} </MappedBlocksCount>\n"
    ));
    s.push_str("    <ChecksumType> sha256 </ChecksumType>\n");
    s.push_str("    <BmapFileChecksum> @CHECKSUM@ </BmapFileChecksum>\n");
    s.push_str("    <BlockMap>\n");
    for r in ranges {
        let span = if r.first == r.last {
            r.first.to_string()
        } else {
            format!("{}-{}", r.first, r.last)
        };
        s.push_str(&format!(
            "        <Range chksum=\"{}\"> {span} </Range>\n",
            r.sha256
        ));
    }
    s.push_str("    </BlockMap>\n</bmap>\n");
    let zeros = "0".repeat(64);
    let with_zeros = s.replace("@CHECKSUM@", &zeros);
    let sum = crate::util::hex(&Sha256::digest(with_zeros.as_bytes()));
    s.replace("@CHECKSUM@", &sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_widen_to_blocks_and_merge() {
        let r = block_ranges(&[(0, 100), (4096, 10), (3 * 4096 + 5, 4096)]);
        assert_eq!(r, vec![(0, 1), (3, 4)]);
    }

    #[test]
    fn file_checksum_covers_the_file_with_zeros_in_its_place() {
        let x = render(
            8192,
            &[Range {
                first: 0,
                last: 0,
                sha256: "a".repeat(64),
            }],
        );
        let sum = x
            .split("<BmapFileChecksum> ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap()
            .to_string();
        let zeroed = x.replace(&sum, &"0".repeat(64));
        assert_eq!(crate::util::hex(&Sha256::digest(zeroed.as_bytes())), sum);
        assert!(x.contains("<Range chksum=\"aaaa"));
        assert!(x.contains("> 0 </Range>"));
    }
}
