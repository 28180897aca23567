//! `kiln write IMAGE DEVICE`: puts a raw image on a local disk (NVMe, SD, USB) or file.
//!
//! Order matters for a disk that may be pulled half-way (coreos-installer's order): the first
//! MiB of the target is zeroed and synced first, then everything else is written and synced,
//! then the image's first MiB (partition table, loader), so an interrupted write never looks
//! bootable or mountable as a mix of old and new. Then the device is read back and hashed
//! against the image, and the GPT backup header is moved to the end of a larger disk. Any error
//! after the first byte was written, and Ctrl-C or SIGTERM, zero the first MiB again.

use crate::config::size::{MIB, human};
use crate::image::sparse::data_ranges;
use anyhow::{Context, Result, anyhow, bail};
use rustix::fs::{Advice, FallocateFlags, fadvise, fallocate};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const CHUNK: usize = 4 << 20;
const SECTOR: u64 = 512;

/// What `kiln write IMAGE DEVICE` asks for.
#[derive(Debug)]
pub struct WriteRequest {
    /// Raw image (`kiln build` output, `<node>.img`).
    pub image: PathBuf,
    /// Target block device (e.g. /dev/nvme0n1, /dev/sdb) or an existing file.
    pub device: PathBuf,
    /// Do not ask for confirmation.
    pub yes: bool,
    /// Copy only the image's data ranges and zero the holes on the device (fast on SSDs).
    pub bmap: bool,
}

struct Target {
    path: PathBuf,
    file: File,
    size: u64,
    block: bool,
    /// A new, empty file: reads as zeros, so holes need no writing.
    zeroed: bool,
}

/// What the user is asked before anything is written (unless `--yes`).
pub struct Question<'a> {
    pub target: &'a Path,
    pub target_size: u64,
    pub image: &'a Path,
}

/// Writes and verifies. `confirm` is asked once the target is known to be usable and before
/// its first byte changes; `false` stops with nothing written.
pub fn run_write(args: &WriteRequest, confirm: &dyn Fn(&Question) -> Result<bool>) -> Result<()> {
    let image = File::open(&args.image)
        .with_context(|| format!("opening image {}", args.image.display()))?;
    let img_len = image
        .metadata()
        .with_context(|| format!("reading {}", args.image.display()))?
        .len();
    if img_len == 0 || img_len % SECTOR != 0 {
        bail!(
            "{} is {img_len} bytes; expected a disk image (a non-empty multiple of 512 bytes)",
            args.image.display()
        );
    }
    let target = open_target(&args.device, &args.image, img_len)?;
    if target.size < img_len {
        bail!(
            "{} holds {} ({} bytes) but the image is {} ({img_len} bytes); expected a device at least as large as the image",
            target.path.display(),
            human(target.size),
            target.size,
            human(img_len)
        );
    }
    if !args.yes {
        let q = Question {
            target: &target.path,
            target_size: target.size,
            image: &args.image,
        };
        if !confirm(&q)? {
            bail!("not confirmed; nothing was written");
        }
    }
    let bmap = args.bmap || target.zeroed;
    let ranges = if bmap {
        data_ranges(&image, 0, img_len)?
    } else {
        vec![(0, img_len)]
    };
    // Nothing was written so far. From here on, an error, Ctrl-C or SIGTERM leaves the first MiB
    // zeroed: a half-written disk must not boot, nor mount as a mix of old and new.
    let head = MIB.min(target.size);
    let wipe_file = target
        .file
        .try_clone()
        .with_context(|| format!("opening {} again", target.path.display()))?;
    let wipe_path = target.path.clone();
    let _on_interrupt = crate::cleanup::on_interrupt(move || match wipe(&wipe_file, head) {
        Ok(()) => crate::progress::note(format!(
            "interrupted: zeroed the first MiB of {} so the partly written disk does not boot; run kiln write again",
            wipe_path.display()
        )),
        Err(e) => crate::progress::note(format!(
            "interrupted, and zeroing the first MiB of {} failed too ({e}); do not boot from it",
            wipe_path.display()
        )),
    });
    let written = (|| {
        if target.zeroed {
            target
                .file
                .set_len(img_len)
                .with_context(|| format!("sizing {}", target.path.display()))?;
        }
        copy(&image, img_len, &target, &ranges, bmap)?;
        verify(&image, img_len, &target)?;
        if target.size > img_len {
            grow_gpt(&target, img_len)?;
        }
        Ok::<(), anyhow::Error>(())
    })();
    if let Err(e) = written {
        // Interrupted: the signal handler zeroes the first MiB and ends the process.
        crate::cleanup::settle();
        let what = format!(
            "writing {} to {} failed",
            args.image.display(),
            target.path.display()
        );
        return Err(match wipe(&target.file, head) {
            Ok(()) => e.context(format!(
                "{what}; its first MiB was zeroed so the partly written disk does not boot (run kiln write again)"
            )),
            Err(w) => e.context(format!(
                "{what}, and zeroing its first MiB failed too ({w:#}); do not boot from it"
            )),
        });
    }
    crate::progress::result(format!(
        "wrote {} to {} ({}{}), verified",
        args.image.display(),
        target.path.display(),
        human(img_len),
        if bmap { ", mapped ranges only" } else { "" }
    ));
    // A kiln image names its target's one-time firmware settings (the Pi 5's boot order);
    // an image from elsewhere has no identity, and that is fine here.
    if let Ok(id) = crate::image::inspect::identity(&args.image) {
        if let Some(a) = id.firmware_advice() {
            crate::progress::result(a);
        }
        // The system alone does not boot: its loader lives on another device.
        if let (Some(on), Some(name)) = (&id.loader_on, id.loader_image_name()) {
            crate::progress::result(format!(
                "{}: this system boots through the loader on its {on}: flash {name} there (`kiln flash {}`) if it does not hold it yet",
                id.node, id.node
            ));
        }
    }
    Ok(())
}

fn open_target(device: &Path, image: &Path, img_len: u64) -> Result<Target> {
    let path = device.canonicalize().with_context(|| {
        format!(
            "{} does not exist; expected a block device or an existing file",
            device.display()
        )
    })?;
    let meta = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
    let img_meta =
        std::fs::metadata(image).with_context(|| format!("reading {}", image.display()))?;
    if meta.dev() == img_meta.dev() && meta.ino() == img_meta.ino() {
        bail!("{} is the image itself", device.display());
    }
    let ft = meta.file_type();
    if ft.is_block_device() {
        in_use::check_block(&path, meta.rdev())?;
        // O_EXCL on a block device: the kernel refuses it while anything has it mounted or
        // claimed, closing the gap between our checks and the write.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::EXCL.bits() as i32)
            .open(&path)
            .with_context(|| format!("opening {} exclusively (is it in use?)", path.display()))?;
        let size = file.seek(SeekFrom::End(0))?;
        Ok(Target {
            path,
            file,
            size,
            block: true,
            zeroed: false,
        })
    } else if ft.is_file() {
        in_use::check_file(&path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // A new, empty file is sized to the image once the write is confirmed.
        let zeroed = meta.len() == 0;
        let size = if zeroed { img_len } else { meta.len() };
        Ok(Target {
            path,
            file,
            size,
            block: false,
            zeroed,
        })
    } else {
        bail!(
            "{} is neither a block device nor a regular file",
            path.display()
        )
    }
}

/// Zeroes `[off, off+len)` on the target without writing buffers where the kernel can.
fn zero(t: &Target, off: u64, len: u64) -> Result<()> {
    let flags = if t.block {
        FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
    } else {
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
    };
    if fallocate(&t.file, flags, off, len).is_ok() {
        return Ok(());
    }
    let buf = vec![0u8; CHUNK];
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(CHUNK as u64) as usize;
        t.file
            .write_all_at(&buf[..n], pos)
            .with_context(|| format!("zeroing {} at byte {pos}", t.path.display()))?;
        pos += n as u64;
    }
    Ok(())
}

fn copy_range(
    image: &File,
    t: &Target,
    off: u64,
    len: u64,
    buf: &mut [u8],
    pb: &crate::progress::Task,
) -> Result<()> {
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(buf.len() as u64) as usize;
        image
            .read_exact_at(&mut buf[..n], pos)
            .with_context(|| format!("reading the image at byte {pos}"))?;
        t.file
            .write_all_at(&buf[..n], pos)
            .with_context(|| format!("writing {} at byte {pos}", t.path.display()))?;
        pos += n as u64;
        pb.inc(n as u64);
    }
    Ok(())
}

/// Writes zeros over `[0, len)` and syncs: the target then has no partition table or loader.
fn wipe(f: &File, len: u64) -> Result<()> {
    // Never makes a regular file longer than it is.
    let len = match f.metadata() {
        Ok(m) if m.is_file() => len.min(m.len()),
        _ => len,
    };
    let buf = vec![0u8; CHUNK];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(CHUNK as u64) as usize;
        f.write_all_at(&buf[..n], pos)
            .with_context(|| format!("writing zeros at byte {pos}"))?;
        pos += n as u64;
    }
    f.sync_all().context("syncing")
}

fn copy(image: &File, img_len: u64, t: &Target, ranges: &[(u64, u64)], bmap: bool) -> Result<()> {
    let head = MIB.min(img_len);
    // 1. The first MiB goes first, as zeros: until the image's own first MiB is written last,
    //    the target has neither the old partition table nor the new one.
    if !t.zeroed {
        wipe(&t.file, head)
            .with_context(|| format!("clearing the first MiB of {}", t.path.display()))?;
    }
    if bmap && !t.zeroed {
        let mut pos = 0;
        for &(off, len) in ranges.iter().chain(std::iter::once(&(img_len, 0))) {
            if off > pos {
                zero(t, pos, off - pos)?;
            }
            pos = off + len;
        }
    }
    let total: u64 = ranges
        .iter()
        .map(|&(o, l)| (o + l).max(head) - o.max(head))
        .sum::<u64>()
        + head;
    let pb = crate::progress::bytes(total, format!("writing {}", t.path.display()));
    let mut buf = vec![0u8; CHUNK];
    // 2. Everything after the first MiB.
    let mut first = true;
    for &(off, len) in ranges {
        let start = off.max(head);
        let end = off + len;
        if end > start {
            copy_range(image, t, start, end - start, &mut buf, &pb)?;
            if first {
                first = false;
                crate::cleanup::checkpoint("write-data")?;
            }
        }
    }
    t.file
        .sync_all()
        .with_context(|| format!("syncing {}", t.path.display()))?;
    // 3. The first MiB last; a signal arriving meanwhile waits until it is written, then zeroes
    //    it again (the write is not verified yet).
    crate::cleanup::critical(|| {
        copy_range(image, t, 0, head, &mut buf, &pb)?;
        crate::cleanup::checkpoint("write-head")?;
        t.file
            .sync_all()
            .with_context(|| format!("syncing {}", t.path.display()))
    })?;
    pb.finish_and_clear();
    Ok(())
}

/// Reads the device back (past the page cache) and compares its sha256 with the image's.
fn verify(image: &File, img_len: u64, t: &Target) -> Result<()> {
    // Drop cached pages so the read-back comes from the medium, not from what we just wrote.
    let _ = fadvise(&t.file, 0, None, Advice::DontNeed);
    let pb = crate::progress::bytes(img_len, format!("verifying {}", t.path.display()));
    let (mut hi, mut hd) = (Sha256::new(), Sha256::new());
    let mut a = vec![0u8; CHUNK];
    let mut b = vec![0u8; CHUNK];
    let mut first_diff = None;
    let mut pos = 0;
    while pos < img_len {
        let n = (img_len - pos).min(CHUNK as u64) as usize;
        image
            .read_exact_at(&mut a[..n], pos)
            .context("reading the image back")?;
        t.file
            .read_exact_at(&mut b[..n], pos)
            .with_context(|| format!("reading {} back at byte {pos}", t.path.display()))?;
        if first_diff.is_none() && a[..n] != b[..n] {
            let i = a[..n]
                .iter()
                .zip(&b[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            first_diff = Some(pos + i as u64);
        }
        hi.update(&a[..n]);
        hd.update(&b[..n]);
        pos += n as u64;
        pb.set_position(pos);
    }
    pb.finish_and_clear();
    let (hi, hd) = (
        crate::util::hex(&hi.finalize()),
        crate::util::hex(&hd.finalize()),
    );
    if hi != hd {
        bail!(
            "verification failed: {} reads back with sha256 {hd}, the image has {hi} (first difference at byte {}); the device may be failing",
            t.path.display(),
            first_diff.map_or_else(|| "?".to_string(), |d| d.to_string())
        );
    }
    Ok(())
}

/// On a disk larger than the image, moves the GPT backup (header and entries) to the disk's
/// last sectors and extends the usable range, as `sgdisk -e` does; the root partition grows
/// into it on first boot. MBR images need nothing.
fn grow_gpt(t: &Target, img_len: u64) -> Result<()> {
    let mut mbr = [0u8; 512];
    t.file.read_exact_at(&mut mbr, 0)?;
    if mbr[446 + 4] != 0xee {
        return Ok(());
    }
    // gptman allocates what the header claims: only a GPT that passes the bounded check is
    // handed to it. The disk already holds the image byte for byte; only the backup stays put.
    if let Err(e) = crate::image::inspect::check_gpt(&t.file, img_len) {
        crate::progress::note(format!(
            "warning: {}: the image's GPT does not check out ({e:#}); its backup header was left where the image has it",
            t.path.display()
        ));
        return Ok(());
    }
    let mut f = &t.file;
    let mut gpt = gptman::GPT::read_from(&mut f, SECTOR)
        .map_err(|e| anyhow!("reading the GPT back from {}: {e}", t.path.display()))?;
    gpt.header
        .update_from(&mut f, SECTOR)
        .map_err(|e| anyhow!("sizing the GPT to {}: {e}", t.path.display()))?;
    // A stale backup header in the middle of the disk confuses partitioning tools.
    t.file.write_all_at(&[0u8; 512], img_len - SECTOR)?;
    gpt.write_into(&mut f)
        .map_err(|e| anyhow!("writing the moved GPT to {}: {e}", t.path.display()))?;
    gptman::GPT::write_protective_mbr_into(&mut f, SECTOR)
        .map_err(|e| anyhow!("writing the protective MBR to {}: {e}", t.path.display()))?;
    t.file.sync_all()?;
    let check = gptman::GPT::read_from(&mut f, SECTOR).map_err(|e| {
        anyhow!(
            "the moved GPT on {} does not read back: {e}",
            t.path.display()
        )
    })?;
    if check.header.backup_lba != t.size / SECTOR - 1 {
        bail!(
            "the GPT backup header on {} is at LBA {}; expected the last LBA {}",
            t.path.display(),
            check.header.backup_lba,
            t.size / SECTOR - 1
        );
    }
    Ok(())
}

/// Whether a device or file is in use by the running system.
mod in_use {
    use super::*;

    type DevNum = (u32, u32);

    fn split(rdev: u64) -> DevNum {
        (rustix::fs::major(rdev), rustix::fs::minor(rdev))
    }

    fn sysfs(d: DevNum) -> PathBuf {
        PathBuf::from(format!("/sys/dev/block/{}:{}", d.0, d.1))
    }

    /// The whole disk a block device (or partition) belongs to.
    fn disk_of(d: DevNum) -> DevNum {
        let dir = sysfs(d);
        if !dir.join("partition").exists() {
            return d;
        }
        dir.canonicalize()
            .ok()
            .and_then(|p| std::fs::read_to_string(p.parent()?.join("dev")).ok())
            .and_then(|s| {
                let (a, b) = s.trim().split_once(':')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            })
            .unwrap_or(d)
    }

    fn dev_of_path(p: &str) -> Option<DevNum> {
        let m = std::fs::metadata(p).ok()?;
        m.file_type().is_block_device().then(|| split(m.rdev()))
    }

    /// `/proc` files escape spaces in paths as `\040`.
    fn unescape(s: &str) -> String {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\134", "\\")
    }

    pub fn check_block(path: &Path, rdev: u64) -> Result<()> {
        let disk = disk_of(split(rdev));
        let root = std::fs::metadata("/")?.dev();
        if rustix::fs::major(root) != 0 && disk_of(split(root)) == disk {
            bail!(
                "{} holds the running system's `/`; refusing to overwrite it",
                path.display()
            );
        }
        let mounts =
            std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
        for line in mounts.lines() {
            let mut f = line.split_whitespace();
            let (Some(src), Some(at)) = (f.next(), f.next()) else {
                continue;
            };
            if let Some(d) = dev_of_path(&unescape(src))
                && disk_of(d) == disk
            {
                let at = unescape(at);
                if at == "/" {
                    bail!(
                        "{} holds the running system's `/`; refusing to overwrite it",
                        path.display()
                    );
                }
                bail!(
                    "{} is mounted ({} on {at}); expected an unmounted device (umount it first)",
                    path.display(),
                    unescape(src)
                );
            }
        }
        if let Ok(swaps) = std::fs::read_to_string("/proc/swaps") {
            for line in swaps.lines().skip(1) {
                if let Some(src) = line.split_whitespace().next()
                    && dev_of_path(&unescape(src)).is_some_and(|d| disk_of(d) == disk)
                {
                    bail!(
                        "{} is in use as swap ({src}); expected an unused device (swapoff it first)",
                        path.display()
                    );
                }
            }
        }
        // Holders: device-mapper, LVM, RAID or crypt layered on the disk or its partitions.
        let dir = sysfs(disk);
        let mut dirs = vec![dir.clone()];
        if let Ok(rd) = std::fs::read_dir(&dir) {
            dirs.extend(
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.join("partition").exists()),
            );
        }
        for d in dirs {
            let holders: Vec<String> = std::fs::read_dir(d.join("holders"))
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            if !holders.is_empty() {
                bail!(
                    "{} is in use by {} (device-mapper, LVM, RAID or encryption); expected an unused device",
                    path.display(),
                    holders.join(", ")
                );
            }
        }
        Ok(())
    }

    /// A file attached to a loop device may be mounted through it.
    pub fn check_file(path: &Path) -> Result<()> {
        let Ok(rd) = std::fs::read_dir("/sys/block") else {
            return Ok(());
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file"))
                && Path::new(b.trim()) == path
            {
                bail!(
                    "{} is attached to /dev/{name}; expected a file no loop device uses (losetup -d /dev/{name})",
                    path.display()
                );
            }
        }
        Ok(())
    }
}
