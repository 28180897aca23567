//! TEST DOUBLE: a stand-in for the k3s release. The "binary" is a shell script and the "airgap
//! images" a small zstd tarball; neither is k3s. A loopback HTTP server serves them the way the
//! release page does (`/<version>/<asset>`, with a sha256sum file), so kiln's real download
//! path runs against it. Never listens on anything but 127.0.0.1.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub const STANDIN_MARK: &str = "kiln-test-double: stand-in for k3s";

/// The stand-in k3s "binary": records how it was started (test double).
pub fn standin_binary() -> Vec<u8> {
    format!("#!/bin/sh\n# {STANDIN_MARK}; not k3s.\necho \"k3s stand-in $*\" >&2\nexit 0\n")
        .into_bytes()
}

/// A small zstd tar as the stand-in airgap images.
pub fn standin_images() -> Vec<u8> {
    let mut raw = Vec::new();
    {
        let mut b = tar::Builder::new(&mut raw);
        let data = format!("{STANDIN_MARK}: no container images here\n");
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "manifest.txt", data.as_bytes())
            .unwrap();
        b.finish().unwrap();
    }
    zstd::encode_all(raw.as_slice(), 3).unwrap()
}

pub fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Writes the stand-ins into `dir` for `--artifact` use.
pub fn write_standins(dir: &Path) {
    std::fs::write(dir.join("k3s-standin"), standin_binary()).unwrap();
    std::fs::write(
        dir.join("k3s-airgap-images-arm64.tar.zst"),
        standin_images(),
    )
    .unwrap();
}

pub fn artifact_args(dir: &Path) -> Vec<String> {
    vec![
        "--artifact".into(),
        format!("k3s={}", dir.join("k3s-standin").display()),
        "--artifact".into(),
        format!(
            "k3s-images={}",
            dir.join("k3s-airgap-images-arm64.tar.zst").display()
        ),
    ]
}

/// Served assets: URL path and bytes.
pub type Files = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

#[derive(Debug, Clone)]
pub struct Hit {
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
}

/// The release server (test double). `files` maps an asset's URL path to its bytes.
pub struct Release {
    pub url: String,
    pub hits: Arc<Mutex<Vec<Hit>>>,
    pub files: Files,
    /// Close the connection after this many body bytes of the next response whose path ends
    /// with the given suffix (a cut download).
    pub cut_after: Arc<Mutex<Option<(String, usize)>>>,
}

impl Release {
    /// Serves the stand-ins as release `version` for arm64 (path-encoded as a client must).
    pub fn start(encoded_version: &str) -> Release {
        let bin = standin_binary();
        let img = standin_images();
        let sums = format!(
            "{}  k3s-arm64\n{}  k3s-airgap-images-arm64.tar.zst\n{}  k3s\n",
            sha256(&bin),
            sha256(&img),
            sha256(b"amd64 not served")
        );
        let files = vec![
            (format!("/{encoded_version}/k3s-arm64"), bin),
            (
                format!("/{encoded_version}/k3s-airgap-images-arm64.tar.zst"),
                img,
            ),
            (
                format!("/{encoded_version}/sha256sum-arm64.txt"),
                sums.into_bytes(),
            ),
        ];
        Self::serve(files)
    }

    pub fn serve(files: Vec<(String, Vec<u8>)>) -> Release {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(Mutex::new(Vec::new()));
        let files = Arc::new(Mutex::new(files));
        let cut_after: Arc<Mutex<Option<(String, usize)>>> = Arc::new(Mutex::new(None));
        let (h, f, c) = (hits.clone(), files.clone(), cut_after.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut range = None;
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = l.split_once(':')
                        && k.eq_ignore_ascii_case("range")
                    {
                        range = Some(v.trim().to_string());
                    }
                }
                let body = f
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(p, _)| *p == path)
                    .map(|(_, b)| b.clone());
                let (status, head, payload) = match body {
                    None => (404, "HTTP/1.1 404 Not Found\r\n".to_string(), Vec::new()),
                    Some(b) => match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                        Some(spec) => {
                            let from: usize = spec.trim_end_matches('-').parse().unwrap();
                            if from >= b.len() {
                                (
                                    416,
                                    "HTTP/1.1 416 Range Not Satisfiable\r\n".into(),
                                    Vec::new(),
                                )
                            } else {
                                (
                                    206,
                                    format!(
                                        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{}\r\n",
                                        b.len() - 1,
                                        b.len()
                                    ),
                                    b[from..].to_vec(),
                                )
                            }
                        }
                        None => (200, "HTTP/1.1 200 OK\r\n".into(), b),
                    },
                };
                h.lock().unwrap().push(Hit {
                    path: path.clone(),
                    range: range.clone(),
                    status,
                });
                let cut = {
                    let mut g = c.lock().unwrap();
                    match g.as_ref() {
                        Some((suffix, n)) if path.ends_with(suffix.as_str()) => {
                            let n = *n;
                            *g = None;
                            Some(n)
                        }
                        _ => None,
                    }
                };
                let _ = write!(
                    s,
                    "{head}Content-Length: {}\r\nConnection: close\r\n\r\n",
                    payload.len()
                );
                let n = cut.unwrap_or(payload.len()).min(payload.len());
                let _ = s.write_all(&payload[..n]);
                let _ = s.flush();
                // Dropping both handles closes the connection: that ends the (cut) response.
            }
        });
        Release {
            url,
            hits,
            files,
            cut_after,
        }
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Replaces an asset's bytes (e.g. a tampered download).
    pub fn replace(&self, path_suffix: &str, bytes: Vec<u8>) {
        let mut f = self.files.lock().unwrap();
        for (p, b) in f.iter_mut() {
            if p.ends_with(path_suffix) {
                *b = bytes.clone();
            }
        }
    }
}

/// Points a workspace inventory's `[k3s]` at a release server.
pub fn set_release(inventory: &Path, url: &str) -> PathBuf {
    let s = std::fs::read_to_string(inventory).unwrap();
    let start = s.find("[k3s]").expect("inventory has a [k3s] table");
    let end = s[start..]
        .find("\n\n")
        .map(|e| start + e)
        .unwrap_or(s.len());
    let new = format!(
        "{}[k3s]\nversion = \"v1.33.5+k3s1\"\nrelease_url = \"{url}\"{}",
        &s[..start],
        &s[end..]
    );
    std::fs::write(inventory, new).unwrap();
    inventory.to_path_buf()
}
