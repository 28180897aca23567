//! Putting images on nodes: `kiln flash` (through the Turing Pi 2 BMC) and `kiln write`
//! (onto a local disk or file).

pub mod bmc;
pub mod tls;
pub mod wait;
pub mod write;
pub mod xz;

use crate::config::{self, Config, inventory::Node, inventory::Target};
use anyhow::{Context, Result, anyhow, bail};
use bmc::{Bmc, FlashStatus};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// `kiln flash NODE`
#[derive(clap::Args, Debug)]
#[command(long_about = "Flash a node's eMMC through the Turing Pi 2 BMC.\n\n\
Steps: check the image was built for NODE from the current inventory and board profile; \
make <image>.xz beside it if missing or stale; log in to the BMC ([bmc] in the inventory, \
password from KILN_BMC_PASSWORD or a prompt); request the flash with the upload's length and \
sha256; stream the .xz (the BMC decompresses and writes it, then reads it back); power the \
node on; with --wait, wait until it answers on its address. Ctrl-C cancels the upload. \
A node whose flash failed is never powered on.")]
pub struct FlashArgs {
    /// Node to flash; it needs a `slot` in the inventory.
    pub node: String,
    /// Raw image to flash [default: OUT/<node>.img].
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Directory holding `<node>.img` (as written by `kiln build`).
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// Flash even if the image was built from an older inventory or board profile.
    #[arg(long)]
    pub force: bool,
    /// Leave the node powered off after flashing.
    #[arg(long)]
    pub no_power_on: bool,
    /// After powering on, wait until the node answers: `/ping` on 6443 for servers, SSH for
    /// agents.
    #[arg(long)]
    pub wait: bool,
    /// Seconds `--wait` waits before giving up.
    #[arg(long, default_value_t = 900, value_name = "SECS")]
    pub wait_timeout: u64,
    #[command(flatten)]
    pub bmc: BmcArgs,
}

/// How to reach the BMC (shared by `flash` and `reimage`).
#[derive(clap::Args, Debug, Clone)]
pub struct BmcArgs {
    /// Accept any BMC certificate. Only used when the inventory has no `[bmc] tls_sha256`.
    #[arg(long)]
    pub insecure: bool,
    /// Give up (and cancel) when the BMC reports no flashing progress for this many seconds.
    #[arg(long, default_value_t = 180, value_name = "SECS")]
    pub stall_timeout: u64,
}

/// Set by Ctrl-C; checked by the upload stream and the polling loop.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn install_ctrlc() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst)) {
            eprintln!("warning: Ctrl-C will not cancel the upload cleanly: {e}");
        }
    });
}

pub fn run_flash(inventory: &Path, boards: &Path, args: &FlashArgs) -> Result<ExitCode> {
    let cfg = config::load(inventory, boards, false)?;
    let node = lookup(&cfg, &args.node)?;
    let slot = slot_of(node)?;
    let image = args
        .image
        .clone()
        .unwrap_or_else(|| args.out.join(format!("{}.img", node.name)));
    check_image(&cfg, node, &image, args.force)?;
    let xz = xz::ensure(&image)?;
    let bmc = connect(&cfg, &args.bmc)?;
    flash(&bmc, node, slot, &xz, &args.bmc)?;
    if args.no_power_on {
        println!("{}: left powered off (--no-power-on)", node.name);
        return Ok(ExitCode::SUCCESS);
    }
    bmc.power(slot, true)?;
    println!("{}: powered on (slot {slot})", node.name);
    if args.wait {
        wait::online(node, Duration::from_secs(args.wait_timeout))?;
    }
    Ok(ExitCode::SUCCESS)
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

/// The BMC slot of a node, refusing nodes the BMC cannot flash.
pub(crate) fn slot_of(node: &Node) -> Result<u8> {
    let Some(slot) = node.slot else {
        bail!(
            "node `{}` has no `slot`; expected `slot = 1..4` for a node in the Turing Pi (use `kiln write` for other machines)",
            node.name
        );
    };
    if node.target != Target::Emmc {
        bail!(
            "node `{}` boots from {:?}, but the BMC writes only the eMMC; write the image from a running system with `kiln write IMAGE /dev/nvme0n1`",
            node.name,
            node.target
        );
    }
    Ok(slot)
}

/// Refuses an image built for another node, or (unless `force`) from an inventory or board
/// profile that has changed since.
pub(crate) fn check_image(cfg: &Config, node: &Node, image: &Path, force: bool) -> Result<()> {
    let id = crate::image::inspect::identity(image)?;
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
    let mut stale = Vec::new();
    if id.inventory_sha256 != cfg.inventory.sha256 {
        stale.push(format!("inventory {}", cfg.inventory.path.display()));
    }
    if id.board != board.name() || id.board_sha256 != board.sha256 {
        stale.push(format!("board profile {}", board.path.display()));
    }
    if !stale.is_empty() {
        let what = stale.join(" and ");
        if !force {
            bail!(
                "{} is older than the {what} it was built from; expected a fresh image: run `kiln build {}` (or pass --force to flash it anyway)",
                image.display(),
                node.name
            );
        }
        eprintln!(
            "warning: {} predates the current {what}; flashing anyway (--force)",
            image.display()
        );
    }
    Ok(())
}

/// Logs in to the inventory's BMC. The password comes from `KILN_BMC_PASSWORD` or a prompt.
pub(crate) fn connect(cfg: &Config, args: &BmcArgs) -> Result<Bmc> {
    let b = cfg.inventory.bmc.as_ref().ok_or_else(|| {
        anyhow!(
            "{} has no [bmc] section; expected host, user and tls_sha256 of the Turing Pi BMC",
            cfg.inventory.path.display()
        )
    })?;
    let fingerprint = match (&b.tls_sha256, args.insecure) {
        (Some(fp), _) => Some(tls::parse_fingerprint(fp)?),
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
    Bmc::login(&b.host, &b.user, &password, tls::pinned(fingerprint)?)
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
/// the HTTP request is torn down instead of finishing a flash nobody waits for.
struct Abortable {
    inner: File,
    abort: Arc<AtomicBool>,
}

impl Read for Abortable {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.abort.load(Ordering::SeqCst) || INTERRUPTED.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("upload cancelled"));
        }
        self.inner.read(buf)
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

/// Flashes slot `slot` with the compressed image and waits until the BMC reports it done
/// (written and read back). Never powers the node on.
pub(crate) fn flash(
    bmc: &Bmc,
    node: &Node,
    slot: u8,
    xz: &xz::Compressed,
    args: &BmcArgs,
) -> Result<()> {
    install_ctrlc();
    let file_name = xz
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("{}.img.xz", node.name));
    let data = File::open(&xz.path).with_context(|| format!("opening {}", xz.path.display()))?;
    println!(
        "{}: flashing slot {slot} with {} ({}, sha256 {})",
        node.name,
        xz.path.display(),
        config::size::human(xz.length),
        xz.sha256
    );
    let handle = bmc.request_flash(slot, &file_name, xz.length, &xz.sha256)?;
    let abort = Arc::new(AtomicBool::new(false));
    let reader = Abortable {
        inner: data,
        abort: abort.clone(),
    };
    let uploader = bmc.clone();
    let length = xz.length;
    let upload = std::thread::spawn(move || uploader.upload(handle, reader, length));
    let res = poll(bmc, handle, upload, node, args);
    if res.is_err() {
        abort.store(true, Ordering::SeqCst);
        // Best effort: the BMC may already have dropped the transfer.
        let _ = bmc.cancel(handle);
    }
    res.map_err(|e| {
        anyhow!(
            "flashing {} (slot {slot}) failed: {e:#}; the node was not powered on",
            node.name
        )
    })
}

fn poll(
    bmc: &Bmc,
    handle: u64,
    upload: std::thread::JoinHandle<Result<()>>,
    node: &Node,
    args: &BmcArgs,
) -> Result<()> {
    let stall = Duration::from_secs(args.stall_timeout);
    let pb = crate::progress::bytes(0, format!("{}: flashing", node.name));
    let mut upload = Some(upload);
    let mut uploaded = false;
    let mut last = 0u64;
    let mut moved = Instant::now();
    let finish = |pb: &indicatif::ProgressBar| pb.finish_and_clear();
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
        match bmc.flash_status()? {
            FlashStatus::Transferring { id, .. } if id != handle => {
                finish(&pb);
                bail!("the BMC is running another transfer (id {id}, ours is {handle})");
            }
            FlashStatus::Transferring {
                size,
                bytes_written,
                ..
            } => {
                pb.set_length(size);
                pb.set_position(bytes_written.min(size));
                if bytes_written >= size {
                    pb.set_message(format!("{}: verifying", node.name));
                }
                if bytes_written != last {
                    last = bytes_written;
                    moved = Instant::now();
                }
            }
            FlashStatus::Done { .. } if uploaded || upload.is_none() => {
                finish(&pb);
                println!("{}: flashed and verified by the BMC", node.name);
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
        if moved.elapsed() > stall {
            finish(&pb);
            bail!(
                "the BMC reported no progress for {} s (stuck at {last} bytes); expected bytes_written to grow",
                stall.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
