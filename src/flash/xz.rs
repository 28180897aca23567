//! `<node>.img.xz`, the form the BMC takes: it decompresses a file whose name ends in `.xz`
//! while writing, so only the compressed bytes cross the network.

use crate::util::AtomicFile;
use anyhow::{Context, Result};
use liblzma::stream::{Check, MtStreamBuilder};
use liblzma::write::XzEncoder;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// xz preset 6 (the `xz` default): its 8 MiB dictionary keeps the BMC's decompression memory
/// small, which matters on a board that runs out of memory on back-to-back flashes.
const PRESET: u32 = 6;

/// The compressed image beside `img` and what the BMC is told about it.
pub struct Compressed {
    pub path: PathBuf,
    pub length: u64,
    pub sha256: String,
}

/// Returns `<img>.xz`, compressing `img` first when the `.xz` is missing or older than it.
pub fn ensure(img: &Path) -> Result<Compressed> {
    let mut name = img.as_os_str().to_owned();
    name.push(".xz");
    let xz = PathBuf::from(name);
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = matches!((mtime(&xz), mtime(img)), (Some(x), Some(i)) if x >= i);
    if !fresh {
        compress(img, &xz)?;
    }
    let (length, sha256) = hash_file(&xz)?;
    Ok(Compressed {
        path: xz,
        length,
        sha256,
    })
}

fn compress(img: &Path, dest: &Path) -> Result<()> {
    let input = File::open(img).with_context(|| format!("opening {}", img.display()))?;
    let len = input.metadata()?.len();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let stream = MtStreamBuilder::new()
        .preset(PRESET)
        .threads(threads)
        .check(Check::Crc64)
        .encoder()
        .context("starting the xz encoder")?;
    let mut out = AtomicFile::create(dest)?;
    let pb = crate::progress::bytes(len, format!("compressing {}", img.display()));
    {
        let mut enc = XzEncoder::new_stream(out.file(), stream);
        let mut r = BufReader::with_capacity(1 << 20, input);
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        loop {
            let n = r
                .read(&mut buf)
                .with_context(|| format!("reading {}", img.display()))?;
            if n == 0 {
                break;
            }
            enc.write_all(&buf[..n])
                .with_context(|| format!("writing {}", dest.display()))?;
            done += n as u64;
            pb.set_position(done);
        }
        enc.finish()
            .with_context(|| format!("finishing {}", dest.display()))?;
    }
    pb.finish_and_clear();
    out.commit()?;
    Ok(())
}

/// Length and sha256 (hex) of a file.
pub fn hash_file(p: &Path) -> Result<(u64, String)> {
    let len = std::fs::metadata(p)
        .with_context(|| format!("reading {}", p.display()))?
        .len();
    Ok((len, crate::fetch::sha256_file(p)?))
}
