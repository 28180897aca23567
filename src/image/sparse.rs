//! Keeps images sparse: blocks that hold only zeros (mke2fs zeroes its journal and inode tables
//! explicitly) are turned back into holes, so the file on disk is its data, not its size.

use anyhow::{Context, Result};
use rustix::fs::{FallocateFlags, SeekFrom, fallocate, seek};
use std::fs::File;
use std::os::unix::fs::FileExt;

const BLOCK: u64 = 4096;

/// The data (non-hole) ranges of `file` within `[start, end)`, as (offset, len).
pub fn data_ranges(file: &File, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d,
            // ENXIO: no data after pos.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e).context("SEEK_DATA on the image"),
        };
        if data >= end {
            break;
        }
        let hole = seek(file, SeekFrom::Hole(data)).context("SEEK_HOLE on the image")?;
        let hole = hole.min(end);
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(out)
}

/// Punches holes over zero-filled 4 KiB blocks in `[start, end)`. Returns bytes released.
pub fn punch_zeros(file: &File, start: u64, end: u64) -> Result<u64> {
    let mut released = 0;
    let mut buf = vec![0u8; 1 << 20];
    let ranges = data_ranges(file, start, end)?;
    // What SEEK_DATA calls holes may still be allocated as unwritten extents (mke2fs
    // preallocates its journal with fallocate): release those too.
    let mut gap_start = start;
    for &(off, len) in ranges.iter().chain(std::iter::once(&(end, 0))) {
        if off > gap_start {
            punch(file, gap_start, off - gap_start)?;
        }
        gap_start = off + len;
    }
    for (off, len) in ranges {
        let mut pos = off - off % BLOCK;
        let stop = off + len;
        while pos < stop {
            let n = ((stop - pos).min(buf.len() as u64)) as usize;
            file.read_exact_at(&mut buf[..n], pos)
                .context("reading the image to find zero blocks")?;
            let mut run_start: Option<u64> = None;
            for (i, chunk) in buf[..n].chunks(BLOCK as usize).enumerate() {
                let at = pos + i as u64 * BLOCK;
                let zero = chunk.len() as u64 == BLOCK && chunk.iter().all(|b| *b == 0);
                match (zero, run_start) {
                    (true, None) => run_start = Some(at),
                    (false, Some(s)) => {
                        released += punch(file, s, at - s)?;
                        run_start = None;
                    }
                    _ => {}
                }
            }
            if let Some(s) = run_start {
                released += punch(file, s, pos + n as u64 - s)?;
            }
            pos += n as u64;
        }
    }
    Ok(released)
}

fn punch(file: &File, off: u64, len: u64) -> Result<u64> {
    fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        off,
        len,
    )
    .context("punching a hole in the image")?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn zero_blocks_become_holes_and_data_stays() {
        let path = std::env::temp_dir().join(format!("kiln-sparse-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all_at(&vec![0u8; 8 << 20], 0).unwrap();
        f.write_all_at(b"kiln", 5 << 20).unwrap();
        f.sync_all().unwrap();
        assert!(f.metadata().unwrap().blocks() * 512 >= 8 << 20);
        punch_zeros(&f, 0, 8 << 20).unwrap();
        assert!(f.metadata().unwrap().blocks() * 512 <= 64 << 10);
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, 5 << 20).unwrap();
        assert_eq!(&b, b"kiln");
        assert_eq!(f.metadata().unwrap().len(), 8 << 20);
        std::fs::remove_file(path).unwrap();
    }
}
