//! TEST DOUBLE: a fake Turing Pi 2 BMC implementing the legacy API (v1.1) that `tpi` and kiln
//! speak, per turing-machines/bmcd `api/legacy.rs` and ../shared/reference/turing-bmc-api.md:
//! authenticate, flash request (`length`, `sha256`), multipart upload, status polling,
//! cancel, power. It records every request so tests can compare clients, and it can misbehave
//! on purpose (send timeout, lost bytes, flash error, a hung flash). It never writes anywhere:
//! an uploaded `.xz` is decompressed in memory only to hash what would reach the eMMC.

use super::http::{self, Cert, Request, Response, first_part};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub const USER: &str = "root";
pub const PASSWORD: &str = "turing-test-pw";
const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Normal,
    /// The upload arrives too late: the BMC has already given up ("Send timeout").
    SendTimeout,
    /// The connection loses this many bytes of the part: "missing N bytes".
    LoseBytes(usize),
    /// Writing fails after the upload (e.g. the module is not detected).
    FlashError,
    /// The flash never progresses.
    Hang,
}

/// What the fake saw of one upload.
#[derive(Debug, Clone)]
pub struct Upload {
    pub path: String,
    pub field: String,
    pub content_type: String,
    pub part_len: usize,
    pub part_sha256: String,
    /// sha256 of the decompressed stream (what the eMMC would get), for `.xz` files.
    pub written_sha256: Option<String>,
    pub chunked: bool,
}

#[derive(Default)]
pub struct State {
    pub requests: Vec<Request>,
    pub uploads: Vec<Upload>,
    pub power: [bool; 4],
    status: serde_json::Value,
    handle: Option<u64>,
    length: u64,
    file: String,
    sha256: Option<String>,
    done_after_polls: Option<u32>,
    pub bad_usb_modes: Vec<String>,
}

pub struct FakeBmc {
    pub addr: SocketAddr,
    pub cert: Cert,
    pub state: Arc<Mutex<State>>,
}

fn legacy(status: u16, msg: &str) -> Response {
    Response::json(status, json!({"response":[{"result": msg}]}))
}

fn sha_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

impl FakeBmc {
    pub fn start(mode: Mode) -> FakeBmc {
        let cert = http::leaf(None);
        let state = Arc::new(Mutex::new(State {
            status: json!("Ready"),
            ..Default::default()
        }));
        let st = state.clone();
        let addr = http::serve(&cert, "127.0.0.1", 0, move |req| handle(&st, mode, req));
        FakeBmc { addr, cert, state }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn uploads(&self) -> Vec<Upload> {
        self.state.lock().unwrap().uploads.clone()
    }

    /// Requests with `type=power` and `opt=set`, as (key, value) of the node parameter.
    pub fn power_sets(&self) -> Vec<(String, String)> {
        self.requests()
            .iter()
            .filter(|r| r.param("type") == Some("power") && r.param("opt") == Some("set"))
            .flat_map(|r| {
                r.query
                    .iter()
                    .filter(|(k, _)| k.starts_with("node"))
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

fn handle(st: &Mutex<State>, mode: Mode, req: Request) -> Response {
    let mut s = st.lock().unwrap();
    s.requests.push(req.clone());
    if req.method == "POST" && req.path == "/api/bmc/authenticate" {
        let v: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
        if v["username"] == USER && v["password"] == PASSWORD {
            return Response::json(200, json!({"id": TOKEN, "expires_in": 10800}));
        }
        return Response::text(403, "Invalid credentials");
    }
    if !req.path.starts_with("/api/bmc") {
        return Response::text(404, "not found");
    }
    if req.header("authorization") != Some(&format!("Bearer {TOKEN}")) {
        return Response::text(401, "Unauthorized");
    }
    if let Some(rest) = req.path.strip_prefix("/api/bmc/upload/") {
        if let Some(h) = rest.strip_suffix("/cancel") {
            if s.handle.map(|x| x.to_string()).as_deref() == Some(h) {
                s.status = json!({"Error": "cancelled"});
                s.handle = None;
            }
            return Response::text(200, "");
        }
        return upload(&mut s, mode, rest, &req);
    }
    let opt = req.param("opt").unwrap_or("");
    let ty = req.param("type").unwrap_or("");
    match (opt, ty) {
        ("set", "flash") => {
            if s.status.get("Transferring").is_some() {
                return legacy(503, "another flashing operation in progress");
            }
            let Some(node) = req
                .param("node")
                .and_then(|n| n.parse::<u8>().ok())
                .filter(|n| *n < 4)
            else {
                return legacy(400, "Parameter `node` is not a number");
            };
            let Some(file) = req.param("file") else {
                return legacy(400, "Invalid `file` query parameter");
            };
            let Some(length) = req.param("length").and_then(|l| l.parse::<u64>().ok()) else {
                return legacy(411, "Invalid `length` query parameter");
            };
            if let Some(sha) = req.param("sha256")
                && (sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return legacy(400, "`sha256` parameter contains invalid hex values");
            }
            let handle = 4242 + u64::from(node);
            s.handle = Some(handle);
            s.length = length;
            s.file = file.to_string();
            s.sha256 = req.param("sha256").map(str::to_string);
            s.done_after_polls = None;
            s.status = if mode == Mode::SendTimeout {
                json!({"Error": "Send timeout"})
            } else {
                json!({"Transferring": {"id": handle, "process_name": format!("Node{} os install service", node + 1),
                       "size": length, "cancelled": false, "bytes_written": 0}})
            };
            // bmcd answers with a JSON string body.
            Response::text(200, &json!({"handle": handle}).to_string())
        }
        ("get", "flash") => {
            if let Some(n) = s.done_after_polls {
                if n == 0 {
                    let len = s.length;
                    s.status = json!({"Done": [{"secs": 1, "nanos": 0}, len]});
                    s.done_after_polls = None;
                } else {
                    s.done_after_polls = Some(n - 1);
                }
            }
            Response::text(200, &s.status.to_string())
        }
        ("set", "power") => {
            for i in 0..4 {
                match req.param(&format!("node{}", i + 1)) {
                    Some("1") => s.power[i] = true,
                    Some("0") => s.power[i] = false,
                    Some(x) => {
                        return legacy(
                            400,
                            &format!("Invalid value `{x}` for parameter `node{}`", i + 1),
                        );
                    }
                    None => {}
                }
            }
            legacy(200, "ok")
        }
        ("get", "power") => {
            let p = |i: usize| if s.power[i] { "1" } else { "0" };
            Response::json(
                200,
                json!({"response":[{"result":[{"node1":p(0),"node2":p(1),"node3":p(2),"node4":p(3)}]}]}),
            )
        }
        ("set", "usb") => {
            let m = req.param("mode").unwrap_or("").to_string();
            if m == "3" || m == "7" {
                // bmcd hits unreachable!() here; the connection just dies.
                s.bad_usb_modes.push(m);
                return Response::text(500, "bmcd panicked");
            }
            legacy(200, "ok")
        }
        _ => legacy(400, &format!("Invalid `type` parameter {ty}")),
    }
}

fn upload(s: &mut State, mode: Mode, handle: &str, req: &Request) -> Response {
    if s.handle.map(|h| h.to_string()).as_deref() != Some(handle) || mode == Mode::SendTimeout {
        return legacy(400, "cannot execute command in current state");
    }
    let Some((field, mut data)) = first_part(req) else {
        return legacy(400, "Multipart form invalid");
    };
    let written_sha256 = if s.file.ends_with(".xz") {
        let mut d = liblzma::read::XzDecoder::new_multi_decoder(&data[..]);
        let mut h = Sha256::new();
        let mut out = Vec::new();
        use std::io::Read;
        if d.read_to_end(&mut out).is_ok() {
            h.update(&out);
            Some(h.finalize().iter().map(|x| format!("{x:02x}")).collect())
        } else {
            None
        }
    } else {
        None
    };
    s.uploads.push(Upload {
        path: req.path.clone(),
        field,
        content_type: req.header("content-type").unwrap_or("").to_string(),
        part_len: data.len(),
        part_sha256: sha_hex(&data),
        written_sha256,
        chunked: req.chunked,
    });
    if let Mode::LoseBytes(n) = mode {
        data.truncate(data.len().saturating_sub(n));
    }
    if data.len() as u64 != s.length {
        let missing = s.length.saturating_sub(data.len() as u64);
        s.status = json!({"Error": "transfer canceled"});
        s.handle = None;
        return legacy(400, &format!("missing {missing} B bytes"));
    }
    if let Some(expected) = &s.sha256
        && *expected != sha_hex(&data)
    {
        s.status = json!({"Error": "sha256 checksum mismatch of uploaded image"});
        return legacy(500, "sha256 checksum mismatch of uploaded image");
    }
    let len = s.length;
    let id = s.handle.unwrap_or(0);
    match mode {
        Mode::FlashError => s.status = json!({"Error": "Compute module not supported"}),
        Mode::Hang => {}
        _ => {
            s.status = json!({"Transferring": {"id": id, "process_name": "os install service", "size": len,
                              "cancelled": false, "bytes_written": len}});
            s.done_after_polls = Some(1);
        }
    }
    Response::text(200, "")
}
