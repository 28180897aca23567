//! Rootfs stage: the base tarball, overlays and per-node files, merged into one tar stream.

pub mod base;
pub mod merge;
pub mod node;
pub mod tree;

use crate::plan::{Identity, NodePlan};
use anyhow::Result;
use tree::Tree;

/// Everything kiln adds on top of the base, in the order it applies: repository overlays
/// (inventory order), then the node's own files, which always win.
pub fn overlay_for(plan: &NodePlan, identity: &Identity) -> Result<Tree> {
    let mut t = Tree::default();
    for dir in &plan.node.overlays {
        let mut o = Tree::default();
        o.add_dir_from_host(dir)?;
        t.merge(o);
    }
    t.merge(node::node_tree(plan, identity)?);
    Ok(t)
}
