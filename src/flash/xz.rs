//! `<node>.img.xz`, the form the BMC takes: it decompresses a file whose name ends in `.xz`
//! while writing, so only the compressed bytes cross the network.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

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
        compress(img)?;
    }
    let (length, sha256) = hash_file(&xz)?;
    Ok(Compressed {
        path: xz,
        length,
        sha256,
    })
}

/// The same compressor `kiln build --format xz` uses (publish stage), so both give one file.
fn compress(img: &Path) -> Result<()> {
    let len = std::fs::metadata(img)
        .with_context(|| format!("reading {}", img.display()))?
        .len();
    let pb = crate::progress::bytes(len, format!("compressing {}", img.display()));
    let r = crate::publish::compress(img, &[crate::publish::Format::Xz], &|n| pb.set_position(n));
    pb.finish_and_clear();
    r.map(|_| ())
}

/// Length and sha256 (hex) of a file.
pub fn hash_file(p: &Path) -> Result<(u64, String)> {
    let len = std::fs::metadata(p)
        .with_context(|| format!("reading {}", p.display()))?
        .len();
    Ok((len, crate::fetch::sha256_file(p)?))
}
