//! `kiln check`: one test per inventory rule. Each breaks the shipped inventory in one place and
//! expects an error naming the file, the line, the field and what was expected.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;

/// Replaces `from` (which must occur) in the workspace's kiln.toml.
fn edit(ws: &Workspace, from: &str, to: &str) {
    let p = ws.path("kiln.toml");
    let s = std::fs::read_to_string(&p).unwrap();
    assert!(s.contains(from), "fixture text `{from}` not in kiln.toml");
    std::fs::write(&p, s.replacen(from, to, 1)).unwrap();
}

fn line_of(ws: &Workspace, needle: &str, nth: usize) -> usize {
    let s = std::fs::read_to_string(ws.path("kiln.toml")).unwrap();
    s.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .nth(nth)
        .map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("`{needle}` #{nth} not in kiln.toml"))
}

/// Runs `kiln check`, expects failure without a panic, and an error line that starts with
/// `kiln.toml:<line>:` and contains every one of `parts`.
fn expect_error(ws: &Workspace, line: usize, parts: &[&str]) {
    let o = ws.kiln(&["check"]);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "check passed, expected an error with {parts:?}"
    );
    assert_ne!(o.status.code(), Some(101), "kiln panicked:\n{err}");
    let prefix = format!("kiln.toml:{line}:");
    let hit = err
        .lines()
        .any(|l| l.contains(&prefix) && parts.iter().all(|p| l.contains(p)));
    assert!(
        hit,
        "no error line with `{prefix}` and {parts:?} in:\n{err}"
    );
}

#[test]
fn shipped_inventory_is_valid() {
    let ws = Workspace::new("check-ok");
    let o = ws.kiln(&["check"]);
    assert_ok(&o, "kiln check");
    assert!(
        stdout(&o).contains("5 nodes in 2 clusters"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn unknown_key() {
    let ws = Workspace::new("check-unknown");
    edit(
        &ws,
        "role = \"agent\"",
        "role = \"agent\"\ncolour = \"blue\"",
    );
    expect_error(&ws, line_of(&ws, "colour", 0), &["colour", "unknown field"]);
}

#[test]
fn duplicate_node_name() {
    let ws = Workspace::new("check-dupname");
    edit(&ws, "name = \"rk1-3\"", "name = \"rk1-2\"");
    expect_error(
        &ws,
        line_of(&ws, "name = \"rk1-2\"", 1),
        &["node[3].name", "already defined", "unique"],
    );
}

#[test]
fn invalid_kubernetes_name() {
    let ws = Workspace::new("check-badname");
    edit(&ws, "name = \"rk1-4\"", "name = \"RK1_4\"");
    expect_error(
        &ws,
        line_of(&ws, "RK1_4", 0),
        &[
            "node[4].name",
            "not a valid Kubernetes node name",
            "expected",
        ],
    );
}

#[test]
fn duplicate_ip() {
    let ws = Workspace::new("check-dupip");
    edit(&ws, "ip = \"192.168.100.13\"", "ip = \"192.168.100.12\"");
    expect_error(
        &ws,
        line_of(&ws, "192.168.100.12", 1),
        &["node[3].ip", "already used by node `rk1-2`"],
    );
}

#[test]
fn ip_outside_cidr() {
    let ws = Workspace::new("check-outside");
    edit(&ws, "ip = \"192.168.100.14\"", "ip = \"192.168.101.14\"");
    expect_error(
        &ws,
        line_of(&ws, "192.168.101.14", 0),
        &["node[4].ip", "outside 192.168.100.0/24"],
    );
}

#[test]
fn ip_is_network_broadcast_or_gateway() {
    for (ip, what) in [
        ("192.168.100.0", "network or broadcast"),
        ("192.168.100.255", "network or broadcast"),
        ("192.168.100.1", "gateway"),
    ] {
        let ws = Workspace::new("check-special");
        edit(&ws, "ip = \"192.168.100.14\"", &format!("ip = \"{ip}\""));
        expect_error(
            &ws,
            line_of(&ws, &format!("ip = \"{ip}\""), 0),
            &["node[4].ip", what],
        );
    }
}

#[test]
fn unknown_board_and_cluster() {
    let ws = Workspace::new("check-unknown-refs");
    edit(
        &ws,
        "board = \"rk1\"\nip = \"192.168.100.14\"",
        "board = \"rk2\"\nip = \"192.168.100.14\"",
    );
    edit(
        &ws,
        "cluster = \"production\"\nboard = \"rk1\"\nip = \"192.168.100.13\"",
        "cluster = \"prod\"\nboard = \"rk1\"\nip = \"192.168.100.13\"",
    );
    expect_error(
        &ws,
        line_of(&ws, "rk2", 0),
        &["node[4].board", "unknown board `rk2`", "rk1, rpi5"],
    );
    expect_error(
        &ws,
        line_of(&ws, "\"prod\"", 0),
        &[
            "node[3].cluster",
            "unknown cluster `prod`",
            "staging, production",
        ],
    );
}

#[test]
fn cluster_without_exactly_one_bootstrap_server() {
    let ws = Workspace::new("check-noboot");
    edit(
        &ws,
        "role = \"server\"\nbootstrap = true\nslot = 1",
        "role = \"server\"\nslot = 1",
    );
    expect_error(
        &ws,
        line_of(&ws, "name = \"production\"", 0),
        &["cluster[1]", "0 bootstrap servers", "exactly one"],
    );

    let ws = Workspace::new("check-twoboot");
    edit(
        &ws,
        "role = \"server\"\nslot = 2",
        "role = \"server\"\nbootstrap = true\nslot = 2",
    );
    expect_error(
        &ws,
        line_of(&ws, "name = \"production\"", 0),
        &["2 bootstrap servers (rk1-1, rk1-2)"],
    );
}

#[test]
fn bootstrap_on_an_agent() {
    let ws = Workspace::new("check-agentboot");
    edit(
        &ws,
        "role = \"agent\"",
        "role = \"agent\"\nbootstrap = true",
    );
    expect_error(
        &ws,
        line_of(&ws, "bootstrap = true", 2),
        &["node[4].bootstrap", "an agent cannot bootstrap"],
    );
}

#[test]
fn slots_duplicate_out_of_range_or_on_a_board_without_slots() {
    let ws = Workspace::new("check-dupslot");
    edit(&ws, "slot = 3", "slot = 2");
    expect_error(
        &ws,
        line_of(&ws, "slot = 2", 1),
        &["node[3].slot", "slot 2 is already taken by node `rk1-2`"],
    );

    let ws = Workspace::new("check-slotrange");
    edit(&ws, "slot = 4", "slot = 5");
    expect_error(
        &ws,
        line_of(&ws, "slot = 5", 0),
        &["node[4].slot", "out of range", "1..=4"],
    );

    let ws = Workspace::new("check-slotless");
    edit(&ws, "board = \"rpi5\"", "board = \"rpi5\"\nslot = 4");
    expect_error(
        &ws,
        line_of(&ws, "slot = 4", 0),
        &["node[0].slot", "board `rpi5` has no slots"],
    );
}

#[test]
fn token_file_readable_by_others_or_missing() {
    let ws = Workspace::new("check-token");
    std::fs::set_permissions(
        ws.path("secrets/production.token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    expect_error(
        &ws,
        line_of(&ws, "production.token", 0),
        &["cluster[1].token_file", "mode 644", "expected 0600"],
    );
    std::fs::remove_file(ws.path("secrets/staging.token")).unwrap();
    expect_error(
        &ws,
        line_of(&ws, "staging.token", 0),
        &["does not exist", "kiln secrets init"],
    );
}

#[test]
fn a_cluster_ca_directory_open_to_others_or_not_a_directory() {
    let ws = Workspace::new("check-ca-dir");
    let ca = ws.path("secrets/production.ca");
    std::fs::create_dir(&ca).unwrap();
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o755)).unwrap();
    expect_error(
        &ws,
        line_of(&ws, "production.token", 0),
        &[
            "cluster[1].token_file",
            "production.ca",
            "mode 755",
            "expected 0700",
        ],
    );
    std::fs::remove_dir(&ca).unwrap();
    std::fs::write(&ca, "").unwrap();
    expect_error(
        &ws,
        line_of(&ws, "production.token", 0),
        &["production.ca", "is not a directory"],
    );
}

#[test]
fn bad_values_name_their_field() {
    let ws = Workspace::new("check-values");
    edit(&ws, "role = \"agent\"", "role = \"worker\"");
    expect_error(
        &ws,
        line_of(&ws, "worker", 0),
        &["unknown variant `worker`", "server", "agent"],
    );

    let ws = Workspace::new("check-cidr");
    edit(
        &ws,
        "cidr = \"192.168.100.0/24\"",
        "cidr = \"192.168.100.1/24\"",
    );
    expect_error(
        &ws,
        line_of(&ws, "cidr", 0),
        &["host bits", "192.168.100.0/24"],
    );
}

#[test]
fn every_problem_is_reported_in_one_run() {
    let ws = Workspace::new("check-many");
    edit(&ws, "slot = 4", "slot = 9");
    edit(&ws, "ip = \"192.168.100.13\"", "ip = \"10.0.0.13\"");
    let o = ws.kiln(&["check"]);
    let err = stderr(&o);
    assert!(err.contains("slot 9") && err.contains("10.0.0.13"), "{err}");
    assert!(err.contains("2 problem(s) found"), "{err}");
}

#[test]
fn secrets_init_creates_root_only_tokens_and_never_overwrites() {
    let ws = Workspace::new("secrets");
    std::fs::remove_dir_all(ws.path("secrets")).unwrap();
    let o = ws.kiln(&["secrets", "init"]);
    assert_ok(&o, "secrets init");
    let t = ws.path("secrets/production.token");
    let mode = std::fs::metadata(&t).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&t).unwrap();
    // A new cluster's token is pinned to the CA made with it: K10<64 hex>::server:<64 hex>.
    let (hash, secret) = token
        .trim()
        .strip_prefix("K10")
        .and_then(|r| r.split_once("::server:"))
        .expect("a K10 server token");
    let hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    assert!(hex(hash) && hex(secret), "not K10<hash>::server:<secret>");
    assert!(ws.path("secrets/production.ca/server-ca.crt").is_file());
    assert!(!stdout(&o).contains(secret), "token printed");
    assert!(!stderr(&o).contains(secret), "token printed");
    assert_ok(&ws.kiln(&["secrets", "init"]), "second secrets init");
    assert_eq!(
        std::fs::read_to_string(&t).unwrap(),
        token,
        "token overwritten"
    );
    assert_ok(&ws.kiln(&["check"]), "check after secrets init");
}

/// No input makes kiln panic: truncations and byte flips of the shipped inventory either load
/// or give diagnostics, in-process for speed.
#[test]
fn no_panic_on_mangled_inventories() {
    let ws = Workspace::new("mangle");
    let text = std::fs::read(ws.path("kiln.toml")).unwrap();
    let boards = kiln::config::board::load_dir(&ws.path("boards")).unwrap();
    let path = ws.path("mangled.toml");
    let mut seen_errors = 0;
    let mut cases: Vec<Vec<u8>> = (0..text.len())
        .step_by(7)
        .map(|n| text[..n].to_vec())
        .collect();
    for (i, seed) in (0..300u64).enumerate() {
        let mut t = text.clone();
        let pos = (seed.wrapping_mul(2654435761) as usize) % t.len();
        t[pos] = bytes(seed, 1)[0];
        if i % 3 == 0 {
            t.insert(pos, b'\n');
        }
        cases.push(t);
    }
    for t in cases {
        std::fs::write(&path, &t).unwrap();
        match kiln::config::inventory::load(&path, &boards, true) {
            Ok(_) => {}
            Err(d) => {
                assert!(!d.is_empty());
                for x in &d {
                    assert!(!x.message.is_empty() && !x.field.is_empty());
                }
                seen_errors += 1;
            }
        }
    }
    assert!(seen_errors > 100, "mangling should break most inventories");
}

#[test]
fn bad_board_profiles_are_reported() {
    let ws = Workspace::new("boards");
    let p = ws.path("boards/rk1.toml");
    let s = std::fs::read_to_string(&p).unwrap();
    // Loader placed over the GPT.
    std::fs::write(&p, s.replace("offset = \"32KiB\"", "offset = \"8KiB\"")).unwrap();
    let o = ws.kiln(&["check"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("rk1.toml:")
            && err.contains("blob[0].offset")
            && err.contains("overlaps the partition table"),
        "{err}"
    );
    // fdt instead of fdtdir is refused for extlinux boards.
    std::fs::write(&p, s.replace("fdtdir = \"/dtbs/\"", "")).unwrap();
    let err = stderr(&ws.kiln(&["check"]));
    assert!(err.contains("devicetree.fdtdir"), "{err}");
    // Unknown key in a board.
    std::fs::write(&p, s.replace("slots = 4", "slots = 4\nsockets = 2")).unwrap();
    let err = stderr(&ws.kiln(&["check"]));
    assert!(
        err.contains("rk1.toml:8:") && err.contains("unknown field `sockets`"),
        "{err}"
    );
}

/// Appends `text` to the workspace's kiln.toml (new tables go at the end).
fn append(ws: &Workspace, text: &str) {
    let p = ws.path("kiln.toml");
    let mut s = std::fs::read_to_string(&p).unwrap();
    s.push_str(text);
    std::fs::write(&p, s).unwrap();
}

#[test]
fn ntp_servers_cannot_inject_configuration() {
    let ws = Workspace::new("check-ntp");
    edit(&ws, "\"pool.ntp.org\"", "\"a\\n[Time]\\nNTP=evil\"");
    expect_error(
        &ws,
        line_of(&ws, "ntp = ", 0),
        &["network.ntp[1]", "not a host name or address", "expected"],
    );
}

#[test]
fn ssh_keys_are_one_authorized_keys_line_each() {
    let ws = Workspace::new("check-ssh-newline");
    edit(
        &ws,
        "ssh_authorized_keys = []",
        "ssh_authorized_keys = [\"ssh-ed25519 AAAAC3Nza a@b\\ncommand=\\\"sh\\\" ssh-rsa AAAAB3 evil\"]",
    );
    expect_error(
        &ws,
        line_of(&ws, "ssh_authorized_keys", 0),
        &[
            "defaults.ssh_authorized_keys[0]",
            "not one authorized_keys line",
            "expected",
        ],
    );

    let ws = Workspace::new("check-ssh-node");
    edit(
        &ws,
        "role = \"agent\"",
        "role = \"agent\"\nssh_authorized_keys = [\"ssh-ed25519 AAAAC3Nza ok\", \"hello\"]",
    );
    expect_error(
        &ws,
        line_of(&ws, "hello", 0),
        &[
            "node[4].ssh_authorized_keys[1]",
            "not one authorized_keys line",
        ],
    );
}

#[test]
fn cluster_names_are_rfc1123_labels() {
    let ws = Workspace::new("check-cluster-name");
    edit(&ws, "name = \"staging\"", "name = \"staging;reboot\"");
    edit(&ws, "cluster = \"staging\"", "cluster = \"staging;reboot\"");
    expect_error(
        &ws,
        line_of(&ws, "name = \"staging;reboot\"", 0),
        &["cluster[0].name", "not a valid cluster name", "expected"],
    );
}

#[test]
fn overlays_stay_inside_the_overlays_directory() {
    for (name, bad, what) in [
        ("dotdot", "../boards", "not an overlay name"),
        ("absolute", "/etc", "not an overlay name"),
        ("missing", "nope", "not found"),
    ] {
        let ws = Workspace::new(&format!("check-overlay-{name}"));
        edit(
            &ws,
            "overlays = [\"hardening\"]",
            &format!("overlays = [\"hardening\", \"{bad}\"]"),
        );
        expect_error(
            &ws,
            line_of(&ws, "overlays = ", 0),
            &["defaults.overlays[1]", what, "expected"],
        );
    }

    // An overlay directory that is a symlink to /etc resolves outside overlays/.
    let ws = Workspace::new("check-overlay-symlink");
    std::os::unix::fs::symlink("/etc", ws.path("overlays/etc-link")).unwrap();
    edit(
        &ws,
        "role = \"agent\"",
        "role = \"agent\"\noverlays = [\"etc-link\"]",
    );
    expect_error(
        &ws,
        line_of(&ws, "etc-link", 0),
        &["node[4].overlays[0]", "resolves to /etc", "outside"],
    );

    // A symlink *inside* an overlay is an entry of the image, whatever it points at.
    let ws = Workspace::new("check-overlay-inner-link");
    std::os::unix::fs::symlink("/etc/passwd", ws.path("overlays/hardening/etc/passwd-link"))
        .unwrap();
    assert_ok(
        &ws.kiln(&["check"]),
        "check with a symlink inside an overlay",
    );
}

#[test]
fn token_file_that_is_not_a_regular_file() {
    let ws = Workspace::new("check-token-dir");
    let t = ws.path("secrets/production.token");
    std::fs::remove_file(&t).unwrap();
    std::fs::create_dir(&t).unwrap();
    std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o700)).unwrap();
    expect_error(
        &ws,
        line_of(&ws, "production.token", 0),
        &[
            "cluster[1].token_file",
            "is a directory",
            "expected a regular file",
        ],
    );

    // A fifo would make the build block reading it.
    let ws = Workspace::new("check-token-fifo");
    let t = ws.path("secrets/staging.token");
    std::fs::remove_file(&t).unwrap();
    let o = run("mkfifo", &["-m", "600", t.to_str().unwrap()]);
    assert_ok(&o, "mkfifo");
    expect_error(
        &ws,
        line_of(&ws, "staging.token", 0),
        &[
            "cluster[0].token_file",
            "is a fifo",
            "expected a regular file",
        ],
    );
}

#[test]
fn urls_and_bmc_values_cannot_inject() {
    let ws = Workspace::new("check-mirror");
    append(
        &ws,
        "\n[debian]\nmirror = \"http://deb.example/debian\\nevil\"\n",
    );
    expect_error(
        &ws,
        line_of(&ws, "mirror = ", 0),
        &["debian.mirror", "not a URL", "expected"],
    );

    let ws = Workspace::new("check-release-url");
    edit(
        &ws,
        "version = \"v1.33.5+k3s1\"",
        "version = \"v1.33.5+k3s1\"\nrelease_url = \"https://example.com/k3s releases\"",
    );
    expect_error(
        &ws,
        line_of(&ws, "release_url", 0),
        &["k3s.release_url", "not an http(s) URL"],
    );

    let ws = Workspace::new("check-bmc");
    append(
        &ws,
        "\n[bmc]\nhost = \"turingpi.lan/evil\"\nuser = \"ro:ot\"\ntls_sha256 = \"abc\"\n",
    );
    let o = ws.kiln(&["check"]);
    let err = stderr(&o);
    for (field, key) in [
        ("bmc.host", "host = "),
        ("bmc.user", "user = "),
        ("bmc.tls_sha256", "tls_sha256 = "),
    ] {
        let prefix = format!("kiln.toml:{}:", line_of(&ws, key, 0));
        assert!(
            err.lines()
                .any(|l| l.contains(&prefix) && l.contains(field) && l.contains("expected")),
            "no `{prefix}` {field} error in:\n{err}"
        );
    }
}

#[test]
fn type_errors_name_the_field_path() {
    let ws = Workspace::new("check-type-ip");
    edit(&ws, "ip = \"192.168.100.13\"", "ip = 13");
    expect_error(
        &ws,
        line_of(&ws, "ip = 13", 0),
        &["node[3].ip", "invalid type: integer `13`"],
    );

    let ws = Workspace::new("check-type-slot");
    edit(&ws, "slot = 4", "slot = 400");
    expect_error(
        &ws,
        line_of(&ws, "slot = 400", 0),
        &["node[4].slot", "expected u8"],
    );

    let ws = Workspace::new("check-type-dns");
    edit(
        &ws,
        "dns = [\"192.168.100.1\"]",
        "dns = [\"192.168.100.1\", \"dns.example\"]",
    );
    expect_error(
        &ws,
        line_of(&ws, "dns = ", 0),
        &["network.dns[1]", "invalid"],
    );

    let ws = Workspace::new("check-missing-field");
    edit(&ws, "role = \"agent\"\n", "");
    let o = ws.kiln(&["check"]);
    let err = stderr(&o);
    assert!(
        err.contains("node[4].role") && err.contains("missing field `role`"),
        "{err}"
    );
}
