//! Command line: parse, call one stage, print results once. Errors go to stderr, non-zero exit.

use crate::config::{self, Config, size::human};
use crate::image;
use crate::plan::{self, MissingArtifacts};
use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Bake bootable per-node disk images for a bare-metal k3s cluster"
)]
pub struct Cli {
    /// The inventory: nodes, clusters, network.
    #[arg(long, global = true, default_value = "kiln.toml")]
    inventory: PathBuf,
    /// Board profile directory [default: boards/ beside the inventory].
    #[arg(long, global = true)]
    boards: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate the inventory and board profiles without building anything.
    Check,
    /// List the board profiles.
    Boards,
    /// Build node images into the output directory (`<node>.img`).
    Build {
        /// Nodes to build.
        nodes: Vec<String>,
        /// Build every node of the inventory.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value = "out")]
        out: PathBuf,
        /// Input files: `base=ROOTFS.tar[.gz|.zst]`, `uboot=u-boot-rockchip.bin`.
        #[arg(long = "artifact", value_name = "NAME=PATH")]
        artifacts: Vec<String>,
        /// Skip (with a one-line reason) nodes whose board needs an artifact that was not given,
        /// instead of failing.
        #[arg(long)]
        skip_missing: bool,
    },
    /// Show an image's partition table, partitions, boot files and the node it was built for.
    Inspect {
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Flash a node's eMMC through the Turing Pi 2 BMC, then power it on.
    Flash(crate::flash::FlashArgs),
    /// Write an image to a disk (NVMe, SD, USB) or a file, then verify it.
    Write(crate::flash::write::WriteArgs),
    /// Replace a failed node: build, remove from etcd, flash, power on, wait until Ready.
    Reimage(crate::reimage::ReimageArgs),
    /// Cluster token files.
    Secrets {
        #[command(subcommand)]
        cmd: SecretsCmd,
    },
}

#[derive(Subcommand)]
enum SecretsCmd {
    /// Create each cluster's token file (0600, random) if it does not exist yet.
    Init,
}

pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    let boards_dir = cli
        .boards
        .clone()
        .unwrap_or_else(|| config::default_boards_dir(&cli.inventory));
    match cli.cmd {
        Cmd::Check => {
            let Some(cfg) = load(&cli.inventory, &boards_dir, true) else {
                return Ok(ExitCode::from(1));
            };
            println!(
                "{}: ok — {} nodes in {} clusters, boards: {}",
                cli.inventory.display(),
                cfg.inventory.nodes.len(),
                cfg.inventory.clusters.len(),
                cfg.boards.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Boards => {
            let boards = config::board::load_dir(&boards_dir).map_err(config::diag::Diagnostics)?;
            for b in boards.values() {
                let s = &b.spec;
                println!(
                    "{:6} {:5} {:?}/{:?} {}{}",
                    s.name,
                    s.arch.debian(),
                    s.partition_table.kind,
                    s.boot,
                    s.description,
                    if s.artifacts.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " (needs: {})",
                            s.artifacts
                                .iter()
                                .map(|a| a.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Build {
            nodes,
            all,
            out,
            artifacts,
            skip_missing,
        } => {
            let supplied = parse_artifacts(&artifacts)?;
            let Some(cfg) = load(&cli.inventory, &boards_dir, true) else {
                return Ok(ExitCode::from(1));
            };
            build(&cfg, nodes, all, &out, &supplied, skip_missing)
        }
        Cmd::Inspect { image, json } => {
            let info = image::inspect::inspect(&image)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", image::inspect::render_text(&info));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Flash(a) => crate::flash::run_flash(&cli.inventory, &boards_dir, &a),
        Cmd::Write(a) => crate::flash::write::run_write(&a),
        Cmd::Reimage(a) => crate::reimage::run(&cli.inventory, &boards_dir, &a),
        Cmd::Secrets {
            cmd: SecretsCmd::Init,
        } => {
            let Some(cfg) = load(&cli.inventory, &boards_dir, false) else {
                return Ok(ExitCode::from(1));
            };
            for c in crate::secrets::init(&cfg.inventory)? {
                match c {
                    crate::secrets::Created::New(p) => println!("created {} (0600)", p.display()),
                    crate::secrets::Created::Kept(p) => println!("kept {} (exists)", p.display()),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads the configuration, printing every diagnostic to stderr on failure.
fn load(inventory: &Path, boards: &Path, check_tokens: bool) -> Option<Config> {
    match config::load(inventory, boards, check_tokens) {
        Ok(c) => Some(c),
        Err(d) => {
            for x in &d.0 {
                eprintln!("error: {x}");
            }
            eprintln!("{} problem(s) found", d.0.len());
            None
        }
    }
}

pub(crate) fn parse_artifacts(args: &[String]) -> Result<BTreeMap<String, PathBuf>> {
    let mut m = BTreeMap::new();
    for a in args {
        let Some((name, path)) = a.split_once('=') else {
            bail!("--artifact `{a}`: expected NAME=PATH, e.g. base=rootfs.tar.zst");
        };
        let p = PathBuf::from(path);
        if !p.is_file() {
            bail!("--artifact {name}: {} is not a readable file", p.display());
        }
        if m.insert(name.to_string(), p).is_some() {
            bail!("--artifact {name} given twice");
        }
    }
    Ok(m)
}

fn build(
    cfg: &Config,
    nodes: Vec<String>,
    all: bool,
    out: &Path,
    supplied: &BTreeMap<String, PathBuf>,
    skip_missing: bool,
) -> Result<ExitCode> {
    let names: Vec<String> = match (all, nodes.is_empty()) {
        (true, true) => cfg.inventory.nodes.iter().map(|n| n.name.clone()).collect(),
        (false, false) => nodes,
        (true, false) => bail!("give node names or --all, not both"),
        (false, true) => bail!("no nodes given; name them or pass --all"),
    };
    image::ext4::check_mke2fs()?;
    let mut plans = Vec::new();
    for n in &names {
        match plan::plan_node(cfg, n, supplied) {
            Ok(p) => plans.push(p),
            Err(e) if skip_missing && e.downcast_ref::<MissingArtifacts>().is_some() => {
                if let Some(m) = e.downcast_ref::<MissingArtifacts>() {
                    let what: Vec<&str> = m
                        .missing
                        .iter()
                        .map(|s| s.split(' ').next().unwrap_or(""))
                        .collect();
                    eprintln!(
                        "skip {n}: board {} needs --artifact {}",
                        m.board,
                        what.join(", ")
                    );
                }
            }
            Err(e) => return Err(e),
        }
    }
    let mut failed = 0;
    for p in &plans {
        match image::build_node(p, out) {
            Ok(r) => println!(
                "{}: {} {} ({} data), kernel {}, {:.1} s",
                r.node,
                r.path.display(),
                human(r.size),
                human(r.allocated),
                r.kernel_version,
                r.seconds
            ),
            Err(e) => {
                failed += 1;
                eprintln!("error: {}: {e:#}", p.node.name);
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} image(s) failed", plans.len());
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
