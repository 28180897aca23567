//! Plan stage: a pure function from the validated configuration to what one node's image holds
//! (identity, derived identifiers, the artifacts it needs). Nothing here touches the disk image.

pub mod boot;
pub mod hash;

use crate::config::Config;
use crate::config::board::{Arch, Board, DebianRecipe, TableKind};
use crate::config::board::{TargetSpec, VariantSpec};
use crate::config::inventory::{K3s, Network, Node, Role};
use crate::util::Guid;
use anyhow::{Result, bail};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// Identifiers that make two builds of a node byte-identical and two nodes distinct.
#[derive(Debug, Clone)]
pub struct DiskIds {
    /// GPT disk GUID (GPT boards).
    pub disk_guid: Guid,
    /// MBR disk signature (MBR boards); PARTUUIDs are `<sig>-NN`.
    pub mbr_signature: u32,
    /// Per partition, in table order: the GPT partition GUID.
    pub partition_guids: Vec<Guid>,
    /// Per partition: ext4 UUID (also used as its hash seed).
    pub fs_uuids: Vec<Guid>,
    /// Per partition: FAT volume ID.
    pub fat_volume_ids: Vec<u32>,
}

impl DiskIds {
    pub fn derive(cluster: &str, node: &str, partitions: usize) -> DiskIds {
        let g = |what: &str, i: usize| Guid::derive(&["kiln", cluster, node, what, &i.to_string()]);
        let sig = Guid::derive(&["kiln", cluster, node, "mbr-signature"]).0;
        DiskIds {
            disk_guid: g("disk", 0),
            // A zero signature means "none" to some tools; force a bit on.
            mbr_signature: u32::from_be_bytes([sig[0], sig[1], sig[2], sig[3]]) | 1,
            partition_guids: (0..partitions).map(|i| g("partition", i)).collect(),
            fs_uuids: (0..partitions).map(|i| g("filesystem", i)).collect(),
            fat_volume_ids: (0..partitions)
                .map(|i| {
                    let b = g("fat-volume-id", i).0;
                    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
                })
                .collect(),
        }
    }
}

/// Whether an image may create its cluster. Every image made for reimaging is `Rejoin`: a
/// node that once belonged to a cluster must never initialise a second one (split brain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinMode {
    /// The bootstrap server may initialise when no peer answers (fresh cluster).
    #[default]
    Init,
    /// Never initialise; wait until a peer answers, then join it.
    Rejoin,
}

impl JoinMode {
    pub fn as_str(self) -> &'static str {
        match self {
            JoinMode::Init => "init",
            JoinMode::Rejoin => "rejoin",
        }
    }
}

/// Where the base root filesystem comes from.
#[derive(Debug, Clone)]
pub enum BaseInput {
    /// `--artifact base=`.
    File(PathBuf),
    /// Built by mmdebstrap from the board's recipe (cached); boxed, as the recipe is large.
    Debian(Box<DebianBase>),
}

/// A Debian base to make: the board's `[debian]` recipe for its architecture, from the
/// inventory's mirror (`None`: mmdebstrap's default). The rootfs stage turns it into an
/// mmdebstrap run and a cache key (`rootfs::bootstrap::Recipe`).
#[derive(Debug, Clone)]
pub struct DebianBase {
    pub arch: Arch,
    pub debian: DebianRecipe,
    pub mirror: Option<String>,
}

/// Where k3s comes from: the release, with either file overridden by `--artifact`.
#[derive(Debug, Clone)]
pub struct K3sInput {
    pub release: Option<K3s>,
    pub binary: Option<PathBuf>,
    pub images: Option<PathBuf>,
}

/// Everything needed to write one node's image.
#[derive(Debug, Clone)]
pub struct NodePlan {
    pub node: Node,
    pub board: Board,
    pub network: Network,
    pub inventory_sha256: String,
    /// Every node of the inventory (name, ip), for /etc/hosts.
    pub hosts: Vec<(String, Ipv4Addr)>,
    pub ids: DiskIds,
    /// Loader blobs the user supplied, by artifact name (`uboot`, ...).
    pub artifacts: BTreeMap<String, PathBuf>,
    pub base: BaseInput,
    pub k3s: K3sInput,
    pub join: JoinMode,
    /// The cluster's token file (read only while the root filesystem is written).
    pub token_file: PathBuf,
    /// The cluster's CA directory (may not exist: a cluster from before kiln made CAs).
    pub ca_dir: PathBuf,
    /// Addresses of the cluster's servers other than this node, in inventory order: whom first
    /// boot probes and joins.
    pub peers: Vec<Ipv4Addr>,
}

impl NodePlan {
    /// Whether this image may start its cluster (the join script's `may_init`): the
    /// cluster's bootstrap server, built to create it. Only such a node needs the cluster's
    /// CAs in k3s's data directory; every other server takes them from the datastore.
    pub fn may_initialise(&self) -> bool {
        self.node.role == crate::config::inventory::Role::Server
            && self.node.bootstrap
            && self.join == JoinMode::Init
    }

    /// The node's target. Validation guarantees the board has it.
    pub fn target(&self) -> Option<&TargetSpec> {
        self.board.spec.targets.get(&self.node.target)
    }

    /// The target holding this node's loader blobs when its own image cannot (`loader_on`).
    pub fn loader_on(&self) -> Option<&str> {
        self.target().and_then(|t| t.loader_on.as_deref())
    }

    /// The node's board revision, if it names one (validated to exist).
    pub fn variant(&self) -> Option<&VariantSpec> {
        self.node
            .variant
            .as_ref()
            .and_then(|v| self.board.spec.variants.get(v))
    }

    /// rpi-firmware: the `device_tree=` file: the variant's, else the board's.
    pub fn device_tree(&self) -> Option<&str> {
        self.variant()
            .and_then(|v| v.device_tree.as_deref())
            .or(self.board.spec.devicetree.device_tree.as_deref())
    }

    /// One-time firmware settings the node's target needs, with the command that sets them.
    pub fn firmware_settings(&self) -> Vec<String> {
        self.target().map(|t| t.eeprom.clone()).unwrap_or_default()
    }

    /// `root=` value for the kernel command line. PARTUUID is resolved by the kernel itself,
    /// so it works without help from the initramfs.
    pub fn root_partuuid(&self) -> String {
        self.partuuid(self.root_index())
    }

    /// PARTUUID of the boot partition (mounted at `/boot/firmware` by /etc/fstab).
    pub fn boot_partuuid(&self) -> String {
        // Invariant: board validation guarantees exactly one boot partition.
        let idx = self
            .board
            .spec
            .partitions
            .iter()
            .position(|p| p.content == crate::config::board::Content::Boot)
            .unwrap_or(0);
        self.partuuid(idx)
    }

    fn partuuid(&self, idx: usize) -> String {
        match self.board.spec.partition_table.kind {
            TableKind::Gpt => self.ids.partition_guids[idx].to_string(),
            TableKind::Mbr => format!("{:08x}-{:02x}", self.ids.mbr_signature, idx + 1),
        }
    }

    pub fn root_index(&self) -> usize {
        // Invariant: board validation guarantees exactly one rootfs partition.
        self.board
            .spec
            .partitions
            .iter()
            .position(|p| p.content == crate::config::board::Content::Rootfs)
            .unwrap_or(0)
    }
}

/// Where users get a base root filesystem for a board without a `[debian]` recipe.
pub const BASE_SOURCE: &str = "a Debian root filesystem tarball with a kernel and initramfs \
(e.g. `mmdebstrap --arch=arm64 --include=linux-image-arm64,initramfs-tools,systemd-sysv trixie base.tar.zst`), \
or add a [debian] recipe to the board profile so kiln builds it";

/// Builds the plan for one node, checking that every artifact its board needs was supplied.
pub fn plan_node(
    config: &Config,
    node_name: &str,
    supplied: &BTreeMap<String, PathBuf>,
    join: JoinMode,
) -> Result<NodePlan> {
    let inv = &config.inventory;
    let Some(node) = inv.node(node_name) else {
        let known: Vec<&str> = inv.nodes.iter().map(|n| n.name.as_str()).collect();
        bail!(
            "no node `{node_name}` in {}; expected one of: {}",
            inv.path.display(),
            known.join(", ")
        );
    };
    let Some(board) = config.board_of(node) else {
        bail!("node `{node_name}`: board `{}` not loaded", node.board);
    };
    let mut artifacts = BTreeMap::new();
    let mut missing = Vec::new();
    let base = match (supplied.get("base"), &board.spec.debian) {
        (Some(p), _) => Some(BaseInput::File(p.clone())),
        (None, Some(recipe)) => Some(BaseInput::Debian(Box::new(DebianBase {
            arch: board.spec.arch,
            debian: recipe.clone(),
            mirror: inv.debian.mirror.clone(),
        }))),
        (None, None) => {
            missing.push(format!(
                "base (root filesystem): pass --artifact base=ROOTFS.tar[.gz|.zst]; {BASE_SOURCE}"
            ));
            None
        }
    };
    let k3s = K3sInput {
        release: inv.k3s.clone(),
        binary: supplied.get("k3s").cloned(),
        images: supplied.get("k3s-images").cloned(),
    };
    if k3s.release.is_none() {
        for (name, have) in [("k3s", &k3s.binary), ("k3s-images", &k3s.images)] {
            if have.is_none() {
                missing.push(format!(
                    "{name}: set [k3s] version in {} so kiln downloads it, or pass --artifact {name}=FILE",
                    inv.path.display()
                ));
            }
        }
    }
    for blob in &board.spec.blobs {
        match supplied.get(&blob.artifact) {
            Some(p) => {
                artifacts.insert(blob.artifact.clone(), p.clone());
            }
            None => {
                let (what, source) = board
                    .artifact(&blob.artifact)
                    .map(|a| (a.description.as_str(), a.source.as_str()))
                    .unwrap_or(("", ""));
                missing.push(format!(
                    "{} ({what}): pass --artifact {}=FILE; get it from {source}",
                    blob.artifact, blob.artifact
                ));
            }
        }
    }
    let (Some(base), true) = (base, missing.is_empty()) else {
        return Err(MissingArtifacts {
            node: node_name.to_string(),
            board: board.name().to_string(),
            missing,
        }
        .into());
    };
    let cluster = inv.cluster(&node.cluster).ok_or_else(|| {
        anyhow::anyhow!("node `{node_name}`: cluster `{}` not defined", node.cluster)
    })?;
    let token_file = cluster.token_file.clone();
    let ca_dir = cluster.ca_dir();
    let peers = peers_of(inv, node);
    Ok(NodePlan {
        node: node.clone(),
        board: board.clone(),
        network: inv.network.clone(),
        inventory_sha256: inv.sha256.clone(),
        hosts: inv.nodes.iter().map(|n| (n.name.clone(), n.ip)).collect(),
        ids: DiskIds::derive(&node.cluster, &node.name, board.spec.partitions.len()),
        artifacts,
        base,
        k3s,
        join,
        token_file,
        ca_dir,
        peers,
    })
}

/// Addresses of the servers of `node`'s cluster other than itself, in inventory order: whom
/// its first boot probes and joins.
pub fn peers_of(inv: &crate::config::inventory::Inventory, node: &Node) -> Vec<Ipv4Addr> {
    inv.nodes
        .iter()
        .filter(|n| n.cluster == node.cluster && n.role == Role::Server && n.name != node.name)
        .map(|n| n.ip)
        .collect()
}

/// A node cannot be built because the user has not supplied something only they can.
#[derive(Debug)]
pub struct MissingArtifacts {
    pub node: String,
    pub board: String,
    pub missing: Vec<String>,
}

impl std::fmt::Display for MissingArtifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node `{}` (board {}) needs artifacts that were not supplied:",
            self.node, self.board
        )?;
        for m in &self.missing {
            write!(f, "\n  - {m}")?;
        }
        Ok(())
    }
}

impl std::error::Error for MissingArtifacts {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_per_node() {
        let a = DiskIds::derive("production", "rk1-1", 2);
        let b = DiskIds::derive("production", "rk1-1", 2);
        let c = DiskIds::derive("production", "rk1-2", 2);
        assert_eq!(a.disk_guid, b.disk_guid);
        assert_eq!(a.partition_guids, b.partition_guids);
        assert_ne!(a.disk_guid, c.disk_guid);
        assert_ne!(a.partition_guids[1], c.partition_guids[1]);
        assert_ne!(a.partition_guids[0], a.partition_guids[1]);
        assert_ne!(a.mbr_signature, c.mbr_signature);
    }
}
