//! The build pipeline for a set of nodes: plan each, resolve the inputs they share once (one
//! base per recipe, one k3s per architecture), then write each node's image.

use crate::config::Config;
use crate::config::size::human;
use crate::fetch::{Cache, k3s};
use crate::image::{self, ImageReport, Inputs};
use crate::plan::{self, BaseInput, JoinMode, MissingArtifacts, NodePlan};
use crate::rootfs::bootstrap;
use anyhow::{Result, anyhow, bail};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub struct Request<'a> {
    pub cfg: &'a Config,
    pub nodes: Vec<String>,
    pub out: PathBuf,
    pub supplied: BTreeMap<String, PathBuf>,
    pub skip_missing: bool,
    pub join: JoinMode,
    pub cache: Cache,
}

#[derive(Default)]
pub struct Outcome {
    pub built: Vec<ImageReport>,
    pub failed: Vec<(String, anyhow::Error)>,
    pub skipped: Vec<String>,
}

/// Plans every node; with `skip_missing`, nodes lacking a user-only artifact are reported and
/// skipped instead of failing the run.
fn plans(req: &Request, outcome: &mut Outcome) -> Result<Vec<NodePlan>> {
    let mut plans = Vec::new();
    for n in &req.nodes {
        match plan::plan_node(req.cfg, n, &req.supplied, req.join) {
            Ok(p) => plans.push(p),
            Err(e) => match e.downcast_ref::<MissingArtifacts>() {
                Some(m) if req.skip_missing => {
                    let what: Vec<&str> = m
                        .missing
                        .iter()
                        .map(|s| s.split([' ', ':']).next().unwrap_or(""))
                        .collect();
                    eprintln!(
                        "skip {n}: board {} needs --artifact {}",
                        m.board,
                        what.join(", ")
                    );
                    outcome.skipped.push(n.clone());
                }
                _ => return Err(e),
            },
        }
    }
    Ok(plans)
}

/// The base tarball for a plan, building it with mmdebstrap when it is not cached.
fn base_for(cache: &Cache, plan: &NodePlan) -> Result<PathBuf> {
    match &plan.base {
        BaseInput::File(p) => Ok(p.clone()),
        BaseInput::Debian(recipe) => {
            let cached = bootstrap::cached_path(cache, recipe)?;
            if cached.is_file() {
                eprintln!(
                    "base for {}: {} (cached {})",
                    plan.board.name(),
                    recipe.describe(),
                    cached.display()
                );
                return Ok(cached);
            }
            eprintln!(
                "base for {}: building {} with mmdebstrap; under emulation this takes 15-20 minutes, once per recipe",
                plan.board.name(),
                recipe.describe()
            );
            let pb = crate::progress::spinner(format!("{}: mmdebstrap", plan.board.name()));
            let r = bootstrap::ensure(cache, recipe, &|l| pb.set_message(l.to_string()));
            pb.finish_and_clear();
            let b = r?;
            let size = std::fs::metadata(&b.path).map(|m| m.len()).unwrap_or(0);
            eprintln!(
                "base for {}: built {} ({})",
                plan.board.name(),
                b.path.display(),
                human(size)
            );
            Ok(b.path)
        }
    }
}

fn k3s_for(cache: &Cache, plan: &NodePlan) -> Result<k3s::K3sFiles> {
    let arch = plan.board.spec.arch;
    let pb = crate::progress::bytes(0, format!("k3s {}", arch.debian()));
    let r = k3s::resolve(cache, &plan.k3s, arch, &|name, n, total| {
        if let Some(t) = total {
            pb.set_length(t);
        }
        pb.set_message(name.to_string());
        pb.set_position(n);
    });
    pb.finish_and_clear();
    let f = r?;
    eprintln!(
        "k3s {} for {}: {} ({}), images {} ({})",
        f.version,
        arch.debian(),
        f.binary.path.display(),
        &f.binary.sha256[..12],
        f.images.path.display(),
        &f.images.sha256[..12]
    );
    Ok(f)
}

pub fn run(req: &Request) -> Result<Outcome> {
    if req.nodes.is_empty() {
        bail!("no nodes to build");
    }
    image::ext4::check_mke2fs()?;
    let mut outcome = Outcome::default();
    let plans = plans(req, &mut outcome)?;

    // Shared inputs, each resolved once; an error is kept per key so it fails only the nodes
    // that need it.
    let mut bases: BTreeMap<String, Result<PathBuf, String>> = BTreeMap::new();
    let mut k3s_files: BTreeMap<String, Result<k3s::K3sFiles, String>> = BTreeMap::new();
    let mut jobs: Vec<(NodePlan, Result<Inputs>)> = Vec::new();
    for p in plans {
        let base_key = match &p.base {
            BaseInput::File(f) => f.display().to_string(),
            BaseInput::Debian(r) => r.key(),
        };
        let base = bases
            .entry(base_key)
            .or_insert_with(|| base_for(&req.cache, &p).map_err(|e| format!("{e:#}")))
            .clone();
        let k3s_key = p.board.spec.arch.debian().to_string();
        let k = k3s_files
            .entry(k3s_key)
            .or_insert_with(|| k3s_for(&req.cache, &p).map_err(|e| format!("{e:#}")))
            .clone();
        let inputs = match (base, k) {
            (Ok(base), Ok(k3s)) => Ok(Inputs { base, k3s }),
            (Err(e), _) => Err(anyhow!("base root filesystem: {e}")),
            (_, Err(e)) => Err(anyhow!("k3s: {e}")),
        };
        jobs.push((p, inputs));
    }
    for (p, inputs) in jobs {
        let r = inputs.and_then(|i| image::build_node(&p, &i, &req.out));
        match r {
            Ok(r) => {
                println!(
                    "{}: {} {} ({} data), kernel {}, k3s {}, {}{:.1} s",
                    r.node,
                    r.path.display(),
                    human(r.size),
                    human(r.allocated),
                    r.kernel_version,
                    r.k3s_version,
                    if req.join == JoinMode::Rejoin {
                        "rejoin, "
                    } else {
                        ""
                    },
                    r.seconds
                );
                outcome.built.push(r);
            }
            Err(e) => {
                eprintln!("error: {}: {e:#}", p.node.name);
                outcome.failed.push((p.node.name.clone(), e));
            }
        }
    }
    Ok(outcome)
}
