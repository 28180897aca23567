//! Test double support: a tiny HTTPS/1.1 server on 127.0.0.1 with a self-signed certificate
//! generated per test (rcgen), for the fake BMC, the fake Kubernetes API and the fake k3s
//! `/ping`. Never listens on anything but loopback.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Query pairs in the order sent; key-only parameters have an empty value.
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub chunked: bool,
    /// The client's certificate (DER), when the server asked for one and it verified.
    pub client_cert: Option<Vec<u8>>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: &'static str,
}

impl Response {
    pub fn json(status: u16, v: serde_json::Value) -> Response {
        Response {
            status,
            body: v.to_string().into_bytes(),
            content_type: "application/json",
        }
    }
    pub fn text(status: u16, s: &str) -> Response {
        Response {
            status,
            body: s.as_bytes().to_vec(),
            content_type: "text/plain",
        }
    }
}

/// A certificate for 127.0.0.1/localhost; `issuer` signs it (else it is self-signed).
pub struct Cert {
    pub der: Vec<u8>,
    pub pem: String,
    pub key_der: Vec<u8>,
    pub sha256_colons: String,
}

pub struct Ca {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

pub fn ca() -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "k3s-server-ca (test double)");
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: rcgen::Issuer::new(p, key),
    }
}

pub fn leaf(ca: Option<&Ca>) -> Cert {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = match ca {
        Some(ca) => p.signed_by(&key, &ca.issuer).unwrap(),
        None => p.self_signed(&key).unwrap(),
    };
    let der = cert.der().to_vec();
    let fp = Sha256::digest(&der);
    Cert {
        pem: cert.pem(),
        sha256_colons: fp
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":"),
        der,
        key_der: key.serialize_der(),
    }
}

/// A certificate for 127.0.0.1/localhost signed by a CA on disk (`ca_pem`: its certificate,
/// `key_pem`: its key), e.g. a cluster's server CA that `kiln secrets init` made.
pub fn leaf_signed_by_pem(ca_pem: &str, key_pem: &str) -> Cert {
    let ca_key = rcgen::KeyPair::from_pem(key_pem).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(ca_pem, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = p.signed_by(&key, &issuer).unwrap();
    let der = cert.der().to_vec();
    Cert {
        pem: cert.pem(),
        sha256_colons: String::new(),
        der,
        key_der: key.serialize_der(),
    }
}

/// Serves `handler` over HTTPS on `ip:port` (port 0: any) until the process ends.
pub fn serve<H>(cert: &Cert, ip: &str, port: u16, handler: H) -> SocketAddr
where
    H: Fn(Request) -> Response + Send + Sync + 'static,
{
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone())),
        )
        .unwrap();
    serve_with(cfg, ip, port, handler)
}

/// Like [`serve`], asking for a client certificate that chains to one of `client_roots` (as
/// kube-apiserver's `--client-ca-file`: every certificate of the file is trusted); requests
/// without one still reach `handler` (it decides, as the API server's authenticator does).
pub fn serve_mtls<H>(
    cert: &Cert,
    client_roots: &[Vec<u8>],
    ip: &str,
    port: u16,
    handler: H,
) -> SocketAddr
where
    H: Fn(Request) -> Response + Send + Sync + 'static,
{
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for r in client_roots {
        roots.add(CertificateDer::from(r.clone())).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .unwrap();
    let cfg = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(cert.der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone())),
        )
        .unwrap();
    serve_with(cfg, ip, port, handler)
}

fn serve_with<H>(cfg: rustls::ServerConfig, ip: &str, port: u16, handler: H) -> SocketAddr
where
    H: Fn(Request) -> Response + Send + Sync + 'static,
{
    let cfg = Arc::new(cfg);
    let listener = TcpListener::bind((ip, port)).unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            let cfg = cfg.clone();
            let handler = handler.clone();
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                    return;
                };
                let tls = rustls::StreamOwned::new(conn, s);
                let mut r = BufReader::new(tls);
                while let Some(mut req) = read_request(&mut r) {
                    req.client_cert = r
                        .get_ref()
                        .conn
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.to_vec());
                    let close = req
                        .header("connection")
                        .is_some_and(|c| c.eq_ignore_ascii_case("close"));
                    let resp = handler(req);
                    let head = format!(
                        "HTTP/1.1 {} X\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
                        resp.status,
                        resp.content_type,
                        resp.body.len()
                    );
                    let w = r.get_mut();
                    if w.write_all(head.as_bytes()).is_err()
                        || w.write_all(&resp.body).is_err()
                        || w.flush().is_err()
                    {
                        return;
                    }
                    if close {
                        w.conn.send_close_notify();
                        let _ = w.flush();
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match h {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_request<R: BufRead>(r: &mut R) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let chunked = get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut sz = String::new();
            r.read_line(&mut sz).ok()?;
            let n = usize::from_str_radix(sz.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body = vec![0u8; n];
        r.read_exact(&mut body).ok()?;
    }
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (pct_decode(k), pct_decode(v)),
            None => (pct_decode(p), String::new()),
        })
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        headers,
        body,
        chunked,
        client_cert: None,
    })
}

/// The first part of a multipart/form-data body: (field name, data).
pub fn first_part(req: &Request) -> Option<(String, Vec<u8>)> {
    let ct = req.header("content-type")?;
    let boundary = ct.split("boundary=").nth(1)?.trim_matches('"');
    let delim = format!("--{boundary}");
    let body = &req.body;
    let start = find(body, delim.as_bytes())? + delim.len() + 2;
    let head_end = start + find(&body[start..], b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&body[start..head_end]).to_string();
    let name = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("content-disposition"))?
        .split("name=\"")
        .nth(1)?
        .split('"')
        .next()?
        .to_string();
    let data_start = head_end + 4;
    let end = data_start + find(&body[data_start..], format!("\r\n{delim}").as_bytes())?;
    Some((name, body[data_start..end].to_vec()))
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}
