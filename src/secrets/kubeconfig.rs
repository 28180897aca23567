//! An admin kubeconfig from the cluster's CA: what k3s writes as `cred/admin.kubeconfig` on a
//! server (k3s `pkg/daemons/control/deps/deps.go`, `genClientCerts`), made on the build
//! machine, so nobody copies `/etc/rancher/k3s/k3s.yaml` off a node.
//!
//! The client certificate is k3s's `client-admin`: CN `system:admin`, O `system:masters`
//! (Kubernetes's privileged group), EKU clientAuth, key usage digitalSignature +
//! keyEncipherment, an EC P-256 key, 365 days (dynamiclistener's `NewSignedCert` default),
//! signed by the first certificate of `client-ca.crt` and written followed by that file's
//! chain, as k3s writes its client certificates. The cluster's CA data is the server CA
//! bundle (`server-ca.crt`), what `/cacerts` serves.

use super::ca::{self, ClusterCa};
use anyhow::{Context, Result, anyhow, bail};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// The kubeconfig text (holds a private key: write it 0600, never print it).
pub struct Kubeconfig(String);

impl std::fmt::Debug for Kubeconfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kubeconfig(<redacted>)")
    }
}

impl Kubeconfig {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Issues admin credentials for `cluster` at `server` (`https://host:port`).
pub fn admin(
    cluster: &str,
    ca: &ClusterCa,
    server: &str,
    now: OffsetDateTime,
) -> Result<Kubeconfig> {
    let dir = match ca {
        ClusterCa::Full { dir, .. } => dir,
        ClusterCa::Pinned { dir, .. } => bail!(
            "cluster `{cluster}`: {} holds only the server CA bundle (k3s made this cluster's CAs), so kiln cannot sign a client certificate; expected `kubeconfig` in the cluster's [[cluster]] entry (a copy of /etc/rancher/k3s/k3s.yaml)",
            dir.display()
        ),
        ClusterCa::None => bail!(
            "cluster `{cluster}` has no CA made by kiln (a bare token from before); expected `kubeconfig` in its [[cluster]] entry or KUBECONFIG"
        ),
    };
    let read = |name: &str| -> Result<String> {
        let p = dir.join(name);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let client_chain = read("client-ca.crt")?;
    let client_key = read("client-ca.key")?;
    const END: &str = "-----END CERTIFICATE-----";
    let first = client_chain
        .find(END)
        .map(|i| &client_chain[..i + END.len()])
        .ok_or_else(|| anyhow!("{}: no certificate", dir.join("client-ca.crt").display()))?;
    let signer = KeyPair::from_pem(&client_key)
        .with_context(|| format!("{}: not a private key", dir.join("client-ca.key").display()))?;
    let issuer = Issuer::from_ca_cert_pem(first, signer).with_context(|| {
        format!(
            "{}: the first certificate is not a CA kiln can sign with",
            dir.join("client-ca.crt").display()
        )
    })?;

    let (key, key_pem) = ca::ec_key()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    p.distinguished_name
        .push(DnType::CommonName, "system:admin");
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(ca::serial()?);
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(365);
    let cert = p
        .signed_by(&key, &issuer)
        .context("signing the admin client certificate")?;
    let cert_pem = format!("{}{client_chain}", cert.pem());

    use base64::Engine;
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let bundle = ca
        .bundle()
        .ok_or_else(|| anyhow!("cluster `{cluster}`: no server CA bundle"))?;
    let user = format!("{cluster}-admin");
    Ok(Kubeconfig(format!(
        "# Written by kiln: admin credentials for cluster `{cluster}` (system:masters). Keep it 0600.\n\
         apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\n\
         contexts:\n- name: {cluster}\n  context:\n    cluster: {cluster}\n    user: {user}\n\
         current-context: {cluster}\npreferences: {{}}\nusers:\n- name: {user}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
        b64(bundle),
        b64(cert_pem.as_bytes()),
        b64(key_pem.as_bytes()),
    )))
}

/// The API addresses kiln's kubeconfig may name, best first: the cluster's `api_server`, else
/// its servers on 6443, the bootstrap server first; `except` (a node being replaced) left out.
pub fn api_servers(
    inv: &crate::config::inventory::Inventory,
    cluster: &str,
    except: Option<&str>,
) -> Vec<String> {
    use crate::config::inventory::Role;
    if let Some(u) = inv
        .clusters
        .iter()
        .find(|c| c.name == cluster)
        .and_then(|c| c.api_server.clone())
    {
        return vec![u];
    }
    let mut servers: Vec<_> = inv
        .nodes
        .iter()
        .filter(|n| {
            n.cluster == cluster && n.role == Role::Server && Some(n.name.as_str()) != except
        })
        .collect();
    // Stable: inventory order, the bootstrap server first.
    servers.sort_by_key(|n| !n.bootstrap);
    servers
        .iter()
        .map(|n| format!("https://{}:6443", n.ip))
        .collect()
}

/// Where `kiln kubeconfig` writes by default: `<cluster>.kubeconfig` beside the token.
pub fn default_path(c: &crate::config::inventory::Cluster) -> std::path::PathBuf {
    let dir = c.token_file.parent().unwrap_or(std::path::Path::new("."));
    dir.join(format!("{}.kubeconfig", c.name))
}

/// Writes a kubeconfig 0600, replacing an older one only once the new one is complete.
pub fn write(path: &std::path::Path, k: &Kubeconfig) -> Result<()> {
    super::write_private(path, k.expose().as_bytes(), true)
}
