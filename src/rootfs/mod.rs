//! Rootfs stage: the base tarball, overlays and per-node files, merged into one tar stream.

pub mod base;
pub mod boot;
pub mod bootstrap;
pub mod identity;
pub mod k3s;
pub mod merge;
pub mod node;

use crate::fetch::k3s::K3sFiles;
use crate::fetch::loader::LoaderRecord;
use crate::plan::NodePlan;
use crate::secrets::ClusterSecrets;
use crate::tree::Tree;
use anyhow::Result;
use identity::Identity;

/// What this stage makes for one node, on top of its base: the files (k3s, overlays, the
/// node's own files and secrets) and the identity they record. The image stage only writes it.
///
/// The files come in two trees so that a board's nodes can share one root filesystem: `shared`
/// depends only on what the nodes have in common (k3s, the repository overlays), `own` is the
/// node's (identity, address, secrets, first boot, its role's unit) and is applied last.
pub struct NodeContents {
    pub identity: Identity,
    /// `identity` as written to `/etc/kiln/node.json` and the boot partition's `kiln.json`.
    pub identity_json: String,
    pub shared: Tree,
    pub own: Tree,
    /// Unix time every file is stamped with (SOURCE_DATE_EPOCH or the base's newest file).
    pub epoch: u64,
}

/// Reads the node's cluster token and makes its identity and files.
pub fn node_contents(
    plan: &NodePlan,
    scan: &base::BaseScan,
    k3s: &K3sFiles,
    loaders: Vec<LoaderRecord>,
) -> Result<NodeContents> {
    let secrets = ClusterSecrets::read(&plan.token_file, &plan.ca_dir)?;
    let epoch = crate::util::source_date_epoch(scan.max_mtime)?;
    let identity = identity::of(
        plan,
        identity::Resolved {
            base_sha256: &scan.sha256,
            epoch,
            k3s_version: &k3s.version,
            loaders,
        },
    )?;
    let identity_json = serde_json::to_string_pretty(&identity)? + "\n";
    let (shared, own) = overlay_for(plan, &identity_json, k3s, &secrets)?;
    Ok(NodeContents {
        identity,
        identity_json,
        shared,
        own,
        epoch,
    })
}

/// Everything kiln adds on top of the base, in the order it applies: k3s, repository overlays
/// (inventory order), then the node's own files, which always win. Returned as (shared, own):
/// the first holds nothing of the node's identity, role or secrets.
/// `identity_json` is the node's identity as written (the same bytes go on the boot partition).
pub fn overlay_for(
    plan: &NodePlan,
    identity_json: &str,
    k3s: &K3sFiles,
    secrets: &ClusterSecrets,
) -> Result<(Tree, Tree)> {
    let mut shared = k3s::k3s_tree(k3s)?;
    for dir in &plan.node.overlays {
        let mut o = Tree::default();
        o.add_dir_from_host(dir)?;
        shared.merge(o);
    }
    // An overlay may replace the role's unit, as it could when the unit came before it.
    let mut own = k3s::unit_tree(plan.node.role);
    own.entries
        .retain(|path, e| e.kind == crate::tree::Kind::Dir || !shared.entries.contains_key(path));
    own.merge(node::node_tree(plan, identity_json, secrets)?);
    Ok((shared, own))
}
