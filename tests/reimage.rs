//! `kiln reimage` end to end against a fake BMC and a fake Kubernetes API (test doubles on
//! 127.0.0.1): build, power off, delete the Node, flash, power on, wait until Ready.

mod common_bmc;

use common_bmc::bmc::{FakeBmc, Mode};
use common_bmc::fixture::{Workspace, shift, stderr, stdout};
use common_bmc::kube::{FakeKube, Stale, node};

fn setup(
    name: &str,
    ip_base: u8,
    nodes: Vec<serde_json::Value>,
    revive: Option<(&str, usize)>,
) -> (FakeBmc, FakeKube, Workspace) {
    let bmc = FakeBmc::start(Mode::Normal);
    let back = revive.map(|(n, slot)| {
        let ip = shift(
            if n == "n2" {
                "127.0.0.12"
            } else {
                "127.0.0.13"
            },
            ip_base,
        );
        (
            n.to_string(),
            slot,
            bmc.state.clone(),
            node(n, &ip, true, n.starts_with('n'), "new-boot"),
        )
    });
    let kube = FakeKube::start(nodes, back);
    let host = bmc.addr.to_string();
    let ws = Workspace::new(
        name,
        Some((&host, Some(&bmc.cert.sha256_colons))),
        Some("kube.yaml"),
        ip_base,
    );
    std::fs::write(ws.path("kube.yaml"), kube.kubeconfig()).unwrap();
    (bmc, kube, ws)
}

fn reimage(ws: &Workspace, node: &str, extra: &[&str]) -> std::process::Output {
    let art = ws.artifact_args();
    let mut a = vec!["reimage", node, "--timeout", "60"];
    a.extend(art.iter().map(String::as_str));
    a.extend_from_slice(extra);
    ws.kiln(&a)
}

#[test]
fn a_server_is_removed_from_etcd_flashed_and_waited_for() {
    let b = 30;
    let nodes = vec![
        node("n1", &shift("127.0.0.11", b), true, true, "n1-boot"),
        node("n2", &shift("127.0.0.12", b), false, true, "old-boot"),
    ];
    let (bmc, kube, ws) = setup("reimage-server", b, nodes, Some(("n2", 2)));
    bmc.state.lock().unwrap().power[1] = true;
    kube.watch_power("n2", 2, bmc.state.clone());
    let out = reimage(&ws, "n2", &[]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let so = stdout(&out);
    let mut at = 0;
    for (i, step) in [
        "build",
        "power-off",
        "delete-node",
        "flash",
        "power-on",
        "wait-ready",
    ]
    .iter()
    .enumerate()
    {
        let line = format!("[{}/6] n2: {step}", i + 1);
        let found = so[at..].find(&line);
        assert!(
            found.is_some(),
            "step {step} not printed as `{line}` after the previous one: {so}"
        );
        at += found.unwrap_or(0);
    }
    assert_eq!(kube.deletes(), vec!["/api/v1/nodes/n2".to_string()]);
    // A server still running when its etcd member goes would wipe itself and rejoin under
    // the same name: the Node is deleted only once its slot is off.
    assert_eq!(
        kube.state.lock().unwrap().power_at_delete,
        vec![("n2".to_string(), Some(false))],
        "the Node must be deleted while its slot is powered off"
    );
    // Power off, then flash, then power on — in that order.
    let reqs = bmc.requests();
    let idx = |f: &dyn Fn(&common_bmc::http::Request) -> bool| {
        reqs.iter().position(f).expect("request missing")
    };
    let off = idx(&|r| r.param("node2") == Some("0"));
    let flash = idx(&|r| r.param("type") == Some("flash") && r.param("opt") == Some("set"));
    let on = idx(&|r| r.param("node2") == Some("1"));
    assert!(
        off < flash && flash < on,
        "order: off {off}, flash {flash}, on {on}"
    );
    assert_eq!(bmc.uploads().len(), 1);
    let k = kube.state.lock().unwrap();
    assert!(k.nodes["n2"]["status"]["nodeInfo"]["bootID"] == "new-boot");
    // The image flashed was built to rejoin: its first boot never initialises a cluster.
    let insp = ws.kiln(&["inspect", "--json", "out/n2.img"]);
    assert!(insp.status.success(), "{}", stderr(&insp));
    let v: serde_json::Value = serde_json::from_slice(&insp.stdout).unwrap();
    assert_eq!(v["identity"]["join"], "rejoin", "{v}");
}

#[test]
fn an_agent_keeps_its_node_and_skips_the_etcd_step() {
    let b = 31;
    let nodes = vec![
        node("n1", &shift("127.0.0.11", b), true, true, "n1-boot"),
        node("a3", &shift("127.0.0.13", b), true, false, "old-boot"),
    ];
    let (bmc, kube, ws) = setup("reimage-agent", b, nodes, Some(("a3", 3)));
    let out = reimage(&ws, "a3", &[]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("skipped: agents have no etcd member"),
        "{}",
        stdout(&out)
    );
    assert!(kube.deletes().is_empty(), "agents keep their Node");
    assert_eq!(
        bmc.power_sets(),
        vec![("node3".into(), "0".into()), ("node3".into(), "1".into())]
    );
}

#[test]
fn a_node_with_another_address_is_not_deleted() {
    let b = 32;
    // The kubeconfig points at a cluster where `n2` is some other machine.
    let nodes = vec![
        node("n1", &shift("127.0.0.11", b), true, true, "n1-boot"),
        node("n2", "10.9.9.9", true, true, "x"),
    ];
    let (bmc, kube, ws) = setup("reimage-wrongip", b, nodes, None);
    ws.build("n2");
    let out = reimage(&ws, "n2", &["--from-step", "delete-node"]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("InternalIP 10.9.9.9"), "{e}");
    assert!(e.contains("--from-step delete-node"), "{e}");
    assert!(kube.deletes().is_empty());
    assert!(
        bmc.requests().is_empty(),
        "nothing may be powered off or flashed"
    );
}

#[test]
fn an_image_built_to_create_the_cluster_is_never_flashed_by_a_reimage() {
    let b = 33;
    let nodes = vec![
        node("n1", &shift("127.0.0.11", b), true, true, "n1-boot"),
        node("n2", &shift("127.0.0.12", b), true, true, "old-boot"),
    ];
    let (bmc, _kube, ws) = setup("reimage-initimage", b, nodes, None);
    // `kiln build` without --rejoin: n1 is the bootstrap server, its image may initialise.
    ws.build("n1");
    let out = reimage(&ws, "n1", &["--from-step", "flash"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let e = stderr(&out);
    assert!(e.contains("must rejoin") && e.contains("--rejoin"), "{e}");
    assert!(
        bmc.uploads().is_empty(),
        "an init image was uploaded to the BMC"
    );
}

#[test]
fn a_powered_on_server_is_never_deleted_and_power_off_comes_first() {
    let b = 34;
    let nodes = vec![
        node("n1", &shift("127.0.0.11", b), true, true, "n1-boot"),
        node("n2", &shift("127.0.0.12", b), false, true, "old-boot"),
    ];
    let (bmc, kube, ws) = setup("reimage-poweredon", b, nodes, None);
    kube.watch_power("n2", 2, bmc.state.clone());
    bmc.state.lock().unwrap().power[1] = true;
    // Resuming at delete-node skips power-off: kiln must see the slot is still on and refuse.
    let out = reimage(&ws, "n2", &["--from-step", "delete-node"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let e = stderr(&out);
    assert!(
        e.contains("slot 2 (n2) is powered on") && e.contains("--from-step power-off"),
        "{e}"
    );
    assert!(kube.deletes().is_empty(), "a powered-on server was deleted");
    assert!(bmc.power_sets().is_empty(), "delete-node switches nothing");

    // From power-off, the new order runs power-off, then delete-node (then flash, which
    // refuses this init image: only the order up to the delete matters here).
    ws.build("n2");
    let out = reimage(&ws, "n2", &["--from-step", "power-off"]);
    let so = stdout(&out);
    assert!(!out.status.success(), "{so}");
    let off = so.find("[2/6] n2: power-off").expect(&so);
    let del = so.find("[3/6] n2: delete-node").expect(&so);
    assert!(off < del, "{so}");
    assert!(
        stderr(&out).contains("step `flash` failed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        bmc.power_sets(),
        vec![("node2".to_string(), "0".to_string())]
    );
    assert_eq!(
        kube.state.lock().unwrap().power_at_delete,
        vec![("n2".to_string(), Some(false))]
    );
}

#[test]
fn a_wrong_cluster_is_noticed_before_anything_is_powered_off() {
    let b = 35;
    let nodes = vec![
        node("n1", &shift("127.0.0.11", b), true, true, "n1-boot"),
        node("n2", "10.9.9.9", true, true, "x"),
    ];
    let (bmc, kube, ws) = setup("reimage-wrongip-off", b, nodes, None);
    let out = reimage(&ws, "n2", &["--from-step", "power-off"]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("InternalIP 10.9.9.9"), "{e}");
    assert!(e.contains("--from-step power-off"), "{e}");
    assert!(kube.deletes().is_empty());
    assert!(
        bmc.requests().is_empty(),
        "the Kubernetes checks come before the BMC is touched"
    );
}

#[test]
fn the_last_etcd_server_is_not_powered_off_without_force() {
    let b = 36;
    let nodes = vec![
        node("n1", &shift("127.0.0.11", b), false, true, "n1-boot"),
        node("n2", &shift("127.0.0.12", b), true, true, "old-boot"),
    ];
    let (bmc, kube, ws) = setup("reimage-lastetcd", b, nodes, None);
    let out = reimage(&ws, "n2", &["--from-step", "power-off"]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("no other Ready etcd server"), "{e}");
    assert!(kube.deletes().is_empty());
    assert!(bmc.requests().is_empty(), "nothing may be switched off");
}

#[test]
fn an_agents_old_node_still_ready_is_not_taken_for_the_new_boot() {
    let b = 37;
    let nodes = vec![
        node("n1", &shift("127.0.0.11", b), true, true, "n1-boot"),
        node("a3", &shift("127.0.0.13", b), true, false, "old-boot"),
    ];
    let (_bmc, kube, ws) = setup("reimage-staleboot", b, nodes, Some(("a3", 3)));
    // An agent's Node is never deleted: after the power-on the cluster still serves the old
    // object, Ready with the old boot ID, until the new kubelet reports.
    let stale = 3;
    kube.stale_for(Stale::Reads(stale));
    let out = reimage(&ws, "a3", &[]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(kube.deletes().is_empty(), "agents keep their Node");
    let reads = kube.reads_after_power_on();
    assert!(
        reads > stale,
        "kiln took the old boot (Ready, boot ID old-boot) for the new one: it read the Node {reads} time(s) after the power-on, the first {stale} of them stale"
    );
    assert!(
        stdout(&out).contains("a3: reimaged and Ready"),
        "{}",
        stdout(&out)
    );
    let k = kube.state.lock().unwrap();
    assert_eq!(k.nodes["a3"]["status"]["nodeInfo"]["bootID"], "new-boot");
}

#[test]
fn a_node_that_keeps_its_old_boot_fails_wait_ready() {
    let b = 38;
    let nodes = vec![
        node("n1", &shift("127.0.0.11", b), true, true, "n1-boot"),
        node("a3", &shift("127.0.0.13", b), true, false, "old-boot"),
    ];
    let (bmc, kube, ws) = setup("reimage-oldbootforever", b, nodes, Some(("a3", 3)));
    // The new image never registers: the Node stays Ready with the old boot ID.
    kube.stale_for(Stale::Forever);
    let art = ws.artifact_args();
    let mut a = vec!["reimage", "a3", "--timeout", "3"];
    a.extend(art.iter().map(String::as_str));
    let out = ws.kiln(&a);
    let (so, e) = (stdout(&out), stderr(&out));
    assert!(
        !out.status.success(),
        "a Node still on its old boot was taken as reimaged:\n{so}\n{e}"
    );
    assert_eq!(bmc.uploads().len(), 1, "the slot was flashed: {so}\n{e}");
    assert!(
        e.contains("step `wait-ready` failed") && e.contains("--from-step wait-ready"),
        "{e}"
    );
    assert!(
        e.contains("Node a3 is not Ready with a new boot after 3 s")
            && e.contains("still reports the old boot ID old-boot"),
        "{e}"
    );
    assert!(!so.contains("reimaged and Ready"), "{so}");
    assert!(
        kube.reads_after_power_on() >= 2,
        "kiln gave up without polling: {} read(s)",
        kube.reads_after_power_on()
    );
    drop(out);
    // Resumed at wait-ready, a new process that never saw the old boot: it still must not
    // take the old Node for the new boot.
    let out = ws.kiln(&[
        "reimage",
        "a3",
        "--timeout",
        "3",
        "--from-step",
        "wait-ready",
    ]);
    let (so, e) = (stdout(&out), stderr(&out));
    assert!(
        !out.status.success() && e.contains("still reports the old boot ID old-boot"),
        "a resumed wait-ready took the old boot for the new one:\n{so}\n{e}"
    );
    // Once the new boot registers, the resumed step succeeds.
    kube.stale_for(Stale::No);
    let out = ws.kiln(&[
        "reimage",
        "a3",
        "--timeout",
        "30",
        "--from-step",
        "wait-ready",
    ]);
    assert!(
        out.status.success() && stdout(&out).contains("a3: reimaged and Ready"),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
}

#[test]
fn with_no_kubeconfig_reimage_signs_in_with_admin_credentials_from_the_cluster_ca() {
    let b = 60;
    let bmc = FakeBmc::start(Mode::Normal);
    let host = bmc.addr.to_string();
    let ws = Workspace::new(
        "reimage-own-kube",
        Some((&host, Some(&bmc.cert.sha256_colons))),
        None,
        b,
    );
    // A new cluster: its CA and pinned token from `kiln secrets init`.
    std::fs::remove_file(ws.path("secrets/prod.token")).unwrap();
    let o = ws.kiln(&["secrets", "init"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let nodes = vec![
        node("n1", &shift("127.0.0.11", b), true, true, "n1-boot"),
        node("n2", &shift("127.0.0.12", b), false, true, "old-boot"),
    ];
    let back = (
        "n2".to_string(),
        2,
        bmc.state.clone(),
        node("n2", &shift("127.0.0.12", b), true, true, "new-boot"),
    );
    // The API server presents a certificate of the cluster's server CA and lets in only
    // clients of its client CA in system:masters.
    let kube = FakeKube::start_with_cluster_ca(nodes, Some(back), &ws.path("secrets/prod.ca"));
    let inv = std::fs::read_to_string(ws.path("kiln.toml"))
        .unwrap()
        .replace(
            "token_file = \"secrets/prod.token\"\n",
            &format!(
                "token_file = \"secrets/prod.token\"\napi_server = \"https://{}\"\n",
                kube.addr
            ),
        );
    std::fs::write(ws.path("kiln.toml"), inv).unwrap();
    // No kubeconfig in the inventory, none in the environment (kiln_command removes it).
    let out = reimage(&ws, "n2", &[]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(kube.deletes(), vec!["/api/v1/nodes/n2".to_string()]);
    let k = kube.state.lock().unwrap();
    assert!(k.nodes["n2"]["status"]["nodeInfo"]["bootID"] == "new-boot");
    assert!(!k.requests.is_empty());
    for r in &k.requests {
        assert!(
            r.client_cert.is_some() && r.header("authorization").is_none(),
            "{} {} without the admin client certificate",
            r.method,
            r.path
        );
    }
    let all = stdout(&out) + &stderr(&out);
    assert!(all.contains("as system:admin from the cluster CA"), "{all}");
    assert!(!all.contains("PRIVATE KEY"));
}
