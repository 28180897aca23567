//! `kiln reimage NODE`: replace a failed node's disk with a fresh image and bring it back
//! into its cluster. A sequence of named steps, each printed, each resumable with
//! `--from-step`, stopping at the first failure.

pub mod kube;

use crate::config::{self, Config, inventory::Node, inventory::Role};
use crate::fetch::Cache;
use crate::flash::{self, BmcArgs, bmc::Bmc};
use crate::plan::JoinMode;
use anyhow::{Context, Result, anyhow, bail};
use clap::ValueEnum;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Step {
    /// Build `<out>/<node>.img` for rejoining its cluster.
    Build,
    /// Check the Node in the cluster, then power the slot off through the BMC. Before the
    /// delete: a server still running when its etcd member is removed wipes itself on its next
    /// start and rejoins under the same name.
    PowerOff,
    /// Servers: delete the Node object so k3s removes its etcd member; wait until it is gone.
    /// Refused while the slot is powered on.
    DeleteNode,
    /// Flash the image through the BMC.
    Flash,
    /// Power the slot on.
    PowerOn,
    /// Wait until the Node is Ready again (a new boot of it).
    WaitReady,
}

impl Step {
    fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

/// `kiln reimage`
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Replace a failed node: rebuild, flash and rejoin it.\n\n\
Steps (resume any of them with --from-step):\n  \
build       build OUT/<node>.img to rejoin (first boot joins a live peer, never initialises)\n  \
power-off   check the Node (its InternalIP must match; a server needs another Ready etcd \
server), then power the slot off through the BMC\n  \
delete-node servers only: with the slot confirmed off, delete the Node through the Kubernetes \
API so k3s removes its etcd member, and wait until it is gone (agents skip this)\n  \
flash       flash the image through the BMC (as `kiln flash`)\n  \
power-on    power the slot on\n  \
wait-ready  wait until the Node is Ready again\n\n\
The kubeconfig is the cluster's `kubeconfig` in the inventory, else $KUBECONFIG."
)]
pub struct ReimageArgs {
    /// Node to reimage; it needs a `slot`.
    pub node: String,
    /// Input files for the build step, as for `kiln build`: `uboot=u-boot-rockchip.bin`;
    /// overrides `base=`, `k3s=`, `k3s-images=`.
    #[arg(long = "artifact", value_name = "NAME=PATH")]
    pub artifacts: Vec<String>,
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// Start at this step (after fixing what stopped an earlier run).
    #[arg(long, value_enum, default_value_t = Step::Build)]
    pub from_step: Step,
    /// Flash an image older than the inventory or board profile; delete the last ready etcd
    /// server's peer.
    #[arg(long)]
    pub force: bool,
    /// Seconds to wait for the etcd member to go and for the node to become Ready.
    #[arg(long, default_value_t = 900, value_name = "SECS")]
    pub timeout: u64,
    #[command(flatten)]
    pub bmc: BmcArgs,
}

/// State carried between steps.
struct Run<'a> {
    cfg: &'a Config,
    node: &'a Node,
    slot: u8,
    args: &'a ReimageArgs,
    bmc: Option<Bmc>,
    kube: Option<kube::Kube>,
    /// The Node's boot ID before power-off: Ready with the same boot ID is the old boot.
    old_boot: Option<String>,
    cache: Cache,
}

pub fn run(inventory: &Path, boards: &Path, cache: Cache, args: &ReimageArgs) -> Result<ExitCode> {
    let building = args.from_step == Step::Build;
    let artifacts = crate::cli::parse_artifacts(&args.artifacts)?;
    let cfg = config::load(inventory, boards, building)?;
    let node = flash::lookup(&cfg, &args.node)?;
    let slot = flash::slot_of(&cfg, node)?;
    let mut r = Run {
        cfg: &cfg,
        node,
        slot,
        args,
        bmc: None,
        kube: None,
        old_boot: None,
        cache,
    };
    let steps = Step::value_variants();
    for (i, &step) in steps.iter().enumerate() {
        if step < args.from_step {
            continue;
        }
        println!("[{}/{}] {}: {}", i + 1, steps.len(), node.name, step.name());
        let started = Instant::now();
        let res = match step {
            Step::Build => r.build(&artifacts),
            Step::PowerOff => r.power_off(),
            Step::DeleteNode => r.delete_node(),
            Step::Flash => r.flash(),
            Step::PowerOn => r.bmc().and_then(|b| b.power(slot, true)),
            Step::WaitReady => r.wait_ready(),
        };
        if let Err(e) = res {
            return Err(e.context(format!(
                "step `{}` failed; fix the cause and resume with `kiln reimage {} --from-step {}`",
                step.name(),
                node.name,
                step.name()
            )));
        }
        println!("      done in {:.0} s", started.elapsed().as_secs_f64());
    }
    println!("{}: reimaged and Ready", node.name);
    Ok(ExitCode::SUCCESS)
}

impl Run<'_> {
    fn image(&self) -> PathBuf {
        self.args.out.join(format!("{}.img", self.node.name))
    }

    fn bmc(&mut self) -> Result<&Bmc> {
        if self.bmc.is_none() {
            self.bmc = Some(flash::connect(self.cfg, &self.args.bmc)?);
        }
        self.bmc
            .as_ref()
            .ok_or_else(|| anyhow!("BMC session missing"))
    }

    fn kube(&mut self) -> Result<&kube::Kube> {
        if self.kube.is_none() {
            let from_inventory = self
                .cfg
                .inventory
                .cluster(&self.node.cluster)
                .and_then(|c| c.kubeconfig.clone());
            let path = match from_inventory {
                Some(p) => p,
                None => std::env::var_os("KUBECONFIG")
                    .and_then(|v| std::env::split_paths(&v).next())
                    .ok_or_else(|| {
                        anyhow!(
                            "no kubeconfig for cluster `{}`: set `kubeconfig` in its [[cluster]] or KUBECONFIG",
                            self.node.cluster
                        )
                    })?,
            };
            self.kube = Some(kube::Kube::from_kubeconfig(&path)?);
        }
        self.kube
            .as_ref()
            .ok_or_else(|| anyhow!("Kubernetes client missing"))
    }

    /// Always a rejoin image: the node's cluster exists, so first boot must join a live peer
    /// and never initialise a second cluster.
    fn build(&self, artifacts: &BTreeMap<String, PathBuf>) -> Result<()> {
        let req = crate::build::Request {
            cfg: self.cfg,
            nodes: vec![self.node.name.clone()],
            out: self.args.out.clone(),
            supplied: artifacts.clone(),
            skip_missing: false,
            join: JoinMode::Rejoin,
            cache: self.cache.clone(),
            // The flash step sends the .xz; make it with the build.
            formats: vec![crate::publish::Format::Xz],
        };
        let mut o = crate::build::run(&req)?;
        if let Some((_, e)) = o.failed.pop() {
            return Err(e);
        }
        Ok(())
    }

    /// Reads the Node, if the cluster has one of this name, and checks it is this machine (its
    /// InternalIP is the inventory's address). Remembers its boot ID: Ready with the same boot
    /// ID later is still the old boot.
    fn existing_node(&mut self) -> Result<Option<serde_json::Value>> {
        let name = self.node.name.clone();
        let ip = self.node.ip.to_string();
        let cluster = self.node.cluster.clone();
        let k = self.kube()?;
        let existing = k.node(&name)?;
        if let Some(n) = &existing {
            // The same name in another cluster must not be touched: check the address too.
            if let Some(found) = kube::internal_ip(n)
                && found != ip
            {
                bail!(
                    "Node {name} in this cluster has InternalIP {found}; expected {ip} from the inventory — is the kubeconfig for cluster `{cluster}`?"
                );
            }
            if self.old_boot.is_none() {
                self.old_boot = kube::boot_id(n);
            }
        }
        Ok(existing)
    }

    /// A server's etcd member may go only if another Ready etcd server remains to rejoin.
    fn check_peers(&mut self) -> Result<()> {
        let name = self.node.name.clone();
        let force = self.args.force;
        let peers = self
            .kube()?
            .nodes()?
            .into_iter()
            .filter(|n| kube::name(n) != name && kube::is_etcd(n) && kube::is_ready(n))
            .count();
        if peers == 0 && !force {
            bail!(
                "no other Ready etcd server in the cluster; removing {name} would leave no cluster to rejoin (pass --force if the cluster is being rebuilt)"
            );
        }
        Ok(())
    }

    /// Checks the Kubernetes side first, so a wrong kubeconfig or a last etcd server stops the
    /// run before anything is switched off; then powers the slot off and confirms it.
    fn power_off(&mut self) -> Result<()> {
        let existing = self.existing_node()?;
        if self.node.role == Role::Server && existing.is_some() {
            self.check_peers()?;
        }
        let slot = self.slot;
        let b = self.bmc()?;
        b.power(slot, false)?;
        if b.power_state(slot)? {
            bail!("slot {slot} still reports power on after power off");
        }
        Ok(())
    }

    fn delete_node(&mut self) -> Result<()> {
        let name = self.node.name.clone();
        let timeout = Duration::from_secs(self.args.timeout);
        let existing = self.existing_node()?;
        if self.node.role == Role::Agent {
            println!("      skipped: agents have no etcd member");
            return Ok(());
        }
        let Some(_) = existing else {
            println!("      Node {name} is already gone");
            return Ok(());
        };
        self.check_peers()?;
        // A server that still runs (or starts again) after its etcd member is removed finds
        // itself removed, wipes its etcd data and rejoins under the same name, racing the new
        // image: the slot must be off, whichever step this run started from.
        let slot = self.slot;
        if self.bmc()?.power_state(slot)? {
            bail!(
                "slot {slot} ({name}) is powered on; expected it off before the Node and its etcd member are deleted (a server still running when its member is removed wipes itself and rejoins under the same name): run `kiln reimage {name} --from-step power-off`"
            );
        }
        let k = self.kube()?;
        k.delete_node(&name)?;
        // k3s's etcd member controller holds the Node (finalizer) until it has removed the
        // member, so the Node vanishing means the member is gone.
        let start = Instant::now();
        let pb = crate::progress::spinner(format!(
            "{name}: waiting for the Node and its etcd member to go"
        ));
        while k.node(&name)?.is_some() {
            if start.elapsed() > timeout {
                pb.finish_and_clear();
                bail!(
                    "Node {name} still exists after {} s; expected k3s to remove its etcd member and the Node (check `kubectl get node {name} -o yaml` finalizers)",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        pb.finish_and_clear();
        println!("      Node {name} and its etcd member are gone");
        Ok(())
    }

    fn flash(&mut self) -> Result<()> {
        let image = self.image();
        flash::check_image(self.cfg, self.node, &image, self.args.force)
            .context("run the build step first (--from-step build)")?;
        // An init image of a bootstrap server would start a second cluster if its peers are
        // slow to answer: a reimage flashes only rejoin images.
        let id = crate::image::inspect::identity(&image)?;
        if id.join != JoinMode::Rejoin {
            bail!(
                "{} was built to create its cluster (join = {}); a reimaged node must rejoin: run `kiln reimage {} --from-step build` or `kiln build {} --rejoin`",
                image.display(),
                id.join.as_str(),
                self.node.name,
                self.node.name
            );
        }
        let xz = flash::xz::ensure(&image)?;
        let (cfg, node, slot, bmc_args) = (self.cfg, self.node, self.slot, self.args.bmc.clone());
        let b = self.bmc()?;
        flash::flash(b, cfg, node, slot, &xz, &bmc_args)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let name = self.node.name.clone();
        let old = self.old_boot.clone();
        let timeout = Duration::from_secs(self.args.timeout);
        let k = self.kube()?;
        let start = Instant::now();
        let pb = crate::progress::spinner(format!("{name}: waiting for the Node to be Ready"));
        loop {
            if let Some(n) = k.node(&name)?
                && kube::is_ready(&n)
                && (old.is_none() || kube::boot_id(&n) != old)
            {
                pb.finish_and_clear();
                return Ok(());
            }
            if start.elapsed() > timeout {
                pb.finish_and_clear();
                bail!(
                    "Node {name} is not Ready after {} s; expected the new boot to join (watch the console: tpi uart -n {} get)",
                    timeout.as_secs(),
                    self.slot
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}
