//! The source tree is shaped like the pipeline: each top-level module of `src/` is a stage (or
//! a support module beneath every stage), and a module may use only the ones listed before
//! it. So no stage imports the CLI, and no two stage folders import each other in a cycle.
//! The check reads the sources for `crate::…` paths (including `use crate::{…}` groups), so
//! a new import against the order fails here with the file and the line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest first. Support modules (one job each, no pipeline knowledge) come first; then the
/// stages in pipeline order; the CLI last.
const ORDER: &[(&str, &str)] = &[
    ("util", "support"),
    ("cleanup", "support"),
    ("tool", "support"),
    ("progress", "support"),
    ("tree", "support"),
    ("tls", "support"),
    ("config", "stage"),
    ("secrets", "stage"),
    ("plan", "stage"),
    ("fetch", "stage"),
    ("rootfs", "stage"),
    ("image", "stage"),
    ("publish", "stage"),
    ("build", "stage"),
    ("flash", "stage"),
    ("write", "stage"),
    ("reimage", "stage"),
    ("cli", "cli"),
];

fn rank(m: &str) -> Option<usize> {
    ORDER.iter().position(|(n, _)| *n == m)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`src/image/fat.rs` → `image`).
fn owner(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Top-level modules named by `crate::` paths in one line of code (comments stripped).
fn crate_refs(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        // `kiln::crate::` cannot occur; a preceding identifier char means e.g. `mycrate::`.
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::b, c}`: the first name of each item at depth 0.
            let mut depth = 0;
            let mut item_start = true;
            let mut name = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        if !name.is_empty() {
                            found.push(std::mem::take(&mut name));
                        }
                        item_start = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 && item_start {
                    if c.is_alphanumeric() || c == '_' {
                        name.push(c);
                    } else if !name.is_empty() {
                        found.push(std::mem::take(&mut name));
                        item_start = false;
                    }
                }
            }
            if !name.is_empty() {
                found.push(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

/// (from module, to module) → first place it happens.
fn edges() -> BTreeMap<(String, String), String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 20, "found only {} source files", files.len());
    let mut e = BTreeMap::new();
    for f in &files {
        let from = owner(&src, f);
        let text = std::fs::read_to_string(f).unwrap();
        // A multi-line `use crate::{…}` is joined so its group parses as one.
        let mut joined = Vec::new();
        let mut acc = String::new();
        let mut first_line = 0;
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if acc.is_empty() {
                first_line = n + 1;
            }
            acc.push_str(code);
            acc.push(' ');
            let open = acc.matches('{').count() > acc.matches('}').count();
            if !(acc.contains("use crate::{") && open) {
                joined.push((first_line, std::mem::take(&mut acc)));
            }
        }
        for (n, line) in joined {
            for to in crate_refs(&line) {
                if to != from {
                    e.entry((from.clone(), to))
                        .or_insert_with(|| format!("{}:{n}", f.display()));
                }
            }
        }
    }
    e
}

#[test]
fn the_reference_scanner_sees_groups_and_paths() {
    assert_eq!(
        crate_refs("use crate::{config::board::{A, B}, plan, util::hex}; // crate::cli"),
        ["config", "plan", "util"]
    );
    assert_eq!(
        crate_refs("let x = crate::fetch::sha(p); y(crate::image::x)"),
        ["fetch", "image"]
    );
    assert!(crate_refs("/// see `crate::cli`").is_empty());
}

#[test]
fn every_module_is_in_the_order() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut mods = BTreeSet::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let name = owner(&src, &e.unwrap().path());
        if name != "lib" && name != "main" {
            mods.insert(name);
        }
    }
    let unknown: Vec<_> = mods.iter().filter(|m| rank(m).is_none()).collect();
    assert!(
        unknown.is_empty(),
        "src/ modules not placed in tests/layering.rs ORDER: {unknown:?}"
    );
}

#[test]
fn modules_use_only_what_comes_before_them() {
    let e = edges();
    assert!(
        e.keys().any(|(f, t)| f == "cli" && t == "build"),
        "the scanner found no cli → build edge; it is not reading the sources"
    );
    let mut wrong = Vec::new();
    for ((from, to), at) in &e {
        if from == "lib" || from == "main" {
            continue;
        }
        match (rank(from), rank(to)) {
            (Some(f), Some(t)) if t < f => {}
            _ => wrong.push(format!("{at}: `{from}` uses `{to}`")),
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the pipeline order (see ORDER in tests/layering.rs):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_stage_uses_the_cli_or_draws_on_the_terminal() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for f in files {
        let m = owner(&src, &f);
        if m == "cli" || m == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for what in ["clap::", "indicatif::", "ExitCode", "crate::cli"] {
                if code.contains(what) {
                    wrong.push(format!("{}:{}: {what}", f.display(), n + 1));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "argument parsing, exit codes and terminal drawing belong to src/cli:\n{}",
        wrong.join("\n")
    );
}
