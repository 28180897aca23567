//! The build pipeline for a set of nodes: plan each, resolve the inputs they share once (one
//! base per recipe, one k3s per architecture), then write each node's image.
//!
//! Everything a build makes is staged and moved into `--out` as one set, only when all of it is
//! complete (see `publish::staging`): a failed node, a failed publish step, Ctrl-C or SIGTERM
//! leave the previous outputs as they were.

use crate::config::Config;
use crate::config::size::human;
use crate::fetch::{Cache, k3s};
use crate::image::{self, ImageReport, Inputs};
use crate::plan::{self, BaseInput, JoinMode, MissingArtifacts, NodePlan};
use crate::publish::staging::{OutDir, Staging};
use crate::publish::{self, Format, Manifest, NodeOutput, Published};
use crate::rootfs::base::BaseScan;
use crate::rootfs::{self, bootstrap};
use anyhow::{Result, anyhow, bail};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub struct Request<'a> {
    pub cfg: &'a Config,
    pub nodes: Vec<String>,
    pub out: PathBuf,
    pub supplied: BTreeMap<String, PathBuf>,
    pub skip_missing: bool,
    pub join: JoinMode,
    pub cache: Cache,
    /// Outputs besides the raw image (see [`Format::resolve`]).
    pub formats: Vec<Format>,
}

#[derive(Default)]
pub struct Outcome {
    /// Images now in the output directory (empty when any node failed).
    pub built: Vec<ImageReport>,
    pub published: Vec<Published>,
    pub failed: Vec<(String, anyhow::Error)>,
    pub skipped: Vec<String>,
    /// Nodes whose image was made but not published because another node of the build failed.
    pub discarded: Vec<String>,
}

/// Plans every node; with `skip_missing`, nodes lacking a user-only artifact are reported and
/// skipped instead of failing the run.
fn plans(req: &Request, outcome: &mut Outcome) -> Result<Vec<NodePlan>> {
    let mut plans = Vec::new();
    // A node named twice is built once (two builds of it would share its file names).
    let mut seen = std::collections::HashSet::new();
    for n in req.nodes.iter().filter(|n| seen.insert(n.as_str())) {
        match plan::plan_node(req.cfg, n, &req.supplied, req.join) {
            Ok(p) => plans.push(p),
            Err(e) => match e.downcast_ref::<MissingArtifacts>() {
                Some(m) if req.skip_missing => {
                    let what: Vec<&str> = m
                        .missing
                        .iter()
                        .map(|s| s.split([' ', ':']).next().unwrap_or(""))
                        .collect();
                    crate::progress::note(format!(
                        "skip {n}: board {} needs --artifact {}",
                        m.board,
                        what.join(", ")
                    ));
                    outcome.skipped.push(n.clone());
                }
                _ => return Err(e),
            },
        }
    }
    Ok(plans)
}

/// Every Debian base the plans need, each built once (in parallel) or taken from the cache.
fn debian_bases(cache: &Cache, plans: &[NodePlan]) -> BTreeMap<String, Result<PathBuf, String>> {
    let mut wanted = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for p in plans {
        if let BaseInput::Debian(b) = &p.base
            && let r = bootstrap::Recipe::of(b)
            && seen.insert(r.key())
        {
            let r = &r;
            let cached = bootstrap::cached_path(cache, r)
                .map(|c| c.is_file())
                .unwrap_or(false);
            crate::progress::note(format!(
                "base for {}: {}{}",
                p.board.name(),
                r.describe(),
                if cached {
                    " (cached)"
                } else {
                    ": building with mmdebstrap; about 12 minutes under emulation, once per recipe"
                }
            ));
            wanted.push((p.board.name().to_string(), r.clone()));
        }
    }
    bootstrap::ensure_all(cache, wanted)
        .into_iter()
        .map(|(board, recipe, r)| {
            if let Ok(b) = &r
                && !b.reused
            {
                let size = std::fs::metadata(&b.path).map(|m| m.len()).unwrap_or(0);
                crate::progress::note(format!(
                    "base for {board}: built {} ({})",
                    b.path.display(),
                    human(size)
                ));
            }
            (
                recipe.key(),
                r.map(|b| b.path).map_err(|e| format!("{e:#}")),
            )
        })
        .collect()
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
    crate::progress::note(format!(
        "k3s {} for {}: {} ({}), images {} ({})",
        f.version,
        arch.debian(),
        f.binary.path.display(),
        &f.binary.sha256[..12],
        f.images.path.display(),
        &f.images.sha256[..12]
    ));
    Ok(f)
}

pub fn run(req: &Request) -> Result<Outcome> {
    let r = run_locked(req);
    // Interrupted: whatever failed because of it, the signal handler ends the process.
    crate::cleanup::settle();
    r
}

fn run_locked(req: &Request) -> Result<Outcome> {
    if req.nodes.is_empty() {
        bail!("no nodes to build");
    }
    image::ext4::check_mke2fs()?;
    // Locked from here to the end: a second build into the same directory fails now, before
    // it has done any work. Taking the lock also finishes or removes what a killed build left.
    let out = OutDir::lock(&req.out)?;
    let staging = out.stage()?;
    crate::cleanup::sweep_tmp();
    let mut outcome = Outcome::default();
    let plans = plans(req, &mut outcome)?;

    // Shared inputs, each resolved once; an error is kept per key so it fails only the nodes
    // that need it.
    let bases = debian_bases(&req.cache, &plans);
    let mut k3s_files: BTreeMap<String, Result<k3s::K3sFiles, String>> = BTreeMap::new();
    let mut scans: BTreeMap<(PathBuf, String), Result<Arc<BaseScan>, String>> = BTreeMap::new();
    let mut jobs: Vec<(NodePlan, Result<Inputs>)> = Vec::new();
    for p in plans {
        let base = match &p.base {
            BaseInput::File(f) => Ok(f.clone()),
            BaseInput::Debian(b) => bases
                .get(&bootstrap::Recipe::of(b).key())
                .cloned()
                .unwrap_or_else(|| Err("base was not prepared".into())),
        };
        let k3s_key = p.board.spec.arch.debian().to_string();
        let k = k3s_files
            .entry(k3s_key)
            .or_insert_with(|| k3s_for(&req.cache, &p).map_err(|e| format!("{e:#}")))
            .clone();
        // One scan per base and board (the board picks the device trees).
        let scan = base.clone().and_then(|b| {
            scans
                .entry((b.clone(), p.board.name().to_string()))
                .or_insert_with(|| {
                    image::scan_base(&p, &b)
                        .map(Arc::new)
                        .map_err(|e| format!("{e:#}"))
                })
                .clone()
        });
        let inputs = match (base, scan, k) {
            (Ok(base), Ok(scan), Ok(k3s)) => Ok(Inputs { base, scan, k3s }),
            (Err(e), _, _) | (_, Err(e), _) => Err(anyhow!("base root filesystem: {e}")),
            (_, _, Err(e)) => Err(anyhow!("k3s: {e}")),
        };
        jobs.push((p, inputs));
    }

    // Per-node work on every core. Nodes of a board share one root filesystem, written by the
    // first of them to need it (the others of that board wait for it, see `SharedRoots`), so
    // the first node of every board is scheduled first.
    let formats = Format::resolve(&req.formats);
    // The order nodes are taken in; results and the summary keep the inventory's order.
    let mut leaders = std::collections::HashSet::new();
    let (mut order, followers): (Vec<usize>, Vec<usize>) =
        (0..jobs.len()).partition(|&i| leaders.insert(jobs[i].0.board.name().to_string()));
    order.extend(followers);
    let roots = SharedRoots::default();
    // One .xz block cache for the build: the nodes of a board share most of their bytes.
    let xz_blocks = publish::BlockCache::new();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<NodeResult>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&i) = order.get(n) else {
                        break;
                    };
                    let (p, inputs) = &jobs[i];
                    let r = match inputs {
                        Ok(inp) => image_node(p, inp, &roots, staging.dir()).and_then(|r| {
                            crate::cleanup::checkpoint("image")?;
                            let mut published =
                                publish::publish_image_with(&r.path, &formats, &xz_blocks)?;
                            if let Some(l) = &r.loader_image {
                                published.loader_image = Some(Box::new(
                                    publish::publish_image_with(&l.path, &formats, &xz_blocks)?,
                                ));
                            }
                            crate::cleanup::checkpoint("publish")?;
                            Ok((r, published))
                        }),
                        Err(e) => Err(anyhow!("{e:#}")),
                    };
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(r);
                    }
                }
            });
        }
    });
    drop(roots);

    let mut inputs_used: Vec<publish::Input> = Vec::new();
    let mut done: Vec<(ImageReport, Published)> = Vec::new();
    for ((p, inputs), slot) in jobs.iter().zip(results) {
        let r = slot
            .into_inner()
            .ok()
            .flatten()
            .unwrap_or_else(|| Err(anyhow!("the build worker for {} stopped", p.node.name)));
        match r {
            Ok((r, published)) => {
                if let Ok(i) = inputs {
                    note_inputs(&mut inputs_used, p, i, &r);
                }
                done.push((r, published));
            }
            Err(e) => {
                crate::progress::note(format!("error: {}: {e:#}", p.node.name));
                outcome.failed.push((p.node.name.clone(), e));
            }
        }
    }
    if !outcome.failed.is_empty() {
        // All or nothing: the previous set stays as it was (dropping `staging` removes it).
        for (r, _) in &done {
            crate::progress::note(format!(
                "{}: built, but not published: another image of this build failed",
                r.node
            ));
        }
        crate::progress::note(format!(
            "nothing in {} was replaced; the previous outputs are unchanged",
            req.out.display()
        ));
        outcome.discarded = done.into_iter().map(|(r, _)| r.node).collect();
        return Ok(outcome);
    }
    if done.is_empty() {
        return Ok(outcome);
    }
    // Paths as they will be once the set is in place (the manifest records them).
    for (r, published) in &mut done {
        r.path = staging.final_path(&r.path);
        if let Some(l) = &mut r.loader_image {
            l.path = staging.final_path(&l.path);
        }
        published.relocate(&|p| staging.final_path(p));
    }
    let (built, published): (Vec<_>, Vec<_>) = done.into_iter().unzip();
    outcome.built = built;
    outcome.published = published;
    write_index(req, &staging, &outcome, inputs_used)?;
    crate::cleanup::checkpoint("index")?;
    staging.commit()?;

    for (r, published) in outcome.built.iter().zip(&outcome.published) {
        let mut extra = String::new();
        for (f, c) in &published.compressed {
            extra.push_str(&format!(
                ", {} {}",
                f.extension().unwrap_or(""),
                human(c.size)
            ));
        }
        crate::progress::result(format!(
            "{}: {} {} ({} data{extra}), kernel {}, k3s {}, {}{:.1} s",
            r.node,
            r.path.display(),
            human(r.size),
            human(published.mapped_bytes),
            r.kernel_version,
            r.k3s_version,
            if req.join == JoinMode::Rejoin {
                "rejoin, "
            } else {
                ""
            },
            r.seconds
        ));
        if let Some(l) = &r.loader_image {
            crate::progress::result(format!(
                "{}: {} {}: the loader alone, for its {} (`kiln flash {}` writes it; {} goes on the {} with `kiln write`)",
                r.node,
                l.path.display(),
                human(l.size),
                l.target,
                r.node,
                r.path
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default(),
                r.identity.target,
            ));
        }
        if let Some(a) = r.identity.firmware_advice() {
            crate::progress::result(a);
        }
    }
    Ok(outcome)
}

/// The shared root filesystems of a build, each written once by the first node that needs it
/// (`OnceLock::get_or_init` makes the others of its board wait instead of writing it again).
#[derive(Default)]
struct SharedRoots {
    roots: Mutex<BTreeMap<image::shared::Key, Arc<SharedSlot>>>,
}

type SharedSlot = std::sync::OnceLock<Result<image::shared::SharedRoot, String>>;

impl SharedRoots {
    fn slot(&self, key: &image::shared::Key) -> Result<Arc<SharedSlot>> {
        let mut roots = self
            .roots
            .lock()
            .map_err(|_| anyhow!("another build worker panicked"))?;
        Ok(roots.entry(key.clone()).or_default().clone())
    }
}

/// One node's image: its boot blobs, then the files and identity the rootfs stage makes
/// (they record the blobs), then its board's shared root filesystem, then the image itself.
fn image_node(
    p: &NodePlan,
    inputs: &Inputs,
    roots: &SharedRoots,
    dir: &std::path::Path,
) -> Result<ImageReport> {
    let blobs = image::read_blobs(p)?;
    let contents =
        rootfs::node_contents(p, &inputs.scan, &inputs.k3s, image::loader_records(&blobs))?;
    let spec = image::shared_spec(p, inputs, &contents)?;
    let slot = roots.slot(&spec.key)?;
    let root = slot.get_or_init(|| {
        let r = image::make_shared_root(p, inputs, &contents, &spec, dir);
        if let Ok(r) = &r {
            crate::progress::note(format!(
                "{}: shared root filesystem written once for its nodes in {:.1} s",
                p.board.name(),
                r.seconds
            ));
        }
        r.map_err(|e| format!("{e:#}"))
    });
    let root = root.as_ref().map_err(|e| {
        anyhow!(
            "the shared root filesystem of board {}: {e}",
            p.board.name()
        )
    })?;
    image::build_node(p, inputs, &contents, root, &blobs, dir)
}

type NodeResult = Result<(ImageReport, Published)>;

/// Records the inputs a node was built from, once each, for the manifest.
fn note_inputs(used: &mut Vec<publish::Input>, p: &NodePlan, i: &Inputs, r: &ImageReport) {
    fn add(used: &mut Vec<publish::Input>, name: String, source: String, sha256: String) {
        if !used.iter().any(|u| u.name == name && u.sha256 == sha256) {
            used.push(publish::Input {
                name,
                source,
                sha256,
                loader: None,
            });
        }
    }
    let base_source = match &p.base {
        BaseInput::File(f) => format!("--artifact base={}", f.display()),
        BaseInput::Debian(b) => {
            let recipe = bootstrap::Recipe::of(b);
            format!(
                "mmdebstrap: {} (recipe {})",
                recipe.describe(),
                &recipe.key()[..16]
            )
        }
    };
    let arch = p.board.spec.arch.debian();
    add(
        used,
        format!("base:{}", p.board.name()),
        base_source,
        r.identity.base_sha256.clone(),
    );
    add(
        used,
        format!("k3s:{arch}"),
        i.k3s.binary.source.clone(),
        i.k3s.binary.sha256.clone(),
    );
    add(
        used,
        format!("k3s-images:{arch}"),
        i.k3s.images.source.clone(),
        i.k3s.images.sha256.clone(),
    );
    for (name, path) in &p.artifacts {
        // Nodes of a board share their loader: hash it once.
        let source = format!("--artifact {name}={}", path.display());
        if used.iter().any(|u| u.name == *name && u.source == source) {
            continue;
        }
        if let Ok(sha) = crate::fetch::sha256_file(path) {
            used.push(publish::Input {
                name: name.clone(),
                source,
                sha256: sha,
                loader: r
                    .identity
                    .loaders
                    .iter()
                    .find(|l| l.artifact == *name)
                    .cloned(),
            });
        }
    }
}

/// SHA256SUMS and kiln-manifest.json for the images this run built, staged with them.
fn write_index(
    req: &Request,
    staging: &Staging,
    o: &Outcome,
    inputs: Vec<publish::Input>,
) -> Result<()> {
    let mut files = Vec::new();
    for p in &o.published {
        files.push(&p.raw);
        files.extend(p.compressed.iter().map(|(_, c)| c));
        if let Some(l) = &p.loader_image {
            files.push(&l.raw);
            files.extend(l.compressed.iter().map(|(_, c)| c));
        }
    }
    publish::write_sums(staging.dir(), &files)?;
    let inv = &req.cfg.inventory;
    let mut boards: Vec<publish::Source> = Vec::new();
    for r in &o.built {
        if let Some(b) = req.cfg.boards.get(&r.identity.board)
            && !boards.iter().any(|x| x.name == b.name())
        {
            boards.push(publish::Source {
                name: b.name().to_string(),
                path: b.path.clone(),
                sha256: b.sha256.clone(),
            });
        }
    }
    let m = Manifest {
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        inventory: publish::Source {
            name: "inventory".into(),
            path: inv.path.clone(),
            sha256: inv.sha256.clone(),
        },
        boards,
        inputs,
        nodes: o
            .built
            .iter()
            .zip(&o.published)
            .map(|(r, p)| NodeOutput {
                identity: r.identity.clone(),
                files: p.files(),
                bmap: p.bmap.clone(),
                mapped_bytes: p.mapped_bytes,
                loader_image: r.loader_image.as_ref().zip(p.loader_image.as_deref()).map(
                    |(l, lp)| publish::LoaderImageOutput {
                        target: l.target.clone(),
                        files: lp.files(),
                        bmap: lp.bmap.clone(),
                    },
                ),
            })
            .collect(),
    };
    publish::write_manifest(staging.dir(), &m)?;
    Ok(())
}
