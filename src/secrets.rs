//! Cluster tokens: created once, root-only, never printed.

use crate::config::inventory::Inventory;
use anyhow::{Context, Result};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

pub enum Created {
    New(PathBuf),
    Kept(PathBuf),
}

/// Creates each cluster's token file (mode 0600, 32 random bytes as hex) unless it exists;
/// an existing token is never overwritten.
pub fn init(inv: &Inventory) -> Result<Vec<Created>> {
    let mut out = Vec::new();
    for c in &inv.clusters {
        let p = &c.token_file;
        if p.exists() {
            out.push(Created::Kept(p.clone()));
            continue;
        }
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(p)
            .with_context(|| format!("creating token file {}", p.display()))?;
        writeln!(f, "{}", crate::util::hex(&raw))?;
        f.sync_all()?;
        out.push(Created::New(p.clone()));
    }
    Ok(out)
}
