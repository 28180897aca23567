//! The command line's arguments for `flash`, `write` and `reimage`, and what each turns into
//! for its stage: the stages take plain typed requests and know nothing of clap.

use crate::flash::{BmcOptions, FlashRequest};
use crate::reimage::{ReimageRequest, Step};
use crate::write::WriteRequest;
use anyhow::Result;
use clap::builder::PossibleValuesParser;
use std::path::PathBuf;

/// `kiln flash NODE`
#[derive(clap::Args, Debug)]
#[command(long_about = "Flash a node's eMMC through the Turing Pi 2 BMC.\n\n\
Steps: check the image was built for NODE and that what of the inventory and board profile \
went into it (its plan hash) is unchanged; make <image>.xz beside it if missing or stale; log \
in to the BMC ([bmc] in the inventory, password from KILN_BMC_PASSWORD or a prompt); read the \
BMC's flash status and refuse while another transfer runs (a new request would make the BMC \
drop it); request the flash with the upload's length and sha256; stream the .xz (the BMC \
decompresses and writes it, then reads it back), showing phase and bytes; power the node on; \
with --wait, wait until it answers on its address. Ctrl-C cancels kiln's own transfer, never \
another client's. A node whose flash failed is never powered on.\n\nA node whose system is on a drive the BMC cannot write (an RK1 with target = \"nvme\") gets OUT/<node>.emmc.img, the loader alone: write OUT/<node>.img to the drive with `kiln write`. Or pass --install: the eMMC then also gets a one-shot installer that copies the system onto the drive, checks it against the image's sha256, erases itself and reboots into the drive.")]
pub struct FlashArgs {
    /// Node to flash; it needs a `slot` in the inventory.
    pub node: String,
    /// Raw image to flash [default: OUT/<node>.img, or OUT/<node>.emmc.img for a node whose
    /// system is on a drive the BMC cannot write].
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// For a node whose system is on a drive the BMC cannot write (the RK1 on NVMe): flash an
    /// eMMC image that installs the system onto that drive on first power-on, checks it and
    /// reboots into it (OUT/<node>.install.img, made from the two images of the build).
    #[arg(long)]
    pub install: bool,
    /// With --install: let the installer write over a drive that is not empty (by default it
    /// refuses, powers the node off and leaves the drive as it was).
    #[arg(long, requires = "install")]
    pub overwrite_nvme: bool,
    /// Make and check the raw image that would be flashed, print its path and stop without
    /// contacting the BMC: for `tpi flash` or the BMC's web page.
    #[arg(long, conflicts_with_all = ["wait", "no_power_on"])]
    pub prepare: bool,
    /// Directory holding `<node>.img` (as written by `kiln build`).
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// Flash even if what went into the image (the node's plan in the inventory, the board
    /// profile) has changed since it was built.
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
    /// Give up (and cancel its own transfer) when a flash has not finished after this many
    /// seconds, however it progresses: no slow BMC holds kiln forever. The default allows a
    /// 32 GB eMMC written and read back at about 20 MB/s.
    #[arg(long, default_value_t = 3600, value_name = "SECS")]
    pub deadline: u64,
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
The Kubernetes API is reached with the cluster's `kubeconfig` in the inventory; else, for a \
cluster whose CA kiln made, with admin credentials kiln issues from it (in memory) for another \
server (or the cluster's `api_server`); else with $KUBECONFIG."
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
    #[arg(long, default_value = "build", value_parser = step_names())]
    pub from_step: String,
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

/// `kiln write`
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Write a raw image to a disk (NVMe, SD card, USB stick) or a file.\n\n\
Steps: refuse a device that is mounted, in use, holds `/`, or is smaller than the image; ask \
for confirmation (unless --yes; with stdin not a terminal, refuse before touching the target); \
zero the first MiB, write everything after it, sync, then write the first MiB, so an \
interrupted write never boots; read the device back and compare its sha256 with the image's; \
on a larger disk, move the GPT backup header to the disk's end. On any error, Ctrl-C or \
SIGTERM the first MiB is zeroed again. With --bmap (or when the target is a new, empty file) \
only the image's data ranges are copied and the rest is zeroed on the device instead of \
written."
)]
pub struct WriteArgs {
    /// Raw image (`kiln build` output, `<node>.img`).
    pub image: PathBuf,
    /// Target block device (e.g. /dev/nvme0n1, /dev/sdb) or an existing file.
    pub device: PathBuf,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Copy only the image's data ranges and zero the holes on the device (fast on SSDs).
    #[arg(long)]
    pub bmap: bool,
}

fn step_names() -> PossibleValuesParser {
    PossibleValuesParser::new(Step::ALL.map(Step::name))
}

impl From<BmcArgs> for BmcOptions {
    fn from(a: BmcArgs) -> BmcOptions {
        BmcOptions {
            insecure: a.insecure,
            stall_timeout: a.stall_timeout,
            deadline: a.deadline,
        }
    }
}

impl From<FlashArgs> for FlashRequest {
    fn from(a: FlashArgs) -> FlashRequest {
        FlashRequest {
            node: a.node,
            image: a.image,
            install: a.install,
            overwrite_nvme: a.overwrite_nvme,
            prepare: a.prepare,
            out: a.out,
            force: a.force,
            no_power_on: a.no_power_on,
            wait: a.wait,
            wait_timeout: a.wait_timeout,
            bmc: a.bmc.into(),
        }
    }
}

impl From<WriteArgs> for WriteRequest {
    fn from(a: WriteArgs) -> WriteRequest {
        WriteRequest {
            image: a.image,
            device: a.device,
            yes: a.yes,
            bmap: a.bmap,
        }
    }
}

impl ReimageArgs {
    pub fn into_request(self) -> Result<ReimageRequest> {
        Ok(ReimageRequest {
            node: self.node,
            artifacts: super::parse_artifacts(&self.artifacts)?,
            out: self.out,
            from_step: self.from_step.parse().map_err(anyhow::Error::msg)?,
            force: self.force,
            timeout: self.timeout,
            bmc: self.bmc.into(),
        })
    }
}
