//! Cluster trust made at build time (`kiln secrets init`, `kiln secrets pin`, `kiln kubeconfig`),
//! checked with independent tools: openssl for every certificate, key and hash, debugfs and
//! mtools for where the files land in an image, and Debian's kubectl against a test API
//! server (a TEST DOUBLE, tests/common_bmc/kube.rs) whose certificate the cluster CA signed.

mod common;
// For the test Kubernetes API; it loads common/k3s.rs again, harmlessly.
#[allow(clippy::duplicate_mod)]
mod common_bmc;

use common::disk::*;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A workspace whose clusters are new: no tokens yet, so `kiln secrets init` makes the CAs.
fn ca_workspace(name: &str) -> Workspace {
    let ws = Workspace::new(name);
    for c in ["staging", "production"] {
        std::fs::remove_file(ws.path(&format!("secrets/{c}.token"))).unwrap();
    }
    assert_ok(&ws.kiln(&["secrets", "init"]), "secrets init");
    ws
}

fn openssl(args: &[&str]) -> String {
    let o = run("openssl", args);
    assert_ok(&o, &format!("openssl {}", args.join(" ")));
    stdout(&o)
}

fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// SHA-256 of a certificate's DER (its fingerprint), lowercase hex, by openssl.
fn der_sha256(pem: &Path) -> String {
    let o = openssl(&["x509", "-in", p(pem), "-noout", "-fingerprint", "-sha256"]);
    o.trim()
        .rsplit('=')
        .next()
        .unwrap()
        .replace(':', "")
        .to_lowercase()
}

fn token(ws: &Workspace, cluster: &str) -> String {
    std::fs::read_to_string(ws.path(&format!("secrets/{cluster}.token")))
        .unwrap()
        .trim()
        .to_string()
}

const LEAVES: [(&str, &str); 5] = [
    ("client-ca", "client"),
    ("server-ca", "server"),
    ("request-header-ca", "request-header"),
    ("etcd/peer-ca", "etcd-peer"),
    ("etcd/server-ca", "etcd-server"),
];

#[test]
fn secrets_init_makes_the_ca_set_of_k3s_custom_ca_script_and_a_pinned_token() {
    let ws = ca_workspace("ca-init");
    let ca = ws.path("secrets/production.ca");
    assert_eq!(mode(&ca), 0o700);
    assert_eq!(mode(&ca.join("etcd")), 0o700);
    let mut files = 0;
    for e in walk(&ca) {
        if e.is_file() {
            files += 1;
            assert_eq!(mode(&e), 0o600, "{}", e.display());
        }
    }
    // root, intermediate and five CAs as .key/.pem/.crt, and service.key.
    assert_eq!(files, 7 * 3 + 1);

    let root = ca.join("root-ca.pem");
    let int = ca.join("intermediate-ca.pem");
    let text = |f: &Path| openssl(&["x509", "-in", p(f), "-noout", "-text"]);
    let days_left = |f: &Path, d: u64| {
        run(
            "openssl",
            &[
                "x509",
                "-in",
                p(f),
                "-noout",
                "-checkend",
                &(d * 86400).to_string(),
            ],
        )
        .status
        .success()
    };
    // Root: RSA 4096, self-signed, 7300 days.
    let t = text(&root);
    assert!(t.contains("Public-Key: (4096 bit)"), "{t}");
    assert!(
        t.contains("Subject: CN=k3s-root-ca@") || t.contains("Subject: CN = k3s-root-ca@"),
        "{t}"
    );
    assert!(
        days_left(&root, 7299) && !days_left(&root, 7301),
        "root validity"
    );
    assert!(openssl(&["verify", "-CAfile", p(&root), p(&root)]).contains("OK"));
    // Intermediate: RSA 4096, signed by the root, 3700 days.
    let t = text(&int);
    assert!(
        t.contains("Public-Key: (4096 bit)") && t.contains("k3s-intermediate-ca@"),
        "{t}"
    );
    assert!(
        days_left(&int, 3699) && !days_left(&int, 3701),
        "intermediate validity"
    );
    assert!(openssl(&["verify", "-CAfile", p(&root), p(&int)]).contains("OK"));

    let ts = {
        let t = text(&root);
        let i = t.find("k3s-root-ca@").unwrap() + "k3s-root-ca@".len();
        t[i..].split_whitespace().next().unwrap().to_string()
    };
    for (stem, kind) in LEAVES {
        let pem = ca.join(format!("{stem}.pem"));
        let crt = ca.join(format!("{stem}.crt"));
        let key = ca.join(format!("{stem}.key"));
        let t = text(&pem);
        // The script's [v3_ca]: CN only, critical CA:TRUE without pathlen, critical key usage,
        // SKI and AKI, SHA-256 by the (RSA) intermediate, no EKU; an EC P-256 key.
        assert!(t.contains(&format!("k3s-{kind}-ca@{ts}")), "{stem}: {t}");
        assert!(
            t.contains("Basic Constraints: critical") && t.contains("CA:TRUE"),
            "{stem}: {t}"
        );
        assert!(!t.contains("pathlen"), "{stem}: {t}");
        assert!(
            t.contains("Key Usage: critical")
                && t.contains("Digital Signature, Key Encipherment, Certificate Sign"),
            "{stem}: {t}"
        );
        assert!(
            t.contains("Subject Key Identifier") && t.contains("Authority Key Identifier"),
            "{stem}: {t}"
        );
        assert!(!t.contains("Extended Key Usage"), "{stem}: {t}");
        assert!(t.contains("sha256WithRSAEncryption"), "{stem}: {t}");
        assert!(
            t.contains("prime256v1") || t.contains("P-256"),
            "{stem}: {t}"
        );
        assert!(
            days_left(&pem, 3699) && !days_left(&pem, 3701),
            "{stem} validity"
        );
        let v = openssl(&[
            "verify",
            "-CAfile",
            p(&root),
            "-untrusted",
            p(&int),
            p(&pem),
        ]);
        assert!(v.contains("OK"), "{stem}: {v}");
        // <x>-ca.crt: the CA, then the intermediate, then the root (k3s signs with the first).
        let want = [pem.clone(), int.clone(), root.clone()]
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect::<String>();
        assert_eq!(std::fs::read_to_string(&crt).unwrap(), want, "{stem}.crt");
        // The key: SEC1 (`openssl ecparam -genkey -noout`), the certificate's.
        let k = std::fs::read_to_string(&key).unwrap();
        assert!(
            k.starts_with("-----BEGIN EC PRIVATE KEY-----"),
            "{stem}.key"
        );
        let from_key = openssl(&["pkey", "-in", p(&key), "-pubout"]);
        let from_cert = openssl(&["x509", "-in", p(&pem), "-noout", "-pubkey"]);
        assert_eq!(from_key, from_cert, "{stem}.key does not match {stem}.pem");
    }
    // service.key: RSA 2048, PKCS#1 (`genrsa -traditional`).
    let sk = ca.join("service.key");
    assert!(
        std::fs::read_to_string(&sk)
            .unwrap()
            .starts_with("-----BEGIN RSA PRIVATE KEY-----")
    );
    let t = openssl(&["rsa", "-in", p(&sk), "-noout", "-text", "-check"]);
    assert!(t.contains("2048 bit") && t.contains("RSA key ok"), "{t}");

    // The token: K10 + the root's DER SHA-256 (k3s hashCA for a bundle of several
    // certificates) + ::server: + a secret.
    let tok = token(&ws, "production");
    let hash = der_sha256(&root);
    assert!(
        tok.starts_with(&format!("K10{hash}::server:")),
        "{}",
        &tok[..3]
    );
    assert!(tok.len() > 3 + 64 + 9 + 32);
    assert_eq!(mode(&ws.path("secrets/production.token")), 0o600);
    // Another cluster, another root.
    assert_ne!(der_sha256(&ws.path("secrets/staging.ca/root-ca.pem")), hash);

    // Never overwritten: a second init keeps every byte.
    let before: Vec<(PathBuf, Vec<u8>)> = walk(&ws.path("secrets"))
        .into_iter()
        .filter(|f| f.is_file())
        .map(|f| (f.clone(), std::fs::read(&f).unwrap()))
        .collect();
    let o = ws.kiln(&["secrets", "init"]);
    assert_ok(&o, "second init");
    assert!(stdout(&o).contains("kept"), "{}", stdout(&o));
    for (f, b) in before {
        assert_eq!(std::fs::read(&f).unwrap(), b, "{} changed", f.display());
    }
    // Nothing secret was printed.
    assert!(!stdout(&o).contains(&tok) && !stdout(&o).contains("PRIVATE KEY"));
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let e = e.unwrap().path();
        if e.is_dir() {
            out.extend(walk(&e));
        }
        out.push(e);
    }
    out
}

#[test]
fn a_bare_token_is_kept_and_pinned_only_by_kiln_secrets_pin() {
    // Workspace::new writes bare tokens: clusters from before kiln made CAs.
    let ws = Workspace::new("ca-pin");
    let bare = token(&ws, "production");
    let o = ws.kiln(&["secrets", "init"]);
    assert_ok(&o, "init");
    assert!(stdout(&o).contains("no CA made at"), "{}", stdout(&o));
    assert!(!ws.path("secrets/production.ca").exists());
    assert_eq!(token(&ws, "production"), bare);

    // Without saying where the CA comes from, nothing changes.
    let o = ws.kiln(&["secrets", "pin", "production"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--new-ca") && stderr(&o).contains("--cacerts"),
        "{}",
        stderr(&o)
    );
    assert_eq!(token(&ws, "production"), bare);

    // A running cluster whose CA k3s made: pinned to its /cacerts (one self-signed
    // certificate here, so k3s hashes the bytes as they are).
    let cacerts = ws.path("cacerts.pem");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=k3s-server-ca@1700000000",
        "-days",
        "3650",
        "-keyout",
        p(&ws.path("cacerts.key")),
        "-out",
        p(&cacerts),
    ]);
    let o = ws.kiln(&["secrets", "pin", "production", "--cacerts", p(&cacerts)]);
    assert_ok(&o, "pin --cacerts");
    let bytes_hash = common::k3s::sha256(&std::fs::read(&cacerts).unwrap());
    assert_eq!(
        token(&ws, "production"),
        format!("K10{bytes_hash}::server:{bare}")
    );
    assert_eq!(mode(&ws.path("secrets/production.token")), 0o600);
    assert_eq!(
        std::fs::read(ws.path("secrets/production.ca/server-ca.crt")).unwrap(),
        std::fs::read(&cacerts).unwrap()
    );
    // Pinned once is enough.
    let o = ws.kiln(&["secrets", "pin", "production", "--cacerts", p(&cacerts)]);
    assert!(
        !o.status.success() && stderr(&o).contains("already pinned"),
        "{}",
        stderr(&o)
    );
    // kiln cannot sign for a CA it does not hold.
    let o = ws.kiln(&["kubeconfig", "production"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("holds only the server CA bundle"),
        "{}",
        stderr(&o)
    );

    // A cluster that has not started: a new CA set, the same secret.
    let bare_staging = token(&ws, "staging");
    assert_ok(
        &ws.kiln(&["secrets", "pin", "staging", "--new-ca"]),
        "pin --new-ca",
    );
    let root = der_sha256(&ws.path("secrets/staging.ca/root-ca.pem"));
    assert_eq!(
        token(&ws, "staging"),
        format!("K10{root}::server:{bare_staging}")
    );
}

#[test]
fn a_token_that_pins_another_ca_stops_the_build_and_is_not_printed() {
    let ws = ca_workspace("ca-mismatch");
    let bases = make_bases(&ws.dir);
    let tok = token(&ws, "staging");
    let other = der_sha256(&ws.path("secrets/production.ca/root-ca.pem"));
    let secret = tok.rsplit(':').next().unwrap();
    let forged = format!("K10{other}::server:{secret}\n");
    std::fs::write(ws.path("secrets/staging.token"), forged).unwrap();
    let o = build(&ws, &["pi5-staging"], &bases.tar, None);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("staging.token")
            && err.contains("staging.ca/server-ca.crt")
            && err.contains("pins CA hash"),
        "{err}"
    );
    assert!(!err.contains(secret), "the secret was printed: {err}");
    assert!(!ws.path("out/pi5-staging.img").exists());
}

#[test]
fn the_cluster_ca_goes_only_to_the_server_that_may_start_the_cluster() {
    let ws = ca_workspace("ca-image");
    let bases = make_bases(&ws.dir);
    let (ub, _) = uboot(&ws, 100_000);
    assert_ok(
        &build(
            &ws,
            &["rk1-1", "rk1-2", "rk1-4", "pi5-staging"],
            &bases.tar,
            Some(&ub),
        ),
        "build",
    );
    let mut a = build_args(&ws, &["rk1-1"], &bases.tar, Some(&ub));
    a.extend(["--rejoin", "--out", "rejoin"].map(String::from));
    let o = ws.kiln(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_ok(&o, "build --rejoin");
    let ca = ws.path("secrets/production.ca");
    let tls = "/var/lib/rancher/k3s/server/tls";
    let img = ws.path("out/rk1-1.img");
    let (_, parts) = sfdisk(&img);
    let root = parts[1].start;
    let work = ws.path("dump");
    std::fs::create_dir_all(&work).unwrap();
    for d in ["/var/lib/rancher/k3s/server", tls, &format!("{tls}/etcd")] {
        let (m, uid, _) = stat(&img, root, d);
        assert_eq!((m & 0o7777, uid), (0o700, 0), "{d}");
    }
    for f in kiln::secrets::ca::NODE_FILES {
        let path = format!("{tls}/{f}");
        let (m, uid, gid) = stat(&img, root, &path);
        assert_eq!((m & 0o7777, uid, gid), (0o600, 0, 0), "{path}");
        let got = dump(&img, root, &path, &work).unwrap();
        assert_eq!(got, std::fs::read(ca.join(f)).unwrap(), "{path}");
    }
    // The root and intermediate keys stay on the build machine.
    for f in [
        "root-ca.key",
        "intermediate-ca.key",
        "root-ca.pem",
        "intermediate-ca.pem",
    ] {
        assert!(
            !exists(&img, root, &format!("{tls}/{f}")),
            "{f} on the node"
        );
    }
    let bundle = std::fs::read(ca.join("server-ca.crt")).unwrap();
    // Other servers take the CAs from the datastore, agents never need them, and a rejoin
    // image never starts the cluster.
    for (img, what) in [
        (ws.path("out/rk1-2.img"), "rk1-2 (a joining server)"),
        (ws.path("out/rk1-4.img"), "rk1-4 (an agent)"),
        (ws.path("rejoin/rk1-1.img"), "rk1-1 built to rejoin"),
    ] {
        let (_, parts) = sfdisk(&img);
        let r = parts[1].start;
        assert!(!exists(&img, r, tls), "{what} has {tls}");
        // Only the public bundle, to check peers before they get the token.
        let (m, _, _) = stat(&img, r, "/etc/kiln/cluster-ca.crt");
        assert_eq!(m & 0o7777, 0o644, "{what}");
        assert_eq!(
            dump(&img, r, "/etc/kiln/cluster-ca.crt", &work).unwrap(),
            bundle,
            "{what}"
        );
        let env = cat(&img, r, "/etc/kiln/node.env");
        assert!(
            env.lines().any(|l| l == "KILN_CA=/etc/kiln/cluster-ca.crt"),
            "{what}: {env}"
        );
        // The pinned token, root-only.
        let (m, _, _) = stat(&img, r, "/etc/kiln/token");
        assert_eq!(m & 0o7777, 0o600);
        assert_eq!(
            cat(&img, r, "/etc/kiln/token").trim(),
            token(&ws, "production")
        );
    }
    // Never on the FAT partition, in kiln.json, the manifest, inspect output: no key, no
    // token, not even the public certificates.
    let tok = token(&ws, "production");
    let secret = tok.rsplit(':').next().unwrap().to_string();
    for img in [ws.path("out/rk1-1.img"), ws.path("out/pi5-staging.img")] {
        let fat = String::from_utf8_lossy(&fat_bytes(&img)).into_owned();
        assert!(
            !fat.contains("PRIVATE KEY") && !fat.contains("BEGIN CERTIFICATE"),
            "{}",
            img.display()
        );
        assert!(!fat.contains(&secret));
        let insp = ws.kiln(&["inspect", "--json", p(&img)]);
        assert_ok(&insp, "inspect");
        let all = stdout(&insp) + &stderr(&insp);
        assert!(
            !all.contains("PRIVATE KEY")
                && !all.contains("BEGIN CERTIFICATE")
                && !all.contains(&secret)
        );
    }
    for e in std::fs::read_dir(ws.path("out")).unwrap() {
        let f = e.unwrap().path();
        if f.extension().is_some_and(|x| x == "img" || x == "xz") {
            continue;
        }
        if let Ok(t) = std::fs::read_to_string(&f) {
            assert!(
                !t.contains("PRIVATE KEY")
                    && !t.contains("BEGIN CERTIFICATE")
                    && !t.contains(&secret),
                "{}",
                f.display()
            );
        }
    }
}

/// Debian's kubectl (kubernetes-client), unpacked once into kiln's cache by
/// tools/debian-kubectl.sh: whatever else owns `kubectl` on the machine is not what is tested.
fn debian_kubectl() -> PathBuf {
    let cache = std::env::var_os("KILN_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("kiln")))
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/kiln"));
    let o = std::process::Command::new("bash")
        .arg(repo().join("tools/debian-kubectl.sh"))
        .arg(cache.join("debian-kubectl"))
        .output()
        .unwrap();
    assert_ok(&o, "tools/debian-kubectl.sh");
    PathBuf::from(stdout(&o).trim())
}

#[test]
fn kiln_kubeconfig_is_accepted_by_kubectl_against_an_api_server_signed_by_the_cluster_ca() {
    let ws = ca_workspace("kubeconfig");
    let ca = ws.path("secrets/production.ca");
    let o = ws.kiln(&["kubeconfig", "production"]);
    assert_ok(&o, "kubeconfig");
    assert!(!stdout(&o).contains("PRIVATE KEY"));
    let kc = ws.path("secrets/production.kubeconfig");
    assert_eq!(mode(&kc), 0o600);
    let y: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&kc).unwrap()).unwrap();
    let b64 = |v: &serde_yaml_ng::Value| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    };
    let cluster = &y["clusters"][0]["cluster"];
    // The bootstrap server (rk1-1).
    assert_eq!(
        cluster["server"].as_str(),
        Some("https://192.168.100.11:6443")
    );
    assert_eq!(
        b64(&cluster["certificate-authority-data"]),
        std::fs::read(ca.join("server-ca.crt")).unwrap()
    );
    let user = &y["users"][0]["user"];
    let cert = ws.path("admin.crt");
    std::fs::write(&cert, b64(&user["client-certificate-data"])).unwrap();
    let key = ws.path("admin.key");
    std::fs::write(&key, b64(&user["client-key-data"])).unwrap();
    // k3s's client-admin: system:admin in system:masters, client auth, signed by the client
    // CA, written with the client CA's chain after it.
    let t = openssl(&["x509", "-in", p(&cert), "-noout", "-text"]);
    assert!(
        t.contains("O=system:masters") || t.contains("O = system:masters"),
        "{t}"
    );
    assert!(
        t.contains("CN=system:admin") || t.contains("CN = system:admin"),
        "{t}"
    );
    assert!(t.contains("TLS Web Client Authentication"), "{t}");
    assert!(t.contains("k3s-client-ca@"), "issuer: {t}");
    let v = openssl(&[
        "verify",
        "-CAfile",
        p(&ca.join("root-ca.pem")),
        "-untrusted",
        p(&ca.join("client-ca.crt")),
        p(&cert),
    ]);
    assert!(v.contains("OK"), "{v}");
    let chain = std::fs::read_to_string(&cert).unwrap();
    assert!(chain.ends_with(&std::fs::read_to_string(ca.join("client-ca.crt")).unwrap()));
    assert_eq!(
        openssl(&["pkey", "-in", p(&key), "-pubout"]),
        openssl(&["x509", "-in", p(&cert), "-noout", "-pubkey"])
    );

    // Debian's kubectl, against an API server with the cluster's certificates.
    let api = common_bmc::kube::FakeKube::start_with_cluster_ca(
        vec![common_bmc::kube::node(
            "rk1-1",
            "192.168.100.11",
            true,
            true,
            "b",
        )],
        None,
        &ca,
    );
    let kubectl_bin = debian_kubectl();
    let kubectl = |kubeconfig: &Path| {
        run(
            p(&kubectl_bin),
            &[
                "--kubeconfig",
                p(kubeconfig),
                "--server",
                &format!("https://{}", api.addr),
                "--cache-dir",
                p(&ws.path("kube-cache")),
                "get",
                "nodes",
                "-o",
                "name",
            ],
        )
    };
    let o = kubectl(&kc);
    assert_ok(&o, "kubectl get nodes");
    assert_eq!(stdout(&o).trim(), "node/rk1-1");

    // Another cluster's credentials are refused: its CA did not sign this API server's
    // certificate, and its client CA is not this cluster's.
    assert_ok(
        &ws.kiln(&["kubeconfig", "staging", "--out", "staging.kubeconfig"]),
        "staging",
    );
    let o = kubectl(&ws.path("staging.kubeconfig"));
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(stderr(&o).contains("certificate"), "{}", stderr(&o));
}
