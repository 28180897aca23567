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
        writeln!(f, "{}", crate::util::hex(&raw))
            .with_context(|| format!("writing token file {}", p.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing token file {}", p.display()))?;
        out.push(Created::New(p.clone()));
    }
    Ok(out)
}

/// A cluster token read from its file. `Debug` never shows it, so it cannot reach a log by
/// accident; the bytes leave only through [`Token::expose`] into root-only files.
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Reads and checks a token file. The message names the file, never the content.
    pub fn read(path: &std::path::Path) -> Result<Token> {
        let raw = std::fs::read_to_string(path)
            .with_context(|| format!("reading token file {}", path.display()))?;
        let t = raw.trim();
        // It goes into a YAML double-quoted string on the node, and k3s splits on `::`.
        if t.len() < 16 {
            anyhow::bail!(
                "token file {}: token is {} characters; expected at least 16 (make one with `kiln secrets init`)",
                path.display(),
                t.len()
            );
        }
        if !t
            .bytes()
            .all(|c| c.is_ascii_graphic() && c != b'"' && c != b'\\')
        {
            anyhow::bail!(
                "token file {}: expected one line of printable ASCII without quotes or backslashes",
                path.display()
            );
        }
        Ok(Token(t.to_string()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The node's k3s agent password: HMAC-SHA256(token, node name), hex. Deterministic, so a
    /// reimaged node presents the password the server stored for it; distinct per node; and
    /// worthless without the token.
    pub fn node_password(&self, node: &str) -> String {
        use hmac::{KeyInit, Mac};
        // Invariant: HMAC accepts keys of any length.
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(self.0.as_bytes())
            .expect("HMAC takes any key length");
        mac.update(b"kiln node-password\0");
        mac.update(node.as_bytes());
        crate::util::hex(&mac.finalize().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_password_is_stable_per_node_and_token() {
        let a = Token("a".repeat(32));
        let b = Token("b".repeat(32));
        assert_eq!(a.node_password("rk1-1"), a.node_password("rk1-1"));
        assert_ne!(a.node_password("rk1-1"), a.node_password("rk1-2"));
        assert_ne!(a.node_password("rk1-1"), b.node_password("rk1-1"));
        assert_eq!(a.node_password("rk1-1").len(), 64);
        assert!(!format!("{a:?}").contains("aaaa"));
    }
}
