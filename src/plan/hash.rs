//! The plan hash: one sha256 over what of the inventory and board profile goes into ONE node's
//! image. `kiln build` stores it in the image's identity (`plan_sha256`); `kiln flash` computes
//! it again from the current configuration and calls the image stale only when it differs, so
//! adding another node or editing `[bmc]` leaves every built image fresh.
//!
//! In: the node's own settings (name, cluster, board, address, role, bootstrap, slot, SSH keys,
//! target, variant), the board profile (name and file hash), the network, the `[k3s]` release,
//! the addresses of the cluster's other servers (whom first boot joins), and the content of
//! the node's overlay directories.
//!
//! Out: the cluster token (a secret, never hashed), `[bmc]`, kubeconfig paths, other nodes'
//! settings except the peer addresses, the `/etc/hosts` list of every node, the Debian mirror
//! (where a base comes from, not what it holds), and what `kiln build` was given on its
//! command line (`--artifact`, `--rejoin`): those are not known when flashing; the base is
//! pinned by `base_sha256` and the join mode by `join` in the identity instead.

use crate::config::Config;
use crate::config::inventory::{K3s, Network, Node};
use crate::plan::NodePlan;
use crate::tree::{Kind, Tree};
use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::net::Ipv4Addr;

/// Bumped when what is hashed changes, so old and new hashes never match by accident.
const FORMAT: &str = "kiln-plan/1";

#[derive(Serialize)]
struct NodeFields<'a> {
    name: &'a str,
    cluster: &'a str,
    board: &'a str,
    ip: Ipv4Addr,
    role: crate::config::inventory::Role,
    bootstrap: bool,
    slot: Option<u8>,
    ssh_authorized_keys: &'a [String],
    target: &'a str,
    variant: Option<&'a str>,
}

#[derive(Serialize)]
struct Input<'a> {
    format: &'static str,
    /// The board's name is `node.board`.
    node: NodeFields<'a>,
    board_sha256: &'a str,
    network: &'a Network,
    k3s: Option<&'a K3s>,
    peers: &'a [Ipv4Addr],
    /// Per overlay directory, in the order they apply: the sha256 of what it adds.
    overlays: Vec<String>,
}

/// The plan hash of a node being built.
pub fn of_plan(plan: &NodePlan) -> Result<String> {
    digest(
        &plan.node,
        &plan.board.sha256,
        &plan.network,
        plan.k3s.release.as_ref(),
        &plan.peers,
    )
}

/// The plan hash the node would be built with from the current configuration.
pub fn of_config(cfg: &Config, node: &Node) -> Result<String> {
    let board = cfg
        .board_of(node)
        .ok_or_else(|| anyhow!("node `{}`: board `{}` not loaded", node.name, node.board))?;
    of_config_with_board_sha256(cfg, node, &board.sha256)
}

/// [`of_config`] as if the board profile's file hash were `board_sha256`: with an image's own
/// board hash, it tells whether the inventory changed apart from the board profile.
pub fn of_config_with_board_sha256(
    cfg: &Config,
    node: &Node,
    board_sha256: &str,
) -> Result<String> {
    let peers = crate::plan::peers_of(&cfg.inventory, node);
    digest(
        node,
        board_sha256,
        &cfg.inventory.network,
        cfg.inventory.k3s.as_ref(),
        &peers,
    )
}

fn digest(
    node: &Node,
    board_sha256: &str,
    network: &Network,
    k3s: Option<&K3s>,
    peers: &[Ipv4Addr],
) -> Result<String> {
    let overlays = node
        .overlays
        .iter()
        .map(|dir| {
            overlay_sha256(dir).with_context(|| {
                format!(
                    "hashing overlay {} of node `{}` for its plan hash",
                    dir.display(),
                    node.name
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let input = Input {
        format: FORMAT,
        node: NodeFields {
            name: &node.name,
            cluster: &node.cluster,
            board: &node.board,
            ip: node.ip,
            role: node.role,
            bootstrap: node.bootstrap,
            slot: node.slot,
            ssh_authorized_keys: &node.ssh_authorized_keys,
            target: &node.target,
            variant: node.variant.as_deref(),
        },
        board_sha256,
        network,
        k3s,
        peers,
        overlays,
    };
    let bytes = serde_json::to_vec(&input).context("serialising the node's plan for its hash")?;
    Ok(crate::util::sha256_hex(&bytes))
}

/// What an overlay directory adds to the image, read as the build reads it (paths, kinds,
/// modes, contents), hashed.
fn overlay_sha256(dir: &std::path::Path) -> Result<String> {
    let mut t = Tree::default();
    t.add_dir_from_host(dir)?;
    let mut h = Sha256::new();
    for (path, e) in &t.entries {
        h.update((path.len() as u64).to_le_bytes());
        h.update(path.as_bytes());
        h.update(e.mode.to_le_bytes());
        h.update(e.uid.to_le_bytes());
        h.update(e.gid.to_le_bytes());
        let (tag, data): (u8, &[u8]) = match &e.kind {
            Kind::File(d) => (b'f', d),
            Kind::Dir => (b'd', &[]),
            Kind::Symlink(s) => (b'l', s.as_bytes()),
            // Overlays read from the host are held in memory; a streamed file would be a
            // build-time input, named by its path.
            Kind::HostFile { path, .. } => (b'h', path.as_os_str().as_encoded_bytes()),
        };
        h.update([tag]);
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    Ok(crate::util::hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{JoinMode, plan_node};
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    const BASE_INVENTORY: &str = r#"[network]
cidr = "10.0.0.0/24"
gateway = "10.0.0.1"

[bmc]
host = "turingpi.local"
user = "root"

[[cluster]]
name = "prod"
token_file = "prod.token"

[[node]]
name = "s1"
cluster = "prod"
board = "rk1"
ip = "10.0.0.11"
role = "server"
bootstrap = true
slot = 1
overlays = ["ov"]

[[node]]
name = "s2"
cluster = "prod"
board = "rk1"
ip = "10.0.0.12"
role = "server"
slot = 2
"#;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("kiln-planhash-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("overlays/ov/etc")).unwrap();
        std::fs::write(d.join("overlays/ov/etc/motd"), "hello\n").unwrap();
        Dir(d)
    }

    fn load(dir: &Path, inventory: &str) -> Config {
        let inv = dir.join("kiln.toml");
        std::fs::write(&inv, inventory).unwrap();
        let boards = Path::new(env!("CARGO_MANIFEST_DIR")).join("boards");
        crate::config::load(&inv, &boards, false).unwrap_or_else(|e| panic!("{e}"))
    }

    fn hash(cfg: &Config, node: &str) -> String {
        of_config(cfg, cfg.inventory.node(node).unwrap()).unwrap()
    }

    #[test]
    fn build_and_flash_compute_the_same_hash() {
        let d = scratch("same");
        let cfg = load(&d.0, BASE_INVENTORY);
        let node = cfg.inventory.node("s1").unwrap();
        let board = cfg.board_of(node).unwrap();
        // plan_node only checks that the artifacts were named; it reads none of them.
        let mut supplied = BTreeMap::new();
        for a in ["base", "k3s", "k3s-images"] {
            supplied.insert(a.to_string(), d.0.join(a));
        }
        for b in &board.spec.blobs {
            supplied.insert(b.artifact.clone(), d.0.join(&b.artifact));
        }
        for join in [JoinMode::Init, JoinMode::Rejoin] {
            let plan = plan_node(&cfg, "s1", &supplied, join).unwrap();
            assert_eq!(of_plan(&plan).unwrap(), hash(&cfg, "s1"));
        }
    }

    #[test]
    fn only_what_reaches_the_node_changes_its_hash() {
        let d = scratch("what");
        let base = load(&d.0, BASE_INVENTORY);
        let h = hash(&base, "s1");
        assert_eq!(hash(&base, "s1"), h, "the hash is deterministic");
        assert_ne!(hash(&base, "s2"), h, "nodes differ");

        let same = |text: &str, why: &str| {
            assert_eq!(
                hash(&load(&d.0, text), "s1"),
                h,
                "{why} must not make s1 stale"
            );
        };
        let changed = |text: &str, why: &str| {
            assert_ne!(hash(&load(&d.0, text), "s1"), h, "{why} must make s1 stale");
        };
        same(&format!("# a comment\n{BASE_INVENTORY}"), "a comment");
        same(
            &BASE_INVENTORY.replace("turingpi.local", "bmc.example"),
            "another [bmc]",
        );
        same(
            &format!(
                "{BASE_INVENTORY}\n[[node]]\nname = \"a9\"\ncluster = \"prod\"\nboard = \"rk1\"\nip = \"10.0.0.19\"\nrole = \"agent\"\nslot = 4\n"
            ),
            "another agent",
        );
        changed(
            &BASE_INVENTORY.replace("10.0.0.11", "10.0.0.21"),
            "its address",
        );
        changed(
            &BASE_INVENTORY.replace("10.0.0.12", "10.0.0.22"),
            "a peer server's address",
        );
        changed(
            &BASE_INVENTORY.replace("gateway = \"10.0.0.1\"", "gateway = \"10.0.0.254\""),
            "the gateway",
        );
        changed(
            &format!("{BASE_INVENTORY}\n[k3s]\nversion = \"v1.33.5+k3s1\"\n"),
            "a k3s release",
        );

        std::fs::write(d.0.join("overlays/ov/etc/motd"), "changed\n").unwrap();
        assert_ne!(hash(&base, "s1"), h, "overlay content is part of the plan");
        assert_eq!(
            hash(&base, "s2"),
            hash(&load(&d.0, BASE_INVENTORY), "s2"),
            "s2 has no overlay"
        );
    }
}
