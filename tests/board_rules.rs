//! Board-profile rules as a table (`kiln::config::board::RULES`): deleting a rule, or its body,
//! fails a test here. Every rule has a failing fixture, `tests/fixtures/boards/fail/<id>.toml`
//! (a shipped profile with exactly the thing the rule forbids), whose header names the field
//! path and the text of the expected diagnostic; every fixture names an existing rule; and the
//! shipped profiles pass every rule.
//!
//! Golden layouts: for each shipped board, the partition table, partitions, blobs and boot
//! files computed for an example node of the repository's inventory, compared with
//! `tests/golden/<board>.layout`. Rerun with `KILN_BLESS=1` to rewrite the files after an
//! intended change. All in-process: no mmdebstrap, network, root or image is involved.

mod common;

use kiln::config::board::{self, Content, PartSize, TableKind};
use kiln::config::size::ByteSize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture_dir() -> PathBuf {
    repo().join("tests/fixtures/boards/fail")
}

/// `*.toml` in a directory, sorted.
fn tomls(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

fn stem(p: &Path) -> String {
    p.file_stem().unwrap().to_string_lossy().into_owned()
}

/// What a fixture's header promises.
struct Expect {
    field: String,
    text: String,
    /// Rules that cannot help failing along with this one (`# also: <id>`).
    also: Vec<String>,
}

fn expectation(path: &Path) -> Expect {
    let text = std::fs::read_to_string(path).unwrap();
    let header = |key: &str| -> Vec<String> {
        text.lines()
            .take_while(|l| l.starts_with('#'))
            .filter_map(|l| l.strip_prefix(&format!("# {key}:")))
            .map(|v| v.trim().to_string())
            .collect()
    };
    let one = |key: &str| -> String {
        let v = header(key);
        assert!(
            v.len() == 1,
            "{}: expected one `# {key}:` line in the header comment, found {}",
            path.display(),
            v.len()
        );
        v[0].clone()
    };
    Expect {
        field: one("expect-field"),
        text: one("expect-text"),
        also: header("also"),
    }
}

#[test]
fn every_rule_has_a_fixture_and_every_fixture_a_rule() {
    let ids: Vec<&str> = board::rule_ids().collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "duplicate rule ids in RULES: {ids:?}"
    );
    let fixtures: BTreeSet<String> = tomls(&fixture_dir()).iter().map(|p| stem(p)).collect();
    let without: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !fixtures.contains(*id))
        .collect();
    assert!(
        without.is_empty(),
        "rules without a failing fixture (add tests/fixtures/boards/fail/<id>.toml): {without:?}"
    );
    let orphans: Vec<&String> = fixtures
        .iter()
        .filter(|f| !unique.contains(f.as_str()))
        .collect();
    assert!(
        orphans.is_empty(),
        "fixtures naming no rule in board::RULES (a deleted or renamed rule?): {orphans:?}"
    );
    for r in board::RULES {
        assert!(
            !r.what.is_empty(),
            "rule {} says nothing about itself",
            r.id
        );
    }
}

#[test]
fn every_fixture_fails_its_rule_with_the_promised_diagnostic() {
    let mut failures = Vec::new();
    let fixtures = tomls(&fixture_dir());
    assert!(
        !fixtures.is_empty(),
        "no fixtures in {}",
        fixture_dir().display()
    );
    for path in &fixtures {
        let id = stem(path);
        let want = expectation(path);
        let found = match board::check_file(path) {
            Ok(f) => f,
            Err(d) => {
                failures.push(format!(
                    "{id}: the fixture does not parse (it must be a valid profile but for the rule): {}",
                    kiln::config::diag::Diagnostics(d)
                ));
                continue;
            }
        };
        let shown: Vec<String> = found.iter().map(|(r, d)| format!("  [{r}] {d}")).collect();
        let shown = shown.join("\n");
        if !found
            .iter()
            .any(|(r, d)| *r == id && d.field == want.field && d.message.contains(&want.text))
        {
            failures.push(format!(
                "{id}: no diagnostic from rule `{id}` with field `{}` and text `{}`; got:\n{shown}",
                want.field, want.text
            ));
        }
        // Exactly the thing the rule forbids: no other rule fails, bar declared companions.
        let others: BTreeSet<&str> = found
            .iter()
            .map(|(r, _)| *r)
            .filter(|r| *r != id && !want.also.iter().any(|a| a == r))
            .collect();
        if !others.is_empty() {
            failures.push(format!(
                "{id}: other rules fail too ({others:?}); a fixture breaks one thing:\n{shown}"
            ));
        }
        for a in &want.also {
            if !found.iter().any(|(r, _)| r == a) {
                failures.push(format!("{id}: `# also: {a}`, but rule {a} does not fail"));
            }
        }
        // The loader refuses it with the same diagnostic (validate runs the same table).
        match board::load_file(path) {
            Ok(_) => failures.push(format!("{id}: load_file accepted the fixture")),
            Err(d) => {
                if !d
                    .iter()
                    .any(|d| d.field == want.field && d.message.contains(&want.text))
                {
                    failures.push(format!(
                        "{id}: load_file's diagnostics lack `{}`: {}",
                        want.field,
                        kiln::config::diag::Diagnostics(d)
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures:\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n")
    );
}

#[test]
fn shipped_boards_pass_every_rule() {
    let boards = tomls(&repo().join("boards"));
    assert!(!boards.is_empty());
    for path in &boards {
        let found = board::check_file(path).unwrap_or_else(|d| {
            panic!(
                "{} does not parse: {}",
                path.display(),
                kiln::config::diag::Diagnostics(d)
            )
        });
        let shown: Vec<String> = found.iter().map(|(r, d)| format!("[{r}] {d}")).collect();
        assert!(
            shown.is_empty(),
            "{}:\n{}",
            path.display(),
            shown.join("\n")
        );
        board::load_file(path).unwrap_or_else(|d| {
            panic!("{}: {}", path.display(), kiln::config::diag::Diagnostics(d))
        });
    }
}

// ---- golden layouts ----

/// Stand-ins for what a real build measures. The root filesystem's size comes from the base
/// tarball and overlay (blocks and inodes, see `image::ext4::estimate_size`); these fixed
/// counts (about 600 MiB of data) stand in, and the board's `headroom` is added as in a build.
const STANDIN_ROOT_BLOCKS: u64 = 150_000;
const STANDIN_ROOT_ENTRIES: u64 = 30_000;
/// A loader blob's length (the real one is the artifact's; layout only checks it fits).
const STANDIN_BLOB_LEN: u64 = 1 << 20;
const STANDIN_KERNEL: &str = "6.12.0-golden";

fn size(b: u64) -> String {
    format!("{b} ({})", ByteSize(b))
}

/// The layout dump of `board` for `node`: table, partitions, blobs and boot files.
fn layout_dump(cfg: &kiln::config::Config, board_name: &str, node: &str) -> String {
    use kiln::image::{bootcfg, ext4, layout};
    use std::fmt::Write;

    let board = &cfg.boards[board_name];
    let spec = &board.spec;
    // Artifacts only need to be named here; nothing is read.
    let mut supplied: BTreeMap<String, PathBuf> = BTreeMap::new();
    supplied.insert("base".into(), PathBuf::from("/nonexistent/base.tar"));
    for b in &spec.blobs {
        supplied.insert(b.artifact.clone(), PathBuf::from("/nonexistent/blob"));
    }
    let plan = kiln::plan::plan_node(cfg, node, &supplied, kiln::plan::JoinMode::Init)
        .unwrap_or_else(|e| panic!("planning {node}: {e:#}"));

    let root = spec
        .partitions
        .iter()
        .find(|p| p.content == Content::Rootfs)
        .expect("a root partition");
    let headroom = root.headroom.map_or(kiln::image::DEFAULT_HEADROOM, |h| h.0);
    let (auto, _) = ext4::estimate_size(STANDIN_ROOT_BLOCKS, STANDIN_ROOT_ENTRIES, headroom);
    let root_size = match root.size {
        PartSize::Fixed(s) => s.0,
        PartSize::Auto => auto,
    };
    let blobs: Vec<(String, u64)> = spec
        .blobs
        .iter()
        .map(|b| (b.artifact.clone(), STANDIN_BLOB_LEN))
        .collect();
    let l = layout::place(&plan, root_size, &blobs)
        .unwrap_or_else(|e| panic!("layout of {board_name}: {e:#}"));

    let mut s = String::new();
    let w = &mut s;
    writeln!(
        w,
        "# kiln layout of board `{board_name}` for example node `{node}` (kiln.toml)."
    )
    .unwrap();
    writeln!(w, "# Written by tests/board_rules.rs; rewrite with KILN_BLESS=1 cargo test --test board_rules.").unwrap();
    writeln!(
        w,
        "# Stand-ins: root content {STANDIN_ROOT_BLOCKS} blocks, {STANDIN_ROOT_ENTRIES} entries, headroom {}; blobs {}; kernel {STANDIN_KERNEL}.",
        ByteSize(headroom),
        ByteSize(STANDIN_BLOB_LEN)
    )
    .unwrap();
    match l.table {
        TableKind::Gpt => writeln!(
            w,
            "table gpt, first usable LBA {}",
            spec.partition_table.first_usable_lba
        ),
        TableKind::Mbr => writeln!(w, "table mbr"),
    }
    .unwrap();
    writeln!(
        w,
        "node target `{}`, variant {}, firmware settings [{}]",
        plan.node.target,
        plan.node.variant.as_deref().unwrap_or("none"),
        plan.firmware_settings().join(", ")
    )
    .unwrap();
    writeln!(w, "disk {}", size(l.disk_size)).unwrap();
    for p in &l.partitions {
        let ty = match l.table {
            TableKind::Gpt => board::gpt_type_guid(&p.type_).unwrap_or_default(),
            TableKind::Mbr => board::mbr_type_byte(&p.type_)
                .map(|b| format!("{b:#04x}"))
                .unwrap_or_default(),
        };
        let spec_p = &spec.partitions[p.index];
        writeln!(w, "partition {} `{}`", p.index + 1, p.name).unwrap();
        writeln!(w, "  start {}", size(p.start)).unwrap();
        writeln!(
            w,
            "  size  {}{}",
            size(p.size),
            if spec_p.size == PartSize::Auto {
                " auto"
            } else {
                ""
            }
        )
        .unwrap();
        writeln!(w, "  end   {}", size(p.end())).unwrap();
        writeln!(w, "  type  {} ({ty})", p.type_).unwrap();
        writeln!(
            w,
            "  fs {:?}, content {:?}, label {:?}{}",
            p.fs,
            p.content,
            p.label,
            if p.bootable { ", bootable" } else { "" }
        )
        .unwrap();
    }
    let first = l.partitions.first().map_or(l.disk_size, |p| p.start);
    for (b, placed) in spec.blobs.iter().zip(&l.blobs) {
        writeln!(
            w,
            "blob `{}` at {}, loader {}, room {} before the first partition",
            placed.artifact,
            size(placed.offset),
            b.loader.map_or("none".into(), |k| format!("{k:?}")),
            size(first - placed.offset)
        )
        .unwrap();
    }

    // Boot files, from a stand-in kernel holding one tree under every copied path.
    let mut dtbs = BTreeMap::new();
    for c in &spec.devicetree.copy {
        let rel = if c.from.ends_with(".dtb") {
            c.from.clone()
        } else {
            format!("{}/standin.dtb", c.from)
        };
        dtbs.insert(rel, b"dtb".to_vec());
    }
    // And every file the board copies from the base.
    let extra = spec
        .boot_files
        .iter()
        .map(|c| (c.from.clone(), b"from the base".to_vec()))
        .collect();
    let kernel = kiln::rootfs::base::KernelFiles {
        version: STANDIN_KERNEL.into(),
        vmlinuz: b"kernel".to_vec(),
        initrd: b"initrd".to_vec(),
        dtbs,
        extra,
    };
    let files = bootcfg::boot_files(&plan, &kernel, "{}\n")
        .unwrap_or_else(|e| panic!("boot files of {board_name}: {e:#}"));
    writeln!(w, "boot files").unwrap();
    for name in files.keys() {
        writeln!(w, "  {name}").unwrap();
    }
    for (name, data) in &files {
        if matches!(
            name.as_str(),
            "extlinux/extlinux.conf"
                | "config.txt"
                | "cmdline.txt"
                | "loader/loader.conf"
                | "loader/entries/kiln.conf"
        ) {
            writeln!(w, "{name}:").unwrap();
            for line in String::from_utf8_lossy(data).lines() {
                writeln!(w, "  |{}{line}", if line.is_empty() { "" } else { " " }).unwrap();
            }
        }
    }
    s
}

/// A line diff (longest common subsequence), `-` expected, `+` computed.
fn diff(want: &str, got: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out += &format!("-{:>4} {}\n", i + 1, a[i]);
            i += 1;
        } else {
            out += &format!("+{:>4} {}\n", j + 1, b[j]);
            j += 1;
        }
    }
    out
}

#[test]
fn golden_layout_per_board() {
    let ws = common::inventory_with_examples();
    let cfg =
        kiln::config::load(&ws.join("kiln.toml"), &ws.join("boards"), false).unwrap_or_else(|e| {
            panic!("the shipped configuration (examples uncommented) does not load:\n{e}")
        });
    let bless = std::env::var_os("KILN_BLESS").is_some_and(|v| v == "1");
    let dir = repo().join("tests/golden");
    let mut problems = Vec::new();
    for name in cfg.boards.keys() {
        // The first node of the example inventory on this board.
        let Some(node) = cfg.inventory.nodes.iter().find(|n| n.board == *name) else {
            problems.push(format!(
                "board `{name}` has no node in kiln.toml, so no golden layout; add an example node"
            ));
            continue;
        };
        let got = layout_dump(&cfg, name, &node.name);
        let path = dir.join(format!("{name}.layout"));
        if bless {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &got).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(want) if want == got => {}
            Ok(want) => problems.push(format!(
                "{} differs from the computed layout (- file, + computed, with line numbers):\n{}",
                path.display(),
                diff(&want, &got)
            )),
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }
    }
    if !bless && let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "layout") && !cfg.boards.contains_key(&stem(&p)) {
                problems.push(format!("{}: no board of that name", p.display()));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&ws);
    assert!(
        problems.is_empty(),
        "{}\nIf the change is intended, rerun with KILN_BLESS=1 to rewrite tests/golden/*.layout:\n  KILN_BLESS=1 cargo test --test board_rules golden",
        problems.join("\n")
    );
}
