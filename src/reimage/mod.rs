//! `kiln reimage NODE`: replace a failed node's disk with a fresh image and bring it back
//! into its cluster. A sequence of named steps, each printed, each resumable with
//! `--from-step`, stopping at the first failure.

pub mod kube;

use crate::config::{self, Config, inventory::Node, inventory::Role};
use crate::fetch::Cache;
use crate::flash::{self, BmcOptions, bmc::Bmc};
use crate::plan::JoinMode;
use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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
    /// Every step, in the order they run.
    pub const ALL: [Step; 6] = [
        Step::Build,
        Step::PowerOff,
        Step::DeleteNode,
        Step::Flash,
        Step::PowerOn,
        Step::WaitReady,
    ];

    /// Its name for `--from-step` and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Step::Build => "build",
            Step::PowerOff => "power-off",
            Step::DeleteNode => "delete-node",
            Step::Flash => "flash",
            Step::PowerOn => "power-on",
            Step::WaitReady => "wait-ready",
        }
    }
}

impl std::str::FromStr for Step {
    type Err = String;
    fn from_str(s: &str) -> Result<Step, String> {
        Step::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Step::ALL.iter().map(|x| x.name()).collect();
                format!("`{s}` is not a step; expected one of {}", names.join(", "))
            })
    }
}

/// What `kiln reimage NODE` asks for.
#[derive(Debug)]
pub struct ReimageRequest {
    /// Node to reimage; it needs a `slot`.
    pub node: String,
    /// Input files for the build step, as for `kiln build` (name → file).
    pub artifacts: BTreeMap<String, PathBuf>,
    pub out: PathBuf,
    /// Start at this step (after fixing what stopped an earlier run).
    pub from_step: Step,
    /// Flash an image older than the inventory or board profile; delete the last ready etcd
    /// server's peer.
    pub force: bool,
    /// Seconds to wait for the etcd member to go and for the node to become Ready.
    pub timeout: u64,
    pub bmc: BmcOptions,
}

/// State carried between steps.
struct Run<'a> {
    cfg: &'a Config,
    node: &'a Node,
    slot: u8,
    args: &'a ReimageRequest,
    bmc: Option<Bmc>,
    kube: Option<kube::Kube>,
    /// The Node's boot ID before power-off: Ready with the same boot ID is the old boot.
    old_boot: Option<String>,
    cache: Cache,
}

pub fn run(inventory: &Path, boards: &Path, cache: Cache, args: &ReimageRequest) -> Result<()> {
    let building = args.from_step == Step::Build;
    let artifacts = &args.artifacts;
    let cfg = config::load(inventory, boards, building)?;
    let node = flash::lookup(&cfg, &args.node)?;
    let slot = flash::slot_of(&cfg, node)?;
    // The BMC writes only this node's loader: flashing it would power-cycle the node into the
    // old system (or none) after its Node and etcd member were deleted.
    if let Some(on) = flash::loader_on(&cfg, node) {
        bail!(
            "node `{}` runs from its {}, which the BMC cannot write (it writes only the {on}); expected a node on its {on}: reimage it by writing a `kiln build {} --rejoin` image to the drive with `kiln write` (after `kubectl delete node {}`)",
            node.name,
            node.target,
            node.name,
            node.name
        );
    }
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
    let steps = Step::ALL;
    for (i, &step) in steps.iter().enumerate() {
        if step < args.from_step {
            continue;
        }
        crate::progress::result(format!(
            "[{}/{}] {}: {}",
            i + 1,
            steps.len(),
            node.name,
            step.name()
        ));
        let started = Instant::now();
        let res = match step {
            Step::Build => r.build(artifacts),
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
        crate::progress::result(format!(
            "      done in {:.0} s",
            started.elapsed().as_secs_f64()
        ));
    }
    crate::progress::result(format!("{}: reimaged and Ready", node.name));
    Ok(())
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
            self.kube = Some(match from_inventory {
                Some(p) => kube::Kube::from_kubeconfig(&p)?,
                None => self.own_kube()?,
            });
        }
        self.kube
            .as_ref()
            .ok_or_else(|| anyhow!("Kubernetes client missing"))
    }

    /// With no kubeconfig in the inventory: admin credentials kiln issues from the cluster's
    /// CA (in memory only), for a server other than the node being replaced; else KUBECONFIG.
    fn own_kube(&self) -> Result<kube::Kube> {
        let cluster = &self.node.cluster;
        let ca = self
            .cfg
            .inventory
            .cluster(cluster)
            .map(|c| crate::secrets::ca::ClusterCa::load(&c.ca_dir()))
            .transpose()?;
        if let Some(ca @ crate::secrets::ca::ClusterCa::Full { .. }) = &ca {
            let server = crate::secrets::kubeconfig::api_servers(
                &self.cfg.inventory,
                cluster,
                Some(&self.node.name),
            )
            .into_iter()
            .next()
            .ok_or_else(|| {
                anyhow!(
                    "cluster `{cluster}` has no server but {} to ask; expected another server or `api_server` in its [[cluster]]",
                    self.node.name
                )
            })?;
            let k = crate::secrets::kubeconfig::admin(
                cluster,
                ca,
                &server,
                time::OffsetDateTime::now_utc(),
            )?;
            crate::progress::note(format!(
                "{}: Kubernetes API {server}, as system:admin from the cluster CA",
                self.node.name
            ));
            return kube::Kube::from_text(
                k.expose(),
                Path::new(&format!(
                    "(kiln's admin credentials for cluster `{cluster}`)"
                )),
            );
        }
        let path = std::env::var_os("KUBECONFIG")
            .and_then(|v| std::env::split_paths(&v).next())
            .ok_or_else(|| {
                anyhow!(
                    "no kubeconfig for cluster `{cluster}`: set `kubeconfig` in its [[cluster]], make its CA with `kiln secrets init` (new clusters), or set KUBECONFIG"
                )
            })?;
        kube::Kube::from_kubeconfig(&path)
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
                // Kept for a run resumed at a later step, which never sees the old boot.
                if let Some(id) = &self.old_boot {
                    let path = self.boot_record();
                    std::fs::create_dir_all(&self.args.out)
                        .and_then(|()| std::fs::write(&path, format!("{id}\n")))
                        .with_context(|| {
                            format!("recording the old boot ID in {}", path.display())
                        })?;
                }
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
            crate::progress::result("      skipped: agents have no etcd member");
            return Ok(());
        }
        let Some(_) = existing else {
            crate::progress::result(format!("      Node {name} is already gone"));
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
        crate::progress::result(format!("      Node {name} and its etcd member are gone"));
        Ok(())
    }

    fn flash(&mut self) -> Result<()> {
        let image = self.image();
        // An init image of a bootstrap server would start a second cluster if its peers are
        // slow to answer: a reimage flashes only rejoin images.
        let id = flash::check_image(self.cfg, self.node, &image, self.args.force)
            .context("run the build step first (--from-step build)")?;
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

    /// Where the Node's boot ID before the reimage is kept between runs.
    fn boot_record(&self) -> PathBuf {
        self.args
            .out
            .join(format!(".{}.reimage-old-boot-id", self.node.name))
    }

    fn wait_ready(&mut self) -> Result<()> {
        let name = self.node.name.clone();
        // A resumed run (`--from-step flash` and later) takes the boot ID an earlier run saw.
        let old = self.old_boot.clone().or_else(|| {
            std::fs::read_to_string(self.boot_record())
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        });
        let timeout = Duration::from_secs(self.args.timeout);
        let k = self.kube()?;
        let start = Instant::now();
        let pb = crate::progress::spinner(format!("{name}: waiting for the Node to be Ready"));
        loop {
            let seen = k.node(&name)?;
            if let Some(n) = &seen
                && kube::is_ready(n)
                && (old.is_none() || kube::boot_id(n) != old)
            {
                pb.finish_and_clear();
                let _ = std::fs::remove_file(self.boot_record());
                return Ok(());
            }
            if start.elapsed() > timeout {
                pb.finish_and_clear();
                // A Node that kept its object (an agent's is never deleted) stays Ready with
                // the old boot ID until the new kubelet reports: that is not the new image.
                let last = match &seen {
                    None => "no Node of that name is registered".to_string(),
                    Some(n) if !kube::is_ready(n) => "the Node is not Ready".to_string(),
                    Some(n) => format!(
                        "the Node is Ready but still reports the old boot ID {} (the boot before the flash)",
                        kube::boot_id(n).unwrap_or_default()
                    ),
                };
                bail!(
                    "Node {name} is not Ready with a new boot after {} s: {last}; expected the new boot to join (watch the console: tpi uart -n {} get)",
                    timeout.as_secs(),
                    self.slot
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}
