//! TLS client configurations: the BMC's self-signed certificate pinned by its SHA-256
//! fingerprint (no CA vouches for it), and plain CA trust for the Kubernetes API.

use anyhow::{Context, Result, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use std::sync::Arc;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a fingerprint as printed by `openssl x509 -fingerprint -sha256` (`AB:CD:...`) or
/// plain hex.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32]> {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    let mut out = [0u8; 32];
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("tls_sha256 `{s}` is not a SHA-256 fingerprint; expected 64 hex digits, `:` allowed");
    }
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .with_context(|| format!("tls_sha256 `{s}`: bad hex"))?;
    }
    Ok(out)
}

/// Formats a fingerprint the way `openssl` prints it, so users can paste it into the inventory.
pub fn format_fingerprint(fp: &[u8]) -> String {
    fp.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Accepts exactly one certificate (by fingerprint) or, with `None`, any certificate. The
/// handshake signature is still checked, so the server must hold the certificate's key.
#[derive(Debug)]
struct PinnedVerifier {
    expected: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(expected) = self.expected else {
            return Ok(ServerCertVerified::assertion());
        };
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate fingerprint {} does not match tls_sha256 {} in the inventory \
                 (a different device answers at this address, or the BMC certificate was regenerated)",
                format_fingerprint(&got),
                format_fingerprint(&expected)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client config that trusts only the certificate with this fingerprint (`None`: any).
pub fn pinned(fingerprint: Option<[u8; 32]>) -> Result<Arc<ClientConfig>> {
    let provider = provider();
    let cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
            expected: fingerprint,
            provider,
        }))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A client config that trusts the CA certificates in `ca_pem`, optionally presenting a client
/// certificate (`cert_pem`, `key_pem`), as kubeconfigs written by k3s do.
pub fn with_ca(ca_pem: &[u8], client: Option<(&[u8], &[u8])>) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(c.context("reading the cluster CA certificate (PEM)")?)
            .context("adding the cluster CA certificate")?;
        n += 1;
    }
    if n == 0 {
        bail!("the certificate authority data holds no PEM certificate; expected the cluster CA");
    }
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let cfg = match client {
        None => b.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .context("reading the client certificate (PEM)")?;
            let key = PrivateKeyDer::from_pem_slice(key).context("reading the client key (PEM)")?;
            b.with_client_auth_cert(chain, key)
                .context("using the client certificate and key")?
        }
    };
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_both_notations() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&hex).unwrap(), [0xab; 32]);
        assert_eq!(parse_fingerprint(&colons).unwrap(), [0xab; 32]);
        assert_eq!(format_fingerprint(&[0xab; 32]), colons);
        assert!(parse_fingerprint("abcd").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }
}
