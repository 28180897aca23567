//! Fetch stage: inputs that come from outside the repository, identified by their sha256 and
//! kept in a content-addressed cache (`$XDG_CACHE_HOME/kiln`, or `--cache-dir`/`KILN_CACHE_DIR`).

pub mod http;
pub mod k3s;
pub mod loader;

use anyhow::{Context, Result, anyhow};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// sha256 of a file's bytes, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(crate::util::hex(&h.finalize()))
}

/// The cache directory. Everything in it can be deleted at any time; it is rebuilt on demand.
#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
}

impl Cache {
    /// `explicit` (the command line) wins, then `KILN_CACHE_DIR`, `XDG_CACHE_HOME/kiln`,
    /// `~/.cache/kiln`.
    pub fn locate(explicit: Option<&Path>) -> Result<Cache> {
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let root = explicit
            .map(Path::to_path_buf)
            .or_else(|| env("KILN_CACHE_DIR"))
            .or_else(|| env("XDG_CACHE_HOME").map(|x| x.join("kiln")))
            .or_else(|| env("HOME").map(|h| h.join(".cache/kiln")))
            .ok_or_else(|| {
                anyhow!("no cache directory: set --cache-dir, KILN_CACHE_DIR or HOME")
            })?;
        Ok(Cache { root })
    }

    /// A subdirectory, created on first use.
    pub fn dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.root.join(name);
        std::fs::create_dir_all(&d)
            .with_context(|| format!("creating cache directory {}", d.display()))?;
        Ok(d)
    }

    /// Where a verified file with this sha256 lives.
    pub fn blob(&self, sha256: &str) -> Result<PathBuf> {
        Ok(self.dir("sha256")?.join(sha256))
    }
}

/// Lower-case hex sha256, as printed by `sha256sum`.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}
