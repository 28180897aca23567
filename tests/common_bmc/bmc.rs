//! TEST DOUBLE: a fake Turing Pi 2 BMC implementing the legacy API (v1.1) that `tpi` and kiln
//! speak, per turing-machines/bmcd `api/legacy.rs` and ../shared/reference/turing-bmc-api.md:
//! authenticate, flash request (`length`, `sha256`), multipart upload, status polling,
//! cancel, power. It records every request so tests can compare clients, and it can misbehave
//! on purpose (send timeout, lost bytes, flash error, a hung flash). It never writes anywhere:
//! an uploaded `.xz` is decompressed in memory only to hash what would reach the eMMC.
//!
//! Like bmcd (`streaming_data_service.rs`, `upgrade_worker.rs`) it runs one transfer at a time
//! and takes time doing it (`State::pace` per step):
//! - a new flash request replaces a running transfer: the old one is dropped, its upload fails
//!   with "transfer canceled", and the status shows the new transfer's id;
//! - `GET /upload/<any handle>/cancel` cancels whatever runs: `{"Error":"cancelled by user"}`;
//! - `bytes_written` counts decompressed bytes written to the eMMC (against `size`, the
//!   compressed upload length), grows while the upload streams in, and starts again from 0
//!   for the CRC read-back; the upload is answered shortly before the write pass ends.

use super::http::{self, Cert, Request, Response, first_part};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const USER: &str = "root";
pub const PASSWORD: &str = "turing-test-pw";
const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// Steps of the write pass (the last one after the upload is answered) and of the read-back.
const WRITE_STEPS: u64 = 4;
const VERIFY_STEPS: u64 = 4;

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
    /// The transfer (handle) it belongs to.
    pub handle: u64,
    /// How the upload request was answered: `None` while the write pass runs, then `Ok` or
    /// the error it got (e.g. "transfer canceled" when a new request dropped its transfer).
    pub answer: Option<Result<(), String>>,
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
    process: String,
    /// Bumped by every flash request and cancel: a transfer runs while it is unchanged.
    /// (Handles are 4242 + node, so the same slot gets the same handle again.)
    generation: u64,
    /// Time per simulated write or read-back step.
    pub pace: Duration,
    /// Every status answered to `opt=get&type=flash`, in order.
    pub statuses: Vec<serde_json::Value>,
    /// Transfers a new flash request dropped while they ran.
    pub dropped: Vec<u64>,
    pub bad_usb_modes: Vec<String>,
}

impl State {
    /// The running transfer's id and bytes_written, if one runs.
    pub fn transferring(&self) -> Option<(u64, u64)> {
        let t = self.status.get("Transferring")?;
        Some((t["id"].as_u64()?, t["bytes_written"].as_u64()?))
    }

    pub fn status(&self) -> serde_json::Value {
        self.status.clone()
    }

    /// Puts a transfer in progress as another client would have started it (bmcd's form).
    pub fn inject_transfer(&mut self, node: u8, id: u64, size: u64, bytes_written: u64) {
        self.handle = Some(id);
        self.length = size;
        self.process = process_name(node);
        self.set_written(bytes_written);
    }

    fn set_written(&mut self, bytes_written: u64) {
        self.status = json!({"Transferring": {"id": self.handle.unwrap_or(0),
            "process_name": self.process, "size": self.length, "cancelled": false,
            "bytes_written": bytes_written}});
    }

    /// Whether the transfer `id` of `generation` still runs (not replaced, cancelled or
    /// failed).
    fn running(&self, id: u64, generation: u64) -> bool {
        self.generation == generation
            && self.handle == Some(id)
            && self.transferring().is_some_and(|(t, _)| t == id)
    }
}

/// bmcd's `format!("{node} os install service")`, where a NodeId displays as `Node 2`.
fn process_name(node: u8) -> String {
    format!("Node {} os install service", node + 1)
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
            pace: Duration::from_millis(40),
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

fn handle(st: &Arc<Mutex<State>>, mode: Mode, req: Request) -> Response {
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
        if rest.ends_with("/cancel") {
            // bmcd's cancel_all(): the handle in the path is not even looked at.
            s.status = json!({"Error": "cancelled by user"});
            s.handle = None;
            s.generation += 1;
            return Response::text(200, "");
        }
        drop(s);
        return upload(st, mode, rest, &req);
    }
    let opt = req.param("opt").unwrap_or("");
    let ty = req.param("type").unwrap_or("");
    match (opt, ty) {
        ("set", "flash") => {
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
            // bmcd's request_transfer(): the running transfer's context is dropped, which
            // cancels it; no error is recorded for it, the status simply becomes the new one.
            if let Some((old, _)) = s.transferring() {
                s.dropped.push(old);
            }
            let handle = 4242 + u64::from(node);
            s.generation += 1;
            s.handle = Some(handle);
            s.length = length;
            s.file = file.to_string();
            s.sha256 = req.param("sha256").map(str::to_string);
            s.process = process_name(node);
            if mode == Mode::SendTimeout {
                s.status = json!({"Error": "Send timeout"});
            } else {
                s.set_written(0);
            }
            // bmcd answers with a JSON string body.
            Response::text(200, &json!({"handle": handle}).to_string())
        }
        ("get", "flash") => {
            let status = s.status.clone();
            s.statuses.push(status.clone());
            Response::text(200, &status.to_string())
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

fn upload(st: &Arc<Mutex<State>>, mode: Mode, handle: &str, req: &Request) -> Response {
    let mut s = st.lock().unwrap();
    let generation = s.generation;
    let Some(id) = s.handle.filter(|h| h.to_string() == handle) else {
        return if s.transferring().is_some() {
            legacy(400, "unauthorized request for handle")
        } else {
            legacy(400, "cannot execute command in current state")
        };
    };
    if mode == Mode::SendTimeout {
        return legacy(400, "cannot execute command in current state");
    }
    let Some((field, mut data)) = first_part(req) else {
        return legacy(400, "Multipart form invalid");
    };
    // What the eMMC would get: the decompressed stream for `.xz`, else the bytes as sent.
    let written = if s.file.ends_with(".xz") {
        let mut d = liblzma::read::XzDecoder::new_multi_decoder(&data[..]);
        let mut out = Vec::new();
        use std::io::Read;
        d.read_to_end(&mut out).ok().map(|_| out)
    } else {
        None
    };
    let written_sha256 = written.as_deref().map(sha_hex);
    let raw_len = written.as_ref().map_or(data.len(), Vec::len) as u64;
    s.uploads.push(Upload {
        path: req.path.clone(),
        field,
        content_type: req.header("content-type").unwrap_or("").to_string(),
        part_len: data.len(),
        part_sha256: sha_hex(&data),
        written_sha256,
        chunked: req.chunked,
        handle: id,
        answer: None,
    });
    let idx = s.uploads.len() - 1;
    let answer = |s: &mut State, r: Result<(), String>| s.uploads[idx].answer = Some(r);
    if let Mode::LoseBytes(n) = mode {
        data.truncate(data.len().saturating_sub(n));
    }
    if data.len() as u64 != s.length {
        let missing = s.length.saturating_sub(data.len() as u64);
        s.status = json!({"Error": "transfer canceled"});
        s.handle = None;
        let msg = format!("missing {missing} B bytes");
        answer(&mut s, Err(msg.clone()));
        return legacy(400, &msg);
    }
    if let Some(expected) = &s.sha256
        && *expected != sha_hex(&data)
    {
        s.status = json!({"Error": "sha256 checksum mismatch of uploaded image"});
        answer(&mut s, Err("sha256 checksum mismatch".into()));
        return legacy(500, "sha256 checksum mismatch of uploaded image");
    }
    match mode {
        Mode::FlashError => {
            s.status = json!({"Error": "Compute module not supported"});
            answer(&mut s, Ok(()));
            return Response::text(200, "");
        }
        Mode::Hang => {
            answer(&mut s, Ok(()));
            return Response::text(200, "");
        }
        _ => {}
    }
    // The write pass, while the upload streams in: bmcd writes chunks as they arrive and
    // answers the upload once the last one is in its buffer, a step before the write ends.
    let pace = s.pace;
    drop(s);
    for step in 1..WRITE_STEPS {
        std::thread::sleep(pace);
        let mut s = st.lock().unwrap();
        if !s.running(id, generation) {
            // Dropped by a new request or cancelled: the upload fails as bmcd's does.
            let msg = s
                .status
                .get("Error")
                .and_then(|e| e.as_str())
                .unwrap_or("transfer canceled")
                .to_string();
            answer(&mut s, Err(msg.clone()));
            return legacy(500, &msg);
        }
        s.set_written(raw_len * step / WRITE_STEPS);
    }
    answer(&mut st.lock().unwrap(), Ok(()));
    let st = st.clone();
    std::thread::spawn(move || {
        // The end of the write pass, then the CRC read-back counting from 0 again, then Done.
        let steps = std::iter::once(raw_len)
            .chain((1..=VERIFY_STEPS).map(|step| raw_len * step / VERIFY_STEPS));
        for bytes in steps {
            std::thread::sleep(pace);
            let mut s = st.lock().unwrap();
            if !s.running(id, generation) {
                return;
            }
            s.set_written(bytes);
        }
        std::thread::sleep(pace);
        let mut s = st.lock().unwrap();
        if s.running(id, generation) {
            let len = s.length;
            s.status = json!({"Done": [{"secs": 1, "nanos": 0}, len]});
        }
    });
    Response::text(200, "")
}
