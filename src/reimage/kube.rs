//! A minimal Kubernetes API client: just the Node calls `kiln reimage` needs, authenticated
//! from a kubeconfig (CA data, client certificate or bearer token, as k3s writes them).

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Deserialize)]
struct Kubeconfig {
    #[serde(rename = "current-context")]
    current_context: Option<String>,
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    #[serde(default)]
    users: Vec<NamedUser>,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    cluster: ClusterEntry,
}

#[derive(Deserialize)]
struct ClusterEntry {
    server: String,
    #[serde(rename = "certificate-authority-data")]
    ca_data: Option<String>,
    #[serde(rename = "certificate-authority")]
    ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    context: ContextEntry,
}

#[derive(Deserialize)]
struct ContextEntry {
    cluster: String,
    user: String,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: UserEntry,
}

#[derive(Deserialize, Default)]
struct UserEntry {
    token: Option<String>,
    #[serde(rename = "client-certificate-data")]
    cert_data: Option<String>,
    #[serde(rename = "client-key-data")]
    key_data: Option<String>,
    #[serde(rename = "client-certificate")]
    cert_file: Option<PathBuf>,
    #[serde(rename = "client-key")]
    key_file: Option<PathBuf>,
}

pub struct Kube {
    agent: ureq::Agent,
    server: String,
    token: Option<String>,
}

/// Inline `*-data` (base64) or a file path, relative to the kubeconfig's directory.
fn material(
    data: &Option<String>,
    file: &Option<PathBuf>,
    dir: &Path,
    what: &str,
) -> Result<Option<Vec<u8>>> {
    if let Some(d) = data {
        let clean: String = d.chars().filter(|c| !c.is_whitespace()).collect();
        return base64::engine::general_purpose::STANDARD
            .decode(clean)
            .map(Some)
            .with_context(|| format!("{what}-data is not base64"));
    }
    if let Some(f) = file {
        let p = if f.is_absolute() {
            f.clone()
        } else {
            dir.join(f)
        };
        return std::fs::read(&p)
            .map(Some)
            .with_context(|| format!("reading {what} {}", p.display()));
    }
    Ok(None)
}

impl Kube {
    pub fn from_kubeconfig(path: &Path) -> Result<Kube> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading kubeconfig {}", path.display()))?;
        Kube::from_text(&text, path)
    }

    /// A kubeconfig's text; `path` names it in messages and anchors relative file paths.
    pub fn from_text(text: &str, path: &Path) -> Result<Kube> {
        let kc: Kubeconfig = serde_yaml_ng::from_str(text)
            .with_context(|| format!("{} is not a kubeconfig", path.display()))?;
        let ctx = match &kc.current_context {
            Some(c) => kc.contexts.iter().find(|x| &x.name == c),
            None if kc.contexts.len() == 1 => kc.contexts.first(),
            None => None,
        }
        .ok_or_else(|| {
            anyhow!(
                "{}: no current-context; expected one context to use",
                path.display()
            )
        })?;
        let cluster = kc
            .clusters
            .iter()
            .find(|c| c.name == ctx.context.cluster)
            .ok_or_else(|| {
                anyhow!(
                    "{}: context {} names unknown cluster {}",
                    path.display(),
                    ctx.name,
                    ctx.context.cluster
                )
            })?;
        let user = kc
            .users
            .iter()
            .find(|u| u.name == ctx.context.user)
            .map(|u| &u.user)
            .ok_or_else(|| {
                anyhow!(
                    "{}: context {} names unknown user {}",
                    path.display(),
                    ctx.name,
                    ctx.context.user
                )
            })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let c = &cluster.cluster;
        let ca =
            material(&c.ca_data, &c.ca_file, dir, "certificate-authority")?.ok_or_else(|| {
                anyhow!(
                    "{}: cluster {} has no certificate-authority(-data); expected the cluster CA",
                    path.display(),
                    cluster.name
                )
            })?;
        let cert = material(&user.cert_data, &user.cert_file, dir, "client-certificate")?;
        let key = material(&user.key_data, &user.key_file, dir, "client-key")?;
        let client = match (&cert, &key) {
            (Some(c), Some(k)) => Some((c.as_slice(), k.as_slice())),
            _ => None,
        };
        if client.is_none() && user.token.is_none() {
            bail!(
                "{}: user {} has neither a client certificate nor a token",
                path.display(),
                ctx.context.user
            );
        }
        let tls = crate::tls::with_ca(&ca, client)?;
        let agent = ureq::AgentBuilder::new()
            .tls_config(tls)
            .timeout(Duration::from_secs(30))
            .build();
        Ok(Kube {
            agent,
            server: c.server.trim_end_matches('/').to_string(),
            token: user.token.clone(),
        })
    }

    fn req(&self, method: &str, path: &str) -> ureq::Request {
        let r = self
            .agent
            .request(method, &format!("{}{path}", self.server));
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    fn fail(&self, what: &str, e: ureq::Error) -> anyhow::Error {
        match e {
            ureq::Error::Status(code, r) => {
                let body = r.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or(body);
                anyhow!("Kubernetes API {}: {what}: HTTP {code}: {msg}", self.server)
            }
            ureq::Error::Transport(t) => anyhow!("Kubernetes API {}: {what}: {t}", self.server),
        }
    }

    /// The Node object, or `None` if there is none.
    pub fn node(&self, name: &str) -> Result<Option<Value>> {
        match self.req("GET", &format!("/api/v1/nodes/{name}")).call() {
            Ok(r) => Ok(Some(r.into_json().context("reading a Node")?)),
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(self.fail(&format!("get node {name}"), e)),
        }
    }

    pub fn nodes(&self) -> Result<Vec<Value>> {
        let v: Value = self
            .req("GET", "/api/v1/nodes")
            .call()
            .map_err(|e| self.fail("list nodes", e))?
            .into_json()
            .context("reading the node list")?;
        Ok(v.get("items")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default())
    }

    /// Deletes the Node; `false` if it was already gone.
    pub fn delete_node(&self, name: &str) -> Result<bool> {
        match self.req("DELETE", &format!("/api/v1/nodes/{name}")).call() {
            Ok(_) => Ok(true),
            Err(ureq::Error::Status(404, _)) => Ok(false),
            Err(e) => Err(self.fail(&format!("delete node {name}"), e)),
        }
    }
}

pub fn is_ready(node: &Value) -> bool {
    node.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Ready")
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        })
}

pub fn internal_ip(node: &Value) -> Option<String> {
    node.pointer("/status/addresses")?
        .as_array()?
        .iter()
        .find(|a| a.get("type").and_then(Value::as_str) == Some("InternalIP"))?
        .get("address")?
        .as_str()
        .map(str::to_string)
}

pub fn boot_id(node: &Value) -> Option<String> {
    node.pointer("/status/nodeInfo/bootID")?
        .as_str()
        .map(str::to_string)
}

pub fn name(node: &Value) -> &str {
    node.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

pub fn is_etcd(node: &Value) -> bool {
    node.pointer("/metadata/labels")
        .and_then(|l| l.get("node-role.kubernetes.io/etcd"))
        .and_then(Value::as_str)
        == Some("true")
}
