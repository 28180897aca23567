//! Client for the Turing Pi 2 BMC's legacy HTTP API (version 1.1), the API the official `tpi`
//! CLI speaks: authenticate, request a flash, stream the image as multipart, poll the status,
//! switch node power. Requests are shaped like tpi's (same endpoints, parameter names and
//! order, multipart field), so a BMC that works with tpi works with kiln.
//!
//! kiln never sends `type=usb`: the BMC's flash routine switches USB itself, and USB modes 3
//! and 7 crash bmcd.

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use std::io::Read;
use std::time::Duration;

/// A logged-in session with the BMC.
#[derive(Clone)]
pub struct Bmc {
    agent: ureq::Agent,
    /// `https://host[:port]/api/bmc`
    base: String,
    host: String,
    token: String,
}

/// Where the BMC's flash service is, from `GET ?opt=get&type=flash`.
#[derive(Debug, Clone, PartialEq)]
pub enum FlashStatus {
    Ready,
    Transferring {
        id: u64,
        /// What bmcd is doing, e.g. `Node 2 os install service` (slot 2) or `firmware upgrade
        /// service`. The status does not name the file.
        process: String,
        /// Length of the upload (for `.xz`: the compressed length).
        size: u64,
        /// Bytes written to the eMMC (for `.xz`: decompressed); starts again from 0 for the
        /// CRC read-back. Not comparable with `size`: see [`super::phase`].
        bytes_written: u64,
        cancelled: bool,
    },
    Done {
        size: u64,
    },
    Error(String),
}

impl FlashStatus {
    pub fn parse(v: &Value) -> Result<FlashStatus> {
        if v.as_str() == Some("Ready") {
            return Ok(FlashStatus::Ready);
        }
        if let Some(t) = v.get("Transferring") {
            let num = |k: &str| t.get(k).and_then(Value::as_u64).unwrap_or(0);
            return Ok(FlashStatus::Transferring {
                id: num("id"),
                process: t
                    .get("process_name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                size: num("size"),
                bytes_written: num("bytes_written"),
                cancelled: t.get("cancelled").and_then(Value::as_bool).unwrap_or(false),
            });
        }
        if let Some(d) = v.get("Done") {
            return Ok(FlashStatus::Done {
                size: d.get(1).and_then(Value::as_u64).unwrap_or(0),
            });
        }
        if let Some(e) = v.get("Error") {
            return Ok(FlashStatus::Error(
                e.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| e.to_string()),
            ));
        }
        bail!(
            "unexpected flash status from the BMC: {v}; expected Ready, Transferring, Done or Error"
        )
    }
}

/// The message in a legacy error body `{"response":[{"result":"..."}]}`, else the body itself.
fn legacy_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            v.get("response")?
                .get(0)?
                .get("result")?
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_else(|| body.trim().to_string())
}

impl Bmc {
    /// Connects and authenticates. `tls` decides which certificate is accepted.
    pub fn login(
        host: &str,
        user: &str,
        password: &str,
        tls: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<Bmc> {
        let agent = ureq::AgentBuilder::new()
            .tls_config(tls)
            .timeout_connect(Duration::from_secs(10))
            // Status calls answer in milliseconds; the upload has its own, longer budget.
            .timeout_read(Duration::from_secs(60))
            .redirects(0)
            .build();
        let mut bmc = Bmc {
            agent,
            base: format!("https://{host}/api/bmc"),
            host: host.to_string(),
            token: String::new(),
        };
        let resp = bmc
            .agent
            .post(&format!("{}/authenticate", bmc.base))
            .send_json(serde_json::json!({ "username": user, "password": password }));
        let body = bmc.body(resp, "log in")?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("BMC {host}: login answer is not JSON: {body}"))?;
        bmc.token = v
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("BMC {host}: login answer has no `id` token: {body}"))?
            .to_string();
        Ok(bmc)
    }

    /// Turns a ureq result into the body text or an error that says what failed and why.
    fn body(&self, r: Result<ureq::Response, ureq::Error>, what: &str) -> Result<String> {
        let host = &self.host;
        match r {
            Ok(resp) => resp
                .into_string()
                .with_context(|| format!("BMC {host}: reading the answer to `{what}`")),
            Err(ureq::Error::Status(code, resp)) => {
                let msg = legacy_message(&resp.into_string().unwrap_or_default());
                let hint = match code {
                    401 | 403 => {
                        "; check [bmc] user and KILN_BMC_PASSWORD (the BMC bans a client for a while after 5 failed logins)"
                    }
                    503 => {
                        "; the BMC is busy with another flash — wait for it to finish (tpi flash status) and retry"
                    }
                    _ => "",
                };
                bail!("BMC {host} refused `{what}`: HTTP {code}: {msg}{hint}")
            }
            Err(ureq::Error::Transport(t)) => {
                let mut msg = t.to_string();
                let mut src = std::error::Error::source(&t);
                while let Some(s) = src {
                    let s_text = s.to_string();
                    if !msg.contains(&s_text) {
                        msg.push_str(": ");
                        msg.push_str(&s_text);
                    }
                    src = s.source();
                }
                bail!("BMC {host}: `{what}` failed: {msg}")
            }
        }
    }

    fn get(&self, what: &str, query: &[(&str, &str)]) -> Result<String> {
        let mut req = self
            .agent
            .get(&self.base)
            .set("Authorization", &format!("Bearer {}", self.token));
        for (k, v) in query {
            req = req.query(k, v);
        }
        self.body(req.call(), what)
    }

    /// Checks a legacy `{"response":[{"result":"ok"}]}` answer.
    fn expect_ok(&self, what: &str, body: &str) -> Result<()> {
        let msg = legacy_message(body);
        if msg == "ok" {
            Ok(())
        } else {
            bail!(
                "BMC {}: `{what}` answered `{msg}`; expected `ok`",
                self.host
            )
        }
    }

    /// Asks the BMC to flash slot `slot` (1-based, as printed on the board) with a stream of
    /// `length` bytes whose sha256 is `sha256`; returns the upload handle. The upload must
    /// start within 10 s.
    pub fn request_flash(&self, slot: u8, file: &str, length: u64, sha256: &str) -> Result<u64> {
        // Slots are 1-based (validated 1..=4 by the inventory); the API's `node` is 0-based.
        let node = slot.saturating_sub(1).to_string();
        let len = length.to_string();
        let body = self.get(
            "flash request",
            &[
                ("opt", "set"),
                ("type", "flash"),
                ("file", file),
                ("length", &len),
                ("node", &node),
                ("sha256", sha256),
            ],
        )?;
        let v: Value = serde_json::from_str(&body).with_context(|| {
            format!(
                "BMC {}: flash request answer is not JSON: {body}",
                self.host
            )
        })?;
        v.get("handle").and_then(Value::as_u64).ok_or_else(|| {
            anyhow!(
                "BMC {}: flash request answered {body}; expected {{\"handle\": N}}",
                self.host
            )
        })
    }

    /// Streams `length` bytes from `data` as the multipart part `file` of
    /// `POST /api/bmc/upload/<handle>`. Returns when the BMC has received everything.
    pub fn upload(&self, handle: u64, data: impl Read + Send, length: u64) -> Result<()> {
        // A random boundary cannot plausibly occur inside the image data, which would cut the
        // part short; its fixed length keeps the body length computable up front.
        let mut rnd = [0u8; 16];
        getrandom::fill(&mut rnd)
            .map_err(|e| anyhow!("no randomness for the multipart boundary: {e}"))?;
        let boundary = format!("kiln-{}", crate::util::hex(&rnd));
        let head = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        );
        let tail = format!("\r\n--{boundary}--\r\n");
        let total = head.len() as u64 + length + tail.len() as u64;
        let body = std::io::Cursor::new(head.into_bytes())
            .chain(data.take(length))
            .chain(std::io::Cursor::new(tail.into_bytes()));
        let resp = self
            .agent
            .post(&format!("{}/upload/{handle}", self.base))
            .timeout(Duration::from_secs(24 * 3600))
            .set("Authorization", &format!("Bearer {}", self.token))
            .set(
                "Content-Type",
                &format!("multipart/form-data; boundary={boundary}"),
            )
            .set("Content-Length", &total.to_string())
            .send(body);
        self.body(resp, "upload").map(|_| ())
    }

    /// Stops the transfer `handle`; the BMC aborts writing. bmcd ignores the handle and
    /// cancels **every** transfer, so call this only for a transfer the flash status shows to
    /// be ours (see `flash::cancel_own`).
    pub fn cancel(&self, handle: u64) -> Result<()> {
        let r = self
            .agent
            .get(&format!("{}/upload/{handle}/cancel", self.base))
            .set("Authorization", &format!("Bearer {}", self.token))
            .call();
        self.body(r, "cancel upload").map(|_| ())
    }

    pub fn flash_status(&self) -> Result<FlashStatus> {
        let body = self.get("flash status", &[("opt", "get"), ("type", "flash")])?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("BMC {}: flash status is not JSON: {body}", self.host))?;
        FlashStatus::parse(&v)
    }

    /// Powers slot `slot` (1-based) on or off.
    pub fn power(&self, slot: u8, on: bool) -> Result<()> {
        let key = format!("node{slot}");
        let what = if on { "power on" } else { "power off" };
        let body = self.get(
            what,
            &[
                ("opt", "set"),
                ("type", "power"),
                (&key, if on { "1" } else { "0" }),
            ],
        )?;
        self.expect_ok(what, &body)
    }

    /// Whether slot `slot` (1-based) is powered, from `GET ?opt=get&type=power`.
    pub fn power_state(&self, slot: u8) -> Result<bool> {
        let body = self.get("power status", &[("opt", "get"), ("type", "power")])?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("BMC {}: power status is not JSON: {body}", self.host))?;
        let key = format!("node{slot}");
        let s = v
            .pointer("/response/0/result/0")
            .and_then(|r| r.get(&key))
            .ok_or_else(|| anyhow!("BMC {}: power status {body} has no {key}", self.host))?;
        match s
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| s.to_string())
            .as_str()
        {
            "1" => Ok(true),
            "0" => Ok(false),
            other => bail!(
                "BMC {}: power state of {key} is `{other}`; expected 0 or 1",
                self.host
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_parse_as_bmcd_serialises_them() {
        let t = serde_json::json!({"Transferring":{"id":7,"process_name":"x","size":100,"cancelled":false,"bytes_written":40}});
        assert_eq!(
            FlashStatus::parse(&t).unwrap(),
            FlashStatus::Transferring {
                id: 7,
                process: "x".into(),
                size: 100,
                bytes_written: 40,
                cancelled: false
            }
        );
        let d = serde_json::json!({"Done":[{"secs":3,"nanos":0},100]});
        assert_eq!(
            FlashStatus::parse(&d).unwrap(),
            FlashStatus::Done { size: 100 }
        );
        assert_eq!(
            FlashStatus::parse(&serde_json::json!({"Error":"Send timeout"})).unwrap(),
            FlashStatus::Error("Send timeout".into())
        );
        assert_eq!(
            FlashStatus::parse(&serde_json::json!("Ready")).unwrap(),
            FlashStatus::Ready
        );
        assert!(FlashStatus::parse(&serde_json::json!({"Other":1})).is_err());
    }

    #[test]
    fn legacy_errors_are_unwrapped() {
        assert_eq!(
            legacy_message(r#"{"response":[{"result":"missing 12 B bytes"}]}"#),
            "missing 12 B bytes"
        );
        assert_eq!(legacy_message("plain"), "plain");
    }
}
