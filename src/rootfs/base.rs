//! The base root filesystem tarball: opening it (plain, gzip or zstd) and one scanning pass that
//! pulls out the kernel, initramfs and device trees and measures the tree for sizing.

use crate::config::board::{BaseFileCopy, DtbCopy};
use crate::config::size::{GIB, MIB, human};
use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// Opens a tarball, detecting compression from its first bytes, not its name. `on_progress`
/// gets the bytes read from the file itself (compressed), to match a bar sized by file length.
pub fn open<'a>(path: &Path, on_progress: &'a dyn Fn(u64)) -> Result<Box<dyn Read + 'a>> {
    let mut f =
        File::open(path).with_context(|| format!("opening base tarball {}", path.display()))?;
    let mut magic = [0u8; 4];
    let n = f
        .read(&mut magic)
        .with_context(|| format!("reading base tarball {}", path.display()))?;
    f.seek(SeekFrom::Start(0))
        .with_context(|| format!("rewinding base tarball {}", path.display()))?;
    let f = BufReader::with_capacity(1 << 20, CountingReader::new(f, on_progress));
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(f)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(
            zstd::stream::read::Decoder::with_buffer(f)
                .with_context(|| format!("reading zstd stream {}", path.display()))?,
        ),
        _ => Box::new(f),
    })
}

/// Tar member path without a leading `./`, `.` components or a trailing `/`; `""` for the root
/// itself. An absolute path or a `..` component is refused (the message says which): the stream
/// goes into mke2fs, and such a member would not land where its name says.
pub fn normalize(path: &Path) -> Result<String, String> {
    let s = path.to_string_lossy();
    if s.starts_with('/') {
        return Err(format!("`{s}` is an absolute path"));
    }
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(format!("`{s}` has a `..` component")),
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// A member path of the base at `tarball`, or an error naming the member.
pub fn member_path(tarball: &Path, path: &Path) -> Result<String> {
    normalize(path).map_err(|m| {
        anyhow!(
            "base tarball {}: member {m}; expected relative paths inside the root filesystem",
            tarball.display()
        )
    })
}

/// The largest member a base may hold. A root filesystem has no file near this; a header
/// claiming more is corrupt or hostile, and its size must not reach any arithmetic.
pub const MAX_MEMBER: u64 = 64 * GIB;

/// The largest kernel, initramfs or device tree read into memory for the boot partition.
pub const MAX_BOOT_FILE: u64 = 512 * MIB;

/// A kernel found in the base, with what the boot partition needs from it.
#[derive(Debug, Clone)]
pub struct KernelFiles {
    pub version: String,
    pub vmlinuz: Vec<u8>,
    pub initrd: Vec<u8>,
    /// Device-tree files selected by the board, keyed by their path relative to the dtb root
    /// (e.g. `rockchip/rk3588-turing-rk1.dtb`).
    pub dtbs: BTreeMap<String, Vec<u8>>,
    /// The board's `[[boot_file]]`s found in the base, by their path there.
    pub extra: BTreeMap<String, Vec<u8>>,
}

/// What one pass over the base found.
#[derive(Debug, Clone)]
pub struct BaseScan {
    pub kernel: KernelFiles,
    /// Members of the tarball (files, dirs, links...).
    pub entries: u64,
    /// 4 KiB blocks the regular files, directories and long symlinks need.
    pub blocks: u64,
    /// Uncompressed bytes of regular-file data.
    pub data_bytes: u64,
    /// Newest mtime in the tree (the default build timestamp).
    pub max_mtime: u64,
    /// sha256 of the tarball file as given.
    pub sha256: String,
}

#[derive(Default)]
struct Found {
    kernels: BTreeMap<String, Vec<u8>>,
    initrds: BTreeMap<String, Vec<u8>>,
    dtbs: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    extra: BTreeMap<String, Vec<u8>>,
    /// Regular files by path, kept only for the boot files, to resolve hard links to them.
    hardlinks: Vec<(String, String)>,
}

/// Where a kernel-related path belongs: (kind, version, rest).
enum Kind {
    Kernel(String),
    Initrd(String),
    Dtb(String, String),
}

fn classify(p: &str) -> Option<Kind> {
    if let Some(v) = p.strip_prefix("boot/vmlinuz-") {
        return Some(Kind::Kernel(v.to_string()));
    }
    if let Some(v) = p.strip_prefix("boot/initrd.img-") {
        return Some(Kind::Initrd(v.to_string()));
    }
    // trixie-backports kernels keep the image in the modules directory.
    if let Some(rest) = p.strip_prefix("usr/lib/modules/") {
        if let Some(v) = rest.strip_suffix("/vmlinuz") {
            return Some(Kind::Kernel(v.to_string()));
        }
        if let Some((v, dtb)) = rest.split_once("/dtb/") {
            return Some(Kind::Dtb(v.to_string(), dtb.to_string()));
        }
    }
    if let Some(rest) = p.strip_prefix("usr/lib/linux-image-")
        && let Some((v, dtb)) = rest.split_once('/')
    {
        return Some(Kind::Dtb(v.to_string(), dtb.to_string()));
    }
    None
}

fn wanted_dtb(rel: &str, copies: &[DtbCopy]) -> bool {
    copies
        .iter()
        .any(|c| rel == c.from || rel.starts_with(&format!("{}/", c.from)))
}

/// Numeric-aware version ordering: `6.12.9` < `6.12.10`.
fn version_key(v: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut num = String::new();
    let mut txt = String::new();
    for c in v.chars() {
        if c.is_ascii_digit() {
            if !txt.is_empty() {
                out.push((0, std::mem::take(&mut txt)));
            }
            num.push(c);
        } else {
            if !num.is_empty() {
                out.push((num.parse().unwrap_or(u64::MAX), String::new()));
                num.clear();
            }
            txt.push(c);
        }
    }
    if !num.is_empty() {
        out.push((num.parse().unwrap_or(u64::MAX), String::new()));
    }
    if !txt.is_empty() {
        out.push((0, txt));
    }
    out
}

/// Reads the whole base once. `on_bytes` is told how many compressed bytes were consumed so far.
pub fn scan(
    path: &Path,
    dtb_copies: &[DtbCopy],
    boot_files: &[BaseFileCopy],
    on_progress: &dyn Fn(u64),
) -> Result<BaseScan> {
    let sha256 = crate::fetch::sha256_file(path)?;
    let mut archive = tar::Archive::new(open(path, on_progress)?);
    let mut found = Found::default();
    let mut entries = 0u64;
    let mut blocks = 0u64;
    let mut data_bytes = 0u64;
    let mut max_mtime = 0u64;
    let bad = |e: std::io::Error| {
        anyhow!(
            "base tarball {} is corrupt or truncated: {e}; expected a complete tar archive (plain, .gz or .zst)",
            path.display()
        )
    };
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let p = member_path(path, &entry.path().map_err(bad)?)?;
        entries += 1;
        let h = entry.header();
        max_mtime = max_mtime.max(h.mtime().unwrap_or(0));
        let ty = h.entry_type();
        let size = entry.size();
        if size > MAX_MEMBER {
            bail!(
                "base tarball {}: member `{p}` claims {size} bytes ({}); expected at most {} (is the tarball corrupt?)",
                path.display(),
                human(size),
                human(MAX_MEMBER)
            );
        }
        if ty.is_file() {
            data_bytes = data_bytes.saturating_add(size);
            blocks = blocks.saturating_add(size.div_ceil(4096));
        } else if ty.is_dir() {
            blocks = blocks.saturating_add(1);
        } else if ty.is_symlink() {
            let target_len = entry.link_name_bytes().map_or(0, |l| l.len());
            // Targets of 60 bytes or more do not fit in the inode.
            if target_len >= 60 {
                blocks = blocks.saturating_add(1);
            }
        }
        if ty.is_hard_link() {
            if let Some(target) = entry.link_name().map_err(bad)? {
                let t = member_path(path, &target)?;
                if classify(&p).is_some() {
                    found.hardlinks.push((p.clone(), t));
                }
            }
            continue;
        }
        if !ty.is_file() {
            continue;
        }
        let read = |entry: &mut tar::Entry<_>| -> Result<Vec<u8>> {
            if size > MAX_BOOT_FILE {
                bail!(
                    "base tarball {}: boot file `{p}` is {}; expected at most {}",
                    path.display(),
                    human(size),
                    human(MAX_BOOT_FILE)
                );
            }
            // Bounded above, so the capacity is too.
            let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            entry
                .by_ref()
                .take(size)
                .read_to_end(&mut buf)
                .map_err(bad)?;
            Ok(buf)
        };
        match classify(&p) {
            Some(Kind::Kernel(v)) => {
                found.kernels.insert(v, read(&mut entry)?);
            }
            Some(Kind::Initrd(v)) => {
                found.initrds.insert(v, read(&mut entry)?);
            }
            Some(Kind::Dtb(v, rel)) if wanted_dtb(&rel, dtb_copies) => {
                let data = read(&mut entry)?;
                found.dtbs.entry(v).or_default().insert(rel, data);
            }
            _ if boot_files.iter().any(|b| b.from == p) => {
                let data = read(&mut entry)?;
                found.extra.insert(p.clone(), data);
            }
            _ => {}
        }
    }
    // Resolve hard links that point at kernel files seen earlier in the stream.
    for (link, target) in std::mem::take(&mut found.hardlinks) {
        let data = match classify(&target) {
            Some(Kind::Kernel(v)) => found.kernels.get(&v).cloned(),
            Some(Kind::Initrd(v)) => found.initrds.get(&v).cloned(),
            _ => None,
        };
        match (classify(&link), data) {
            (Some(Kind::Kernel(v)), Some(d)) => {
                found.kernels.entry(v).or_insert(d);
            }
            (Some(Kind::Initrd(v)), Some(d)) => {
                found.initrds.entry(v).or_insert(d);
            }
            _ => {}
        }
    }
    if entries == 0 {
        bail!(
            "base tarball {} holds no files; expected a Debian root filesystem",
            path.display()
        );
    }
    let kernel = pick_kernel(path, found)?;
    Ok(BaseScan {
        kernel,
        entries,
        blocks,
        data_bytes,
        max_mtime,
        sha256,
    })
}

fn pick_kernel(path: &Path, mut found: Found) -> Result<KernelFiles> {
    let mut versions: Vec<String> = found
        .kernels
        .keys()
        .filter(|v| found.initrds.contains_key(*v))
        .cloned()
        .collect();
    versions.sort_by_key(|v| version_key(v));
    let Some(version) = versions.pop() else {
        if found.kernels.is_empty() {
            bail!(
                "base tarball {} has no kernel; expected /boot/vmlinuz-VERSION (install linux-image-arm64 in the base)",
                path.display()
            );
        }
        let v: Vec<&String> = found.kernels.keys().collect();
        bail!(
            "base tarball {} has a kernel ({}) but no /boot/initrd.img-VERSION for it; expected an initramfs (install initramfs-tools in the base)",
            path.display(),
            v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        );
    };
    Ok(KernelFiles {
        vmlinuz: found.kernels.remove(&version).unwrap_or_default(),
        initrd: found.initrds.remove(&version).unwrap_or_default(),
        dtbs: found.dtbs.remove(&version).unwrap_or_default(),
        extra: std::mem::take(&mut found.extra),
        version,
    })
}

/// Counts bytes read from the compressed file, for progress.
struct CountingReader<'a, R> {
    inner: R,
    count: u64,
    last: u64,
    cb: &'a dyn Fn(u64),
}

impl<'a, R> CountingReader<'a, R> {
    fn new(inner: R, cb: &'a dyn Fn(u64)) -> Self {
        CountingReader {
            inner,
            count: 0,
            last: 0,
            cb,
        }
    }
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count - self.last >= 1 << 20 || n == 0 {
            (self.cb)(self.count);
            self.last = self.count;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_numerically() {
        let mut v = vec!["6.12.9-arm64", "6.12.10-arm64", "6.1.0-arm64"];
        v.sort_by_key(|s| version_key(s));
        assert_eq!(v, vec!["6.1.0-arm64", "6.12.9-arm64", "6.12.10-arm64"]);
    }

    #[test]
    fn classifies_debian_layouts() {
        assert!(matches!(classify("boot/vmlinuz-6.12.1"), Some(Kind::Kernel(v)) if v == "6.12.1"));
        assert!(
            matches!(classify("usr/lib/modules/7.3.0/vmlinuz"), Some(Kind::Kernel(v)) if v == "7.3.0")
        );
        assert!(matches!(
            classify("usr/lib/linux-image-6.12.1/rockchip/rk3588-turing-rk1.dtb"),
            Some(Kind::Dtb(v, r)) if v == "6.12.1" && r == "rockchip/rk3588-turing-rk1.dtb"
        ));
        assert!(matches!(
            classify("usr/lib/modules/7.3.0/dtb/broadcom/bcm2712-rpi-5-b.dtb"),
            Some(Kind::Dtb(v, r)) if v == "7.3.0" && r == "broadcom/bcm2712-rpi-5-b.dtb"
        ));
        assert!(classify("etc/hostname").is_none());
    }
}
