//! Flash stage: puts a node's image on its eMMC through the Turing Pi 2 BMC (`kiln flash`):
//! the BMC client, its progress phases, the .xz it takes, and the wait for the node to answer.

pub mod bmc;
pub mod install;
pub mod phase;
pub mod wait;
pub mod xz;

use crate::config::{self, Config, inventory::Node};
use anyhow::{Context, Result, anyhow, bail};
use bmc::{Bmc, FlashStatus};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What `kiln flash NODE` asks for.
#[derive(Debug)]
pub struct FlashRequest {
    /// Node to flash; it needs a `slot` in the inventory.
    pub node: String,
    /// Raw image to flash [default: OUT/<node>.img, or its loader image].
    pub image: Option<PathBuf>,
    /// Flash the installer of a system on a drive the BMC cannot write (`install`).
    pub install: bool,
    /// The installer may write over a drive that is not empty.
    pub overwrite_nvme: bool,
    /// Stop before the BMC: make and check the image and its .xz only.
    pub prepare: bool,
    /// Directory holding `<node>.img` (as written by `kiln build`).
    pub out: PathBuf,
    /// Flash even if what went into the image (the node's plan in the inventory, the board
    /// profile) has changed since it was built.
    pub force: bool,
    /// Leave the node powered off after flashing.
    pub no_power_on: bool,
    /// After powering on, wait until the node answers: `/ping` on 6443 for servers, SSH for
    /// agents.
    pub wait: bool,
    /// Seconds `--wait` waits before giving up.
    pub wait_timeout: u64,
    pub bmc: BmcOptions,
}

/// How to reach the BMC (shared by `flash` and `reimage`).
#[derive(Debug, Clone)]
pub struct BmcOptions {
    /// Accept any BMC certificate. Only used when the inventory has no `[bmc] tls_sha256`.
    pub insecure: bool,
    /// Give up (and cancel) when the BMC reports no flashing progress for this many seconds.
    pub stall_timeout: u64,
    /// Give up (and cancel its own transfer) when a flash has not finished after this many
    /// seconds, however it progresses: no slow BMC holds kiln forever. The default allows a
    /// 32 GB eMMC written and read back at about 20 MB/s.
    pub deadline: u64,
}

/// Set by Ctrl-C; checked by the upload stream and the polling loop.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn install_ctrlc() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst)) {
            crate::progress::note(format!(
                "warning: Ctrl-C will not cancel the upload cleanly: {e}"
            ));
        }
    });
}

pub fn run_flash(inventory: &Path, boards: &Path, args: &FlashRequest) -> Result<()> {
    let cfg = config::load(inventory, boards, false)?;
    let node = lookup(&cfg, &args.node)?;
    let slot = slot_of(&cfg, node)?;
    let image = image_to_flash(&cfg, node, args)?;
    if args.prepare {
        crate::progress::result(format!(
            "{}: checked and ready for slot {slot}: {} (`tpi flash -n {slot} -i` takes it as it is; `kiln flash` without --prepare sends it as .xz)",
            node.name,
            image.display(),
        ));
        return Ok(());
    }
    let xz = xz::ensure(&image)?;
    let bmc = connect(&cfg, &args.bmc)?;
    flash(&bmc, &cfg, node, slot, &xz, &args.bmc)?;
    if args.no_power_on {
        crate::progress::result(format!("{}: left powered off (--no-power-on)", node.name));
        return Ok(());
    }
    bmc.power(slot, true)?;
    crate::progress::result(format!("{}: powered on (slot {slot})", node.name));
    if args.wait {
        wait::online(node, Duration::from_secs(args.wait_timeout))?;
    }
    Ok(())
}

pub(crate) fn lookup<'a>(cfg: &'a Config, name: &str) -> Result<&'a Node> {
    cfg.inventory.node(name).ok_or_else(|| {
        let known: Vec<&str> = cfg
            .inventory
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        anyhow!(
            "no node `{name}` in {}; expected one of: {}",
            cfg.inventory.path.display(),
            known.join(", ")
        )
    })
}

/// The target whose loader-only image the BMC writes for a node whose own target it cannot
/// write (the RK1 on NVMe), if the node has one.
pub(crate) fn loader_on(cfg: &Config, node: &Node) -> Option<String> {
    cfg.board_of(node)
        .and_then(|b| b.spec.targets.get(&node.target))
        .and_then(|t| t.loader_on.clone())
}

/// What `kiln flash` sends, checked: the node's image, or for a node whose system is on a drive
/// the BMC cannot write, its loader-only image, checked against the system image beside it
/// (whose identity says whose loader it is and how fresh).
fn image_to_flash(cfg: &Config, node: &Node, args: &FlashRequest) -> Result<PathBuf> {
    let Some(target) = loader_on(cfg, node) else {
        if args.install {
            bail!(
                "--install is for a node whose system is on a drive the BMC cannot write; `{}` boots from its {}, which the BMC writes itself: flash without --install",
                node.name,
                node.target
            );
        }
        let image = args
            .image
            .clone()
            .unwrap_or_else(|| args.out.join(format!("{}.img", node.name)));
        check_image(cfg, node, &image, args.force)?;
        return Ok(image);
    };
    let image = args
        .image
        .clone()
        .unwrap_or_else(|| args.out.join(format!("{}.{target}.img", node.name)));
    let system = image.with_file_name(format!("{}.img", node.name));
    if !system.is_file() {
        bail!(
            "{} not found: {}'s system is on its {} and the BMC writes only its loader, checked against the system image of the same build; expected both: run `kiln build {}`",
            system.display(),
            node.name,
            node.target,
            node.name
        );
    }
    let id = check_image(cfg, node, &system, args.force).with_context(|| {
        format!(
            "{}'s system is on its {} and the BMC writes only the loader ({}); the system image {} beside it says whose loader that is",
            node.name,
            node.target,
            image.display(),
            system.display()
        )
    })?;
    let info = crate::image::inspect::inspect_loader_image(&image, &id)?;
    if let Some(p) = info.problem() {
        bail!(
            "{p}; expected the {target} image of the same build as {}",
            system.display()
        );
    }
    if args.install {
        let dest = system.with_file_name(format!("{}.install.img", node.name));
        let pb = crate::progress::spinner(format!("{}: making the installer", node.name));
        let made = install::compose(&system, &image, &id, &dest, args.overwrite_nvme);
        pb.finish_and_clear();
        let made = made?;
        crate::progress::note(format!(
            "{}: flashing {} ({}) to its {target}: the loader and an installer that writes {} ({} bytes, sha256 {}) to its {}, checks it, erases itself and reboots into it",
            node.name,
            made.path.display(),
            crate::config::size::human(made.size),
            system.display(),
            made.system_bytes,
            made.system_sha256,
            node.target
        ));
        return Ok(made.path);
    }
    crate::progress::note(format!(
        "{}: flashing {} (the loader alone) to its {target}; its system {} goes on the {} (kiln write, or kiln flash --install)",
        node.name,
        image.display(),
        system.display(),
        node.target
    ));
    Ok(image)
}

/// The BMC slot of a node, refusing nodes the BMC cannot flash.
pub(crate) fn slot_of(cfg: &Config, node: &Node) -> Result<u8> {
    let Some(slot) = node.slot else {
        bail!(
            "node `{}` has no `slot`; expected `slot = 1..4` for a node in the Turing Pi (use `kiln write` for other machines)",
            node.name
        );
    };
    // A node whose target cannot hold the loader has it flashed to the target that does.
    let board = cfg.board_of(node);
    let flashed = loader_on(cfg, node).unwrap_or_else(|| node.target.clone());
    let bmc_writes = board
        .and_then(|b| b.spec.targets.get(&flashed))
        .is_some_and(|t| t.bmc_flash);
    if !bmc_writes {
        bail!(
            "node `{}` boots from its `{}` target, which the BMC cannot write (it writes only the module's eMMC); write the image with `kiln write IMAGE DEVICE` instead",
            node.name,
            node.target
        );
    }
    Ok(slot)
}

/// Refuses an image built for another node, or (unless `force`) one whose plan — what of the
/// inventory and board profile went into this node's image — has changed since it was built.
/// Changes that do not reach this node (another node, `[bmc]`, comments) leave it fresh.
/// Returns the identity the image carries.
pub(crate) fn check_image(
    cfg: &Config,
    node: &Node,
    image: &Path,
    force: bool,
) -> Result<crate::rootfs::identity::Identity> {
    // A truncated image (a cut copy, a full disk) would be written to the eMMC as far as it
    // goes and leave a root partition that ends in nothing.
    // One read of the image serves both checks (inspect hashes every boot file).
    let info = crate::image::inspect::inspect(image)?;
    if let Some(p) = info.partition_past_end() {
        bail!(
            "{} is {} bytes, but its partition {} ({}) ends at byte {}: the image is truncated; expected the whole image (build it again)",
            image.display(),
            info.size,
            p.number,
            p.name,
            p.end()
        );
    }
    let id = info.into_identity()?;
    if id.node != node.name || id.cluster != node.cluster {
        bail!(
            "{} was built for node `{}` (cluster {}); expected an image of `{}` (cluster {})",
            image.display(),
            id.node,
            id.cluster,
            node.name,
            node.cluster
        );
    }
    let board = cfg
        .board_of(node)
        .ok_or_else(|| anyhow!("node `{}`: board `{}` not loaded", node.name, node.board))?;
    let inv = cfg.inventory.path.display();
    let mut what = Vec::new();
    let mut why = Vec::new();
    if id.plan_sha256.is_empty() {
        // An image from a kiln that did not record its plan: only the whole file can tell.
        if id.inventory_sha256 != cfg.inventory.sha256 {
            what.push("inventory");
            why.push(format!(
                "{inv} changed since it was built (the image records no plan hash, so any change counts)"
            ));
        }
    } else {
        match crate::plan::hash::of_config(cfg, node) {
            Ok(now) if now == id.plan_sha256 => {}
            // The hash covers the board profile too: tell the inventory's part apart by
            // hashing again with the image's board hash.
            Ok(_)
                if crate::plan::hash::of_config_with_board_sha256(cfg, node, &id.board_sha256)
                    .is_ok_and(|h| h == id.plan_sha256) => {}
            Ok(_) => {
                what.push("inventory");
                let changes = plan_changes(&id, cfg, node);
                why.push(format!(
                    "what {inv} puts into {}'s image changed since it was built ({})",
                    node.name,
                    if changes.is_empty() {
                        "its network, SSH keys, overlays, k3s release or cluster peers".to_string()
                    } else {
                        changes.join(", ")
                    }
                ));
            }
            Err(e) => {
                what.push("inventory");
                why.push(format!("its current plan cannot be computed: {e:#}"));
            }
        }
    }
    if id.board != board.name() || id.board_sha256 != board.sha256 {
        what.push("board profile");
        why.push(format!(
            "{} changed since it was built",
            board.path.display()
        ));
    }
    if !what.is_empty() {
        let what = what.join(" and ");
        let why = why.join("; ");
        if !force {
            bail!(
                "{} is older than the {what}: {why}; expected a fresh image: run `kiln build {}` (or pass --force to flash it anyway)",
                image.display(),
                node.name
            );
        }
        crate::progress::note(format!(
            "warning: {} predates the current {what} ({why}); flashing anyway (--force)",
            image.display()
        ));
    }
    Ok(id)
}

/// The differences between an image's identity and the node's current settings that the
/// identity can show (the plan hash says only that something changed).
fn plan_changes(id: &crate::rootfs::identity::Identity, cfg: &Config, node: &Node) -> Vec<String> {
    let mut c = Vec::new();
    let mut diff = |what: &str, was: String, now: String| {
        if was != now {
            c.push(format!("{what} {was} → {now}"));
        }
    };
    let show = |o: Option<String>| o.unwrap_or_else(|| "none".to_string());
    diff("ip", id.ip.to_string(), node.ip.to_string());
    diff(
        "role",
        format!("{:?}", id.role).to_lowercase(),
        format!("{:?}", node.role).to_lowercase(),
    );
    diff(
        "bootstrap",
        id.bootstrap.to_string(),
        node.bootstrap.to_string(),
    );
    diff(
        "slot",
        show(id.slot.map(|s| s.to_string())),
        show(node.slot.map(|s| s.to_string())),
    );
    diff("board", id.board.clone(), node.board.clone());
    diff("target", id.target.to_string(), node.target.to_string());
    diff(
        "variant",
        show(id.variant.clone()),
        show(node.variant.clone()),
    );
    // `custom` means the build was given its own k3s (`--artifact k3s=`).
    if id.k3s_version != "custom" {
        diff(
            "k3s",
            id.k3s_version.clone(),
            show(cfg.inventory.k3s.as_ref().map(|k| k.version.clone())),
        );
    }
    c
}

/// Logs in to the inventory's BMC. The password comes from `KILN_BMC_PASSWORD` or a prompt.
pub(crate) fn connect(cfg: &Config, args: &BmcOptions) -> Result<Bmc> {
    let b = cfg.inventory.bmc.as_ref().ok_or_else(|| {
        anyhow!(
            "{} has no [bmc] section; expected host, user and tls_sha256 of the Turing Pi BMC",
            cfg.inventory.path.display()
        )
    })?;
    let fingerprint = match (&b.tls_sha256, args.insecure) {
        (Some(fp), _) => Some(crate::tls::parse_fingerprint(fp)?),
        (None, true) => None,
        (None, false) => bail!(
            "[bmc] in {} has no tls_sha256; expected the SHA-256 fingerprint of the BMC's certificate \
             (`openssl s_client -connect {}:443 </dev/null | openssl x509 -noout -fingerprint -sha256`), \
             or pass --insecure to accept any certificate",
            cfg.inventory.path.display(),
            b.host
        ),
    };
    let password = password(&b.user, &b.host)?;
    Bmc::login(
        &b.host,
        &b.user,
        &password,
        crate::tls::pinned(fingerprint)?,
    )
}

fn password(user: &str, host: &str) -> Result<String> {
    use std::io::IsTerminal;
    if let Ok(p) = std::env::var("KILN_BMC_PASSWORD")
        && !p.is_empty()
    {
        return Ok(p);
    }
    if !std::io::stdin().is_terminal() {
        bail!("no BMC password: set KILN_BMC_PASSWORD or run kiln in a terminal to be asked");
    }
    rpassword::prompt_password(format!("BMC password for {user}@{host}: "))
        .context("reading the BMC password")
}

/// The upload stream: stops with an error when kiln gives up or the user presses Ctrl-C, so
/// the HTTP request is torn down instead of finishing a flash nobody waits for. Counts what
/// it has handed out, for the progress line.
struct Abortable {
    inner: File,
    abort: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
}

impl Read for Abortable {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.abort.load(Ordering::SeqCst) || INTERRUPTED.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("upload cancelled"));
        }
        let n = self.inner.read(buf)?;
        self.sent.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }
}

/// Explains a BMC flash error in terms of what to do about it.
fn explain(msg: &str) -> String {
    let m = msg.to_ascii_lowercase();
    if m.contains("send timeout") {
        format!(
            "{msg}: the BMC stopped waiting for image data (the upload must start within 10 s of the request and keep flowing); check the network to the BMC"
        )
    } else if m.contains("missing") {
        format!(
            "{msg}: the BMC received fewer bytes than announced; the connection dropped or the image changed during the upload"
        )
    } else if m.contains("sha") || m.contains("checksum") {
        format!(
            "{msg}: the uploaded stream does not match its sha256; the data was corrupted on the way or the file changed"
        )
    } else if m.contains("crc") {
        format!(
            "{msg}: the eMMC read-back differs from what was written; the module's eMMC may be failing"
        )
    } else if m.contains("not supported") {
        format!(
            "{msg}: this BMC firmware does not recognise the compute module; update the BMC firmware"
        )
    } else {
        msg.to_string()
    }
}

/// The slot a bmcd process name is about: `Node 2 os install service` → 2.
fn slot_in_process(process: &str) -> Option<u8> {
    let rest = process.strip_prefix("Node")?.trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Why kiln will not send a flash request now, if the BMC is busy with a transfer. bmcd runs
/// one transfer at a time: a new flash request drops the running one, and its cancel endpoint
/// cancels every transfer, so kiln must leave a running transfer alone.
pub(crate) fn busy_message(status: &FlashStatus, nodes: &[Node], host: &str) -> Option<String> {
    let FlashStatus::Transferring {
        id,
        process,
        size,
        bytes_written,
        cancelled,
    } = status
    else {
        return None;
    };
    let what = match slot_in_process(process) {
        Some(slot) => {
            let owner = nodes
                .iter()
                .find(|n| n.slot == Some(slot))
                .map(|n| format!("node `{}`", n.name))
                .unwrap_or_else(|| "no node of the inventory".to_string());
            format!("flashing slot {slot} ({owner}; \"{process}\")")
        }
        None if process.is_empty() => "running a transfer".to_string(),
        None => format!("running \"{process}\""),
    };
    Some(format!(
        "the BMC {host} is already {what}, transfer id {id}{}: {} written to the eMMC or read \
         back so far, from an upload of {} (the BMC's status does not name the file). Another \
         client (tpi, the web UI, another kiln) started it; a new flash request would make the \
         BMC drop it, so kiln sent none. Wait until it finishes (`tpi flash` prints Done, or \
         `GET https://{host}/api/bmc?opt=get&type=flash` no longer says Transferring), then run \
         kiln again. Only if it is stuck (its byte count no longer grows) cancel it deliberately: \
         `curl -k -u USER https://{host}/api/bmc/upload/{id}/cancel` (this cancels every transfer \
         on the BMC)",
        if *cancelled { ", being cancelled" } else { "" },
        config::size::human(*bytes_written),
        config::size::human(*size),
    ))
}

/// Cancels transfer `handle` only if the BMC shows it is still the one running: bmcd's cancel
/// stops whatever transfer is running, which may be someone else's by now.
fn cancel_own(bmc: &Bmc, node: &Node, handle: u64) {
    match bmc.flash_status() {
        Ok(FlashStatus::Transferring { id, .. }) if id == handle => match bmc.cancel(handle) {
            Ok(()) => crate::progress::note(format!(
                "{}: cancelled kiln's transfer {handle} on the BMC",
                node.name
            )),
            Err(e) => crate::progress::note(format!(
                "warning: {}: cancelling kiln's transfer {handle} failed: {e:#}",
                node.name
            )),
        },
        // Not running (ended, failed, already dropped) or someone else's: nothing of ours to stop.
        _ => {}
    }
}

/// Flashes slot `slot` with the compressed image and waits until the BMC reports it done
/// (written and read back). Never powers the node on. Refuses, without sending any request,
/// while the BMC runs another transfer.
pub(crate) fn flash(
    bmc: &Bmc,
    cfg: &Config,
    node: &Node,
    slot: u8,
    xz: &xz::Compressed,
    args: &BmcOptions,
) -> Result<()> {
    install_ctrlc();
    let file_name = xz
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("{}.img.xz", node.name));
    let data = File::open(&xz.path).with_context(|| format!("opening {}", xz.path.display()))?;
    let host = cfg.inventory.bmc.as_ref().map_or("", |b| b.host.as_str());
    let before = bmc
        .flash_status()
        .context("reading the BMC's flash status before requesting a flash")?;
    if let Some(msg) = busy_message(&before, &cfg.inventory.nodes, host) {
        bail!(
            "not flashing {} (slot {slot}): {msg}; {} was left as it was",
            node.name,
            node.name
        );
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("cancelled by Ctrl-C before the flash was requested");
    }
    crate::progress::result(format!(
        "{}: flashing slot {slot} with {} ({}, sha256 {}; {} once decompressed)",
        node.name,
        xz.path.display(),
        config::size::human(xz.length),
        xz.sha256,
        config::size::human(xz.image_len)
    ));
    let handle = bmc.request_flash(slot, &file_name, xz.length, &xz.sha256)?;
    let abort = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let reader = Abortable {
        inner: data,
        abort: abort.clone(),
        sent: sent.clone(),
    };
    let uploader = bmc.clone();
    let length = xz.length;
    let upload = std::thread::spawn(move || uploader.upload(handle, reader, length));
    let res = poll(bmc, handle, upload, node, xz, &sent, args);
    if res.is_err() {
        abort.store(true, Ordering::SeqCst);
        cancel_own(bmc, node, handle);
    }
    res.map_err(|e| {
        anyhow!(
            "flashing {} (slot {slot}) failed: {e:#}; the node was not powered on",
            node.name
        )
    })
}

/// The error for a transfer of ours that the BMC replaced with another client's.
fn dropped(handle: u64, id: u64, process: &str) -> anyhow::Error {
    anyhow!(
        "another client requested a flash while kiln's was running (now transfer id {id}, \
         \"{process}\"); the BMC runs one transfer at a time and dropped kiln's ({handle}). \
         kiln leaves the new transfer alone; flash again when it has finished"
    )
}

fn poll(
    bmc: &Bmc,
    handle: u64,
    upload: std::thread::JoinHandle<Result<()>>,
    node: &Node,
    xz: &xz::Compressed,
    sent: &AtomicU64,
    args: &BmcOptions,
) -> Result<()> {
    let stall = Duration::from_secs(args.stall_timeout);
    let deadline = Duration::from_secs(args.deadline);
    let started = Instant::now();
    let pb = crate::progress::spinner(format!("{}: flash requested", node.name));
    let finish = |pb: &crate::progress::Task| pb.finish_and_clear();
    let mut upload = Some(upload);
    let mut uploaded = false;
    let mut progress = phase::Progress::START;
    let mut shown = None;
    let mut last = (progress, 0u64);
    let mut moved = Instant::now();
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            finish(&pb);
            bail!("cancelled by Ctrl-C");
        }
        if upload.as_ref().is_some_and(|u| u.is_finished())
            && let Some(u) = upload.take()
        {
            match u.join() {
                Ok(Ok(())) => uploaded = true,
                Ok(Err(e)) => {
                    finish(&pb);
                    // The BMC's own status often names the cause (e.g. "Send timeout").
                    let status = match bmc.flash_status() {
                        Ok(FlashStatus::Error(m)) => format!("; BMC status: {}", explain(&m)),
                        Ok(FlashStatus::Transferring { id, process, .. }) if id != handle => {
                            return Err(dropped(handle, id, &process)
                                .context(format!("the upload failed: {e:#}")));
                        }
                        _ => String::new(),
                    };
                    return Err(anyhow!("{}{status}", explain(&format!("{e:#}"))));
                }
                Err(_) => {
                    finish(&pb);
                    bail!("the upload thread panicked");
                }
            }
        }
        let sent_now = sent.load(Ordering::SeqCst);
        match bmc.flash_status()? {
            FlashStatus::Transferring { id, process, .. } if id != handle => {
                finish(&pb);
                return Err(dropped(handle, id, &process));
            }
            FlashStatus::Transferring { bytes_written, .. } => {
                progress = progress.next(bytes_written, uploaded);
                let line = progress.describe(sent_now, xz.length, xz.image_len);
                if shown != Some(progress.phase) {
                    shown = Some(progress.phase);
                    crate::progress::result(format!("{}: {line}", node.name));
                }
                pb.set_message(format!("{}: {line}", node.name));
                if (progress, sent_now) != last {
                    last = (progress, sent_now);
                    moved = Instant::now();
                }
            }
            FlashStatus::Done { .. } if uploaded || upload.is_none() => {
                finish(&pb);
                crate::progress::result(format!(
                    "{}: flashed and verified by the BMC: {} written to the eMMC and read back (CRC checked)",
                    node.name,
                    config::size::human(xz.image_len)
                ));
                return Ok(());
            }
            FlashStatus::Done { .. } | FlashStatus::Ready => {}
            FlashStatus::Error(msg) => {
                finish(&pb);
                // The upload's own error (e.g. "missing N bytes") says more; give it a moment.
                if let Some(u) = upload.take() {
                    let deadline = Instant::now() + Duration::from_secs(3);
                    while !u.is_finished() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    if u.is_finished()
                        && let Ok(Err(e)) = u.join()
                    {
                        return Err(anyhow!(
                            "{}; BMC status: {}",
                            explain(&format!("{e:#}")),
                            explain(&msg)
                        ));
                    }
                }
                bail!("BMC reported: {}", explain(&msg));
            }
        }
        if started.elapsed() > deadline {
            finish(&pb);
            bail!(
                "the flash did not finish within its deadline of {} s (--deadline; now {})",
                deadline.as_secs(),
                progress.describe(sent_now, xz.length, xz.image_len)
            );
        }
        if moved.elapsed() > stall {
            finish(&pb);
            bail!(
                "the BMC reported no progress for {} s (stuck {}); expected bytes_written to grow",
                stall.as_secs(),
                progress.describe(sent_now, xz.length, xz.image_len)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transferring(process: &str) -> FlashStatus {
        FlashStatus::Transferring {
            id: 9,
            process: process.into(),
            size: 50_000_000,
            bytes_written: 1_300_000_000,
            cancelled: false,
        }
    }

    #[test]
    fn a_running_transfer_is_described_and_nothing_else_is_busy() {
        let m = busy_message(&transferring("Node 4 os install service"), &[], "bmc").unwrap();
        assert!(
            m.contains("flashing slot 4 (no node of the inventory"),
            "{m}"
        );
        assert!(m.contains("transfer id 9"), "{m}");
        assert!(m.contains(&config::size::human(1_300_000_000)), "{m}");
        assert!(m.contains("https://bmc/api/bmc/upload/9/cancel"), "{m}");
        let m = busy_message(&transferring("firmware upgrade service"), &[], "bmc").unwrap();
        assert!(m.contains("running \"firmware upgrade service\""), "{m}");
        for idle in [
            FlashStatus::Ready,
            FlashStatus::Done { size: 1 },
            FlashStatus::Error("cancelled by user".into()),
        ] {
            assert_eq!(busy_message(&idle, &[], "bmc"), None);
        }
        assert_eq!(slot_in_process("Node 2 os install service"), Some(2));
        assert_eq!(slot_in_process("Node2 os install service"), Some(2));
        assert_eq!(slot_in_process("os install service"), None);
    }
}
