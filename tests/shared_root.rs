//! The root filesystem a board's nodes share (`image::shared`): written once per board, each
//! node's copy finished with its own files and UUID, checked with e2fsck and debugfs; and a
//! node's image does not depend on which other nodes the build had.

mod common;

use common::disk::{debugfs, e2fsck, sfdisk, stat};
use common::*;

/// Raw images (no compressed copies to wait for) at a fixed epoch.
fn build_nodes(ws: &Workspace, nodes: &[&str]) -> std::process::Output {
    build_with(
        ws,
        nodes,
        &["--format", "raw"],
        &[("SOURCE_DATE_EPOCH", "1767225600")],
    )
}

fn root_uuid(img: &std::path::Path, offset: u64) -> String {
    debugfs(img, offset, "stats")
        .lines()
        .find_map(|l| l.strip_prefix("Filesystem UUID:"))
        .map(|s| s.trim().to_string())
        .unwrap()
}

#[test]
fn a_boards_nodes_share_one_root_filesystem_and_each_is_its_own() {
    let ws = Workspace::new("shared-root-all");
    let o = build_nodes(&ws, &["rk1-1", "rk1-2", "rk1-3"]);
    assert_ok(&o, "build of three rk1 nodes");
    let err = stderr(&o);
    assert_eq!(
        err.matches("rk1: shared root filesystem written once")
            .count(),
        1,
        "one shared root filesystem for the board:\n{err}"
    );
    let mut uuids = Vec::new();
    for n in ["rk1-1", "rk1-2", "rk1-3"] {
        let img = ws.path(&format!("out/{n}.img"));
        let (_, parts) = sfdisk(&img);
        let root = &parts[1];
        e2fsck(&img, root);
        assert_eq!(debugfs(&img, root.start, "cat /etc/hostname").trim(), n);
        let (mode, uid, gid) = stat(&img, root.start, "/etc/kiln/token");
        assert_eq!((mode & 0o7777, uid, gid), (0o600, 0, 0), "{n}: token");
        let (mode, _, _) = stat(&img, root.start, "/etc/rancher/node");
        assert_eq!(mode & 0o7777, 0o700, "{n}: node password directory");
        // The shared part is there too (k3s from the stand-in release).
        let (mode, _, _) = stat(&img, root.start, "/usr/local/bin/k3s");
        assert_eq!(mode & 0o7777, 0o755, "{n}: k3s");
        uuids.push(root_uuid(&img, root.start));
    }
    uuids.sort();
    uuids.dedup();
    assert_eq!(
        uuids.len(),
        3,
        "every node's root has its own UUID: {uuids:?}"
    );

    // Only the server that may start the cluster carries the cluster CA keys.
    let img = ws.path("out/rk1-2.img");
    let (_, parts) = sfdisk(&img);
    let listing = debugfs(
        &img,
        parts[1].start,
        "ls -l /var/lib/rancher/k3s/server/tls",
    );
    assert!(
        !listing.contains("server-ca.key"),
        "rk1-2 (joins) must not carry the CA keys:\n{listing}"
    );
}

#[test]
fn a_nodes_image_does_not_depend_on_the_other_nodes_of_the_build() {
    let alone = Workspace::new("shared-root-alone");
    assert_ok(&build_nodes(&alone, &["rk1-2"]), "build of rk1-2 alone");
    let with = Workspace::new("shared-root-with");
    assert_ok(
        &build_nodes(&with, &["rk1-1", "rk1-2", "rk1-4"]),
        "build of rk1-2 with others",
    );
    let a = std::fs::read(alone.path("out/rk1-2.img")).unwrap();
    let b = std::fs::read(with.path("out/rk1-2.img")).unwrap();
    let first = a.iter().zip(&b).position(|(x, y)| x != y);
    assert!(
        a == b,
        "rk1-2.img differs between a build of it alone and one with other nodes (lengths {} \
and {}, first at byte {first:?})",
        a.len(),
        b.len()
    );
}
