//! Cluster secrets: the token and the cluster's CAs, created once, root-only, never printed.

use crate::config::inventory::{Cluster, Inventory};
use anyhow::{Context, Result, anyhow, bail};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

pub mod ca;
pub mod kubeconfig;

use ca::ClusterCa;

/// What `kiln secrets init` did for one cluster.
pub enum Created {
    New(PathBuf),
    Kept(PathBuf),
    /// A bare token exists and no CA: the cluster's CA (if it started) was made by k3s, so
    /// kiln makes none; `kiln secrets pin` upgrades it.
    NoCa(PathBuf),
}

/// Creates what each cluster lacks, never overwriting: the CA set (0700 directory, 0600
/// files) and the token (0600), pinned to the CA as `K10<hash>::server:<secret>`. A cluster
/// whose token exists without a CA keeps its bare token and gets no CA (see [`Created::NoCa`]).
pub fn init(inv: &Inventory) -> Result<Vec<Created>> {
    let mut out = Vec::new();
    for c in &inv.clusters {
        let dir = c.ca_dir();
        let token_exists = c.token_file.exists();
        let mut have_ca = dir.exists();
        if have_ca {
            out.push(Created::Kept(dir.clone()));
        } else if token_exists {
            // A pinned token without a CA here pins the running cluster's own; say nothing.
            let pinned = std::fs::read_to_string(&c.token_file)
                .map(|t| t.trim_start().starts_with("K10"))
                .unwrap_or(false);
            if !pinned {
                out.push(Created::NoCa(dir.clone()));
            }
        } else {
            ca::create(&dir, OffsetDateTime::now_utc())?;
            have_ca = true;
            out.push(Created::New(dir.clone()));
        }
        if token_exists {
            out.push(Created::Kept(c.token_file.clone()));
            continue;
        }
        let secret = random_secret()?;
        let token = if have_ca {
            let bundle = ClusterCa::load(&dir)?
                .bundle()
                .map(<[u8]>::to_vec)
                .ok_or_else(|| anyhow!("{}: no server CA bundle", dir.display()))?;
            pinned(&ca::k10_hash(&bundle, OffsetDateTime::now_utc())?, &secret)
        } else {
            secret
        };
        write_token(&c.token_file, &token, false)?;
        out.push(Created::New(c.token_file.clone()));
    }
    Ok(out)
}

/// Where `kiln secrets pin` takes the cluster's CA from.
pub enum PinSource {
    /// The CA directory already there.
    Existing,
    /// A new CA set, for a cluster that has not started (k3s takes custom CAs only before its
    /// first start).
    NewCa,
    /// The running cluster's `/cacerts` bundle (k3s made its CAs): kept as the CA directory's
    /// `server-ca.crt`.
    Cacerts(PathBuf),
}

/// What `kiln secrets pin` did: the token file and the hash it now pins.
pub struct Pinned {
    pub token_file: PathBuf,
    pub ca_dir: PathBuf,
    pub hash: String,
    pub made_ca: bool,
}

/// Upgrades a cluster's bare token to `K10<hash>::server:<secret>` (same secret, so a running
/// cluster accepts it: k3s keeps only the part after `::server:`). The token file is replaced
/// atomically, still 0600.
pub fn pin(c: &Cluster, source: PinSource) -> Result<Pinned> {
    let token = Token::read(&c.token_file)?;
    if let Some(h) = token.pin() {
        bail!(
            "token file {}: already pinned to CA hash {}…; nothing to do",
            c.token_file.display(),
            ca::short(h)
        );
    }
    let dir = c.ca_dir();
    let exists = dir.exists();
    let made_ca = match (&source, exists) {
        (PinSource::Existing, true) => false,
        (PinSource::Existing, false) => bail!(
            "cluster `{}` has no CA in {}; expected --new-ca (a cluster that has not started yet) or --cacerts FILE (the running cluster's /cacerts)",
            c.name,
            dir.display()
        ),
        (_, true) => bail!(
            "{} exists; expected no --new-ca or --cacerts (the cluster's CA is already there)",
            dir.display()
        ),
        (PinSource::NewCa, false) => {
            ca::create(&dir, OffsetDateTime::now_utc())?;
            true
        }
        (PinSource::Cacerts(f), false) => {
            let b = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            ca::parse_pem_certs(&b).with_context(|| {
                format!(
                    "{}: expected the cluster's /cacerts (PEM certificates)",
                    f.display()
                )
            })?;
            ca::write_dir(&dir, &[(ca::SERVER_BUNDLE.to_string(), b)])?;
            true
        }
    };
    let bundle = ClusterCa::load(&dir)?
        .bundle()
        .map(<[u8]>::to_vec)
        .ok_or_else(|| anyhow!("{}: no server CA bundle", dir.display()))?;
    let hash = ca::k10_hash(&bundle, OffsetDateTime::now_utc())?;
    write_token(&c.token_file, &pinned(&hash, token.secret()), true)?;
    Ok(Pinned {
        token_file: c.token_file.clone(),
        ca_dir: dir,
        hash,
        made_ca,
    })
}

fn random_secret() -> Result<String> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| anyhow!("no randomness: {e}"))?;
    Ok(crate::util::hex(&raw))
}

/// k3s's secure token form (`pkg/clientaccess/token.go`, `FormatTokenBytes`).
fn pinned(hash: &str, secret: &str) -> String {
    format!("K10{hash}::server:{secret}")
}

/// Writes a token file 0600: new (`replace` false: never over an existing file) or replacing
/// one atomically.
fn write_token(p: &Path, token: &str, replace: bool) -> Result<()> {
    write_private(p, format!("{token}\n").as_bytes(), replace)
        .with_context(|| format!("writing token file {}", p.display()))
}

/// Writes a root-only file (0600 from its first byte) under a temporary name beside it and
/// renames it into place: never over an existing file unless `replace`, and a failure leaves
/// the old file (or none) and no temporary file.
pub(crate) fn write_private(p: &Path, bytes: &[u8], replace: bool) -> Result<()> {
    if let Some(dir) = p.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = p.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        let flags = if replace {
            rustix::fs::RenameFlags::empty()
        } else {
            rustix::fs::RenameFlags::NOREPLACE
        };
        rustix::fs::renameat_with(rustix::fs::CWD, &tmp, rustix::fs::CWD, p, flags)
            .map_err(std::io::Error::from)
            .with_context(|| format!("renaming {} to {}", tmp.display(), p.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A cluster token read from its file: bare (`<secret>`) or pinned
/// (`K10<sha256 hex>::server:<secret>`). `Debug` never shows it, so it cannot reach a log by
/// accident; the bytes leave only through [`Token::expose`] into root-only files.
pub struct Token {
    full: String,
    /// Byte offset of the secret in `full`.
    secret_at: usize,
    pin: Option<String>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Reads and checks a token file. The message names the file, never the content.
    pub fn read(path: &Path) -> Result<Token> {
        let raw = std::fs::read_to_string(path)
            .with_context(|| format!("reading token file {}", path.display()))?;
        Token::parse(raw.trim()).map_err(|e| anyhow!("token file {}: {e}", path.display()))
    }

    fn parse(t: &str) -> Result<Token> {
        // It goes into a YAML double-quoted string on the node.
        if !t
            .bytes()
            .all(|c| c.is_ascii_graphic() && c != b'"' && c != b'\\')
        {
            bail!("expected one line of printable ASCII without quotes or backslashes");
        }
        let (pin, secret_at) = match t.strip_prefix("K10") {
            Some(rest) => {
                // k3s: `K10<hash>::<user>:<password>`, hash empty or 64 characters; a server
                // token's user is `server`.
                let (hash, creds) = rest.split_once("::").unwrap_or((rest, ""));
                if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                {
                    bail!(
                        "a K10 token's CA hash is {} characters; expected 64 lowercase hex digits (K10<hash>::server:<secret>)",
                        hash.len()
                    );
                }
                if !creds.starts_with("server:") {
                    bail!(
                        "a K10 token must be a server token; expected K10<hash>::server:<secret>"
                    );
                }
                (
                    Some(hash.to_string()),
                    t.len() - creds.len() + "server:".len(),
                )
            }
            None => (None, 0),
        };
        let secret = &t[secret_at..];
        // k3s splits on `::` and `:`: a secret holding them would be read as something else.
        if secret.contains(':') {
            bail!("the secret holds `:`; expected a token as `kiln secrets init` makes it");
        }
        if secret.len() < 16 {
            bail!(
                "the secret is {} characters; expected at least 16 (make one with `kiln secrets init`)",
                secret.len()
            );
        }
        Ok(Token {
            full: t.to_string(),
            secret_at,
            pin,
        })
    }

    /// The whole token, as k3s's `token:` takes it.
    pub fn expose(&self) -> &str {
        &self.full
    }

    /// The secret: what k3s stores and compares (`passwd.go` keeps the part after
    /// `::server:`), the same before and after `kiln secrets pin`.
    pub fn secret(&self) -> &str {
        &self.full[self.secret_at..]
    }

    /// The CA hash a K10 token pins, if it is one.
    pub fn pin(&self) -> Option<&str> {
        self.pin.as_deref()
    }

    /// The node's k3s agent password: HMAC-SHA256(secret, node name), hex. Deterministic, so a
    /// reimaged node presents the password the server stored for it; distinct per node;
    /// worthless without the token; unchanged when the token is pinned.
    pub fn node_password(&self, node: &str) -> String {
        use hmac::{KeyInit, Mac};
        // Invariant: HMAC accepts keys of any length.
        let mut mac =
            <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(self.secret().as_bytes())
                .expect("HMAC takes any key length");
        mac.update(b"kiln node-password\0");
        mac.update(node.as_bytes());
        crate::util::hex(&mac.finalize().into_bytes())
    }
}

/// A cluster's secrets as a node's image needs them: the token and the CA material, read
/// together so a token that pins another CA than the one kiln holds is caught at build time.
#[derive(Debug)]
pub struct ClusterSecrets {
    pub token: Token,
    pub ca: ClusterCa,
}

impl ClusterSecrets {
    pub fn read(token_file: &Path, ca_dir: &Path) -> Result<ClusterSecrets> {
        let token = Token::read(token_file)?;
        let ca = ClusterCa::load(ca_dir)?;
        if let (Some(pin), Some(bundle)) = (token.pin(), ca.bundle()) {
            let have = ca::k10_hash(bundle, OffsetDateTime::now_utc())?;
            if pin != have {
                bail!(
                    "token file {} pins CA hash {}…, but {} hashes to {}…; expected the token made with that CA (`kiln secrets init` makes both)",
                    token_file.display(),
                    ca::short(pin),
                    ca_dir.join(ca::SERVER_BUNDLE).display(),
                    ca::short(&have)
                );
            }
        }
        Ok(ClusterSecrets { token, ca })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_password_is_stable_per_node_and_token() {
        let a = Token::parse(&"a".repeat(32)).unwrap();
        let b = Token::parse(&"b".repeat(32)).unwrap();
        assert_eq!(a.node_password("rk1-1"), a.node_password("rk1-1"));
        assert_ne!(a.node_password("rk1-1"), a.node_password("rk1-2"));
        assert_ne!(a.node_password("rk1-1"), b.node_password("rk1-1"));
        assert_eq!(a.node_password("rk1-1").len(), 64);
        assert!(!format!("{a:?}").contains("aaaa"));
    }

    #[test]
    fn a_pinned_token_keeps_the_secret_and_the_node_password() {
        let bare = Token::parse(&"a".repeat(32)).unwrap();
        let k10 = Token::parse(&pinned(&"0f".repeat(32), &"a".repeat(32))).unwrap();
        assert_eq!(bare.pin(), None);
        assert_eq!(k10.pin(), Some("0f".repeat(32).as_str()));
        assert_eq!(k10.secret(), "a".repeat(32));
        assert_eq!(k10.node_password("n"), bare.node_password("n"));
        assert!(!format!("{k10:?}").contains("aaaa"));
    }

    #[test]
    fn malformed_k10_tokens_are_refused() {
        let s = "a".repeat(32);
        for bad in [
            format!("K10{}::server:{s}", "0f".repeat(31)),
            format!("K10{}::server:{s}", "0F".repeat(32)),
            format!("K10{}::node:{s}", "0f".repeat(32)),
            format!("K10{}::{s}", "0f".repeat(32)),
            format!("K10{}::server:short", "0f".repeat(32)),
            format!("{s}:x"),
        ] {
            assert!(Token::parse(&bad).is_err(), "{bad}");
        }
    }
}
