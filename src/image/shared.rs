//! The root filesystem a board's nodes share: written once per build with `mke2fs -d -` from
//! the base and everything the nodes have in common (k3s, the repository overlays), then, for
//! each node, copied into its image and finished with e2fsprogs' own tools: `debugfs -w`
//! applies the node's own files, `tune2fs -U` gives it its own filesystem UUID.
//!
//! Why this way: streaming a 1 GiB base into one mke2fs per node made five images cost 2.8×
//! one. A node's own files are a few dozen small ones, and with `metadata_csum_seed` a new
//! UUID rewrites only the superblocks, so a further node costs a copy of the shared data
//! (in-kernel `copy_file_range`, a reflink where the filesystem has them) and two short tool
//! runs. Everything stays deterministic: the shared filesystem is a function of its inputs
//! alone (never of which other nodes a build has), and the tools run with
//! `E2FSPROGS_FAKE_TIME` at the build epoch, so every inode and superblock time is the epoch.

use super::ext4;
use crate::config::size::MIB;
use crate::rootfs::merge::{self, Listing};
use crate::tool::Tool;
use crate::tree::{Kind, Tree};
use crate::util::{AtomicFile, Guid};
use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Room kept in the shared filesystem for one node's own files: they are kiln's small
/// generated files (identity, network, secrets, first boot: about 100 KiB), never an overlay.
pub const NODE_ROOM: u64 = 8 * MIB;
/// Inodes kept for them.
pub const NODE_ENTRIES: u64 = 512;

/// What decides a shared root filesystem's bytes. Nodes with the same key share one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub String);

impl Key {
    /// The base tarball (by its hash), the board (its profile decides the layout), the build
    /// epoch, the filesystem's size and inode count, and the shared tree.
    pub fn of(
        board: &str,
        base_sha256: &str,
        epoch: u64,
        geometry: Geometry,
        shared: &Tree,
    ) -> Key {
        let mut h = Sha256::new();
        for part in [board, base_sha256] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update(epoch.to_le_bytes());
        h.update(geometry.size.to_le_bytes());
        h.update(geometry.inodes.to_le_bytes());
        shared.digest(&mut h);
        Key(crate::util::hex(&h.finalize()))
    }
}

/// A shared filesystem's size in bytes and its inode count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub size: u64,
    pub inodes: u64,
}

/// UUID and directory hash seed of a board's shared filesystem: from the board, the base and
/// the epoch, never from where the build's files are (the key names host files by their path),
/// so the same inputs in another directory give the same bytes. Each node's copy gets its own
/// UUID; the hash seed stays (changing it would mean reindexing every directory), which only
/// makes directory hashes the same across the nodes of a board.
pub fn seed(board: &str, base_sha256: &str, epoch: u64) -> Guid {
    Guid::derive(&["kiln shared root", board, base_sha256, &epoch.to_string()])
}

/// A shared root filesystem on disk, removed when dropped (never published: its name starts
/// with a dot in the build's staging directory).
pub struct SharedRoot {
    pub key: Key,
    /// Held so that the file is removed with this value.
    _file: AtomicFile,
    /// A handle to read it through from several node builds at once.
    read: std::fs::File,
    pub size: u64,
    pub inodes: u64,
    /// Every path it holds, and whether it is a directory.
    listing: Listing,
    epoch: u64,
    /// Wall seconds writing it took.
    pub seconds: f64,
}

/// The filesystem's size and inode count for a base of `base_blocks`/`base_entries` and the
/// shared tree, with room for one node's own files.
pub fn size_for(base_blocks: u64, base_entries: u64, shared: &Tree, headroom: u64) -> (u64, u64) {
    ext4::estimate_size(
        base_blocks
            .saturating_add(shared.blocks())
            .saturating_add(NODE_ROOM / 4096),
        base_entries
            .saturating_add(shared.entries.len() as u64)
            .saturating_add(NODE_ENTRIES),
        headroom,
    )
}

pub struct SharedParams<'a> {
    pub key: Key,
    /// From [`seed`].
    pub uuid: Guid,
    pub base: &'a Path,
    pub base_len: u64,
    pub shared: &'a Tree,
    pub size: u64,
    pub inodes: u64,
    pub label: &'a str,
    pub epoch: u64,
    /// Where to write it (the build's staging directory) and a name for messages.
    pub dir: &'a Path,
    pub name: &'a str,
}

/// Writes the shared filesystem: base ⊕ shared tree through one mke2fs.
pub fn make(p: &SharedParams<'_>) -> Result<SharedRoot> {
    let started = std::time::Instant::now();
    let dest = p
        .dir
        .join(format!(".shared-{}-{}.ext4", p.name, &p.key.0[..16]));
    let mut file = AtomicFile::create(&dest)?;
    file.file()
        .set_len(p.size)
        .with_context(|| format!("sizing {}", file.path().display()))?;
    let uuid = p.uuid;
    let mut listing = Listing::default();
    let pb = crate::progress::bytes(
        p.base_len,
        format!("{}: writing the shared root filesystem", p.name),
    );
    ext4::make(
        &ext4::Ext4Params {
            image: file.path(),
            offset: 0,
            size: p.size,
            inodes: p.inodes,
            uuid,
            label: p.label,
            epoch: p.epoch,
        },
        |stdin| {
            merge::write_tar_listing(
                p.base,
                p.shared,
                p.epoch,
                stdin,
                &|n| pb.set_position(n),
                &mut listing,
            )
        },
    )?;
    pb.finish_and_clear();
    super::sparse::punch_zeros(file.file(), 0, p.size)?;
    let read = file
        .file()
        .try_clone()
        .with_context(|| format!("opening {}", file.path().display()))?;
    Ok(SharedRoot {
        key: p.key.clone(),
        _file: file,
        read,
        size: p.size,
        inodes: p.inodes,
        listing,
        epoch: p.epoch,
        seconds: started.elapsed().as_secs_f64(),
    })
}

impl SharedRoot {
    /// Puts this filesystem into `image` at `offset` with the node's own files (`own`) and
    /// filesystem UUID. `work` is a private directory for the files debugfs reads.
    pub fn write_node(
        &self,
        image: &std::fs::File,
        image_path: &Path,
        offset: u64,
        own: &Tree,
        uuid: Guid,
        work: &Path,
    ) -> Result<()> {
        copy_data(&self.read, image, offset, self.size)?;
        let script = self.script(own, work)?;
        // `path?offset=N`: e2fsprogs' unix I/O manager opens the filesystem inside the image.
        let mut device = image_path.as_os_str().to_owned();
        device.push(format!("?offset={offset}"));
        let epoch = self.epoch.to_string();
        let debugfs = Tool::new("applying the node's own files (debugfs)", "debugfs")
            .env("E2FSPROGS_FAKE_TIME", &epoch)
            .arg("-w")
            .arg("-f")
            .arg("-")
            .arg(&device);
        let mut run = debugfs.spawn_with_stdin()?;
        let fed = run
            .child
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("debugfs has no stdin"))
            .and_then(|s| s.write_all(script.as_bytes()).map_err(Into::into));
        let stderr = run.finish_stderr()?;
        fed.context("writing debugfs's commands")?;
        // debugfs exits 0 whatever its commands did; a failed one says so on stderr, the only
        // other line there is its version banner.
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
            .collect();
        if !errors.is_empty() {
            bail!(
                "debugfs could not apply the node's own files to its root filesystem:\n  {}",
                errors.join("\n  ")
            );
        }
        Tool::new("setting the root filesystem's UUID (tune2fs)", "tune2fs")
            .env("E2FSPROGS_FAKE_TIME", &epoch)
            .arg("-U")
            .arg(uuid.to_string())
            .arg(&device)
            .output()?;
        Ok(())
    }

    /// debugfs commands making `own` what the node's root holds at those paths, as the single
    /// tar stream did before: a file or link replaces what was there, a directory already
    /// there keeps its owner and mode unless `own` sets them. Contents go through files in
    /// `work` (0700, each 0600), written here.
    fn script(&self, own: &Tree, work: &Path) -> Result<String> {
        std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", work.display()))?;
        let mut s = String::new();
        let mut n = 0usize;
        for (path, e) in &own.entries {
            // kiln's own paths: checked so that no name can split a debugfs command.
            if path.is_empty()
                || path
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\\')
            {
                bail!(
                    "node file `{path}`: expected a path without spaces, quotes or control characters"
                );
            }
            let target = format!("/{path}");
            let existing = self.listing.paths.get(path).copied();
            match &e.kind {
                Kind::Dir => {
                    match existing {
                        Some(true) if e.implicit => continue,
                        Some(true) => {}
                        Some(false) => {
                            writeln!(s, "rm {target}")?;
                            writeln!(s, "mkdir {target}")?;
                        }
                        None => writeln!(s, "mkdir {target}")?,
                    }
                    writeln!(s, "sif {target} mode 0{:o}", 0o040000 | (e.mode & 0o7777))?;
                }
                Kind::File(_) | Kind::HostFile { .. } | Kind::Symlink(_) => {
                    match existing {
                        Some(true) => bail!(
                            "node file `{path}` would replace a directory of the shared root filesystem"
                        ),
                        Some(false) => writeln!(s, "rm {target}")?,
                        None => {}
                    }
                    match &e.kind {
                        Kind::Symlink(t) => {
                            if t.chars()
                                .any(|c| c.is_whitespace() || c.is_control() || c == '"')
                            {
                                bail!(
                                    "node link `{path}` -> `{t}`: expected a target without spaces or quotes"
                                );
                            }
                            writeln!(s, "symlink {target} {t}")?;
                        }
                        Kind::File(data) => {
                            let src = work.join(n.to_string());
                            n += 1;
                            write_private(&src, data)?;
                            write_file(&mut s, &src, &target, e.mode)?;
                        }
                        Kind::HostFile { path: host, .. } => {
                            write_file(&mut s, host, &target, e.mode)?;
                        }
                        Kind::Dir => {}
                    }
                }
            }
            writeln!(s, "sif {target} uid {}", e.uid)?;
            writeln!(s, "sif {target} gid {}", e.gid)?;
            for field in ["mtime", "atime", "ctime"] {
                writeln!(s, "sif {target} {field} @{}", self.epoch)?;
            }
        }
        Ok(s)
    }
}

/// debugfs commands writing the contents of `src` to `target` as a regular file of `mode`.
fn write_file(s: &mut String, src: &Path, target: &str, mode: u32) -> std::fmt::Result {
    writeln!(s, "write {} {target}", src.display())?;
    writeln!(s, "sif {target} mode 0{:o}", 0o100000 | (mode & 0o7777))
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))
}

/// Copies the data ranges of `from` (a whole filesystem) into `to` at `offset`, leaving holes
/// as holes: in the kernel (`copy_file_range`: no bytes through kiln, a shared extent on
/// filesystems with reflinks).
fn copy_data(from: &std::fs::File, to: &std::fs::File, offset: u64, size: u64) -> Result<()> {
    for (start, len) in super::sparse::data_ranges(from, 0, size)? {
        let mut done = 0u64;
        while done < len {
            let mut src = start + done;
            let mut dst = offset
                .checked_add(src)
                .ok_or_else(|| anyhow!("root filesystem offset overflows"))?;
            let want = usize::try_from(len - done)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            let n = rustix::fs::copy_file_range(from, Some(&mut src), to, Some(&mut dst), want)
                .context("copying the shared root filesystem into the image")?;
            if n == 0 {
                bail!("the shared root filesystem ended early at byte {src}");
            }
            done += n as u64;
        }
    }
    Ok(())
}
