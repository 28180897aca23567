//! The cluster's certificate authorities, made before the first boot.
//!
//! kiln builds every node of a cluster, so it can make the CAs k3s would otherwise make on the
//! first server's first start, and with them know the cluster's pinned token (`K10<hash>::…`)
//! and issue an admin kubeconfig at build time. The set follows k3s's
//! `contrib/util/generate-custom-ca-certs.sh`: an RSA-4096 root (7300 days) signs an RSA-4096
//! intermediate (3700 days), which signs five EC P-256 CAs (3700 days): client, server,
//! request-header, etcd/peer and etcd/server; `service.key` is RSA-2048 (PKCS#1). Every CA has
//! only a CN (`k3s-<type>-ca@<unix time>`), critical `CA:true` without path length, critical
//! key usage digitalSignature + keyEncipherment + keyCertSign, subject and authority key
//! identifiers, SHA-256 signatures and no EKU. `<type>-ca.crt` is the CA followed by the
//! intermediate and the root (k3s signs with the first certificate of the file);
//! `<type>-ca.pem` is the CA alone.
//!
//! The directory mirrors k3s's `server/tls/` layout. Only [`NODE_FILES`] go to a node; the root
//! and intermediate keys stay on the build machine (the script says to remove them from nodes).

use anyhow::{Context, Result, anyhow, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// The leaf CAs: file stem under `tls/` and the CN's type (k3s's script: `tr / -`).
const LEAF_CAS: [(&str, &str); 5] = [
    ("client-ca", "client"),
    ("server-ca", "server"),
    ("request-header-ca", "request-header"),
    ("etcd/peer-ca", "etcd-peer"),
    ("etcd/server-ca", "etcd-server"),
];

/// What a server that starts the cluster needs in `/var/lib/rancher/k3s/server/tls/` before
/// k3s's first start (k3s docs, cli/certificate.md, "Custom Certificate Authority").
pub const NODE_FILES: [&str; 11] = [
    "server-ca.crt",
    "server-ca.key",
    "client-ca.crt",
    "client-ca.key",
    "request-header-ca.crt",
    "request-header-ca.key",
    "etcd/peer-ca.crt",
    "etcd/peer-ca.key",
    "etcd/server-ca.crt",
    "etcd/server-ca.key",
    "service.key",
];

/// The bundle `/cacerts` serves (k3s: the bytes of `server-ca.crt`), the one the token pins.
pub const SERVER_BUNDLE: &str = "server-ca.crt";

/// A generated file: path relative to the CA directory and its bytes.
pub type CaFile = (String, Vec<u8>);

pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b.as_bytes().chunks(64) {
        // Invariant: base64 output is ASCII.
        s.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// One DER TLV at the start of `b`: (tag, contents, rest).
fn der_tlv(b: &[u8]) -> Result<(u8, &[u8], &[u8])> {
    let bad = || anyhow!("malformed DER");
    let (&tag, b) = b.split_first().ok_or_else(bad)?;
    let (&l0, mut b) = b.split_first().ok_or_else(bad)?;
    let len = if l0 < 0x80 {
        usize::from(l0)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return Err(bad());
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |a, x| (a << 8) | usize::from(*x));
        b = &b[n..];
        len
    };
    if b.len() < len {
        return Err(bad());
    }
    Ok((tag, &b[..len], &b[len..]))
}

/// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo` (its `privateKey` OCTET STRING).
fn pkcs8_to_pkcs1(pkcs8: &[u8]) -> Result<Vec<u8>> {
    let (_, info, _) = der_tlv(pkcs8)?;
    let (_, _version, rest) = der_tlv(info)?;
    let (_, _alg, rest) = der_tlv(rest)?;
    let (tag, key, _) = der_tlv(rest)?;
    if tag != 0x04 {
        bail!("PKCS#8 key without an OCTET STRING");
    }
    Ok(key.to_vec())
}

/// A new RSA key: the signer and its PKCS#1 PEM (`openssl genrsa -traditional`).
fn rsa_key(size: rcgen::RsaKeySize) -> Result<(KeyPair, String)> {
    let key = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, size)
        .context("generating an RSA key")?;
    let pkcs1 = pkcs8_to_pkcs1(&key.serialize_der())?;
    Ok((key, pem("RSA PRIVATE KEY", &pkcs1)))
}

/// A new EC P-256 key: the signer and its SEC1 PEM (`openssl ecparam -genkey -noout`).
pub(crate) fn ec_key() -> Result<(KeyPair, String)> {
    let key =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating an EC key")?;
    let ec = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &key.serialize_der(),
    )
    .map_err(|e| anyhow!("re-reading an EC key: {e}"))?;
    use aws_lc_rs::encoding::AsDer;
    let sec1 = ec
        .private_key()
        .as_der()
        .map_err(|e| anyhow!("encoding an EC key: {e}"))?;
    Ok((key, pem("EC PRIVATE KEY", sec1.as_ref())))
}

/// A positive random serial of 8 bytes (the script: `openssl rand -hex 8`).
pub(crate) fn serial() -> Result<SerialNumber> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| anyhow!("no randomness: {e}"))?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

fn ca_params(cn: &str, days: i64, now: OffsetDateTime) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyCertSign,
    ];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(serial()?);
    // An hour back: a node whose clock lags the build machine a little still accepts them.
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days);
    Ok(p)
}

/// Makes a whole CA set in memory. `now` is the creation time (CNs carry it as unix seconds).
pub fn generate(now: OffsetDateTime) -> Result<Vec<CaFile>> {
    let ts = now.unix_timestamp();
    let mut out: Vec<CaFile> = Vec::new();
    let mut put = |name: &str, s: String| out.push((name.to_string(), s.into_bytes()));

    let (root_key, root_key_pem) = rsa_key(rcgen::RsaKeySize::_4096)?;
    let root_params = ca_params(&format!("k3s-root-ca@{ts}"), 7300, now)?;
    let root = root_params
        .self_signed(&root_key)
        .context("signing the root CA")?;
    let root_pem = root.pem();
    put("root-ca.key", root_key_pem);
    put("root-ca.pem", root_pem.clone());
    put("root-ca.crt", root_pem.clone());
    let root_issuer = Issuer::new(root_params, root_key);

    let (int_key, int_key_pem) = rsa_key(rcgen::RsaKeySize::_4096)?;
    let int_params = ca_params(&format!("k3s-intermediate-ca@{ts}"), 3700, now)?;
    let int = int_params
        .signed_by(&int_key, &root_issuer)
        .context("signing the intermediate CA")?;
    let int_pem = int.pem();
    put("intermediate-ca.key", int_key_pem);
    put("intermediate-ca.pem", int_pem.clone());
    put("intermediate-ca.crt", format!("{int_pem}{root_pem}"));
    let int_issuer = Issuer::new(int_params, int_key);

    for (stem, kind) in LEAF_CAS {
        let (key, key_pem) = ec_key()?;
        let params = ca_params(&format!("k3s-{kind}-ca@{ts}"), 3700, now)?;
        let cert = params
            .signed_by(&key, &int_issuer)
            .with_context(|| format!("signing the {kind} CA"))?;
        let p = cert.pem();
        put(&format!("{stem}.key"), key_pem);
        put(&format!("{stem}.pem"), p.clone());
        put(&format!("{stem}.crt"), format!("{p}{int_pem}{root_pem}"));
    }
    let (_, service) = rsa_key(rcgen::RsaKeySize::_2048)?;
    put("service.key", service);
    Ok(out)
}

/// Writes a new CA set into `dir` (which must not exist): built in a sibling temporary
/// directory (0700, files 0600) and renamed into place, so a failure leaves nothing that looks
/// like a set and an existing set is never replaced.
pub fn create(dir: &Path, now: OffsetDateTime) -> Result<()> {
    let files = generate(now)?;
    write_dir(dir, &files)
}

/// Writes `files` into a new directory `dir`, atomically, never replacing one.
pub fn write_dir(dir: &Path, files: &[CaFile]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let mkdir = |p: &Path| {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(p)
            .with_context(|| format!("creating {}", p.display()))
    };
    let result = (|| -> Result<()> {
        mkdir(&tmp)?;
        for (rel, bytes) in files {
            let p = tmp.join(rel);
            if let Some(d) = p.parent()
                && !d.exists()
            {
                mkdir(d)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
                .with_context(|| format!("creating {}", p.display()))?;
            f.write_all(bytes)
                .and_then(|_| f.sync_all())
                .with_context(|| format!("writing {}", p.display()))?;
        }
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &tmp,
            rustix::fs::CWD,
            dir,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(std::io::Error::from)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// A cluster's CA material as kiln keeps it.
pub enum ClusterCa {
    /// No CA directory: a cluster from before kiln made CAs (bare token; k3s made its CA).
    None,
    /// Only the server CA bundle (`kiln secrets pin --cacerts`): a cluster whose CAs k3s made
    /// at its first start. Nodes can verify peers; kiln cannot issue certificates.
    Pinned { dir: PathBuf, bundle: Vec<u8> },
    /// The whole set kiln made.
    Full { dir: PathBuf, bundle: Vec<u8> },
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the bytes: the directory holds keys.
        match self {
            ClusterCa::None => f.write_str("ClusterCa::None"),
            ClusterCa::Pinned { dir, .. } => write!(f, "ClusterCa::Pinned({})", dir.display()),
            ClusterCa::Full { dir, .. } => write!(f, "ClusterCa::Full({})", dir.display()),
        }
    }
}

impl ClusterCa {
    /// Reads the directory: absent is `None`; the bundle alone is `Pinned`; every node file
    /// present is `Full`; anything in between is an error naming what is missing.
    pub fn load(dir: &Path) -> Result<ClusterCa> {
        if !dir.exists() {
            return Ok(ClusterCa::None);
        }
        let bundle_path = dir.join(SERVER_BUNDLE);
        let bundle = std::fs::read(&bundle_path).with_context(|| {
            format!(
                "reading {} (the cluster's server CA bundle)",
                bundle_path.display()
            )
        })?;
        let missing: Vec<&str> = NODE_FILES
            .iter()
            .filter(|f| !dir.join(f).is_file())
            .copied()
            .collect();
        if missing.len() == NODE_FILES.len() - 1 {
            return Ok(ClusterCa::Pinned {
                dir: dir.to_path_buf(),
                bundle,
            });
        }
        if !missing.is_empty() {
            bail!(
                "{}: incomplete cluster CA set, missing {}; expected every file `kiln secrets init` makes (or only {SERVER_BUNDLE})",
                dir.display(),
                missing.join(", ")
            );
        }
        Ok(ClusterCa::Full {
            dir: dir.to_path_buf(),
            bundle,
        })
    }

    /// The server CA bundle, as `/cacerts` serves it.
    pub fn bundle(&self) -> Option<&[u8]> {
        match self {
            ClusterCa::None => None,
            ClusterCa::Pinned { bundle, .. } | ClusterCa::Full { bundle, .. } => Some(bundle),
        }
    }

    /// The files a cluster-starting server needs, read from the set (`Full` only).
    pub fn node_files(&self) -> Result<Option<Vec<CaFile>>> {
        let ClusterCa::Full { dir, .. } = self else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for f in NODE_FILES {
            let p = dir.join(f);
            let b = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            out.push((f.to_string(), b));
        }
        Ok(Some(out))
    }

    pub fn dir(&self) -> Option<&Path> {
        match self {
            ClusterCa::None => None,
            ClusterCa::Pinned { dir, .. } | ClusterCa::Full { dir, .. } => Some(dir),
        }
    }
}

/// The CA hash of a K10 token for a `/cacerts` bundle, as k3s computes it
/// (`pkg/clientaccess/token.go`, `hashCA`): one certificate, SHA-256 of the bytes as they are;
/// several, SHA-256 of the DER of the root that ends the first certificate's verified chain
/// (a root: authority key ID empty or equal to its subject key ID), falling back to the bytes as
/// they are when the chain does not verify. Lowercase hex.
pub fn k10_hash(bundle: &[u8], now: OffsetDateTime) -> Result<String> {
    let certs = parse_pem_certs(bundle)?;
    if certs.len() > 1
        && let Some(root) = verified_root(&certs, now)
    {
        return Ok(crate::util::sha256_hex(&root));
    }
    Ok(crate::util::sha256_hex(bundle))
}

/// The DER of every `CERTIFICATE` block; an error if there is none or one is not base64.
pub fn parse_pem_certs(b: &[u8]) -> Result<Vec<Vec<u8>>> {
    use base64::Engine;
    let text = std::str::from_utf8(b).map_err(|_| anyhow!("not PEM text"))?;
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("-----BEGIN CERTIFICATE-----") {
        let body = &rest[i + 27..];
        let j = body
            .find("-----END CERTIFICATE-----")
            .ok_or_else(|| anyhow!("a CERTIFICATE block without its END line"))?;
        let clean: String = body[..j].chars().filter(|c| !c.is_whitespace()).collect();
        out.push(
            base64::engine::general_purpose::STANDARD
                .decode(clean)
                .map_err(|_| anyhow!("a CERTIFICATE block that is not base64"))?,
        );
        rest = &body[j..];
    }
    if out.is_empty() {
        bail!("no PEM certificate found");
    }
    Ok(out)
}

/// Go's `x509.Certificate.Verify` as `hashCA` calls it, for the cases that matter here: a chain
/// from the first certificate through the others to a root, each signature checked, each
/// certificate valid at `now`, none with an EKU that excludes server auth.
fn verified_root(certs: &[Vec<u8>], now: OffsetDateTime) -> Option<Vec<u8>> {
    use x509_parser::prelude::*;
    let parsed: Vec<X509Certificate> = certs
        .iter()
        .map(|d| X509Certificate::from_der(d).map(|(_, c)| c))
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    let at = ASN1Time::from_timestamp(now.unix_timestamp()).ok()?;
    let usable = |c: &X509Certificate| {
        c.validity().is_valid_at(at)
            && match c.extended_key_usage() {
                Ok(Some(e)) => e.value.any || e.value.server_auth,
                Ok(None) => true,
                Err(_) => false,
            }
    };
    let ski = |c: &X509Certificate| -> Option<Vec<u8>> {
        c.extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            })
    };
    let aki = |c: &X509Certificate| -> Option<Vec<u8>> {
        c.extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            })
    };
    let is_root = |c: &X509Certificate| match aki(c) {
        None => true,
        Some(a) => a.is_empty() || Some(a) == ski(c),
    };
    let mut cur = 0usize;
    // A chain is at most as long as the bundle.
    for _ in 0..certs.len() {
        if !usable(&parsed[cur]) {
            return None;
        }
        let next = (1..parsed.len()).find(|&i| {
            i != cur
                && parsed[i].subject().as_raw() == parsed[cur].issuer().as_raw()
                && parsed[cur]
                    .verify_signature(Some(parsed[i].public_key()))
                    .is_ok()
        })?;
        if is_root(&parsed[next]) {
            return usable(&parsed[next]).then(|| certs[next].clone());
        }
        cur = next;
    }
    None
}

/// The sha256 of a fingerprint-sized value, for messages: first 12 hex digits.
pub fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}
