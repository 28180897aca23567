//! `<node>.img.xz`, the form the BMC takes: it decompresses a file whose name ends in `.xz`
//! while writing, so only the compressed bytes cross the network.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The compressed image beside `img` and what the BMC is told about it.
pub struct Compressed {
    pub path: PathBuf,
    pub length: u64,
    pub sha256: String,
    /// Length of the raw image: what the BMC writes to the eMMC after decompressing.
    pub image_len: u64,
}

/// Returns `<img>.xz`, compressing `img` first when the `.xz` is missing or older than it.
pub fn ensure(img: &Path) -> Result<Compressed> {
    let xz = crate::publish::with_extension(img, "xz");
    let image_len = std::fs::metadata(img)
        .with_context(|| format!("reading {}", img.display()))?
        .len();
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = matches!((mtime(&xz), mtime(img)), (Some(x), Some(i)) if x >= i);
    let (length, sha256) = if fresh {
        // An .xz made earlier (by `kiln build --format xz` or a previous flash) must still be
        // this image: the BMC writes what it decompresses, not the raw file kiln checked.
        verify_decompresses_to(&xz, img)?;
        hash_file(&xz)?
    } else {
        // The compressing pass already hashed what it wrote.
        let c = compress(img)?;
        (c.size, c.sha256)
    };
    Ok(Compressed {
        path: xz,
        length,
        sha256,
        image_len,
    })
}

/// The same compressor `kiln build --format xz` uses (publish stage), so both give one file.
fn compress(img: &Path) -> Result<crate::publish::FileSum> {
    let len = std::fs::metadata(img)
        .with_context(|| format!("reading {}", img.display()))?
        .len();
    let pb = crate::progress::bytes(len, format!("compressing {}", img.display()));
    let r = crate::publish::compress(img, &[crate::publish::Format::Xz], &|n| pb.set_position(n));
    pb.finish_and_clear();
    r?.compressed
        .into_iter()
        .next()
        .map(|(_, c)| c)
        .ok_or_else(|| anyhow::anyhow!("no .xz written for {}", img.display()))
}

/// Streams `xz` through the decoder and compares length and sha256 with `img`.
fn verify_decompresses_to(xz: &Path, img: &Path) -> Result<()> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let f = std::fs::File::open(xz).with_context(|| format!("opening {}", xz.display()))?;
    let mut dec = liblzma::read::XzDecoder::new_multi_decoder(std::io::BufReader::new(f));
    let mut h = Sha256::new();
    let mut n: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = dec.read(&mut buf).with_context(|| {
            format!(
                "{} does not decompress (corrupt or cut); delete it and flash again to remake it",
                xz.display()
            )
        })?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n = n.saturating_add(k as u64);
    }
    let (len, sum) = hash_file(img)?;
    if n != len || crate::util::hex(&h.finalize()) != sum {
        anyhow::bail!(
            "{} does not decompress to {} ({n} bytes, expected {len} with sha256 {sum}); delete the .xz and flash again to remake it",
            xz.display(),
            img.display()
        );
    }
    Ok(())
}

/// Length and sha256 (hex) of a file.
pub fn hash_file(p: &Path) -> Result<(u64, String)> {
    let len = std::fs::metadata(p)
        .with_context(|| format!("reading {}", p.display()))?
        .len();
    Ok((len, crate::fetch::sha256_file(p)?))
}
