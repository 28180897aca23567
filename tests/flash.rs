//! `kiln flash` against a fake Turing Pi BMC (a test double on 127.0.0.1), and the fake
//! checked against the official `tpi` client.

mod common_bmc;

use common_bmc::bmc::{FakeBmc, Mode, PASSWORD, USER};
use common_bmc::fixture::{Workspace, sha256_file, stderr, stdout};
use common_bmc::http;

fn setup(name: &str, mode: Mode, ip_base: u8) -> (FakeBmc, Workspace) {
    let bmc = FakeBmc::start(mode);
    let host = bmc.addr.to_string();
    let ws = Workspace::new(
        name,
        Some((&host, Some(&bmc.cert.sha256_colons))),
        None,
        ip_base,
    );
    (bmc, ws)
}

fn flash_requests(bmc: &FakeBmc) -> Vec<http::Request> {
    bmc.requests()
        .into_iter()
        .filter(|r| r.param("type") == Some("flash") && r.param("opt") == Some("set"))
        .collect()
}

fn no_usb(bmc: &FakeBmc) {
    assert!(
        bmc.requests()
            .iter()
            .all(|r| r.param("type") != Some("usb")),
        "kiln must never send type=usb"
    );
    assert!(bmc.state.lock().unwrap().bad_usb_modes.is_empty());
}

#[test]
fn flash_uploads_the_xz_with_its_length_and_sha256_then_powers_on() {
    let (bmc, ws) = setup("flash-ok", Mode::Normal, 1);
    let img = ws.build("n2");
    let out = ws.kiln(&["flash", "n2"]);
    assert!(out.status.success(), "kiln flash failed: {}", stderr(&out));
    let xz = ws.path("out/n2.img.xz");
    assert!(xz.is_file(), "kiln flash must produce <node>.img.xz");
    let xz_len = std::fs::metadata(&xz).unwrap().len();

    let reqs = flash_requests(&bmc);
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.param("node"), Some("1"), "slot 2 is node=1 (0-based)");
    assert_eq!(
        r.param("file"),
        Some("n2.img.xz"),
        "the name must end in .xz so the BMC decompresses"
    );
    assert_eq!(r.param("length"), Some(xz_len.to_string().as_str()));
    assert_eq!(
        r.param("sha256"),
        Some(sha256_file(&xz).as_str()),
        "sha256 covers the uploaded stream"
    );

    let ups = bmc.uploads();
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].field, "file");
    assert_eq!(ups[0].part_len as u64, xz_len);
    assert_eq!(
        ups[0].written_sha256.as_deref(),
        Some(sha256_file(&img).as_str()),
        "the eMMC would get the image byte for byte"
    );
    assert_eq!(
        bmc.power_sets(),
        vec![("node2".to_string(), "1".to_string())]
    );
    assert!(bmc.state.lock().unwrap().power[1]);
    no_usb(&bmc);
    assert!(stdout(&out).contains("powered on"), "{}", stdout(&out));
    // Every request after login carries the token.
    let reqs = bmc.requests();
    assert_eq!(reqs[0].path, "/api/bmc/authenticate");
    assert!(reqs[1..].iter().all(|r| {
        r.header("authorization")
            .is_some_and(|a| a.starts_with("Bearer "))
    }));
}

#[test]
fn no_power_on_leaves_the_node_off_and_reuses_a_fresh_xz() {
    let (bmc, ws) = setup("flash-nopower", Mode::Normal, 2);
    ws.build("n1");
    let out = ws.kiln(&["flash", "n1", "--no-power-on"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(bmc.power_sets().is_empty());
    let m1 = std::fs::metadata(ws.path("out/n1.img.xz"))
        .unwrap()
        .modified()
        .unwrap();
    let out = ws.kiln(&["flash", "n1", "--no-power-on"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m2 = std::fs::metadata(ws.path("out/n1.img.xz"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(m1, m2, "a fresh .xz is not recompressed");
    assert_eq!(flash_requests(&bmc).len(), 2);
}

#[test]
fn refuses_wrong_node_image_slotless_node_and_stale_image_before_contacting_the_bmc() {
    let (bmc, ws) = setup("flash-refuse", Mode::Normal, 3);
    ws.build("n2");
    let out = ws.kiln(&["flash", "n1", "--image", "out/n2.img"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("built for node `n2`"),
        "{}",
        stderr(&out)
    );

    let out = ws.kiln(&["flash", "loose"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("has no `slot`"), "{}", stderr(&out));
    assert!(
        bmc.requests().is_empty(),
        "nothing may reach the BMC before the checks pass"
    );

    // Any change to the inventory makes the image stale.
    let inv = ws.path("kiln.toml");
    let mut text = std::fs::read_to_string(&inv).unwrap();
    text.push_str("\n# changed\n");
    std::fs::write(&inv, text).unwrap();
    let out = ws.kiln(&["flash", "n2"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("older than the inventory"),
        "{}",
        stderr(&out)
    );
    assert!(bmc.requests().is_empty());
    let out = ws.kiln(&["flash", "n2", "--force", "--no-power-on"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(flash_requests(&bmc).len(), 1);
}

#[test]
fn tls_pinning_and_credentials() {
    let bmc = FakeBmc::start(Mode::Normal);
    let host = bmc.addr.to_string();
    let other = http::leaf(None);
    // Pinned to another certificate: the handshake fails, no request is made.
    let ws = Workspace::new(
        "flash-pin",
        Some((&host, Some(&other.sha256_colons))),
        None,
        4,
    );
    ws.build("n1");
    let out = ws.kiln(&["flash", "n1"]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("does not match tls_sha256"), "{e}");
    assert!(
        e.contains(&bmc.cert.sha256_colons),
        "the error shows the presented fingerprint: {e}"
    );
    assert!(
        bmc.requests().is_empty(),
        "no HTTP request may be sent to an unpinned server"
    );
    drop(ws);

    // No fingerprint: refused unless --insecure.
    let ws = Workspace::new("flash-nofp", Some((&host, None)), None, 5);
    ws.build("n1");
    let out = ws.kiln(&["flash", "n1", "--no-power-on"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--insecure"), "{}", stderr(&out));
    assert!(bmc.requests().is_empty());
    // No password and no terminal.
    let out = ws.kiln_env(&["flash", "n1", "--insecure"], &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("KILN_BMC_PASSWORD"),
        "{}",
        stderr(&out)
    );
    // Wrong password: the BMC's refusal is explained.
    let out = ws.kiln_env(
        &["flash", "n1", "--insecure"],
        &[("KILN_BMC_PASSWORD", "wrong")],
    );
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("HTTP 403") && e.contains("KILN_BMC_PASSWORD"),
        "{e}"
    );
    assert!(
        !e.contains("wrong"),
        "the password must never be printed: {e}"
    );
    let out = ws.kiln(&["flash", "n1", "--insecure", "--no-power-on"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

fn failing(name: &str, mode: Mode, ip_base: u8, extra: &[&str], expect: &[&str]) -> FakeBmc {
    let (bmc, ws) = setup(name, mode, ip_base);
    ws.build("n1");
    let mut args = vec!["flash", "n1"];
    args.extend_from_slice(extra);
    let out = ws.kiln(&args);
    assert!(!out.status.success(), "flash must fail in mode {mode:?}");
    let e = stderr(&out);
    for x in expect {
        assert!(e.contains(x), "expected `{x}` in: {e}");
    }
    assert!(e.contains("not powered on"), "{e}");
    assert!(
        bmc.power_sets().is_empty(),
        "a failed flash must never power the node on"
    );
    no_usb(&bmc);
    bmc
}

#[test]
fn send_timeout_is_explained_and_the_node_stays_off() {
    failing(
        "flash-timeout",
        Mode::SendTimeout,
        6,
        &[],
        &["Send timeout", "within 10 s"],
    );
}

#[test]
fn missing_bytes_are_explained_and_the_node_stays_off() {
    failing(
        "flash-missing",
        Mode::LoseBytes(100),
        7,
        &[],
        &["missing 100 B bytes", "fewer bytes than announced"],
    );
}

#[test]
fn a_bmc_flash_error_is_explained_and_the_node_stays_off() {
    failing(
        "flash-error",
        Mode::FlashError,
        8,
        &[],
        &["Compute module not supported", "update the BMC firmware"],
    );
}

#[test]
fn a_stalled_flash_is_cancelled() {
    let bmc = failing(
        "flash-hang",
        Mode::Hang,
        9,
        &["--stall-timeout", "2"],
        &["no progress for 2 s"],
    );
    assert!(
        bmc.requests()
            .iter()
            .any(|r| r.path == "/api/bmc/upload/4242/cancel"),
        "kiln must cancel the transfer it gives up on"
    );
}

#[test]
fn wait_polls_the_servers_ping_endpoint() {
    let (bmc, ws) = setup("flash-wait", Mode::Normal, 10);
    ws.build("n1");
    // A fake k3s (test double) answering /ping on the node's address.
    let cert = http::leaf(None);
    http::serve(&cert, "127.0.10.11", 6443, |req| {
        if req.path == "/ping" {
            http::Response::text(200, "pong")
        } else {
            http::Response::text(404, "")
        }
    });
    let out = ws.kiln(&["flash", "n1", "--wait", "--wait-timeout", "30"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("up after"), "{}", stdout(&out));
    assert_eq!(bmc.power_sets().len(), 1);
}

/// Runs the official client against the fake and checks that the fake sees from it what kiln
/// sends: same endpoints, parameters and order, multipart field, length/sha256 semantics.
#[test]
fn kiln_requests_match_the_official_tpi_client() {
    let tpi = std::env::var("KILN_TPI")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/tpi/bin/tpi").to_string());
    assert!(
        std::path::Path::new(&tpi).is_file(),
        "the official tpi client is not installed at {tpi}; install it with \
         `cargo install tpi --version 1.0.7 --locked --root .cache/tpi` (or set KILN_TPI)"
    );
    let (bmc, ws) = setup("flash-tpi", Mode::Normal, 11);
    ws.build("n1");
    let out = ws.kiln(&["flash", "n1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let kiln_reqs = bmc.requests();
    let kiln_ups = bmc.uploads();
    bmc.state.lock().unwrap().requests.clear();
    bmc.state.lock().unwrap().uploads.clear();

    let xz = ws.path("out/n1.img.xz");
    let sha = sha256_file(&xz);
    let port = bmc.addr.port().to_string();
    let run = |args: &[&str]| {
        let o = std::process::Command::new(&tpi)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port,
                "--user",
                USER,
                "--password",
                PASSWORD,
            ])
            .args(args)
            .env("HOME", &ws.dir)
            .env("XDG_CACHE_HOME", &ws.dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "tpi {args:?} failed: {}{}",
            stdout(&o),
            stderr(&o)
        );
        o
    };
    let o = run(&[
        "flash",
        "-n",
        "1",
        "-i",
        xz.to_str().unwrap(),
        "--sha256",
        &sha,
    ]);
    assert!(
        stdout(&o).contains("Done"),
        "tpi must see the fake finish: {}",
        stdout(&o)
    );
    let o = run(&["power", "on", "-n", "1"]);
    assert!(stdout(&o).contains("ok"), "{}", stdout(&o));
    let tpi_reqs = bmc.requests();
    let tpi_ups = bmc.uploads();

    let pick = |reqs: &[http::Request], opt: &str, ty: &str| -> http::Request {
        reqs.iter()
            .find(|r| r.param("opt") == Some(opt) && r.param("type") == Some(ty))
            .unwrap_or_else(|| panic!("no opt={opt}&type={ty} request"))
            .clone()
    };
    // Flash request: same parameters, same order, same values.
    let (k, t) = (
        pick(&kiln_reqs, "set", "flash"),
        pick(&tpi_reqs, "set", "flash"),
    );
    assert_eq!(
        (k.method.as_str(), k.path.as_str()),
        (t.method.as_str(), t.path.as_str())
    );
    assert_eq!(k.query, t.query, "kiln's flash request must equal tpi's");
    assert_eq!(
        t.param("length"),
        Some(std::fs::metadata(&xz).unwrap().len().to_string().as_str())
    );
    // Upload: same endpoint, field, length and hash of the part.
    assert_eq!(kiln_ups.len(), 1);
    assert_eq!(tpi_ups.len(), 1);
    let (ku, tu) = (&kiln_ups[0], &tpi_ups[0]);
    assert_eq!(ku.path, tu.path);
    assert_eq!(ku.field, tu.field);
    assert_eq!(tu.field, "file");
    assert_eq!(ku.part_len, tu.part_len);
    assert_eq!(ku.part_sha256, tu.part_sha256);
    assert_eq!(
        tu.part_sha256, sha,
        "length and sha256 describe the uploaded (compressed) stream"
    );
    assert!(
        ku.content_type.starts_with("multipart/form-data")
            && tu.content_type.starts_with("multipart/form-data")
    );
    // Status polling and power.
    let (k, t) = (
        pick(&kiln_reqs, "get", "flash"),
        pick(&tpi_reqs, "get", "flash"),
    );
    assert_eq!(k.query, t.query);
    let (k, t) = (
        pick(&kiln_reqs, "set", "power"),
        pick(&tpi_reqs, "set", "power"),
    );
    assert_eq!(k.query, t.query, "power on: same parameters");
    // Authentication: both log in with JSON and use the bearer token.
    for reqs in [&kiln_reqs, &tpi_reqs] {
        let auth = reqs
            .iter()
            .find(|r| r.path == "/api/bmc/authenticate")
            .expect("login");
        assert_eq!(auth.method, "POST");
        let v: serde_json::Value = serde_json::from_slice(&auth.body).unwrap();
        assert_eq!(v["username"], USER);
        assert!(
            reqs.iter()
                .filter(|r| r.path != "/api/bmc/authenticate")
                .all(|r| r
                    .header("authorization")
                    .is_some_and(|a| a.starts_with("Bearer ")))
        );
    }
}
