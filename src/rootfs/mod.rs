//! Rootfs stage: the base tarball, overlays and per-node files, merged into one tar stream.

pub mod base;
pub mod bootstrap;
pub mod k3s;
pub mod merge;
pub mod node;
pub mod tree;

use crate::fetch::k3s::K3sFiles;
use crate::plan::{Identity, NodePlan};
use crate::secrets::Token;
use anyhow::Result;
use tree::Tree;

/// Everything kiln adds on top of the base, in the order it applies: k3s, repository overlays
/// (inventory order), then the node's own files, which always win.
pub fn overlay_for(
    plan: &NodePlan,
    identity: &Identity,
    k3s: &K3sFiles,
    token: &Token,
) -> Result<Tree> {
    let mut t = k3s::k3s_tree(k3s, plan.node.role)?;
    for dir in &plan.node.overlays {
        let mut o = Tree::default();
        o.add_dir_from_host(dir)?;
        t.merge(o);
    }
    t.merge(node::node_tree(plan, identity, token)?);
    Ok(t)
}
