//! Per-node files: identity, hosts, the static ServerLAN address, root's SSH keys, the
//! cluster secrets (root-only), the clock floor, and first boot with its join inputs.

use crate::config::inventory::Role;
use crate::plan::NodePlan;
use crate::secrets::ClusterSecrets;
use crate::tree::Tree;
use anyhow::Result;

const FIRSTBOOT_SH: &str = include_str!("../../firstboot/kiln-firstboot.sh");
const JOIN_SH: &str = include_str!("../../firstboot/kiln-join.sh");
const INSTALL_SH: &str = include_str!("../../firstboot/kiln-install.sh");
const FIRSTBOOT_UNIT: &str = include_str!("../../firstboot/kiln-firstboot.service");
const TIME_WAIT_SH: &str = include_str!("../../firstboot/kiln-time-wait.sh");
const TIME_WAIT_UNIT: &str = include_str!("../../firstboot/kiln-time-wait.service");
const SSH_DROPIN: &str = include_str!("../../firstboot/ssh-host-keys.conf");

/// Root-only secret files (mode 0600 in a 0700 or root-owned directory).
pub const TOKEN_PATH: &str = "etc/kiln/token";
pub const NODE_PASSWORD_PATH: &str = "etc/rancher/node/password";
/// k3s's CA directory (`<data-dir>/server/tls`), read on its first start.
pub const K3S_TLS_DIR: &str = "var/lib/rancher/k3s/server/tls";
/// The cluster's server CA bundle (public: every server serves it at `/cacerts`), with which
/// first boot checks a peer before it hands the peer the token.
pub const CLUSTER_CA_PATH: &str = "etc/kiln/cluster-ca.crt";

/// The join script's inputs, sourced by first boot. No secrets: the token stays in its own
/// 0600 file.
pub fn node_env(plan: &NodePlan, has_ca: bool) -> String {
    let peers: Vec<String> = plan.peers.iter().map(|p| p.to_string()).collect();
    let ca = if has_ca {
        format!("/{CLUSTER_CA_PATH}")
    } else {
        String::new()
    };
    format!(
        "# Written by kiln: inputs of the first-boot join decision.\n\
         KILN_NODE={}\nKILN_CLUSTER={}\nKILN_IP={}\nKILN_ROLE={}\nKILN_BOOTSTRAP={}\n\
         KILN_MODE={}\nKILN_PEERS=\"{}\"\nKILN_CA={ca}\n",
        plan.node.name,
        plan.node.cluster,
        plan.node.ip,
        match plan.node.role {
            Role::Server => "server",
            Role::Agent => "agent",
        },
        u8::from(plan.node.bootstrap),
        plan.join.as_str(),
        peers.join(" ")
    )
}

fn timesyncd_conf(plan: &NodePlan) -> String {
    let mut s = String::from("# Written by kiln: the inventory's NTP servers.\n[Time]\n");
    if !plan.network.ntp.is_empty() {
        s.push_str(&format!("NTP={}\n", plan.network.ntp.join(" ")));
    }
    s
}

/// `systemctl enable` as a symlink: `<target>.wants/<unit>` -> `/<unit_dir>/<unit>`.
fn enable(t: &mut Tree, target: &str, unit: &str, unit_dir: &str) {
    t.symlink(
        &format!("etc/systemd/system/{target}.wants/{unit}"),
        &format!("/{unit_dir}/{unit}"),
    );
}

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
pub fn node_tree(plan: &NodePlan, identity_json: &str, secrets: &ClusterSecrets) -> Result<Tree> {
    let token = &secrets.token;
    let mut t = Tree::default();
    t.file("etc/hostname", 0o644, format!("{}\n", plan.node.name));
    t.file("etc/hosts", 0o644, hosts_file(plan));
    t.file(
        "etc/systemd/network/10-kiln-wired.network",
        0o644,
        network_unit(plan),
    );
    // Enable networkd the way `systemctl enable` would, without running systemctl.
    for (target, unit) in [
        ("multi-user.target", "systemd-networkd.service"),
        ("sockets.target", "systemd-networkd.socket"),
        (
            "network-online.target",
            "systemd-networkd-wait-online.service",
        ),
    ] {
        enable(&mut t, target, unit, "usr/lib/systemd/system");
    }
    // Empty: systemd makes this node's own ID on first boot (one image, many machines).
    t.file("etc/machine-id", 0o444, "");
    // systemd moves the clock forward to this file's mtime at boot (stamped with the build
    // epoch), a floor for the RTC-less RK1 before NTP answers.
    t.file("usr/lib/clock-epoch", 0o644, "");
    t.file(
        "etc/systemd/timesyncd.conf.d/50-kiln.conf",
        0o644,
        timesyncd_conf(plan),
    );
    enable(
        &mut t,
        "sysinit.target",
        "systemd-timesyncd.service",
        "usr/lib/systemd/system",
    );
    // time-sync.target (k3s is ordered after it) waits for the first NTP answer on first
    // boot only, and for a bounded time (kiln-time-wait.sh).
    t.file("usr/lib/kiln/kiln-time-wait.sh", 0o755, TIME_WAIT_SH);
    t.file(
        "etc/systemd/system/kiln-time-wait.service",
        0o644,
        TIME_WAIT_UNIT,
    );
    enable(
        &mut t,
        "sysinit.target",
        "kiln-time-wait.service",
        "etc/systemd/system",
    );

    // Secrets: root-only, in the root filesystem only.
    t.dir("etc/kiln", 0o755);
    let mut tok = token.expose().to_string();
    tok.push('\n');
    t.file(TOKEN_PATH, 0o600, tok);
    t.dir("etc/rancher/node", 0o700);
    t.file(
        NODE_PASSWORD_PATH,
        0o600,
        token.node_password(&plan.node.name) + "\n",
    );

    // The cluster's CAs, only where k3s needs them before its first start: the server that
    // may start the cluster. Joining servers get them from the datastore (k3s
    // pkg/cluster/bootstrap.go), agents never. Root-only, in k3s's own 0700 directories.
    if let Some(bundle) = secrets.ca.bundle() {
        t.file(CLUSTER_CA_PATH, 0o644, bundle.to_vec());
    }
    if plan.may_initialise()
        && let Some(files) = secrets.ca.node_files()?
    {
        for d in ["var/lib/rancher", "var/lib/rancher/k3s"] {
            t.dir(d, 0o755);
        }
        t.dir("var/lib/rancher/k3s/server", 0o700);
        t.dir(K3S_TLS_DIR, 0o700);
        t.dir(&format!("{K3S_TLS_DIR}/etcd"), 0o700);
        for (rel, bytes) in files {
            t.file(&format!("{K3S_TLS_DIR}/{rel}"), 0o600, bytes);
        }
    }

    // Day two: the boot partition mounted, kernel updates synced onto it.
    super::boot::add(&mut t, plan);

    // First boot.
    t.file(
        "etc/kiln/node.env",
        0o644,
        node_env(plan, secrets.ca.bundle().is_some()),
    );
    t.file("usr/lib/kiln/kiln-firstboot.sh", 0o755, FIRSTBOOT_SH);
    t.file("usr/lib/kiln/kiln-join.sh", 0o755, JOIN_SH);
    // A system on a drive the BMC cannot write can be installed by itself from the eMMC
    // (`kiln flash --install`): the installer runs from this root, read-only.
    if plan.loader_on().is_some() {
        t.file("usr/lib/kiln/kiln-install", 0o755, INSTALL_SH);
    }
    t.file(
        "etc/systemd/system/kiln-firstboot.service",
        0o644,
        FIRSTBOOT_UNIT,
    );
    enable(
        &mut t,
        "multi-user.target",
        "kiln-firstboot.service",
        "etc/systemd/system",
    );
    t.file(
        "etc/systemd/system/ssh.service.d/50-kiln-host-keys.conf",
        0o644,
        SSH_DROPIN,
    );

    t.file("etc/kiln/node.json", 0o644, identity_json);
    if !plan.node.ssh_authorized_keys.is_empty() {
        t.dir("root/.ssh", 0o700);
        let mut keys = plan.node.ssh_authorized_keys.join("\n");
        keys.push('\n');
        t.file("root/.ssh/authorized_keys", 0o600, keys);
    }
    Ok(t)
}
