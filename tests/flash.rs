//! `kiln flash` against a fake Turing Pi BMC (a test double on 127.0.0.1), and the fake
//! checked against the official `tpi` client.

mod common_bmc;

use common_bmc::bmc::{FakeBmc, Mode, PASSWORD, USER};
use common_bmc::fixture::{Workspace, sha256_file, stderr, stdout};
use common_bmc::http;
use kiln::config::size::human;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

    // A change to what goes into n2's image (here its address) makes the image stale.
    let inv = ws.path("kiln.toml");
    let text = std::fs::read_to_string(&inv).unwrap();
    assert!(text.contains("\"127.0.3.12\""), "{text}");
    std::fs::write(&inv, text.replace("\"127.0.3.12\"", "\"127.0.3.99\"")).unwrap();
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

// ---- one transfer at a time: kiln leaves other clients' transfers alone ----

fn tpi_bin() -> String {
    let tpi = std::env::var("KILN_TPI")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/tpi/bin/tpi").to_string());
    assert!(
        std::path::Path::new(&tpi).is_file(),
        "the official tpi client is not installed at {tpi}; install it with \
         `cargo install tpi --version 1.0.7 --locked --root .cache/tpi` (or set KILN_TPI)"
    );
    tpi
}

/// The official client flashing `xz` into `slot`, started in the background.
fn tpi_flash(bmc: &FakeBmc, ws: &Workspace, slot: u8, xz: &std::path::Path) -> Child {
    Command::new(tpi_bin())
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &bmc.addr.port().to_string(),
            "--user",
            USER,
            "--password",
            PASSWORD,
            "flash",
            "-n",
            &slot.to_string(),
            "-i",
            xz.to_str().unwrap(),
            "--sha256",
            &sha256_file(xz),
        ])
        .env("HOME", &ws.dir)
        .env("XDG_CACHE_HOME", &ws.dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `out/<node>.img.xz`, made before any client runs so nothing waits on compression.
fn xz_of(ws: &Workspace, node: &str) -> PathBuf {
    kiln::flash::xz::ensure(&ws.path(&format!("out/{node}.img")))
        .unwrap()
        .path
}

/// Waits until a transfer other than `not` runs on the test BMC and has written something
/// (its upload is streaming); returns its id.
fn wait_for_transfer(bmc: &FakeBmc, not: Option<u64>) -> u64 {
    let start = Instant::now();
    loop {
        if let Some((id, written)) = bmc.state.lock().unwrap().transferring()
            && written > 0
            && Some(id) != not
        {
            return id;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no transfer started on the test BMC: {}",
            bmc.state.lock().unwrap().status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cancels(bmc: &FakeBmc) -> Vec<String> {
    bmc.requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/cancel"))
        .map(|r| r.path)
        .collect()
}

fn finished(c: Child) -> Output {
    c.wait_with_output().unwrap()
}

fn status_ids(bmc: &FakeBmc) -> Vec<u64> {
    let mut ids: Vec<u64> = Vec::new();
    for st in bmc.state.lock().unwrap().statuses.iter() {
        if let Some(id) = st["Transferring"]["id"].as_u64()
            && ids.last() != Some(&id)
        {
            ids.push(id);
        }
    }
    ids
}

#[test]
fn kiln_refuses_while_tpi_flashes_and_that_flash_completes() {
    let (bmc, ws) = setup("flash-busy-tpi", Mode::Normal, 12);
    ws.build("n1");
    ws.build("n2");
    let xz1 = xz_of(&ws, "n1");
    xz_of(&ws, "n2");
    bmc.state.lock().unwrap().pace = Duration::from_millis(700);
    let other = tpi_flash(&bmc, &ws, 1, &xz1);
    let id = wait_for_transfer(&bmc, None);

    let out = ws.kiln(&["flash", "n2"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let e = stderr(&out);
    for x in [
        "not flashing n2 (slot 2)",
        "already flashing slot 1 (node `n1`; \"Node 1 os install service\")",
        &format!("transfer id {id}"),
        "written to the eMMC or read back so far",
        "a new flash request would make the BMC drop it",
        "Wait until it finishes",
    ] {
        assert!(e.contains(x), "expected `{x}` in: {e}");
    }
    assert_eq!(
        flash_requests(&bmc).len(),
        1,
        "kiln must not send a flash request while another transfer runs"
    );
    assert!(
        cancels(&bmc).is_empty(),
        "kiln must not cancel: {:?}",
        cancels(&bmc)
    );
    assert!(bmc.power_sets().is_empty());

    // The other client's flash goes on undisturbed to the end.
    let o = finished(other);
    assert!(
        o.status.success() && stdout(&o).contains("Done"),
        "tpi's flash must complete: {}{}",
        stdout(&o),
        stderr(&o)
    );
    let s = bmc.state.lock().unwrap();
    assert!(s.dropped.is_empty(), "dropped: {:?}", s.dropped);
    assert_eq!(s.uploads.len(), 1);
    assert_eq!(s.uploads[0].answer, Some(Ok(())));
    assert!(s.status().get("Done").is_some(), "{}", s.status());
    assert_eq!(
        s.uploads[0].written_sha256.as_deref(),
        Some(sha256_file(&ws.path("out/n1.img")).as_str())
    );
}

#[test]
fn kiln_refuses_while_a_transfer_it_did_not_start_is_in_the_bmc_state() {
    let (bmc, ws) = setup("flash-busy-state", Mode::Normal, 13);
    ws.build("n1");
    // As bmcd reports an upload to slot 3 by someone else: 1.3 GB written of a 50 MB .xz.
    bmc.state
        .lock()
        .unwrap()
        .inject_transfer(2, 777, 50_000_000, 1_300_000_000);
    let before = bmc.state.lock().unwrap().status();
    let out = ws.kiln(&["flash", "n1"]);
    assert!(!out.status.success());
    let e = stderr(&out);
    for x in [
        "already flashing slot 3 (node `a3`",
        "transfer id 777",
        &format!(
            "{} written to the eMMC or read back so far, from an upload of {}",
            human(1_300_000_000),
            human(50_000_000)
        ),
        "/api/bmc/upload/777/cancel",
    ] {
        assert!(e.contains(x), "expected `{x}` in: {e}");
    }
    assert!(flash_requests(&bmc).is_empty());
    assert!(cancels(&bmc).is_empty());
    assert_eq!(bmc.state.lock().unwrap().status(), before, "left as it was");
}

#[test]
fn kiln_never_cancels_a_transfer_that_replaced_its_own() {
    let (bmc, ws) = setup("flash-replaced", Mode::Normal, 14);
    ws.build("n1");
    xz_of(&ws, "n1");
    bmc.state.lock().unwrap().pace = Duration::from_millis(700);
    let child = ws
        .kiln_command(
            &["flash", "n1"],
            &[("KILN_BMC_PASSWORD", common_bmc::bmc::PASSWORD)],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ours = wait_for_transfer(&bmc, None);
    // Another client asks the BMC to flash slot 2: bmcd drops kiln's transfer for it.
    let fp = kiln::tls::parse_fingerprint(&bmc.cert.sha256_colons).unwrap();
    let client = kiln::flash::bmc::Bmc::login(
        &bmc.addr.to_string(),
        USER,
        PASSWORD,
        kiln::tls::pinned(Some(fp)).unwrap(),
    )
    .unwrap();
    let theirs = client
        .request_flash(2, "other.img.xz", 1000, &"0".repeat(64))
        .unwrap();
    let out = finished(child);
    assert!(!out.status.success(), "{}", stdout(&out));
    let e = stderr(&out);
    assert!(
        e.contains("another client requested a flash") && e.contains("not powered on"),
        "{e}"
    );
    assert!(
        cancels(&bmc).is_empty(),
        "kiln cancelled: {:?}",
        cancels(&bmc)
    );
    let s = bmc.state.lock().unwrap();
    assert_eq!(s.dropped, vec![ours]);
    assert_eq!(
        s.transferring().map(|t| t.0),
        Some(theirs),
        "the other client's transfer still runs"
    );
    drop(s);
    assert!(bmc.power_sets().is_empty());
}

#[test]
fn ctrl_c_cancels_only_kilns_own_transfer() {
    let (bmc, ws) = setup("flash-ctrlc", Mode::Normal, 15);
    ws.build("n1");
    xz_of(&ws, "n1");
    bmc.state.lock().unwrap().pace = Duration::from_millis(700);
    let child = ws
        .kiln_command(
            &["flash", "n1"],
            &[("KILN_BMC_PASSWORD", common_bmc::bmc::PASSWORD)],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ours = wait_for_transfer(&bmc, None);
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = finished(child);
    assert!(!out.status.success(), "{}", stdout(&out));
    let e = stderr(&out);
    assert!(e.contains("cancelled by Ctrl-C"), "{e}");
    assert_eq!(
        cancels(&bmc),
        vec![format!("/api/bmc/upload/{ours}/cancel")]
    );
    assert!(bmc.power_sets().is_empty());
}

/// The test BMC must behave as bmcd does, shown with the official client: a new flash request
/// drops the transfer in progress (its upload fails, the status shows the new transfer), and a
/// cancel stops whatever runs, whatever handle it names.
#[test]
fn the_test_bmc_like_bmcd_drops_a_running_transfer_and_cancels_all() {
    let (bmc, ws) = setup("flash-bmcd-like", Mode::Normal, 16);
    ws.build("n1");
    ws.build("n2");
    let xz1 = xz_of(&ws, "n1");
    let xz2 = xz_of(&ws, "n2");
    bmc.state.lock().unwrap().pace = Duration::from_millis(700);

    let a = tpi_flash(&bmc, &ws, 1, &xz1);
    let a_id = wait_for_transfer(&bmc, None);
    let b = tpi_flash(&bmc, &ws, 2, &xz2);
    let b_out = finished(b);
    assert!(
        b_out.status.success() && stdout(&b_out).contains("Done"),
        "the new flash completes: {}{}",
        stdout(&b_out),
        stderr(&b_out)
    );
    let a_out = finished(a);
    {
        let s = bmc.state.lock().unwrap();
        assert_eq!(
            s.dropped,
            vec![a_id],
            "the request for slot 2 dropped slot 1's"
        );
        assert_eq!(s.uploads.len(), 2);
        assert_eq!(s.uploads[0].handle, a_id);
        assert_eq!(
            s.uploads[0].answer,
            Some(Err("transfer canceled".to_string())),
            "the dropped upload fails as bmcd's does"
        );
        assert_eq!(s.uploads[1].answer, Some(Ok(())));
        assert!(s.status().get("Done").is_some(), "{}", s.status());
    }
    let b_id = bmc.state.lock().unwrap().uploads[1].handle;
    assert_eq!(
        status_ids(&bmc).first(),
        Some(&b_id),
        "tpi polls only after its upload: it meets the new transfer"
    );
    assert!(
        !stdout(&a_out).contains("Done"),
        "the dropped client must not see its flash done: {}{}",
        stdout(&a_out),
        stderr(&a_out)
    );

    // Cancel stops the running transfer even when it names another handle.
    let c = tpi_flash(&bmc, &ws, 1, &xz1);
    let c_id = wait_for_transfer(&bmc, Some(b_id));
    let fp = kiln::tls::parse_fingerprint(&bmc.cert.sha256_colons).unwrap();
    let client = kiln::flash::bmc::Bmc::login(
        &bmc.addr.to_string(),
        USER,
        PASSWORD,
        kiln::tls::pinned(Some(fp)).unwrap(),
    )
    .unwrap();
    client.cancel(c_id + 1).unwrap();
    let c_out = finished(c);
    assert!(
        stderr(&c_out).contains("Error occured during flashing")
            && stderr(&c_out).contains("cancelled by user"),
        "{}{}",
        stdout(&c_out),
        stderr(&c_out)
    );
    let s = bmc.state.lock().unwrap();
    assert_eq!(
        s.uploads.last().and_then(|u| u.answer.clone()),
        Some(Err("cancelled by user".to_string()))
    );
    assert_eq!(
        s.status(),
        serde_json::json!({"Error": "cancelled by user"})
    );
}

// ---- progress that is true for .xz uploads ----

#[test]
fn progress_shows_phases_and_decompressed_bytes() {
    let (bmc, ws) = setup("flash-progress", Mode::Normal, 17);
    let img = ws.build("n1");
    let raw = std::fs::metadata(&img).unwrap().len();
    let xz_len = std::fs::metadata(xz_of(&ws, "n1")).unwrap().len();
    assert!(raw > xz_len);
    bmc.state.lock().unwrap().pace = Duration::from_millis(800);
    let out = ws.kiln(&["flash", "n1", "--no-power-on"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // The test BMC reported as bmcd does: `size` is the .xz, `bytes_written` counts the
    // decompressed image (so it passes `size`), then starts again for the read-back.
    let written: Vec<u64> = bmc
        .state
        .lock()
        .unwrap()
        .statuses
        .iter()
        .filter_map(|v| {
            let t = v.get("Transferring")?;
            assert_eq!(t["size"].as_u64(), Some(xz_len));
            t["bytes_written"].as_u64()
        })
        .collect();
    assert_eq!(written.iter().max(), Some(&raw), "{written:?}");
    assert!(
        written.windows(2).any(|w| w[1] < w[0]),
        "the count restarts for the verify pass: {written:?}"
    );

    // kiln shows the phases in order, with byte counts, never a percentage.
    let so = stdout(&out);
    let at = |p: &str| {
        so.find(&format!("n1: {p}"))
            .unwrap_or_else(|| panic!("`n1: {p}` not shown: {so}"))
    };
    assert!(at("uploading") < at("writing"), "{so}");
    assert!(at("writing") < at("verifying"), "{so}");
    assert!(at("verifying") < at("flashed and verified"), "{so}");
    assert!(
        so.contains(&format!("{} written to the eMMC and read back", human(raw))),
        "{so}"
    );
    assert!(!so.contains('%'), "{so}");
}

// ---- staleness: what went into this node's image, not the whole inventory ----

#[test]
fn staleness_follows_this_nodes_plan_not_the_whole_inventory() {
    let (bmc, ws) = setup("flash-plan", Mode::Normal, 18);
    ws.build("n2");
    let inv = ws.path("kiln.toml");
    let original = std::fs::read_to_string(&inv).unwrap();

    // A new BMC (another address and certificate) and another node: n2's image is untouched.
    let other = FakeBmc::start(Mode::Normal);
    let base = original
        .replace(&bmc.addr.to_string(), &other.addr.to_string())
        .replace(&bmc.cert.sha256_colons, &other.cert.sha256_colons)
        + "\n[[node]]\nname = \"a5\"\ncluster = \"prod\"\nboard = \"tiny\"\nip = \"127.0.18.15\"\nrole = \"agent\"\nslot = 4\n";
    std::fs::write(&inv, &base).unwrap();
    let out = ws.kiln(&["flash", "n2", "--no-power-on"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("predates"), "{}", stderr(&out));
    assert_eq!(flash_requests(&other).len(), 1);
    assert!(bmc.requests().is_empty());
    let seen = other.requests().len();

    let stale = |text: String, expect: &[&str]| {
        std::fs::write(&inv, text).unwrap();
        let out = ws.kiln(&["flash", "n2", "--no-power-on"]);
        assert!(!out.status.success(), "{}", stdout(&out));
        let e = stderr(&out);
        for x in expect {
            assert!(e.contains(x), "expected `{x}` in: {e}");
        }
        assert!(e.contains("--force"), "{e}");
        assert_eq!(
            other.requests().len(),
            seen,
            "refused before the BMC is contacted"
        );
    };
    // This node's address.
    stale(
        base.replace("\"127.0.18.12\"", "\"127.0.18.99\""),
        &["older than the inventory", "ip 127.0.18.12 → 127.0.18.99"],
    );
    // The k3s release.
    stale(
        format!("{base}\n[k3s]\nversion = \"v1.33.5+k3s1\"\n"),
        &["older than the inventory"],
    );
    // The board profile.
    std::fs::write(&inv, &base).unwrap();
    let board = ws.path("boards/tiny.toml");
    let mut profile = std::fs::read_to_string(&board).unwrap();
    profile.push_str("\n# tuned\n");
    std::fs::write(&board, profile).unwrap();
    stale(base.clone(), &["older than the board profile"]);
}

#[test]
fn a_flash_past_its_deadline_is_cancelled_however_it_progresses() {
    let (bmc, ws) = setup("flash-deadline", Mode::Normal, 41);
    ws.build("n1");
    // A slow BMC that keeps progressing: the stall timeout never fires, the deadline must.
    bmc.state.lock().unwrap().pace = Duration::from_millis(700);
    let t = Instant::now();
    let out = ws.kiln(&["flash", "n1", "--deadline", "2", "--stall-timeout", "600"]);
    assert!(!out.status.success(), "a flash past its deadline succeeded");
    let e = stderr(&out);
    assert!(e.contains("deadline of 2 s"), "{e}");
    assert!(e.contains("not powered on"), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "kiln waited {:?}",
        t.elapsed()
    );
    assert!(
        bmc.requests()
            .iter()
            .any(|r| r.path == "/api/bmc/upload/4242/cancel"),
        "kiln must cancel its own transfer when it gives up"
    );
    assert!(bmc.power_sets().is_empty());
}

#[test]
fn a_truncated_image_or_a_stale_xz_is_never_uploaded() {
    let (bmc, ws) = setup("flash-truncated", Mode::Normal, 42);
    let img = ws.build("n1");
    let full = std::fs::read(&img).unwrap();

    // Cut inside the root partition: it now runs past the end of the file.
    let info = kiln::image::inspect::inspect(&img).unwrap();
    let root = info.partitions.last().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(root.start + (1 << 20)).unwrap();
    drop(f);
    let out = ws.kiln(&["flash", "n1"]);
    assert!(!out.status.success(), "a truncated image was flashed");
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));
    assert!(flash_requests(&bmc).is_empty());

    // Whole again, but the .xz beside it (newer, so kiln would reuse it) is another image's.
    std::fs::write(&img, &full).unwrap();
    let other = ws.path("other.img");
    let mut bytes = full.clone();
    bytes[(1 << 20) + 7] ^= 0xff;
    std::fs::write(&other, &bytes).unwrap();
    let o = Command::new("xz")
        .args(["-k", "-f", "-T1", "-0", other.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success());
    let xz = PathBuf::from(format!("{}.xz", img.display()));
    std::thread::sleep(Duration::from_millis(20));
    std::fs::copy(ws.path("other.img.xz"), &xz).unwrap();
    let out = ws.kiln(&["flash", "n1"]);
    assert!(!out.status.success(), "an .xz of other bytes was flashed");
    assert!(
        stderr(&out).contains("does not decompress to"),
        "{}",
        stderr(&out)
    );
    // A cut .xz is refused too.
    let x = std::fs::read(&xz).unwrap();
    std::fs::write(&xz, &x[..x.len() / 2]).unwrap();
    let out = ws.kiln(&["flash", "n1"]);
    assert!(!out.status.success(), "a cut .xz was flashed");
    assert!(
        stderr(&out).contains("does not decompress"),
        "{}",
        stderr(&out)
    );
    assert!(flash_requests(&bmc).is_empty(), "nothing may reach the BMC");

    // Removed, kiln makes a fresh one and flashes.
    std::fs::remove_file(&xz).unwrap();
    let out = ws.kiln(&["flash", "n1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(flash_requests(&bmc).len(), 1);
}
