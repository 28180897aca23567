//! Per-node files: identity, hosts, the static ServerLAN address and root's SSH keys.

use super::tree::Tree;
use crate::plan::{Identity, NodePlan};
use anyhow::Result;

/// The systemd-networkd unit for the wired interface.
///
/// Matched by type *and* name: k3s creates veth pairs (also `Type=ether`) for every pod, and those
/// must never get the node's address. `en*` covers the RK1 (`end0`), the Pi 5 and QEMU
/// (`enp0s1`); `eth*` covers kernels without predictable names.
pub fn network_unit(plan: &NodePlan) -> String {
    let net = &plan.network;
    let mut s = String::new();
    s.push_str("# Written by kiln: the node's static ServerLAN address.\n");
    s.push_str("[Match]\nType=ether\nName=en* eth*\n\n[Link]\nRequiredForOnline=routable\n\n");
    s.push_str("[Network]\n");
    s.push_str(&format!("Address={}/{}\n", plan.node.ip, net.net.prefix));
    s.push_str(&format!("Gateway={}\n", net.gateway));
    for d in &net.dns {
        s.push_str(&format!("DNS={d}\n"));
    }
    for n in &net.ntp {
        s.push_str(&format!("NTP={n}\n"));
    }
    s.push_str("LinkLocalAddressing=no\nIPv6AcceptRA=no\n");
    s
}

pub fn hosts_file(plan: &NodePlan) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n");
    s.push_str(
        "ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n\n# Cluster nodes (kiln inventory)\n",
    );
    for (name, ip) in &plan.hosts {
        s.push_str(&format!("{ip}\t{name}\n"));
    }
    s
}

/// Per-node files as an overlay tree.
pub fn node_tree(plan: &NodePlan, identity: &Identity) -> Result<Tree> {
    let mut t = Tree::default();
    t.file("etc/hostname", 0o644, format!("{}\n", plan.node.name));
    t.file("etc/hosts", 0o644, hosts_file(plan));
    t.file(
        "etc/systemd/network/10-kiln-wired.network",
        0o644,
        network_unit(plan),
    );
    // Enable networkd the way `systemctl enable` would, without running systemctl.
    t.symlink(
        "etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
        "/usr/lib/systemd/system/systemd-networkd.service",
    );
    t.symlink(
        "etc/systemd/system/sockets.target.wants/systemd-networkd.socket",
        "/usr/lib/systemd/system/systemd-networkd.socket",
    );
    t.symlink(
        "etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service",
        "/usr/lib/systemd/system/systemd-networkd-wait-online.service",
    );
    let mut json = serde_json::to_string_pretty(identity)?;
    json.push('\n');
    t.file("etc/kiln/node.json", 0o644, json);
    if !plan.node.ssh_authorized_keys.is_empty() {
        t.dir("root/.ssh", 0o700);
        let mut keys = plan.node.ssh_authorized_keys.join("\n");
        keys.push('\n');
        t.file("root/.ssh/authorized_keys", 0o600, keys);
    }
    Ok(t)
}
