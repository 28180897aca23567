//! Resumable HTTP(S) downloads into the cache. A download lands in `partial/` and moves into
//! `sha256/` only after its hash matched; a mismatch deletes it, so nothing unverified is cached.

use super::{Cache, sha256_file};
use anyhow::{Context, Result, anyhow, bail};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(15))
        .timeout_read(Duration::from_secs(60))
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Fetches a small text file whole (e.g. a checksum list).
pub fn get_text(url: &str) -> Result<String> {
    let resp = agent().get(url).call().map_err(|e| describe(url, e))?;
    let mut s = String::new();
    resp.into_reader()
        .take(1 << 20)
        .read_to_string(&mut s)
        .with_context(|| format!("reading {url}"))?;
    Ok(s)
}

fn describe(url: &str, e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, r) => {
            anyhow!("GET {url}: HTTP {code} {}", r.status_text())
        }
        ureq::Error::Transport(t) => anyhow!("GET {url}: {t}"),
    }
}

/// Returns the cached file with `sha256`, downloading `url` first if needed. A partial download
/// left by an interrupted run is resumed with a Range request. A cached file is hashed again
/// on every use: one that no longer matches (a bad disk, a cut copy, an edit) is removed and
/// downloaded again, never handed on to be built into an image.
pub fn fetch_verified(
    cache: &Cache,
    url: &str,
    sha256: &str,
    on_progress: &dyn Fn(u64, Option<u64>),
) -> Result<PathBuf> {
    let dest = cache.blob(sha256)?;
    if dest.is_file() {
        let got = sha256_file(&dest)?;
        if got == sha256 {
            return Ok(dest);
        }
        std::fs::remove_file(&dest)
            .with_context(|| format!("removing the corrupt cache entry {}", dest.display()))?;
        crate::progress::note(format!(
            "warning: cache entry {} is corrupt (sha256 {got}, expected {sha256}); removed it, downloading {url} again",
            dest.display()
        ));
    }
    let part = cache.dir("partial")?.join(format!("{sha256}.part"));
    download(url, &part, on_progress)?;
    let got = sha256_file(&part)?;
    if got != sha256 {
        let _ = std::fs::remove_file(&part);
        bail!(
            "{url}: sha256 mismatch: expected {sha256}, downloaded {got}; refusing it (nothing was cached)"
        );
    }
    std::fs::rename(&part, &dest)
        .with_context(|| format!("moving {} into the cache", part.display()))?;
    Ok(dest)
}

/// Downloads `url` into `part`, continuing after whatever `part` already holds.
fn download(
    url: &str,
    part: &std::path::Path,
    on_progress: &dyn Fn(u64, Option<u64>),
) -> Result<()> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut req = agent().get(url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        // The partial file already holds everything the server has.
        Err(ureq::Error::Status(416, _)) if have > 0 => return Ok(()),
        Err(e) => return Err(describe(url, e)),
    };
    let status = resp.status();
    let len: Option<u64> = resp.header("Content-Length").and_then(|v| v.parse().ok());
    let (mut file, start) = match status {
        206 => (
            OpenOptions::new()
                .append(true)
                .open(part)
                .with_context(|| format!("opening {}", part.display()))?,
            have,
        ),
        // A server that ignores Range sends everything again.
        200 => (
            std::fs::File::create(part).with_context(|| format!("creating {}", part.display()))?,
            0,
        ),
        s => bail!("GET {url}: unexpected HTTP {s}"),
    };
    let total = len.map(|l| l + start);
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = start;
    on_progress(done, total);
    loop {
        let n = reader.read(&mut buf).with_context(|| {
            format!("GET {url}: connection lost after {done} bytes (run again to resume)")
        })?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])
            .with_context(|| format!("writing {}", part.display()))?;
        done += n as u64;
        on_progress(done, total);
    }
    file.sync_all()?;
    if let Some(t) = total
        && done != t
    {
        bail!("GET {url}: got {done} of {t} bytes (run again to resume)");
    }
    Ok(())
}
