//! Waiting for a freshly flashed node to come up: servers answer `GET /ping` on the k3s API
//! port, agents answer on SSH.

use crate::config::inventory::{Node, Role};
use anyhow::{Result, bail};
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub const K3S_PORT: u16 = 6443;
pub const SSH_PORT: u16 = 22;

pub fn online(node: &Node, timeout: Duration) -> Result<()> {
    let (port, what) = match node.role {
        Role::Server => (K3S_PORT, "k3s to answer /ping"),
        Role::Agent => (SSH_PORT, "SSH to answer"),
    };
    let pb = crate::progress::spinner(format!(
        "{}: waiting for {what} on {}:{port}",
        node.name, node.ip
    ));
    let start = Instant::now();
    let addr = SocketAddr::new(IpAddr::V4(node.ip), port);
    loop {
        let up = match node.role {
            Role::Server => ping(addr),
            Role::Agent => ssh_banner(addr),
        };
        if up {
            pb.finish_and_clear();
            crate::progress::result(format!(
                "{}: up after {:.0} s ({what})",
                node.name,
                start.elapsed().as_secs_f64()
            ));
            return Ok(());
        }
        if start.elapsed() > timeout {
            pb.finish_and_clear();
            bail!(
                "{}: no answer from {addr} after {} s; expected {what}. Watch the console with `tpi uart -n SLOT get`",
                node.name,
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// `GET https://addr/ping` → `pong`. The certificate is not checked: this only asks whether
/// k3s is serving, and sends nothing secret.
fn ping(addr: SocketAddr) -> bool {
    let Ok(tls) = crate::tls::pinned(None) else {
        return false;
    };
    let agent = ureq::AgentBuilder::new()
        .tls_config(tls)
        .timeout(Duration::from_secs(5))
        .build();
    agent
        .get(&format!("https://{addr}/ping"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .is_some_and(|b| b.trim() == "pong")
}

fn ssh_banner(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut b = [0u8; 4];
    s.read_exact(&mut b).is_ok() && &b == b"SSH-"
}
