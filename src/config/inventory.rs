//! The inventory (`kiln.toml`): network, clusters and nodes. Parsed with spans so every rule
//! violation names the file, line and field.

use super::board::Board;
use super::diag::{Diagnostic, Source};
use super::net::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use toml::Spanned;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Server,
    Agent,
}

// ---- the file as written (spanned) ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    network: RawNetwork,
    bmc: Option<RawBmc>,
    k3s: Option<RawK3s>,
    debian: Option<RawDebian>,
    #[serde(default)]
    defaults: RawOptions,
    #[serde(rename = "cluster", default)]
    clusters: Vec<RawCluster>,
    #[serde(rename = "node", default)]
    nodes: Vec<RawNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    cidr: Spanned<Ipv4Net>,
    gateway: Spanned<Ipv4Addr>,
    #[serde(default)]
    dns: Vec<Ipv4Addr>,
    #[serde(default)]
    ntp: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDebian {
    mirror: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBmc {
    host: Spanned<String>,
    user: Spanned<String>,
    tls_sha256: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOptions {
    ssh_authorized_keys: Option<Vec<Spanned<String>>>,
    target: Option<Spanned<String>>,
    overlays: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Spanned<String>,
    token_file: Spanned<String>,
    kubeconfig: Option<String>,
    api_server: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawK3s {
    version: Spanned<String>,
    release_url: Option<Spanned<String>>,
}

/// Where k3s comes from: `<release_url>/<version>/<asset>`.
#[derive(Debug, Clone, Serialize)]
pub struct K3s {
    /// A k3s release tag, e.g. `v1.33.5+k3s1`.
    pub version: String,
    pub release_url: String,
}

pub const DEFAULT_K3S_RELEASE_URL: &str = "https://github.com/k3s-io/k3s/releases/download";

/// Inventory-wide settings for the Debian bases kiln builds.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DebianOptions {
    /// Debian mirror URL; mmdebstrap's default when absent.
    pub mirror: Option<String>,
}

/// The Turing Pi 2 BMC that flashes and powers the slotted nodes. The password is never in the
/// inventory: it comes from `KILN_BMC_PASSWORD` or a prompt.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bmc {
    /// Name or address, optionally `:port`.
    pub host: String,
    pub user: String,
    /// SHA-256 fingerprint of the BMC's self-signed TLS certificate (hex, `:` allowed).
    pub tls_sha256: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    cluster: Spanned<String>,
    board: Spanned<String>,
    ip: Spanned<Ipv4Addr>,
    role: Spanned<Role>,
    #[serde(default)]
    bootstrap: Option<Spanned<bool>>,
    slot: Option<Spanned<u8>>,
    ssh_authorized_keys: Option<Vec<Spanned<String>>>,
    target: Option<Spanned<String>>,
    /// A board revision (`[variant.NAME]` of the board profile), e.g. `d0` for a Pi 5 with
    /// the D0 stepping.
    variant: Option<Spanned<String>>,
    overlays: Option<Vec<Spanned<String>>>,
}

// ---- the validated model ----

#[derive(Debug, Clone, Serialize)]
pub struct Network {
    pub cidr: String,
    #[serde(skip)]
    pub net: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub ntp: Vec<String>,
}

impl Cluster {
    /// The directory of the cluster's CAs: `<cluster>.ca/` beside its token file.
    pub fn ca_dir(&self) -> PathBuf {
        let dir = self.token_file.parent().unwrap_or(Path::new("."));
        dir.join(format!("{}.ca", self.name))
    }
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    /// Absolute path of the token file (relative paths are resolved against the inventory).
    pub token_file: PathBuf,
    /// Kubeconfig for reaching the cluster's API (reimaging); else kiln's own admin
    /// credentials from the cluster's CA, else `KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// The API address kiln's own kubeconfig names (`https://host:port`, e.g. a virtual IP);
    /// default: a server's address on 6443.
    pub api_server: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub cluster: String,
    pub board: String,
    pub ip: Ipv4Addr,
    pub role: Role,
    pub bootstrap: bool,
    pub slot: Option<u8>,
    pub ssh_authorized_keys: Vec<String>,
    /// The storage device it boots from: a `[target.NAME]` of its board.
    pub target: String,
    /// A `[variant.NAME]` of its board, or `None` for the board's defaults.
    pub variant: Option<String>,
    /// Overlay directories, absolute, in the order they apply.
    pub overlays: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Inventory {
    pub path: PathBuf,
    /// sha256 of the inventory's bytes.
    pub sha256: String,
    pub network: Network,
    pub bmc: Option<Bmc>,
    pub k3s: Option<K3s>,
    pub debian: DebianOptions,
    pub clusters: Vec<Cluster>,
    pub nodes: Vec<Node>,
}

impl Inventory {
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name == name)
    }
}

/// RFC 1123 DNS label, which is what a Kubernetes node name must be here (it is also the
/// hostname, so dots are not allowed).
pub fn is_valid_node_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Loads and validates an inventory against the known boards. Returns every problem found.
/// `check_tokens` is off only for `kiln secrets init`, which creates the token files.
pub fn load(
    path: &Path,
    boards: &BTreeMap<String, Board>,
    check_tokens: bool,
) -> Result<Inventory, Vec<Diagnostic>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Diagnostic {
            file: path.to_path_buf(),
            line: 0,
            col: 0,
            field: "inventory".into(),
            message: format!("cannot read: {e}"),
        }]
    })?;
    let sha256 = crate::util::sha256_hex(text.as_bytes());
    let src = Source::new(path, text);
    let raw: RawInventory = toml::from_str(&src.text).map_err(|e| vec![src.from_toml_error(&e)])?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    validate(&src, &dir, raw, boards, check_tokens).map(|mut inv| {
        inv.sha256 = sha256;
        inv
    })
}

fn resolve(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

fn validate(
    src: &Source,
    dir: &Path,
    raw: RawInventory,
    boards: &BTreeMap<String, Board>,
    check_tokens: bool,
) -> Result<Inventory, Vec<Diagnostic>> {
    let mut d = Vec::new();
    let net = *raw.network.cidr.get_ref();
    let gw = *raw.network.gateway.get_ref();
    if !net.contains(gw) {
        d.push(src.diag(
            raw.network.gateway.span(),
            "network.gateway",
            format!("{gw} is outside {net}; expected an address in the network"),
        ));
    }

    let k3s = raw.k3s.as_ref().map(|k| validate_k3s(src, &mut d, k));
    let mirror = raw.debian.as_ref().and_then(|x| x.mirror.as_ref());
    if let Some(m) = mirror {
        let u = m.get_ref();
        let scheme =
            u.starts_with("http://") || u.starts_with("https://") || u.starts_with("file://");
        // It goes into mmdebstrap's arguments and apt's sources: one word.
        if !scheme || !is_url_text(u) {
            d.push(src.diag(
                m.span(),
                "debian.mirror",
                format!(
                    "{u:?} is not a URL; expected http://, https:// or file:// and no spaces or control characters"
                ),
            ));
        }
    }
    for (i, n) in raw.network.ntp.iter().enumerate() {
        if !is_host(n.get_ref()) {
            d.push(src.diag(
                n.span(),
                format!("network.ntp[{i}]"),
                format!(
                    "{:?} is not a host name or address; expected e.g. \"pool.ntp.org\" or \"192.168.100.1\" (letters, digits, `.`, `-`, `:`)",
                    n.get_ref()
                ),
            ));
        }
    }
    let bmc = raw.bmc.as_ref().map(|b| validate_bmc(src, &mut d, b));
    if let Some(keys) = &raw.defaults.ssh_authorized_keys {
        check_ssh_keys(src, &mut d, "defaults.ssh_authorized_keys", keys);
    }

    // Clusters.
    let mut clusters = Vec::new();
    let mut cluster_names: HashMap<String, std::ops::Range<usize>> = HashMap::new();
    for (i, c) in raw.clusters.iter().enumerate() {
        let name = c.name.get_ref();
        if let Some(prev) = cluster_names.get(name) {
            let (pl, _) = src.line_col(prev.start);
            d.push(src.diag(
                c.name.span(),
                format!("cluster[{i}].name"),
                format!("cluster `{name}` is already defined at line {pl}; expected unique names"),
            ));
        }
        cluster_names.insert(name.clone(), c.name.span());
        // Cluster names go into shell-sourced node.env, file names and messages.
        if !is_valid_node_name(name) {
            d.push(src.diag(
                c.name.span(),
                format!("cluster[{i}].name"),
                format!(
                    "{name:?} is not a valid cluster name; expected 1-63 lower-case letters, digits or `-`, starting and ending with a letter or digit"
                ),
            ));
        }
        let token_file = resolve(dir, c.token_file.get_ref());
        if check_tokens {
            check_token_file(src, &mut d, i, c, &token_file);
        }
        let api_server = c.api_server.as_ref().map(|u| {
            let s = u.get_ref().trim_end_matches('/').to_string();
            let host = s.strip_prefix("https://").unwrap_or("");
            if host.is_empty() || host.contains('/') || !is_url_text(&s) {
                d.push(src.diag(
                    u.span(),
                    format!("cluster[{i}].api_server"),
                    format!(
                        "{s:?} is not an API address; expected https://HOST[:PORT] (e.g. \"https://192.168.100.11:6443\")"
                    ),
                ));
            }
            s
        });
        let cluster = Cluster {
            name: name.clone(),
            token_file,
            kubeconfig: c.kubeconfig.as_deref().map(|k| resolve(dir, k)),
            api_server,
        };
        if check_tokens {
            check_ca_dir(src, &mut d, i, c, &cluster.ca_dir());
        }
        clusters.push(cluster);
    }

    let overlays_dir = dir.join("overlays");
    let default_overlays: Vec<PathBuf> = raw
        .defaults
        .overlays
        .iter()
        .flatten()
        .enumerate()
        .map(|(j, o)| {
            check_overlay(
                src,
                &mut d,
                &overlays_dir,
                o,
                format!("defaults.overlays[{j}]"),
            )
        })
        .collect();
    let mut nodes = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut ips: HashMap<Ipv4Addr, (String, usize)> = HashMap::new();
    let mut slots: HashMap<u8, (String, usize)> = HashMap::new();

    for (i, n) in raw.nodes.iter().enumerate() {
        let field = |f: &str| format!("node[{i}].{f}");
        let name = n.name.get_ref().clone();
        let (line, _) = src.line_col(n.name.span().start);
        if !is_valid_node_name(&name) {
            d.push(src.diag(
                n.name.span(),
                field("name"),
                format!(
                    "`{name}` is not a valid Kubernetes node name; expected 1-63 lower-case letters, digits or `-`, starting and ending with a letter or digit"
                ),
            ));
        }
        if let Some(prev) = names.get(&name) {
            d.push(src.diag(
                n.name.span(),
                field("name"),
                format!("node `{name}` is already defined at line {prev}; expected unique names"),
            ));
        } else {
            names.insert(name.clone(), line);
        }

        let ip = *n.ip.get_ref();
        if let Some((other, l)) = ips.get(&ip) {
            d.push(src.diag(
                n.ip.span(),
                field("ip"),
                format!(
                    "{ip} is already used by node `{other}` (line {l}); expected a unique address"
                ),
            ));
        } else {
            ips.insert(ip, (name.clone(), line));
        }
        if !net.contains(ip) {
            d.push(src.diag(n.ip.span(), field("ip"), format!("{ip} is outside {net}")));
        } else if ip == net.network || ip == net.broadcast() {
            d.push(src.diag(
                n.ip.span(),
                field("ip"),
                format!(
                    "{ip} is the network or broadcast address of {net}; expected a host address"
                ),
            ));
        } else if ip == gw {
            d.push(src.diag(n.ip.span(), field("ip"), format!("{ip} is the gateway")));
        }

        let cluster = n.cluster.get_ref();
        if !cluster_names.contains_key(cluster) {
            let known: Vec<&str> = raw
                .clusters
                .iter()
                .map(|c| c.name.get_ref().as_str())
                .collect();
            d.push(src.diag(
                n.cluster.span(),
                field("cluster"),
                format!(
                    "unknown cluster `{cluster}`; expected one of: {}",
                    known.join(", ")
                ),
            ));
        }
        let board_name = n.board.get_ref();
        let board = boards.get(board_name);
        if board.is_none() {
            let known: Vec<&str> = boards.keys().map(String::as_str).collect();
            d.push(src.diag(
                n.board.span(),
                field("board"),
                format!(
                    "unknown board `{board_name}`; expected one of: {}",
                    known.join(", ")
                ),
            ));
        }

        let role = *n.role.get_ref();
        let bootstrap = n.bootstrap.as_ref().is_some_and(|b| *b.get_ref());
        if bootstrap
            && role == Role::Agent
            && let Some(b) = &n.bootstrap
        {
            d.push(src.diag(
                b.span(),
                field("bootstrap"),
                "an agent cannot bootstrap a cluster; expected role = \"server\" or bootstrap = false",
            ));
        }

        if let Some(slot) = &n.slot {
            let s = *slot.get_ref();
            match board.map(|b| b.spec.slots) {
                Some(None) => d.push(src.diag(
                    slot.span(),
                    field("slot"),
                    format!("board `{board_name}` has no slots; expected no `slot` for this node"),
                )),
                Some(Some(max)) if s == 0 || s > max => d.push(src.diag(
                    slot.span(),
                    field("slot"),
                    format!("slot {s} is out of range; expected 1..={max}"),
                )),
                _ => {}
            }
            if let Some((other, l)) = slots.get(&s) {
                d.push(src.diag(
                    slot.span(),
                    field("slot"),
                    format!("slot {s} is already taken by node `{other}` (line {l})"),
                ));
            } else {
                slots.insert(s, (name.clone(), line));
            }
        }

        // Target: the node's, else [defaults]', else the board's default; always one the board has.
        let target = match (&n.target, &raw.defaults.target, board) {
            (Some(t), _, _) | (None, Some(t), _) => t.get_ref().clone(),
            (None, None, Some(b)) => b.spec.default_target.clone(),
            (None, None, None) => String::new(),
        };
        if let Some(b) = board
            && !b.spec.targets.contains_key(&target)
        {
            let (span, whence) = match (&n.target, &raw.defaults.target) {
                (Some(t), _) => (t.span(), field("target")),
                (None, Some(t)) => (
                    t.span(),
                    format!("defaults.target (for node[{i}] `{name}`)"),
                ),
                (None, None) => (n.board.span(), field("board")),
            };
            d.push(src.diag(
                span,
                whence,
                format!(
                    "`{target}` is not a target of board `{board_name}`; expected one of: {}",
                    b.target_names()
                ),
            ));
        }
        let variant = n.variant.as_ref().map(|v| v.get_ref().clone());
        if let (Some(v), Some(b)) = (&n.variant, board)
            && !b.spec.variants.contains_key(v.get_ref())
        {
            d.push(src.diag(
                v.span(),
                field("variant"),
                format!(
                    "`{}` is not a variant of board `{board_name}`; expected one of: {}",
                    v.get_ref(),
                    b.variant_names()
                ),
            ));
        }

        let overlay_dirs: Vec<PathBuf> = match &n.overlays {
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(j, o)| {
                    check_overlay(
                        src,
                        &mut d,
                        &overlays_dir,
                        o,
                        field(&format!("overlays[{j}]")),
                    )
                })
                .collect(),
            None => default_overlays.clone(),
        };
        if let Some(keys) = &n.ssh_authorized_keys {
            check_ssh_keys(src, &mut d, &field("ssh_authorized_keys"), keys);
        }

        nodes.push(Node {
            name,
            cluster: cluster.clone(),
            board: board_name.clone(),
            ip,
            role,
            bootstrap,
            slot: n.slot.as_ref().map(|s| *s.get_ref()),
            ssh_authorized_keys: n
                .ssh_authorized_keys
                .as_ref()
                .or(raw.defaults.ssh_authorized_keys.as_ref())
                .map(|keys| keys.iter().map(|k| k.get_ref().clone()).collect())
                .unwrap_or_default(),
            target,
            variant,
            overlays: overlay_dirs,
        });
    }

    // Exactly one bootstrap server per cluster.
    for (i, c) in raw.clusters.iter().enumerate() {
        let cname = c.name.get_ref();
        let boots: Vec<&RawNode> = raw
            .nodes
            .iter()
            .filter(|n| n.cluster.get_ref() == cname)
            .filter(|n| n.bootstrap.as_ref().is_some_and(|b| *b.get_ref()))
            .filter(|n| *n.role.get_ref() == Role::Server)
            .collect();
        if boots.len() != 1 {
            let names: Vec<&str> = boots.iter().map(|n| n.name.get_ref().as_str()).collect();
            d.push(src.diag(
                c.name.span(),
                format!("cluster[{i}]"),
                format!(
                    "cluster `{cname}` has {} bootstrap servers{}; expected exactly one node with role = \"server\" and bootstrap = true",
                    boots.len(),
                    if names.is_empty() { String::new() } else { format!(" ({})", names.join(", ")) }
                ),
            ));
        }
    }

    if !d.is_empty() {
        return Err(d);
    }
    Ok(Inventory {
        path: src.path.clone(),
        sha256: String::new(),
        network: Network {
            cidr: net.to_string(),
            net,
            gateway: gw,
            dns: raw.network.dns,
            ntp: raw
                .network
                .ntp
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
        },
        bmc,
        k3s,
        debian: DebianOptions {
            mirror: mirror.map(|m| m.get_ref().clone()),
        },
        clusters,
        nodes,
    })
}

fn validate_k3s(src: &Source, d: &mut Vec<Diagnostic>, k: &RawK3s) -> K3s {
    let v = k.version.get_ref();
    // A release tag: `v1.33.5+k3s1`; it becomes a URL path segment and a cache key.
    let ok = v.starts_with('v')
        && v.len() > 1
        && v.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".+-_".contains(&c));
    if !ok {
        d.push(src.diag(
            k.version.span(),
            "k3s.version",
            format!("`{v}` is not a k3s release tag; expected e.g. \"v1.33.5+k3s1\""),
        ));
    }
    let url = match &k.release_url {
        Some(u) => {
            let s = u.get_ref().trim_end_matches('/').to_string();
            if !(s.starts_with("http://") || s.starts_with("https://")) || !is_url_text(&s) {
                d.push(src.diag(
                    u.span(),
                    "k3s.release_url",
                    format!(
                        "{s:?} is not an http(s) URL; expected e.g. \"{DEFAULT_K3S_RELEASE_URL}\" (no spaces or control characters)"
                    ),
                ));
            }
            s
        }
        None => DEFAULT_K3S_RELEASE_URL.to_string(),
    };
    K3s {
        version: v.clone(),
        release_url: url,
    }
}

/// Text of a URL kiln passes on (to mmdebstrap, apt, HTTP): one word, printable ASCII.
fn is_url_text(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_graphic()) && !s.contains('"')
}

/// A host name or an IPv4/IPv6 address as written into timesyncd.conf and the networkd unit:
/// no space, newline or `#` that could end the value or start another setting.
pub fn is_host(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && !s.starts_with('-')
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".-:".contains(&c))
}

/// One line of root's authorized_keys: a key type word, no newline or other control character
/// (which would add a second key or option line).
pub fn is_authorized_key(s: &str) -> bool {
    let types = ["ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-"];
    !s.chars().any(char::is_control)
        && s.split_whitespace()
            .any(|w| types.iter().any(|t| w.starts_with(t)))
}

fn check_ssh_keys(src: &Source, d: &mut Vec<Diagnostic>, field: &str, keys: &[Spanned<String>]) {
    for (i, k) in keys.iter().enumerate() {
        if !is_authorized_key(k.get_ref()) {
            let shown: String = k.get_ref().chars().take(40).collect();
            d.push(src.diag(
                k.span(),
                format!("{field}[{i}]"),
                format!(
                    "{shown:?} is not one authorized_keys line; expected e.g. \"ssh-ed25519 AAAA... user@host\" without newlines or control characters"
                ),
            ));
        }
    }
}

/// Resolves an overlay name to its directory under `overlays/`, reporting names that are not a
/// plain relative path, directories that do not exist, and any that resolve (through a
/// symlink) outside `overlays/`. Symlinks inside an overlay are image entries, not followed.
fn check_overlay(
    src: &Source,
    d: &mut Vec<Diagnostic>,
    overlays_dir: &Path,
    o: &Spanned<String>,
    field: String,
) -> PathBuf {
    use std::path::Component;
    let name = o.get_ref();
    let plain = !name.is_empty()
        && !name.chars().any(char::is_control)
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    let p = overlays_dir.join(name);
    if !plain {
        d.push(src.diag(
            o.span(),
            field,
            format!(
                "{name:?} is not an overlay name; expected the name of a directory under {} (no `..`, `.` or absolute path)",
                overlays_dir.display()
            ),
        ));
        return p;
    }
    if !p.is_dir() {
        d.push(src.diag(
            o.span(),
            field,
            format!(
                "overlay `{name}` not found; expected a directory {}",
                p.display()
            ),
        ));
        return p;
    }
    match (p.canonicalize(), overlays_dir.canonicalize()) {
        (Ok(real), Ok(root)) if real.starts_with(&root) && real != root => {}
        (Ok(real), Ok(root)) => d.push(src.diag(
            o.span(),
            field,
            format!(
                "overlay `{name}` resolves to {}, outside {}; expected a directory inside it (not a symlink leading out)",
                real.display(),
                root.display()
            ),
        )),
        (Err(e), _) | (_, Err(e)) => d.push(src.diag(
            o.span(),
            field,
            format!("cannot resolve overlay {}: {e}", p.display()),
        )),
    }
    p
}

fn validate_bmc(src: &Source, d: &mut Vec<Diagnostic>, b: &RawBmc) -> Bmc {
    let host = b.host.get_ref();
    // `name[:port]` or `[v6]:port`, put into https:// URLs.
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".-:[]".contains(&c));
    if !host_ok {
        d.push(src.diag(
            b.host.span(),
            "bmc.host",
            format!("{host:?} is not a host; expected a name or address, optionally :port"),
        ));
    }
    let user = b.user.get_ref();
    if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
        d.push(src.diag(
            b.user.span(),
            "bmc.user",
            format!("{user:?} is not a user name; expected no `:` or control characters"),
        ));
    }
    if let Some(fp) = &b.tls_sha256 {
        let hex: String = fp.get_ref().chars().filter(|c| *c != ':').collect();
        if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            d.push(src.diag(
                fp.span(),
                "bmc.tls_sha256",
                format!(
                    "{:?} is not a SHA-256 fingerprint; expected 64 hex digits, `:` allowed",
                    fp.get_ref()
                ),
            ));
        }
    }
    Bmc {
        host: host.clone(),
        user: user.clone(),
        tls_sha256: b.tls_sha256.as_ref().map(|f| f.get_ref().clone()),
    }
}

/// The cluster's CA directory, if there is one, must be root's alone: it holds the CA keys.
fn check_ca_dir(src: &Source, d: &mut Vec<Diagnostic>, i: usize, c: &RawCluster, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return;
    };
    let field = format!("cluster[{i}].token_file");
    if !m.is_dir() {
        d.push(src.diag(
            c.token_file.span(),
            field,
            format!(
                "{} (the cluster's CAs, beside its token) is not a directory; expected the directory `kiln secrets init` makes",
                path.display()
            ),
        ));
        return;
    }
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        d.push(src.diag(
            c.token_file.span(),
            field,
            format!(
                "{} (the cluster's CA keys) is open to group or others (mode {mode:03o}); expected 0700 (chmod -R go= {})",
                path.display(),
                path.display()
            ),
        ));
    }
}

fn check_token_file(src: &Source, d: &mut Vec<Diagnostic>, i: usize, c: &RawCluster, path: &Path) {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let field = format!("cluster[{i}].token_file");
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            let what = if m.is_dir() {
                "a directory"
            } else if m.file_type().is_fifo() {
                "a fifo"
            } else {
                "not a regular file"
            };
            d.push(src.diag(
                c.token_file.span(),
                field,
                format!(
                    "{} is {what}; expected a regular file holding the token (`kiln secrets init` creates it)",
                    path.display()
                ),
            ));
        }
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                d.push(src.diag(
                    c.token_file.span(),
                    field,
                    format!(
                        "{} is readable by group or others (mode {mode:03o}); expected 0600 (chmod 600 {})",
                        path.display(),
                        path.display()
                    ),
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => d.push(src.diag(
            c.token_file.span(),
            field,
            format!(
                "{} does not exist; expected a token file (create it with `kiln secrets init`)",
                path.display()
            ),
        )),
        Err(e) => d.push(src.diag(
            c.token_file.span(),
            field,
            format!("cannot read {}: {e}", path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert!(is_valid_node_name("rk1-1"));
        assert!(is_valid_node_name("pi5-staging"));
        assert!(!is_valid_node_name("RK1"));
        assert!(!is_valid_node_name("-a"));
        assert!(!is_valid_node_name("a-"));
        assert!(!is_valid_node_name("a.b"));
        assert!(!is_valid_node_name(""));
        assert!(!is_valid_node_name(&"a".repeat(64)));
    }
}
