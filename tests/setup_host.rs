//! `tools/debian-mirror.sh`, which `tools/setup-host.sh` uses to add bookworm-backports on the
//! same mirror as the system's own Debian entry: run against sample apt configurations, in
//! both source formats, with third-party and disabled entries beside (or before) Debian's.

mod common;

use common::*;
use std::path::Path;

/// An apt configuration directory with `files` (name, content) under sources.list.d/ and an
/// optional sources.list.
fn apt_dir(ws: &Workspace, name: &str, list: Option<&str>, files: &[(&str, &str)]) -> String {
    let etc = ws.path(name);
    std::fs::create_dir_all(etc.join("sources.list.d")).unwrap();
    if let Some(l) = list {
        std::fs::write(etc.join("sources.list"), l).unwrap();
    }
    for (f, text) in files {
        std::fs::write(etc.join("sources.list.d").join(f), text).unwrap();
    }
    etc.to_string_lossy().into_owned()
}

fn mirror(etc: &str, suite: &str) -> std::process::Output {
    let script = repo().join("tools/debian-mirror.sh");
    assert!(Path::new(&script).is_file());
    run("bash", &[script.to_str().unwrap(), suite, etc])
}

fn expect_mirror(etc: &str, suite: &str, want: &str) {
    let o = mirror(etc, suite);
    assert_ok(&o, &format!("debian-mirror.sh {suite} {etc}"));
    assert_eq!(stdout(&o).trim(), want, "{etc}");
}

const NODESOURCE: &str =
    "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n";
const GOOGLE: &str = "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n";

#[test]
fn deb822_debian_entry_beside_third_party_ones() {
    let ws = Workspace::new("mirror-deb822");
    // The third-party files sort first; a disabled file names a plausible mirror.
    let etc = apt_dir(
        &ws,
        "a",
        None,
        &[
            ("00-google.list", GOOGLE),
            ("01-nodesource.sources", NODESOURCE),
            (
                "02-old.list.disabled",
                "deb http://wrong.invalid/debian bookworm main\n",
            ),
            (
                "debian.sources",
                "# the system's\nTypes: deb\n# snapshot comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n",
            ),
        ],
    );
    expect_mirror(&etc, "bookworm", "http://mirror.example/debian");
    // The security suite lives elsewhere; only an exact suite name counts.
    expect_mirror(
        &etc,
        "bookworm-security",
        "http://mirror.example/debian-security",
    );
}

#[test]
fn one_line_sources_with_options_and_comments() {
    let ws = Workspace::new("mirror-oneline");
    let etc = apt_dir(
        &ws,
        "b",
        Some(
            "# deb http://commented.invalid/debian bookworm main\n\
             deb-src http://src.invalid/debian bookworm main\n\
             deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.example/debian bookworm main contrib\n",
        ),
        &[("google.list", GOOGLE)],
    );
    expect_mirror(&etc, "bookworm", "http://mirror.example/debian");
}

#[test]
fn disabled_deb822_stanzas_and_deb_src_are_ignored() {
    let ws = Workspace::new("mirror-disabled");
    let etc = apt_dir(
        &ws,
        "c",
        None,
        &[(
            "debian.sources",
            "Types: deb\nURIs: http://off.invalid/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n\n\
             Types: deb-src\nURIs: http://src.invalid/debian\nSuites: bookworm\nComponents: main\n\n\
             Types: deb deb-src\nURIs: http://on.example/debian\nSuites: bookworm\nComponents: main\n",
        )],
    );
    expect_mirror(&etc, "bookworm", "http://on.example/debian");
}

#[test]
fn no_debian_entry_fails_with_the_line_to_add() {
    let ws = Workspace::new("mirror-none");
    let etc = apt_dir(
        &ws,
        "d",
        None,
        &[("google.list", GOOGLE), ("nodesource.sources", NODESOURCE)],
    );
    let o = mirror(&etc, "bookworm");
    assert!(
        !o.status.success(),
        "found a Debian mirror among third-party entries"
    );
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("deb http://deb.debian.org/debian bookworm main"),
        "{}",
        stderr(&o)
    );
}
