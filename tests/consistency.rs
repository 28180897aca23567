//! A build's outputs always agree with each other, or the previous set survives: builds killed
//! (SIGKILL, SIGTERM) at named points, failed builds, two builds into one directory, leftovers
//! of killed runs, and a corrupt download cache. Checked from outside with `sha256sum --check`,
//! byte comparisons and debugfs.
//!
//! Builds are stopped deterministically with kiln's test hook (debug builds only, see
//! `kiln::cleanup::checkpoint`): `KILN_TEST_PAUSE_AT=<stage>` makes kiln print
//! `kiln: test hook: paused at <stage>` and wait there until it is signalled, or until the file
//! named by `KILN_TEST_RESUME_FILE` exists; `KILN_TEST_FAIL_AT=<stage>` makes it fail there.

mod common;

use common::disk::{dump, sfdisk};
use common::k3s::{Release, set_release, sha256, standin_binary};
use common::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const EPOCH_A: &str = "1767225600";
const EPOCH_B: &str = "1767312000";
const EPOCH_C: &str = "1767398400";
const NODE: &str = "pi5-staging";

/// `kiln build` arguments for `nodes` with the fixture base and the k3s stand-ins.
fn build_args(ws: &Workspace, nodes: &[&str]) -> Vec<String> {
    let base = ws.path("base.tar");
    if !base.exists() {
        make_bases(&ws.dir);
    }
    let mut args = vec!["build".to_string()];
    args.extend(nodes.iter().map(|s| s.to_string()));
    args.extend(["--artifact".to_string(), format!("base={}", base.display())]);
    args.extend(ws.k3s_args());
    args
}

fn command(ws: &Workspace, args: &[String], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.current_dir(&ws.dir)
        .args(args)
        .env("KILN_CACHE_DIR", ws.dir.join("cache"))
        .env_remove("KILN_TEST_PAUSE_AT")
        .env_remove("KILN_TEST_FAIL_AT")
        .env_remove("KILN_TEST_RESUME_FILE")
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn build(ws: &Workspace, nodes: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    command(ws, &build_args(ws, nodes), env).output().unwrap()
}

/// A kiln run in the background, stopped at a test-hook pause point.
struct Paused {
    child: Child,
    /// stderr lines read so far (the reader thread keeps draining the pipe).
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Paused {
    /// Starts `kiln args` with `KILN_TEST_PAUSE_AT=stage` and waits until it reports the pause.
    fn start(ws: &Workspace, args: &[String], stage: &str, env: &[(&str, &str)]) -> Paused {
        let mut child = command(ws, args, env)
            .env("KILN_TEST_PAUSE_AT", stage)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut p = Paused {
            child,
            lines: rx,
            seen: Vec::new(),
        };
        let want = format!("kiln: test hook: paused at {stage} ");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match p.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => {
                    let hit = l.starts_with(&want);
                    p.seen.push(l);
                    if hit {
                        return p;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(s) = p.child.try_wait().unwrap() {
                        panic!(
                            "kiln ended ({s}) before pausing at {stage}:\n{}",
                            p.seen.join("\n")
                        );
                    }
                    assert!(
                        Instant::now() < deadline,
                        "kiln did not pause at {stage}:\n{}",
                        p.seen.join("\n")
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let s = p.child.wait().unwrap();
                    panic!(
                        "kiln ended ({s}) before pausing at {stage}:\n{}",
                        p.seen.join("\n")
                    );
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` and waits for the process to end; returns its status and remaining stderr.
    fn kill(self, sig: &str) -> (std::process::ExitStatus, String) {
        let o = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .output()
            .unwrap();
        assert_ok(&o, "kill");
        self.finish()
    }

    fn finish(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        self.seen.extend(self.lines.iter());
        (status, self.seen.join("\n"))
    }
}

/// Every entry of a directory: name → sha256 of a file's bytes, or `dir` for a directory.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let v = if e.file_type().unwrap().is_dir() {
            "dir".to_string()
        } else {
            sha256(&std::fs::read(e.path()).unwrap())
        };
        m.insert(name, v);
    }
    m
}

/// Only the published files (kiln's hidden working entries left out).
fn visible(dir: &Path) -> BTreeMap<String, String> {
    snapshot(dir)
        .into_iter()
        .filter(|(n, _)| !n.starts_with('.'))
        .collect()
}

fn hidden(dir: &Path) -> Vec<String> {
    snapshot(dir)
        .into_keys()
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// `sha256sum --check --strict SHA256SUMS` in `dir`: the independent check users run.
fn sums_check(dir: &Path) -> std::process::Output {
    Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(dir)
        .output()
        .unwrap()
}

fn assert_sums_ok(dir: &Path, what: &str) {
    assert_ok(&sums_check(dir), &format!("sha256sum --check ({what})"));
}

/// The manifest's sha256 for a published file.
fn manifest_sha(dir: &Path, file: &str) -> String {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("kiln-manifest.json")).unwrap()).unwrap();
    for n in m["nodes"].as_array().unwrap() {
        for f in n["files"].as_array().unwrap() {
            if f["path"].as_str().unwrap().ends_with(&format!("/{file}")) {
                return f["sha256"].as_str().unwrap().to_string();
            }
        }
    }
    panic!("{file} not in the manifest: {m}");
}

/// A workspace with a first, successful build of `NODE` (epoch A) in `out/`.
fn first_build(name: &str) -> (Workspace, PathBuf, BTreeMap<String, String>) {
    let ws = Workspace::new(name);
    let o = build(&ws, &[NODE], &[("SOURCE_DATE_EPOCH", EPOCH_A)]);
    assert_ok(&o, "first build");
    let out = ws.path("out");
    assert_sums_ok(&out, "first build");
    let before = snapshot(&out);
    assert!(
        before.keys().all(|n| !n.starts_with('.')),
        "a finished build leaves nothing hidden: {before:?}"
    );
    (ws, out, before)
}

#[test]
fn builds_killed_before_the_commit_leave_the_previous_set_byte_identical() {
    let (ws, out, before) = first_build("consistency-kill");
    let args = build_args(&ws, &[NODE]);
    for stage in ["image", "publish", "index"] {
        for sig in ["KILL", "TERM"] {
            let p = Paused::start(&ws, &args, stage, &[("SOURCE_DATE_EPOCH", EPOCH_B)]);
            let pid = p.pid();
            assert_eq!(
                visible(&out),
                before,
                "{stage}: the previous outputs changed before the build was complete"
            );
            // Something of the new build exists, only in its staging directory.
            let staging = out.join(format!(".kiln-staging-{pid}"));
            assert!(
                staging.join(format!("{NODE}.img")).is_file(),
                "{stage}: no staged image in {}",
                staging.display()
            );
            let (status, log) = p.kill(sig);
            let want = if sig == "KILL" { 9 } else { 15 };
            assert_eq!(
                status.signal(),
                Some(want),
                "{stage}/{sig}: {status}\n{log}"
            );
            assert_eq!(
                visible(&out),
                before,
                "{stage}/SIG{sig}: the previous outputs changed\n{log}"
            );
            assert_sums_ok(&out, &format!("after SIG{sig} at {stage}"));
            if sig == "TERM" {
                // SIGTERM cleans up after itself; this build also removed what the SIGKILLed
                // one before it left.
                assert!(
                    log.contains("removed the unfinished outputs of an interrupted kiln build"),
                    "{stage}: leftovers of the SIGKILLed build not removed\n{log}"
                );
                assert_eq!(
                    snapshot(&out),
                    before,
                    "{stage}/SIGTERM: temporary files left\n{log}"
                );
            } else {
                // SIGKILL cannot: its staging directory stays for the next build to remove.
                assert!(staging.is_dir(), "{stage}/SIGKILL: staging directory gone?");
                assert!(
                    std::fs::read_dir(&staging).unwrap().count() > 0,
                    "{stage}/SIGKILL: empty staging directory"
                );
            }
        }
    }

    // Leftovers of killed runs: a staging directory, and a partial file of a process that is
    // gone in the output directory itself.
    let p = Paused::start(&ws, &args, "publish", &[("SOURCE_DATE_EPOCH", EPOCH_B)]);
    let (status, _) = p.kill("KILL");
    assert_eq!(status.signal(), Some(9));
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let partial = out.join(format!(".{NODE}.img.xz.partial-{dead}"));
    std::fs::write(&partial, b"half a file").unwrap();
    assert_eq!(hidden(&out).len(), 2);

    // The next build removes every leftover and publishes a complete set.
    let o = build(&ws, &[NODE], &[("SOURCE_DATE_EPOCH", EPOCH_C)]);
    assert_ok(&o, "build after the killed ones");
    assert!(
        stderr(&o).contains("removed the unfinished outputs of an interrupted kiln build"),
        "{}",
        stderr(&o)
    );
    assert_eq!(hidden(&out), Vec::<String>::new(), "leftovers not removed");
    assert_sums_ok(&out, "next build");
    let after = visible(&out);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    assert_ne!(
        after[&format!("{NODE}.img")],
        before[&format!("{NODE}.img")],
        "the next build's image was not published"
    );
}

#[test]
fn a_build_killed_while_committing_is_detectable_and_finished_by_the_next_build() {
    let (ws, out, before) = first_build("consistency-commit");
    let args = build_args(&ws, &[NODE]);

    // SIGKILL after the first file of the new set was moved into place.
    let p = Paused::start(&ws, &args, "commit", &[("SOURCE_DATE_EPOCH", EPOCH_B)]);
    let commit = out.join(format!(".kiln-commit-{}", p.pid()));
    let (status, log) = p.kill("KILL");
    assert_eq!(status.signal(), Some(9), "{log}");
    // Detectable: the index is gone (a half-moved set has no SHA256SUMS to pass).
    assert!(!out.join("SHA256SUMS").exists());
    assert!(!sums_check(&out).status.success());
    assert!(commit.is_dir());
    // What the killed build had completed: the file it moved, and the rest still to move.
    let mut expected: BTreeMap<String, String> = visible(&commit);
    let img = format!("{NODE}.img");
    let moved = sha256(&std::fs::read(out.join(&img)).unwrap());
    assert_ne!(moved, before[&img], "the first file was not moved yet");
    expected.insert(img.clone(), moved);

    // The next build finishes that set first, even though it fails itself.
    let o = build(
        &ws,
        &[NODE],
        &[
            ("SOURCE_DATE_EPOCH", EPOCH_C),
            ("KILN_TEST_FAIL_AT", "image"),
        ],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("was killed while moving its outputs into place; finishing that"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        visible(&out),
        expected,
        "the interrupted set was not completed"
    );
    assert_eq!(hidden(&out), Vec::<String>::new());
    assert_sums_ok(&out, "completed set");
    assert_eq!(manifest_sha(&out, &img), expected[&img]);

    // SIGTERM at the same point: the commit is finished before kiln ends.
    let before = snapshot(&out);
    let p = Paused::start(&ws, &args, "commit", &[("SOURCE_DATE_EPOCH", EPOCH_A)]);
    let (status, log) = p.kill("TERM");
    assert_eq!(status.signal(), Some(15), "{log}");
    assert_eq!(hidden(&out), Vec::<String>::new(), "{log}");
    assert_sums_ok(&out, "set committed under SIGTERM");
    let after = snapshot(&out);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    assert_ne!(after[&img], before[&img], "the new set was not committed");
    assert_eq!(manifest_sha(&out, &img), after[&img]);
}

#[test]
fn a_failed_build_changes_nothing_of_the_previous_set() {
    let (ws, out, before) = first_build("consistency-fail");
    // Publishing fails after the companions were written, or after the index was.
    for stage in ["publish", "index"] {
        let o = build(
            &ws,
            &[NODE],
            &[("SOURCE_DATE_EPOCH", EPOCH_B), ("KILN_TEST_FAIL_AT", stage)],
        );
        assert!(!o.status.success(), "{stage}: build succeeded");
        assert!(
            stderr(&o).contains(&format!("KILN_TEST_FAIL_AT={stage}")),
            "{}",
            stderr(&o)
        );
        assert_eq!(snapshot(&out), before, "{stage}: outputs changed");
        assert_sums_ok(&out, stage);
    }

    // A real failure of one node: rk1-1's loader overlaps its first partition. pi5-staging's
    // new image was fine, but the build is one set: nothing is replaced.
    let big = ws.path("u-boot-big.bin");
    std::fs::write(&big, bytes(7, 20 << 20)).unwrap();
    let mut args = build_args(&ws, &[NODE, "rk1-1"]);
    args.extend(["--artifact".to_string(), format!("uboot={}", big.display())]);
    let o = command(&ws, &args, &[("SOURCE_DATE_EPOCH", EPOCH_B)])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(
        snapshot(&out),
        before,
        "a partly failed build changed outputs\n{err}"
    );
    assert!(err.contains("error: rk1-1:"), "{err}");
    assert!(
        err.contains(&format!("{NODE}: built, but not published")),
        "{err}"
    );
    assert!(err.contains("nothing in out was replaced"), "{err}");
    assert!(!out.join("rk1-1.img").exists());
    assert_sums_ok(&out, "after a failed node");
}

#[test]
fn a_second_build_into_the_same_directory_fails_fast_and_the_first_completes() {
    let ws = Workspace::new("consistency-lock");
    let out = ws.path("out");
    let resume = ws.path("resume");
    // The same node named twice: built once.
    let args = build_args(&ws, &[NODE, NODE]);
    let first = Paused::start(
        &ws,
        &args,
        "image",
        &[("KILN_TEST_RESUME_FILE", resume.to_str().unwrap())],
    );
    let t = Instant::now();
    let o = build(&ws, &[NODE], &[]);
    let took = t.elapsed();
    assert!(!o.status.success(), "a second build ran beside the first");
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "another kiln build (pid {}) is writing into out",
            first.pid()
        )),
        "{err}"
    );
    assert!(err.contains("wait for it to finish"), "{err}");
    assert!(
        took < Duration::from_secs(20),
        "did not fail fast: {took:?}"
    );
    // It made nothing: only the first build's staging directory is there.
    assert_eq!(hidden(&out), vec![format!(".kiln-staging-{}", first.pid())]);

    std::fs::write(&resume, b"").unwrap();
    let (status, log) = first.finish();
    assert!(status.success(), "{status}\n{log}");
    assert_eq!(hidden(&out), Vec::<String>::new());
    assert_sums_ok(&out, "first build");
    let names: Vec<String> = visible(&out).into_keys().collect();
    assert_eq!(
        names,
        [
            "SHA256SUMS",
            "kiln-manifest.json",
            "pi5-staging.img",
            "pi5-staging.img.bmap",
            "pi5-staging.img.zst"
        ]
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("kiln-manifest.json")).unwrap()).unwrap();
    assert_eq!(m["nodes"].as_array().unwrap().len(), 1, "built twice: {m}");
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    assert_eq!(sums.lines().count(), 2, "{sums}");
}

const VERSION_PATH: &str = "v1.33.5%2Bk3s1";

#[test]
fn a_corrupt_cache_entry_is_downloaded_again_or_refused_never_built_in() {
    let rel = Release::start(VERSION_PATH);
    let ws = Workspace::new("consistency-cache");
    set_release(&ws.path("kiln.toml"), &rel.url);
    let bases = make_bases(&ws.dir);
    let args = vec![
        "build".to_string(),
        NODE.to_string(),
        "--artifact".to_string(),
        format!("base={}", bases.tar.display()),
    ];
    let o = command(&ws, &args, &[]).output().unwrap();
    assert_ok(&o, "build from the release");
    let bin = standin_binary();
    let blob = ws.path(&format!("cache/sha256/{}", sha256(&bin)));
    assert!(blob.is_file());
    let corrupt = |p: &Path| {
        let mut b = std::fs::read(p).unwrap();
        b[20] ^= 0xff;
        std::fs::write(p, b).unwrap();
    };
    let k3s_in = |img: &Path| {
        let (_, parts) = sfdisk(img);
        dump(img, parts[1].start, "/usr/local/bin/k3s", &ws.dir).expect("k3s in the image")
    };

    // Corrupt cache, release reachable: downloaded again, the image gets the real bytes.
    corrupt(&blob);
    let o = command(&ws, &args, &[]).output().unwrap();
    assert_ok(&o, "build with a corrupt cache entry");
    let err = stderr(&o);
    let img = ws.path(&format!("out/{NODE}.img"));
    assert_eq!(
        sha256(&k3s_in(&img)),
        sha256(&bin),
        "corrupt k3s built in\n{err}"
    );
    assert!(
        err.contains("is corrupt") && err.contains("downloading") && err.contains("again"),
        "{err}"
    );
    assert_eq!(sha256(&std::fs::read(&blob).unwrap()), sha256(&bin));
    let fetched = rel
        .hits()
        .iter()
        .filter(|h| h.path.ends_with("/k3s-arm64"))
        .count();
    assert_eq!(fetched, 2, "not downloaded again");

    // Corrupt cache and the release now serves something else: refused, nothing replaced.
    let before = snapshot(&ws.path("out"));
    corrupt(&blob);
    rel.replace("/k3s-arm64", b"#!/bin/sh\necho not the release\n".to_vec());
    let o = command(&ws, &args, &[]).output().unwrap();
    assert!(!o.status.success(), "built with a corrupt k3s");
    let err = stderr(&o);
    assert!(err.contains("is corrupt"), "{err}");
    assert!(err.contains("sha256 mismatch"), "{err}");
    assert_eq!(snapshot(&ws.path("out")), before, "outputs changed");
    assert_eq!(sha256(&k3s_in(&img)), sha256(&bin));
}

#[test]
fn companions_the_new_build_did_not_make_go_with_the_old_image() {
    let (ws, out, before) = first_build("consistency-stale");
    assert!(before.contains_key(&format!("{NODE}.img.zst")));
    let mut args = build_args(&ws, &[NODE]);
    args.extend(["--format".to_string(), "xz".to_string()]);
    let o = command(&ws, &args, &[("SOURCE_DATE_EPOCH", EPOCH_B)])
        .output()
        .unwrap();
    assert_ok(&o, "build --format xz");
    // The old .zst was made from the old image: it would not match the new one.
    let names: Vec<String> = snapshot(&out).into_keys().collect();
    assert_eq!(
        names,
        [
            "SHA256SUMS",
            "kiln-manifest.json",
            "pi5-staging.img",
            "pi5-staging.img.bmap",
            "pi5-staging.img.xz"
        ]
    );
    assert_sums_ok(&out, "after --format xz");
}
