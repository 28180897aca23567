//! Outputs of a build: compressed copies, bmap, SHA256SUMS and the manifest, checked with the
//! tools users run on them (sha256sum, zstd, xz, gzip, bmaptool) — and byte-identical across
//! builds in different directories at different times.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn sha(p: &Path) -> String {
    common::k3s::sha256(&std::fs::read(p).unwrap())
}

/// Decompresses with the standard tool and returns the sha256 of the result.
fn unpacked_sha(tool: &str, file: &Path) -> String {
    let o = Command::new(tool)
        .args(["-dc", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{tool} -dc {}: {}",
        file.display(),
        stderr(&o)
    );
    common::k3s::sha256(&o.stdout)
}

#[test]
fn default_outputs_are_raw_zst_bmap_sums_and_manifest_and_check_out() {
    let ws = Workspace::new("publish-default");
    let o = build_with(&ws, &["rk1-1", "pi5-staging"], &[], &[]);
    assert_ok(&o, "build");
    let out = ws.path("out");
    for n in ["rk1-1", "pi5-staging"] {
        let img = out.join(format!("{n}.img"));
        assert!(out.join(format!("{n}.img.zst")).is_file());
        assert!(
            !out.join(format!("{n}.img.xz")).exists(),
            "xz without --format xz"
        );
        assert_eq!(
            unpacked_sha("zstd", &out.join(format!("{n}.img.zst"))),
            sha(&img)
        );

        // bmaptool (the reference reader) copies the mapped blocks, checking each range's
        // sha256, and the copy equals the image.
        let copy = ws.path(&format!("{n}.copy"));
        let o = run(
            "bmaptool",
            &[
                "copy",
                "--bmap",
                out.join(format!("{n}.img.bmap")).to_str().unwrap(),
                img.to_str().unwrap(),
                copy.to_str().unwrap(),
            ],
        );
        assert_ok(&o, "bmaptool copy");
        let log = stderr(&o);
        assert!(
            log.contains("block map format version 2.0") && !log.contains("Traceback"),
            "bmaptool did not take the bmap:\n{log}"
        );
        assert_eq!(
            sha(&copy),
            sha(&img),
            "{n}: bmap copy differs from the image"
        );
    }
    // One SHA256SUMS for raw and compressed files, in sha256sum's own format.
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    for f in [
        "rk1-1.img",
        "rk1-1.img.zst",
        "pi5-staging.img",
        "pi5-staging.img.zst",
    ] {
        assert!(
            sums.lines().any(|l| l.ends_with(&format!("  {f}"))),
            "{f} not in:\n{sums}"
        );
    }
    let o = Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(&out)
        .output()
        .unwrap();
    assert_ok(&o, "sha256sum --check");

    // The manifest: inputs with sources and hashes, each node's identity and files; no token.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("kiln-manifest.json")).unwrap()).unwrap();
    assert_eq!(m["kiln_version"], env!("CARGO_PKG_VERSION"));
    let nodes = m["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0]["identity"]["node"], "rk1-1");
    let inputs = m["inputs"].to_string();
    assert!(
        inputs.contains(&common::k3s::sha256(&common::k3s::standin_binary())),
        "{inputs}"
    );
    assert!(
        inputs.contains("base:rk1") && inputs.contains("uboot"),
        "{inputs}"
    );
    let text = std::fs::read_to_string(out.join("kiln-manifest.json")).unwrap();
    for c in ["production", "staging"] {
        let tok = std::fs::read_to_string(ws.path(&format!("secrets/{c}.token"))).unwrap();
        assert!(!text.contains(tok.trim()), "token in the manifest");
    }
}

#[test]
fn format_flags_choose_the_companions_of_the_raw_image() {
    let ws = Workspace::new("publish-formats");
    let o = build_with(&ws, &["pi5-staging"], &["--format", "raw"], &[]);
    assert_ok(&o, "build --format raw");
    let out = ws.path("out");
    assert!(out.join("pi5-staging.img").is_file());
    assert!(
        !out.join("pi5-staging.img.zst").exists(),
        "--format raw made a .zst"
    );
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    assert_eq!(sums.lines().count(), 1, "{sums}");

    let o = build_with(
        &ws,
        &["pi5-staging"],
        &["--format", "xz", "--format", "gz"],
        &[],
    );
    assert_ok(&o, "build --format xz --format gz");
    let img = out.join("pi5-staging.img");
    assert_eq!(
        unpacked_sha("xz", &out.join("pi5-staging.img.xz")),
        sha(&img)
    );
    assert_eq!(
        unpacked_sha("gzip", &out.join("pi5-staging.img.gz")),
        sha(&img)
    );
    let s = stdout(&o);
    assert!(
        s.contains("xz ") && s.contains("gz "),
        "sizes not reported: {s}"
    );
}

#[test]
fn two_builds_in_different_directories_at_different_times_are_byte_identical() {
    let env = [("SOURCE_DATE_EPOCH", "1767225600")];
    let a = Workspace::new("publish-repro-a");
    let o = build_with(
        &a,
        &["rk1-2"],
        &["--format", "zst", "--format", "xz", "--format", "gz"],
        &env,
    );
    assert_ok(&o, "first build");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let b = Workspace::new("publish-repro-b");
    let o = build_with(
        &b,
        &["rk1-2"],
        &["--format", "zst", "--format", "xz", "--format", "gz"],
        &env,
    );
    assert_ok(&o, "second build");
    for f in [
        "rk1-2.img",
        "rk1-2.img.zst",
        "rk1-2.img.xz",
        "rk1-2.img.gz",
        "rk1-2.img.bmap",
        "SHA256SUMS",
    ] {
        assert_eq!(
            sha(&a.path(&format!("out/{f}"))),
            sha(&b.path(&format!("out/{f}"))),
            "{f} differs between two builds"
        );
    }
}
