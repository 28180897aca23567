//! Publish stage: what a build hands to users, CI and the BMC besides the raw image: compressed
//! copies, a bmap, one SHA256SUMS and a manifest. The raw image is read once for all of them.

pub mod bmap;
pub mod staging;
pub mod xz;

pub use xz::BlockCache;

use crate::util::AtomicFile;
use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Output formats. `raw` is always written; the others are added beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    /// zstd, multi-threaded: the default companion for downloads and CI artifacts.
    Zst,
    /// xz, what the Turing Pi BMC decompresses while flashing: independent blocks compressed on
    /// every core and shared between the images of a build ([`xz`]).
    Xz,
    Gz,
}

impl Format {
    pub const ALL: [Format; 4] = [Format::Raw, Format::Zst, Format::Xz, Format::Gz];

    /// Its name on the command line and in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Zst => "zst",
            Format::Xz => "xz",
            Format::Gz => "gz",
        }
    }

    pub fn extension(self) -> Option<&'static str> {
        match self {
            Format::Raw => None,
            Format::Zst => Some("zst"),
            Format::Xz => Some("xz"),
            Format::Gz => Some("gz"),
        }
    }

    /// `--format` given or not: no flag means raw + zst; `raw` alone adds nothing.
    pub fn resolve(given: &[Format]) -> Vec<Format> {
        let mut f: Vec<Format> = if given.is_empty() {
            vec![Format::Raw, Format::Zst]
        } else {
            given.to_vec()
        };
        f.push(Format::Raw);
        f.sort();
        f.dedup();
        f
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| format!("`{s}` is not an output format; expected raw, zst, xz or gz"))
    }
}

/// xz preset 0: the BMC writes every decompressed byte to the eMMC and reads it back, so a
/// flash takes as long as the raw image at the eMMC's rate whatever the .xz's size; the .xz only
/// has to keep the image's zeros off the network. Preset 0 compresses an RK1 image 6.4× faster
/// than preset 6 for a file 10 % larger (xz 5.4 -T2 on this machine: 25 s, 266 MB against
/// 160 s, 241 MB), and its 256 KiB dictionary is the least any decoder, the BMC's included,
/// has to allocate. zstd level 3 (its default) is fast enough to run on every build.
const XZ_PRESET: u32 = 0;
const ZSTD_LEVEL: i32 = 3;

/// A written file and its digest.
#[derive(Debug, Clone, Serialize)]
pub struct FileSum {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

impl FileSum {
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// What publishing one image produced.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    pub raw: FileSum,
    pub compressed: Vec<(Format, FileSum)>,
    pub bmap: PathBuf,
    /// Bytes in mapped blocks: what a bmap copy writes.
    pub mapped_bytes: u64,
    /// The node's loader-only image, published the same way (boards with `loader_on`).
    pub loader_image: Option<Box<Published>>,
}

impl Published {
    /// The raw image and its compressed copies.
    pub fn files(&self) -> Vec<FileSum> {
        std::iter::once(self.raw.clone())
            .chain(self.compressed.iter().map(|(_, c)| c.clone()))
            .collect()
    }

    /// Moves every path (staging directory to output directory).
    pub fn relocate(&mut self, to: &dyn Fn(&Path) -> PathBuf) {
        self.raw.path = to(&self.raw.path);
        for (_, c) in &mut self.compressed {
            c.path = to(&c.path);
        }
        self.bmap = to(&self.bmap);
        if let Some(l) = &mut self.loader_image {
            l.relocate(to);
        }
    }
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W: Write> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

enum Encoder {
    Zst(zstd::stream::write::Encoder<'static, Hashing<File>>),
    Xz(xz::XzWriter),
    Gz(flate2::write::GzEncoder<Hashing<File>>),
}

fn threads() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

impl Encoder {
    fn new(format: Format, file: File, cache: &BlockCache) -> Result<Encoder> {
        let w = Hashing {
            inner: file,
            hash: Sha256::new(),
            len: 0,
        };
        Ok(match format {
            Format::Zst => {
                let mut e = zstd::stream::write::Encoder::new(w, ZSTD_LEVEL)?;
                // With one worker or more, zstd's output does not depend on their number.
                e.multithread(threads().max(1))?;
                e.include_checksum(true)?;
                Encoder::Zst(e)
            }
            // Its own writer hashes what it writes.
            Format::Xz => Encoder::Xz(xz::XzWriter::new(w.inner, cache, threads() as usize)?),
            Format::Gz => Encoder::Gz(
                // mtime 0 and no file name: the same image gives the same bytes.
                flate2::GzBuilder::new()
                    .mtime(0)
                    .write(w, flate2::Compression::default()),
            ),
            Format::Raw => anyhow::bail!("raw is not compressed"),
        })
    }

    fn write_all(&mut self, b: &[u8]) -> Result<()> {
        match self {
            Encoder::Zst(e) => e.write_all(b)?,
            Encoder::Xz(e) => e.write_all(b)?,
            Encoder::Gz(e) => e.write_all(b)?,
        }
        Ok(())
    }

    fn finish(self) -> Result<(u64, String)> {
        let w = match self {
            Encoder::Zst(e) => e.finish()?,
            Encoder::Xz(e) => {
                let s = e.finish()?;
                return Ok((s.len, s.sha256));
            }
            Encoder::Gz(e) => e.finish()?,
        };
        w.inner.sync_all()?;
        Ok((w.len, crate::util::hex(&w.hash.finalize())))
    }
}

/// `<img>.<ext>` (the image name keeps its own `.img`).
pub fn with_extension(img: &Path, ext: &str) -> PathBuf {
    let mut s = img.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// One pass over a raw image: its digest, its compressed copies and its mapped block ranges.
pub struct Pass {
    pub raw: FileSum,
    pub compressed: Vec<(Format, FileSum)>,
    pub ranges: Vec<bmap::Range>,
}

/// Writes the compressed copies of `img` in `formats`, hashing everything in one pass.
pub fn compress(img: &Path, formats: &[Format], on_progress: &dyn Fn(u64)) -> Result<Pass> {
    compress_with(img, formats, &BlockCache::new(), on_progress)
}

/// [`compress`], taking the .xz blocks another image of the build already compressed from
/// `cache` (the output is the same either way).
pub fn compress_with(
    img: &Path,
    formats: &[Format],
    cache: &BlockCache,
    on_progress: &dyn Fn(u64),
) -> Result<Pass> {
    let input = File::open(img).with_context(|| format!("opening {}", img.display()))?;
    let size = input.metadata()?.len();
    let data = crate::image::sparse::data_ranges(&input, 0, size)?;
    let blocks = bmap::block_ranges(&data);
    let mut range_hashes: Vec<Sha256> = blocks.iter().map(|_| Sha256::new()).collect();

    let mut outs = Vec::new();
    for &f in formats {
        let Some(ext) = f.extension() else { continue };
        let dest = with_extension(img, ext);
        let mut tmp = AtomicFile::create(&dest)?;
        let handle = tmp
            .file()
            .try_clone()
            .with_context(|| format!("opening {}", dest.display()))?;
        outs.push((f, dest, tmp, Encoder::new(f, handle, cache)?));
    }

    // The image in order as (start, end, holds data): holes are fed from a buffer of zeros
    // instead of being read, so the pass reads only the image's data from disk.
    let mut segments = Vec::new();
    let mut at = 0u64;
    for &(off, len) in &data {
        if off > at {
            segments.push((at, off, false));
        }
        segments.push((off, off + len, true));
        at = off + len;
    }
    if at < size {
        segments.push((at, size, false));
    }
    let zeros = vec![0u8; 4 << 20];
    let mut whole = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0u64;
    let mut ri = 0usize;
    for (start, end, is_data) in segments {
        while pos < end {
            let n = usize::try_from(end - pos).map_or(buf.len(), |l| l.min(buf.len()));
            let chunk: &[u8] = if is_data {
                input
                    .read_exact_at(&mut buf[..n], pos)
                    .with_context(|| format!("reading {} at byte {pos}", img.display()))?;
                &buf[..n]
            } else {
                &zeros[..n]
            };
            debug_assert!(pos >= start);
            whole.update(chunk);
            // Feed the part of this chunk that falls in each mapped block range.
            let end = pos + n as u64;
            while ri < blocks.len() {
                let (first, last) = blocks[ri];
                let (rs, re) = (first * bmap::BLOCK, ((last + 1) * bmap::BLOCK).min(size));
                if rs >= end {
                    break;
                }
                let (a, b) = (rs.max(pos), re.min(end));
                if a < b {
                    range_hashes[ri].update(&chunk[(a - pos) as usize..(b - pos) as usize]);
                }
                if re <= end {
                    ri += 1;
                } else {
                    break;
                }
            }
            for (f, dest, _, enc) in outs.iter_mut() {
                enc.write_all(chunk)
                    .with_context(|| format!("writing {} ({f:?})", dest.display()))?;
            }
            pos = end;
            on_progress(pos);
        }
    }
    let raw = FileSum {
        path: img.to_path_buf(),
        size,
        sha256: crate::util::hex(&whole.finalize()),
    };
    let mut compressed = Vec::new();
    for (f, dest, tmp, enc) in outs {
        let (len, sha) = enc.finish()?;
        tmp.commit()?;
        compressed.push((
            f,
            FileSum {
                path: dest,
                size: len,
                sha256: sha,
            },
        ));
    }
    let ranges = blocks
        .iter()
        .zip(range_hashes)
        .map(|(&(first, last), h)| bmap::Range {
            first,
            last,
            sha256: crate::util::hex(&h.finalize()),
        })
        .collect();
    Ok(Pass {
        raw,
        compressed,
        ranges,
    })
}

/// Compressed copies, `<img>.bmap` and digests for one finished image.
pub fn publish_image(img: &Path, formats: &[Format]) -> Result<Published> {
    publish_image_with(img, formats, &BlockCache::new())
}

/// [`publish_image`] sharing .xz blocks with the other images of a build through `cache`.
pub fn publish_image_with(img: &Path, formats: &[Format], cache: &BlockCache) -> Result<Published> {
    let size = std::fs::metadata(img)?.len();
    let pb = crate::progress::bytes(size, format!("publishing {}", img.display()));
    let r = compress_with(img, formats, cache, &|n| pb.set_position(n));
    pb.finish_and_clear();
    let Pass {
        raw,
        compressed,
        ranges,
    } = r?;
    let mapped_bytes = ranges
        .iter()
        .map(|r| ((r.last + 1) * bmap::BLOCK).min(size) - r.first * bmap::BLOCK)
        .sum();
    let bmap_path = with_extension(img, "bmap");
    crate::util::write_atomic(&bmap_path, bmap::render(size, &ranges).as_bytes())?;
    Ok(Published {
        raw,
        compressed,
        bmap: bmap_path,
        mapped_bytes,
        loader_image: None,
    })
}

/// `SHA256SUMS` in `sha256sum` format: the raw images and every compressed file (the BMC and
/// users check different ones), names relative to the output directory.
pub fn write_sums(out_dir: &Path, files: &[&FileSum]) -> Result<PathBuf> {
    let mut lines: Vec<String> = files
        .iter()
        .map(|f| format!("{}  {}\n", f.sha256, f.name()))
        .collect();
    lines.sort_by(|a, b| a[66..].cmp(&b[66..]));
    lines.dedup();
    let p = out_dir.join("SHA256SUMS");
    crate::util::write_atomic(&p, lines.concat().as_bytes())?;
    Ok(p)
}

/// `kiln-manifest.json`: what a build used and made, without secrets.
#[derive(Debug, Serialize)]
pub struct Manifest {
    pub kiln_version: String,
    pub inventory: Source,
    pub boards: Vec<Source>,
    pub inputs: Vec<Input>,
    pub nodes: Vec<NodeOutput>,
}

#[derive(Debug, Serialize)]
pub struct Source {
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
}

/// An input file: the base, the k3s binary and images, a loader blob.
#[derive(Debug, Serialize)]
pub struct Input {
    pub name: String,
    pub source: String,
    /// sha256 of the file as given.
    pub sha256: String,
    /// A boot loader: what kiln took from the file (form, compression, the loader's sha256).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loader: Option<crate::fetch::loader::LoaderRecord>,
}

#[derive(Debug, Serialize)]
pub struct NodeOutput {
    pub identity: crate::rootfs::identity::Identity,
    pub files: Vec<FileSum>,
    pub bmap: PathBuf,
    pub mapped_bytes: u64,
    /// The loader-only image for another device (`<node>.<target>.img`), if the node has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loader_image: Option<LoaderImageOutput>,
}

#[derive(Debug, Serialize)]
pub struct LoaderImageOutput {
    /// The board target it is written to (the RK1's `emmc`).
    pub target: String,
    pub files: Vec<FileSum>,
    pub bmap: PathBuf,
}

pub fn write_manifest(out_dir: &Path, m: &Manifest) -> Result<PathBuf> {
    let p = out_dir.join("kiln-manifest.json");
    crate::util::write_atomic(&p, (serde_json::to_string_pretty(m)? + "\n").as_bytes())?;
    Ok(p)
}
