//! k3s as its install script would lay it out, airgapped: the binary and its tool links, the
//! airgap images where k3s imports them at start, and the systemd unit for the node's role.

use crate::config::inventory::Role;
use crate::fetch::k3s::K3sFiles;
use crate::tree::Tree;
use anyhow::Result;

pub const BIN: &str = "usr/local/bin/k3s";
pub const IMAGES_DIR: &str = "var/lib/rancher/k3s/agent/images";
const SERVER_UNIT: &str = include_str!("../../firstboot/k3s.service");
const AGENT_UNIT: &str = include_str!("../../firstboot/k3s-agent.service");

/// The unit first boot enables for a role.
pub fn unit_name(role: Role) -> &'static str {
    match role {
        Role::Server => "k3s.service",
        Role::Agent => "k3s-agent.service",
    }
}

/// The binary, its links and the airgap images: the same on every node of an architecture.
pub fn k3s_tree(files: &K3sFiles) -> Result<Tree> {
    let mut t = Tree::default();
    t.host_file(BIN, 0o755, &files.binary.path)?;
    // k3s dispatches on argv[0], as the install script's links rely on.
    for tool in ["kubectl", "crictl", "ctr"] {
        t.symlink(&format!("usr/local/bin/{tool}"), "/usr/local/bin/k3s");
    }
    t.host_file(
        &format!("{IMAGES_DIR}/{}", files.images_name),
        0o644,
        &files.images.path,
    )?;
    Ok(t)
}

/// The systemd unit of the node's role. Not enabled here: first boot enables it after it
/// wrote config.yaml.
pub fn unit_tree(role: Role) -> Tree {
    let mut t = Tree::default();
    let unit = match role {
        Role::Server => SERVER_UNIT,
        Role::Agent => AGENT_UNIT,
    };
    t.file(
        &format!("etc/systemd/system/{}", unit_name(role)),
        0o644,
        unit,
    );
    t
}
