//! `kiln reimage` end to end against a fake BMC and a fake Kubernetes API (test doubles on
//! 127.0.0.1): build, delete the Node, power off, flash, power on, wait until Ready.

mod common_bmc;

use common_bmc::bmc::{FakeBmc, Mode};
use common_bmc::fixture::{Workspace, shift, stderr, stdout};
use common_bmc::kube::{FakeKube, node};

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
    let out = reimage(&ws, "n2", &[]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let so = stdout(&out);
    for step in [
        "build",
        "delete-node",
        "power-off",
        "flash",
        "power-on",
        "wait-ready",
    ] {
        assert!(
            so.contains(&format!("n2: {step}")),
            "step {step} not printed: {so}"
        );
    }
    assert_eq!(kube.deletes(), vec!["/api/v1/nodes/n2".to_string()]);
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
