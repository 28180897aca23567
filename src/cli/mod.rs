//! Command line: parse, call one stage, print results once. Errors go to stderr, non-zero exit.
//! The stages report progress as events; `render` draws them.

pub mod args;
pub mod render;

use crate::config::{self, Config};
use crate::fetch::Cache;
use crate::image;
use crate::plan;
use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
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
    /// Cache of Debian bases and downloads [default: $KILN_CACHE_DIR, $XDG_CACHE_HOME/kiln or
    /// ~/.cache/kiln].
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
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
    ///
    /// Inputs come from the cache or are made once per run: the Debian base of each board
    /// recipe (mmdebstrap), the k3s binary and airgap images of each architecture (downloaded
    /// from [k3s] release_url and checked against the release's sha256sum file).
    Build {
        /// Nodes to build.
        nodes: Vec<String>,
        /// Build every node of the inventory.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value = "out")]
        out: PathBuf,
        /// Input files: `uboot=u-boot-rockchip.bin`; overrides: `base=ROOTFS.tar[.gz|.zst]`,
        /// `k3s=BINARY`, `k3s-images=AIRGAP.tar.zst` (offline builds).
        #[arg(long = "artifact", value_name = "NAME=PATH")]
        artifacts: Vec<String>,
        /// Skip (with a one-line reason) nodes whose board needs an artifact that was not given,
        /// instead of failing.
        #[arg(long)]
        skip_missing: bool,
        /// Image for a node that rejoins an existing cluster (reimaging): first boot never
        /// initialises a cluster, it waits until a peer server answers and joins it.
        #[arg(long)]
        rejoin: bool,
        /// Outputs beside the raw `<node>.img` (repeatable): `zst`, `xz` (for the Turing Pi
        /// BMC), `gz`; `raw` alone adds none [default: raw + zst].
        #[arg(long = "format", value_name = "FORMAT", value_parser = format_names())]
        formats: Vec<String>,
    },
    /// Build (or show) the cached Debian base of each board's recipe.
    Base {
        /// Boards [default: every board with a [debian] recipe].
        #[arg(value_name = "BOARD")]
        board_names: Vec<String>,
    },
    /// Show an image's partition table, partitions, boot files and the node it was built for.
    Inspect {
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Flash a node's eMMC through the Turing Pi 2 BMC, then power it on.
    Flash(args::FlashArgs),
    /// Write an image to a disk (NVMe, SD, USB) or a file, then verify it.
    Write(args::WriteArgs),
    /// Replace a failed node: build, remove from etcd, flash, power on, wait until Ready.
    Reimage(args::ReimageArgs),
    /// Cluster secrets: tokens and certificate authorities.
    Secrets {
        #[command(subcommand)]
        cmd: SecretsCmd,
    },
    /// Write an admin kubeconfig for a cluster (client certificate from its CA; 0600).
    Kubeconfig {
        /// The cluster, as named in the inventory.
        cluster: String,
        /// Where to write it (default: `<cluster>.kubeconfig` beside the cluster's token).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum SecretsCmd {
    /// Create what each cluster lacks: its CAs (0700 directory, 0600 files) and its token
    /// (0600), pinned to the CA. Never overwrites.
    Init,
    /// Upgrade a cluster's bare token to the CA-pinned form `K10<hash>::server:<secret>`.
    Pin {
        /// The cluster, as named in the inventory.
        cluster: String,
        /// Make a new CA set: only for a cluster that has not started yet.
        #[arg(long, conflicts_with = "cacerts")]
        new_ca: bool,
        /// The running cluster's CA bundle (`curl -k https://SERVER:6443/cacerts`, or a
        /// server's /var/lib/rancher/k3s/server/tls/server-ca.crt).
        #[arg(long)]
        cacerts: Option<PathBuf>,
    },
}

fn format_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(crate::publish::Format::ALL.map(|f| f.name()))
}

pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    crate::progress::set_observer(Box::new(render::Render::new()));
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
                for (name, t) in &s.targets {
                    let default = if *name == s.default_target {
                        " (default)"
                    } else {
                        ""
                    };
                    println!("       target {name}{default}: {}", t.description);
                }
                for (name, v) in &s.variants {
                    println!("       variant {name}: {}", v.description);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Build {
            nodes,
            all,
            out,
            artifacts,
            skip_missing,
            rejoin,
            formats,
        } => {
            let supplied = parse_artifacts(&artifacts)?;
            let formats = formats
                .iter()
                .map(|f| f.parse())
                .collect::<Result<Vec<crate::publish::Format>, String>>()
                .map_err(anyhow::Error::msg)?;
            let Some(cfg) = load(&cli.inventory, &boards_dir, true) else {
                return Ok(ExitCode::from(1));
            };
            let nodes = match (all, nodes.is_empty()) {
                (true, true) => cfg.inventory.nodes.iter().map(|n| n.name.clone()).collect(),
                (false, false) => nodes,
                (true, false) => bail!("give node names or --all, not both"),
                (false, true) => bail!("no nodes given; name them or pass --all"),
            };
            let req = crate::build::Request {
                cfg: &cfg,
                nodes,
                out,
                supplied,
                skip_missing,
                join: if rejoin {
                    plan::JoinMode::Rejoin
                } else {
                    plan::JoinMode::Init
                },
                cache: Cache::locate(cli.cache_dir.as_deref())?,
                formats,
            };
            let o = crate::build::run(&req)?;
            if !o.failed.is_empty() {
                eprintln!(
                    "{} of {} image(s) failed",
                    o.failed.len(),
                    o.failed.len() + o.discarded.len()
                );
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Base { board_names } => {
            let all = config::board::load_dir(&boards_dir).map_err(config::diag::Diagnostics)?;
            let cfg_inv = config::load(&cli.inventory, &boards_dir, false).ok();
            let mirror = cfg_inv
                .as_ref()
                .and_then(|c| c.inventory.debian.mirror.clone());
            let cache = Cache::locate(cli.cache_dir.as_deref())?;
            let names: Vec<String> = if board_names.is_empty() {
                all.values()
                    .filter(|b| b.spec.debian.is_some())
                    .map(|b| b.name().to_string())
                    .collect()
            } else {
                board_names
            };
            let mut wanted = Vec::new();
            for n in names {
                let Some(b) = all.get(&n) else {
                    bail!(
                        "no board `{n}` in {}; expected one of: {}",
                        boards_dir.display(),
                        all.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                };
                let Some(d) = &b.spec.debian else {
                    bail!("board `{n}` ({}) has no [debian] recipe", b.path.display());
                };
                wanted.push((
                    n.clone(),
                    crate::rootfs::bootstrap::Recipe::new(b.spec.arch, d, mirror.as_deref()),
                ));
            }
            let mut failed = 0;
            for (n, recipe, r) in crate::rootfs::bootstrap::ensure_all(&cache, wanted) {
                match r {
                    Ok(r) => println!(
                        "{n}: {} {} ({})",
                        if r.reused { "cached" } else { "built" },
                        r.path.display(),
                        recipe.describe()
                    ),
                    Err(e) => {
                        failed += 1;
                        eprintln!("error: base for {n}: {e:#}");
                    }
                }
            }
            if failed > 0 {
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
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
        Cmd::Flash(a) => {
            crate::flash::run_flash(&cli.inventory, &boards_dir, &a.into())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Write(a) => {
            // Nobody can answer the question: refuse before even opening the target.
            if !a.yes && !std::io::stdin().is_terminal() {
                bail!(
                    "refusing to overwrite {} without confirmation; pass --yes (stdin is not a terminal)",
                    a.device.display()
                );
            }
            crate::write::run_write(&a.into(), &ask)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Reimage(a) => {
            let req = a.into_request()?;
            let cache = Cache::locate(cli.cache_dir.as_deref())?;
            crate::reimage::run(&cli.inventory, &boards_dir, cache, &req)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Secrets {
            cmd: SecretsCmd::Init,
        } => {
            let Some(cfg) = load(&cli.inventory, &boards_dir, false) else {
                return Ok(ExitCode::from(1));
            };
            use crate::secrets::Created;
            for c in crate::secrets::init(&cfg.inventory)? {
                match c {
                    Created::New(p) if p.is_dir() => {
                        println!("created {} (cluster CAs; 0700, files 0600)", p.display())
                    }
                    Created::New(p) => println!("created {} (0600)", p.display()),
                    Created::Kept(p) => println!("kept {} (exists)", p.display()),
                    Created::NoCa(p) => println!(
                        "no CA made at {}: the cluster's token is bare, so its CA (if it ever started) is k3s's own; pin it with `kiln secrets pin` (--cacerts or --new-ca)",
                        p.display()
                    ),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Secrets {
            cmd:
                SecretsCmd::Pin {
                    cluster,
                    new_ca,
                    cacerts,
                },
        } => {
            let Some(cfg) = load(&cli.inventory, &boards_dir, true) else {
                return Ok(ExitCode::from(1));
            };
            let c = find_cluster(&cfg.inventory, &cluster)?;
            let source = match (new_ca, cacerts) {
                (true, _) => crate::secrets::PinSource::NewCa,
                (false, Some(f)) => crate::secrets::PinSource::Cacerts(f),
                (false, None) => crate::secrets::PinSource::Existing,
            };
            let p = crate::secrets::pin(c, source)?;
            if p.made_ca {
                println!("created {} (0700, files 0600)", p.ca_dir.display());
            }
            println!(
                "pinned {} to CA hash {} (same secret; 0600)",
                p.token_file.display(),
                p.hash
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Kubeconfig { cluster, out } => {
            let Some(cfg) = load(&cli.inventory, &boards_dir, false) else {
                return Ok(ExitCode::from(1));
            };
            let c = find_cluster(&cfg.inventory, &cluster)?;
            let ca = crate::secrets::ca::ClusterCa::load(&c.ca_dir())?;
            let server = crate::secrets::kubeconfig::api_servers(&cfg.inventory, &c.name, None)
                .into_iter()
                .next()
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "cluster `{}` has no server node and no api_server; expected one of them in the inventory",
                        c.name
                    )
                })?;
            let k = crate::secrets::kubeconfig::admin(
                &c.name,
                &ca,
                &server,
                time::OffsetDateTime::now_utc(),
            )?;
            let path = out.unwrap_or_else(|| crate::secrets::kubeconfig::default_path(c));
            crate::secrets::kubeconfig::write(&path, &k)?;
            println!(
                "wrote {} (0600): cluster {}, server {server}, user system:admin (system:masters), valid 365 days",
                path.display(),
                c.name
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `kiln write`'s question, on the terminal.
fn ask(q: &crate::write::Question) -> Result<bool> {
    eprint!(
        "This erases {} ({}) and writes {} onto it. Type `yes` to continue: ",
        q.target.display(),
        crate::config::size::human(q.target_size),
        q.image.display()
    );
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim() == "yes")
}

/// Loads the configuration, printing every diagnostic to stderr on failure.
fn find_cluster<'a>(
    inv: &'a crate::config::inventory::Inventory,
    name: &str,
) -> Result<&'a crate::config::inventory::Cluster> {
    inv.clusters.iter().find(|c| c.name == name).ok_or_else(|| {
        let names: Vec<&str> = inv.clusters.iter().map(|c| c.name.as_str()).collect();
        anyhow::anyhow!(
            "no cluster `{name}` in the inventory; expected one of: {}",
            names.join(", ")
        )
    })
}

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
        // A zero-byte file is a failed download or a wrong path, never a base, k3s or loader.
        let len = std::fs::metadata(&p)
            .map_err(|e| anyhow::anyhow!("--artifact {name}: reading {}: {e}", p.display()))?
            .len();
        if len == 0 {
            bail!(
                "--artifact {name}: {} is empty (0 bytes); expected the artifact's contents",
                p.display()
            );
        }
        if m.insert(name.to_string(), p).is_some() {
            bail!("--artifact {name} given twice");
        }
    }
    Ok(m)
}
