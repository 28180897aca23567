//! TEST DOUBLE: a fake Kubernetes API server on 127.0.0.1 (CA-signed certificate, bearer
//! token) holding Node objects, enough for `kiln reimage`: get/list/delete nodes. Deleting a
//! Node takes two more reads to finish, as k3s's etcd finalizer would. A node whose BMC slot
//! is powered on again after a flash comes back Ready with a new boot ID. With
//! [`FakeKube::watch_power`] it records whether a Node's slot was powered at its DELETE.
//!
//! By default the new boot appears at the first request after the power-on. With
//! [`FakeKube::stale_for`], a Node object that survived the reimage (an agent's, which
//! `kiln reimage` never deletes) is served unchanged — still Ready, still the old boot ID —
//! for that many GETs of it after the power-on, or for ever: as a real cluster serves the old
//! object until the new kubelet has registered and posted its status (the node controller
//! marks it Unknown only after its grace period, and not at all if the new kubelet is quick).
//! A deleted Node is gone (its kubelet is off), so it has no stale phase.

use super::http::{self, Request, Response};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub const TOKEN: &str = "kube-test-token";

#[derive(Default)]
pub struct KState {
    pub nodes: BTreeMap<String, Value>,
    pub deleting: BTreeMap<String, u32>,
    pub requests: Vec<Request>,
    /// Node name → its BMC slot (1-based) and the fake BMC's state.
    pub slots: BTreeMap<String, (usize, Arc<Mutex<super::bmc::State>>)>,
    /// Per DELETE: the Node's name and whether its slot was powered on then (`None`: not
    /// watched).
    pub power_at_delete: Vec<(String, Option<bool>)>,
    /// How long a surviving Node keeps its old boot after the power-on.
    pub stale: Stale,
    /// GETs of the revived Node (`/api/v1/nodes/<name>`) since its slot was flashed and
    /// powered on again, whatever they returned.
    pub reads_after_power_on: u32,
}

/// How long a Node object that survived the reimage is served unchanged (its old boot, as it
/// was) after the slot is flashed and powered on again.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Stale {
    /// The new boot appears at once (the default).
    #[default]
    No,
    /// For this many GETs of the Node; the next one shows the new boot.
    Reads(u32),
    /// The new boot never appears.
    Forever,
}

pub struct FakeKube {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub state: Arc<Mutex<KState>>,
}

pub fn node(name: &str, ip: &str, ready: bool, etcd: bool, boot: &str) -> Value {
    let mut labels = json!({});
    if etcd {
        labels = json!({"node-role.kubernetes.io/etcd": "true", "node-role.kubernetes.io/control-plane": "true"});
    }
    json!({"apiVersion":"v1","kind":"Node","metadata":{"name":name,"labels":labels},
           "status":{"addresses":[{"type":"InternalIP","address":ip}],
                     "nodeInfo":{"bootID":boot},
                     "conditions":[{"type":"Ready","status": if ready {"True"} else {"Unknown"}}]}})
}

impl FakeKube {
    /// `revive`: (node name, its BMC slot, the fake BMC, the node to return once it is back).
    pub fn start(nodes: Vec<Value>, revive: Option<Revive>) -> FakeKube {
        let ca = http::ca();
        let cert = http::leaf(Some(&ca));
        let state = state_of(nodes);
        let addr = http::serve(&cert, "127.0.0.1", 0, handler(state.clone(), revive));
        FakeKube {
            addr,
            ca_pem: ca.pem,
            state,
        }
    }

    /// Serving as a k3s cluster made with `kiln secrets init` would: a certificate signed by
    /// the cluster's server CA (`ca_dir/server-ca.*`), client certificates checked against
    /// every certificate of `ca_dir/client-ca.crt` (kube-apiserver's `--client-ca-file`), and
    /// only a client in group `system:masters` (the certificate's O) let in: the one group the
    /// tests' requests need, as RBAC would grant it everything.
    pub fn start_with_cluster_ca(
        nodes: Vec<Value>,
        revive: Option<Revive>,
        ca_dir: &std::path::Path,
    ) -> FakeKube {
        let read = |f: &str| std::fs::read_to_string(ca_dir.join(f)).unwrap();
        let server_ca = read("server-ca.pem");
        let cert = http::leaf_signed_by_pem(&server_ca, &read("server-ca.key"));
        let roots = kiln::secrets::ca::parse_pem_certs(read("client-ca.crt").as_bytes()).unwrap();
        let state = state_of(nodes);
        let addr = http::serve_mtls(
            &cert,
            &roots,
            "127.0.0.1",
            0,
            handler(state.clone(), revive),
        );
        FakeKube {
            addr,
            ca_pem: read("server-ca.crt"),
            state,
        }
    }
}

/// Node name, its BMC slot, the fake BMC, and the Node to return once it is back.
pub type Revive = (String, usize, Arc<Mutex<super::bmc::State>>, Value);

fn state_of(nodes: Vec<Value>) -> Arc<Mutex<KState>> {
    let mut st = KState::default();
    for n in nodes {
        st.nodes
            .insert(n["metadata"]["name"].as_str().unwrap().to_string(), n);
    }
    Arc::new(Mutex::new(st))
}

/// The client is let in: the bearer token, or a verified client certificate in
/// `system:masters`.
fn authorized(req: &Request) -> bool {
    if req.header("authorization") == Some(&format!("Bearer {TOKEN}")) {
        return true;
    }
    let Some(der) = &req.client_cert else {
        return false;
    };
    let Ok((_, c)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    c.subject()
        .iter_organization()
        .any(|o| o.as_str() == Ok("system:masters"))
}

fn handler(
    state: Arc<Mutex<KState>>,
    revive: Option<Revive>,
) -> impl Fn(Request) -> Response + Send + Sync + 'static {
    move |req| {
        let mut s = state.lock().unwrap();
        s.requests.push(req.clone());
        if !authorized(&req) {
            return Response::json(401, json!({"kind":"Status","message":"Unauthorized"}));
        }
        // Discovery, as kubectl asks before `get nodes`.
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/api") => {
                return Response::json(
                    200,
                    json!({"kind":"APIVersions","versions":["v1"],
                        "serverAddressByClientCIDRs":[{"clientCIDR":"0.0.0.0/0","serverAddress":"127.0.0.1"}]}),
                );
            }
            ("GET", "/apis") => {
                return Response::json(
                    200,
                    json!({"kind":"APIGroupList","apiVersion":"v1","groups":[]}),
                );
            }
            ("GET", "/api/v1") => {
                return Response::json(
                    200,
                    json!({"kind":"APIResourceList","groupVersion":"v1",
                        "resources":[{"name":"nodes","singularName":"","namespaced":false,"kind":"Node",
                                      "verbs":["delete","get","list"],"shortNames":["no"]}]}),
                );
            }
            _ => {}
        }
        if let Some((name, slot, bmc, back)) = &revive {
            let b = bmc.lock().unwrap();
            let flashed_and_on = b.power[*slot - 1] && !b.uploads.is_empty();
            if flashed_and_on && req.method == "GET" && req.path == format!("/api/v1/nodes/{name}")
            {
                s.reads_after_power_on += 1;
            }
            // The Node object from before, if it survived the reimage.
            let old = s.nodes.get(name).is_some_and(|n| {
                n["status"]["nodeInfo"]["bootID"] != back["status"]["nodeInfo"]["bootID"]
            });
            let held = old
                && match s.stale {
                    Stale::No => false,
                    Stale::Reads(n) => s.reads_after_power_on <= n,
                    Stale::Forever => true,
                };
            let missing = !s.nodes.contains_key(name);
            if flashed_and_on && (old || missing) && !held && !s.deleting.contains_key(name) {
                s.nodes.insert(name.clone(), back.clone());
            }
        }
        match (req.method.as_str(), req.path.strip_prefix("/api/v1/nodes")) {
            ("GET", Some("")) => Response::json(
                200,
                json!({"apiVersion":"v1","kind":"NodeList","metadata":{},"items": s.nodes.values().cloned().collect::<Vec<_>>()}),
            ),
            ("GET", Some(p)) => {
                let name = p.trim_start_matches('/').to_string();
                if let Some(n) = s.deleting.get(&name).copied() {
                    if n == 0 {
                        s.deleting.remove(&name);
                        s.nodes.remove(&name);
                    } else {
                        s.deleting.insert(name.clone(), n - 1);
                    }
                }
                match s.nodes.get(&name) {
                    Some(n) => Response::json(200, n.clone()),
                    None => Response::json(
                        404,
                        json!({"kind":"Status","message":format!("nodes \"{name}\" not found")}),
                    ),
                }
            }
            ("DELETE", Some(p)) => {
                let name = p.trim_start_matches('/').to_string();
                let on = s
                    .slots
                    .get(&name)
                    .map(|(slot, b)| b.lock().unwrap().power[*slot - 1]);
                s.power_at_delete.push((name.clone(), on));
                if s.nodes.contains_key(&name) {
                    s.deleting.insert(name, 2);
                    Response::json(200, json!({"kind":"Status","status":"Success"}))
                } else {
                    Response::json(404, json!({"kind":"Status","message":"not found"}))
                }
            }
            _ => Response::json(404, json!({"kind":"Status","message":"not found"})),
        }
    }
}

impl FakeKube {
    pub fn kubeconfig(&self) -> String {
        use base64::Engine;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: default\n  cluster:\n    server: https://{}\n    certificate-authority-data: {ca}\ncontexts:\n- name: default\n  context:\n    cluster: default\n    user: default\ncurrent-context: default\nusers:\n- name: default\n  user:\n    token: {TOKEN}\n",
            self.addr
        )
    }

    /// Records the power state of `name`'s slot (1-based) at every DELETE of that Node.
    pub fn watch_power(&self, name: &str, slot: usize, bmc: Arc<Mutex<super::bmc::State>>) {
        self.state
            .lock()
            .unwrap()
            .slots
            .insert(name.to_string(), (slot, bmc));
    }

    /// Serves a Node that survives the reimage with its old boot for `stale` after the power-on
    /// (see [`Stale`]).
    pub fn stale_for(&self, stale: Stale) {
        self.state.lock().unwrap().stale = stale;
    }

    pub fn reads_after_power_on(&self) -> u32 {
        self.state.lock().unwrap().reads_after_power_on
    }

    pub fn deletes(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.method == "DELETE")
            .map(|r| r.path.clone())
            .collect()
    }
}
