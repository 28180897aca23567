//! First-boot join decision (firstboot/kiln-join.sh), run by dash with a fake probe.
//!
//! TEST DOUBLE: the probe is a small script that "answers" for addresses listed in a file
//! (and "answers with a foreign certificate" for those in another), standing in for
//! `GET https://<ip>:6443/ping` against a real k3s server. The real probe (`kiln_probe`, curl
//! with the cluster CA) is run against `openssl s_server` serving certificates signed by the
//! CAs `kiln secrets init` made, by another cluster's CA, and self-signed.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "K10secret-token-never-printed";

struct Node {
    root: PathBuf,
    live: PathBuf,
}

impl Node {
    fn new(name: &str) -> Node {
        let root = std::env::temp_dir().join(format!("kiln-join-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("etc/kiln")).unwrap();
        std::fs::write(root.join("etc/kiln/token"), format!("{TOKEN}\n")).unwrap();
        let live = root.join("live-peers");
        std::fs::write(&live, "").unwrap();
        std::fs::write(root.join("foreign-peers"), "").unwrap();
        // The fake probe: 0 for addresses listed in `live`, 2 (a foreign certificate) for
        // those in `foreign-peers`, else 1 (no answer): kiln_probe's contract.
        let probe = root.join("fake-probe");
        std::fs::write(
            &probe,
            format!(
                "#!/bin/sh\ngrep -qx \"$1\" '{}' && exit 0\ngrep -qx \"$1\" '{}' && exit 2\nexit 1\n",
                live.display(),
                root.join("foreign-peers").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
        Node { root, live }
    }

    fn set_live(&self, ips: &[&str]) {
        std::fs::write(&self.live, ips.join("\n") + "\n").unwrap();
    }

    fn set_foreign(&self, ips: &[&str]) {
        std::fs::write(self.root.join("foreign-peers"), ips.join("\n") + "\n").unwrap();
    }

    fn command(&self, env: &[(&str, &str)]) -> Command {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("firstboot/kiln-join.sh");
        let mut c = Command::new("sh");
        c.arg(script).arg("--write");
        c.env("KILN_ROOT", &self.root)
            .env("KILN_RETRY_INTERVAL", "0.2")
            .env("KILN_INIT_WAIT", "1")
            .env("KILN_PROBE", self.root.join("fake-probe"));
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    fn run(&self, env: &[(&str, &str)]) -> Output {
        self.command(env).output().unwrap()
    }

    fn config(&self) -> Option<String> {
        std::fs::read_to_string(self.root.join("etc/rancher/k3s/config.yaml")).ok()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn server(node: &str, ip: &str, bootstrap: &str, mode: &str, peers: &str) -> Vec<(String, String)> {
    vec![
        ("KILN_NODE".into(), node.into()),
        ("KILN_IP".into(), ip.into()),
        ("KILN_ROLE".into(), "server".into()),
        ("KILN_BOOTSTRAP".into(), bootstrap.into()),
        ("KILN_MODE".into(), mode.into()),
        ("KILN_PEERS".into(), peers.into()),
    ]
}

fn env(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect()
}

fn assert_secret_file(n: &Node, out: &Output) {
    let meta = std::fs::metadata(n.root.join("etc/rancher/k3s/config.yaml")).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "config.yaml must be 0600"
    );
    let printed =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!printed.contains(TOKEN), "token printed:\n{printed}");
}

#[test]
fn fresh_cluster_bootstrap_initialises_after_bounded_wait() {
    let n = Node::new("fresh");
    let e = server(
        "rk1-1",
        "192.168.100.11",
        "1",
        "init",
        "192.168.100.12 192.168.100.13",
    );
    let t = Instant::now();
    let out = n.run(&env(&e));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "initialised without waiting for peers"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "init");
    let c = n.config().unwrap();
    assert!(c.contains("cluster-init: true"), "{c}");
    assert!(!c.contains("server:"), "{c}");
    assert!(
        c.contains("node-name: rk1-1") && c.contains("node-ip: 192.168.100.11"),
        "{c}"
    );
    assert!(c.contains(&format!("token: \"{TOKEN}\"")), "{c}");
    assert_secret_file(&n, &out);
}

#[test]
fn bootstrap_server_joins_when_a_peer_answers() {
    let n = Node::new("bootlive");
    n.set_live(&["192.168.100.13"]);
    for mode in ["init", "rejoin"] {
        let e = server(
            "rk1-1",
            "192.168.100.11",
            "1",
            mode,
            "192.168.100.12 192.168.100.13",
        );
        let out = n.run(&env(&e));
        assert!(out.status.success());
        let c = n.config().unwrap();
        assert!(
            c.contains("server: https://192.168.100.13:6443"),
            "{mode}: {c}"
        );
        assert!(
            !c.contains("cluster-init"),
            "{mode}: initialised with a live peer: {c}"
        );
        assert_secret_file(&n, &out);
    }
}

#[test]
fn reimaged_bootstrap_with_peers_down_waits_and_never_initialises() {
    let n = Node::new("rejoin-down");
    let e = server(
        "rk1-1",
        "192.168.100.11",
        "1",
        "rejoin",
        "192.168.100.12 192.168.100.13",
    );
    let mut child = n
        .command(&env(&e))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Well past KILN_INIT_WAIT (1 s): an init-mode image would have initialised by now.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        child.try_wait().unwrap().is_none(),
        "rejoin image stopped waiting"
    );
    assert!(
        n.config().is_none(),
        "rejoin image wrote a config with no peer up"
    );
    // A peer comes back: it joins it.
    n.set_live(&["192.168.100.12"]);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let c = n.config().unwrap();
    assert!(
        c.contains("server: https://192.168.100.12:6443") && !c.contains("cluster-init"),
        "{c}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("retrying"));
}

#[test]
fn non_bootstrap_server_waits_for_any_server_then_joins() {
    let n = Node::new("second");
    let e = server(
        "rk1-2",
        "192.168.100.12",
        "0",
        "init",
        "192.168.100.11 192.168.100.13",
    );
    let mut child = n
        .command(&env(&e))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "non-bootstrap server gave up or initialised"
    );
    n.set_live(&["192.168.100.11"]);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let c = n.config().unwrap();
    assert!(
        c.contains("server: https://192.168.100.11:6443") && !c.contains("cluster-init"),
        "{c}"
    );
}

#[test]
fn agent_joins_a_server_and_never_initialises() {
    let n = Node::new("agent");
    n.set_live(&["192.168.100.12"]);
    let mut e = server(
        "rk1-4",
        "192.168.100.14",
        "0",
        "init",
        "192.168.100.11 192.168.100.12 192.168.100.13",
    );
    e[2].1 = "agent".into();
    let out = n.run(&env(&e));
    assert!(out.status.success());
    let c = n.config().unwrap();
    assert!(
        c.contains("server: https://192.168.100.12:6443") && !c.contains("cluster-init"),
        "{c}"
    );
    // Even marked bootstrap (which kiln check refuses), an agent does not initialise.
    let n = Node::new("agent-alone");
    let mut e = server("rk1-4", "192.168.100.14", "1", "init", "");
    e[2].1 = "agent".into();
    let out = n.run(&env(&e));
    assert!(!out.status.success());
    assert!(n.config().is_none());
}

#[test]
fn staging_single_server_initialises_at_once() {
    let n = Node::new("staging");
    let e = server("pi5-staging", "192.168.100.10", "1", "init", "");
    let t = Instant::now();
    let out = n.run(&env(&e));
    assert!(out.status.success());
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "staging waited for peers it does not have"
    );
    let c = n.config().unwrap();
    assert!(
        c.contains("cluster-init: true") && c.contains("node-name: pi5-staging"),
        "{c}"
    );
    // A reimaged staging server (rejoin) has nobody to rejoin and must not silently init.
    let e = server("pi5-staging", "192.168.100.10", "1", "rejoin", "");
    let n = Node::new("staging-rejoin");
    assert!(!n.run(&env(&e)).status.success());
    assert!(n.config().is_none());
}

#[test]
fn a_bootstrap_server_neither_joins_nor_initialises_while_only_a_foreign_peer_answers() {
    let n = Node::new("foreign");
    n.set_foreign(&["192.168.100.12"]);
    let e = server(
        "rk1-1",
        "192.168.100.11",
        "1",
        "init",
        "192.168.100.12 192.168.100.13",
    );
    // KILN_INIT_WAIT is 1 s: well past it, the foreign answer still holds it back.
    let mut child = n
        .command(&env(&e))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        child.try_wait().unwrap().is_none(),
        "decided while only a foreign peer answered"
    );
    assert!(n.config().is_none(), "wrote a config");
    // The real server comes up: joined, never the foreign one.
    n.set_live(&["192.168.100.13"]);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "join https://192.168.100.13:6443"
    );
    assert!(
        err.contains("only peers with a foreign certificate answer (192.168.100.12): not joining them and not initialising while they answer"),
        "{err}"
    );
    let c = n.config().unwrap();
    assert!(c.contains("server: https://192.168.100.13:6443"), "{c}");
}

/// `openssl s_server` on 127.0.0.1 serving /ping with `cert`/`key`; killed when dropped.
struct TlsPeer(std::process::Child, u16);

impl Drop for TlsPeer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tls_peer(dir: &Path, cert: &Path, key: &Path) -> TlsPeer {
    std::fs::write(dir.join("ping"), "pong").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("openssl")
        .current_dir(dir)
        .args(["s_server", "-quiet", "-WWW", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "s_server did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    TlsPeer(child, port)
}

/// Runs the real `kiln_probe` against 127.0.0.1:`port` with the cluster CA `ca`.
fn probe(ca: &Path, port: u16) -> (i32, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("firstboot/kiln-join.sh");
    let o = Command::new("dash")
        .arg("-c")
        .arg(format!(". '{}'; kiln_probe 127.0.0.1", script.display()))
        .env("KILN_CA", ca)
        .env("KILN_API_PORT", port.to_string())
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[test]
fn the_real_probe_trusts_only_a_certificate_of_the_cluster_ca_naming_the_peer() {
    let ws = common::Workspace::new("probe-ca");
    for c in ["staging", "production"] {
        std::fs::remove_file(ws.path(&format!("secrets/{c}.token"))).unwrap();
    }
    common::assert_ok(&ws.kiln(&["secrets", "init"]), "secrets init");
    let prod = ws.path("secrets/production.ca");
    let bundle = prod.join("server-ca.crt");
    let d = ws.path("peers");
    std::fs::create_dir_all(&d).unwrap();

    let cases: [(&str, Option<PathBuf>, &str, i32); 4] = [
        ("cluster", Some(prod.clone()), "IP:127.0.0.1", 0),
        // Another cluster kiln made: its own root, so not this cluster.
        (
            "staging",
            Some(ws.path("secrets/staging.ca")),
            "IP:127.0.0.1",
            2,
        ),
        ("self-signed", None, "IP:127.0.0.1", 2),
        // The cluster's CA, but for another address (k3s names the node's IP).
        ("other-ip", Some(prod.clone()), "IP:192.168.100.99", 2),
    ];
    for (name, ca, san, want) in cases {
        let (crt, key) = common::serving_cert(&d, name, ca.as_deref(), san);
        let peer = tls_peer(&d, &crt, &key);
        let (code, err) = probe(&bundle, peer.1);
        assert_eq!(code, want, "{name}: {err}");
        if want == 2 {
            assert!(
                err.contains(
                    "peer 127.0.0.1 refused: its certificate does not chain to the cluster CA"
                ),
                "{name}: {err}"
            );
        }
    }
    // Nothing listening: no answer, not a foreign one.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, err) = probe(&bundle, port);
    assert_eq!(code, 1, "{err}");
}
