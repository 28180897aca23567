//! An in-memory overlay tree: the files kiln adds on top of the base (repository overlays and
//! per-node files). Small by design; the base itself is only ever streamed.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File(Vec<u8>),
    /// A large file streamed from the host when the image is written (k3s, airgap images),
    /// never held in memory. `len` is checked again when it is streamed.
    HostFile {
        path: std::path::PathBuf,
        len: u64,
    },
    Dir,
    Symlink(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Added only because a child needs it; the base's directory wins if it has one.
    pub implicit: bool,
}

/// Paths are relative (`etc/hostname`), without a leading slash.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    pub entries: BTreeMap<String, Entry>,
}

impl Tree {
    fn add(&mut self, path: &str, kind: Kind, mode: u32) {
        let path = path
            .trim_start_matches('/')
            .trim_end_matches('/')
            .to_string();
        // Parents first, so the stream creates directories before their children.
        let mut parent = Path::new(&path).parent();
        while let Some(p) = parent {
            let s = p.to_string_lossy().to_string();
            if s.is_empty() {
                break;
            }
            self.entries.entry(s).or_insert(Entry {
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                implicit: true,
            });
            parent = p.parent();
        }
        self.entries.insert(
            path,
            Entry {
                kind,
                mode,
                uid: 0,
                gid: 0,
                implicit: false,
            },
        );
    }

    pub fn file(&mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) {
        self.add(path, Kind::File(data.into()), mode);
    }

    /// Adds a host file by reference; its bytes are read only while the image is written.
    pub fn host_file(&mut self, path: &str, mode: u32, host: &Path) -> Result<()> {
        let len = std::fs::metadata(host)
            .with_context(|| format!("reading {}", host.display()))?
            .len();
        self.add(
            path,
            Kind::HostFile {
                path: host.to_path_buf(),
                len,
            },
            mode,
        );
        Ok(())
    }

    pub fn dir(&mut self, path: &str, mode: u32) {
        self.add(path, Kind::Dir, mode);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.add(path, Kind::Symlink(target.to_string()), 0o777);
    }

    /// Later trees win over earlier ones.
    pub fn merge(&mut self, other: Tree) {
        for (k, v) in other.entries {
            match self.entries.get(&k) {
                Some(existing) if v.implicit && existing.kind == Kind::Dir => {}
                _ => {
                    self.entries.insert(k, v);
                }
            }
        }
    }

    /// Adds a repository overlay directory. Files become root-owned, as in a Debian system;
    /// permission bits come from the checkout (git keeps the executable bit).
    pub fn add_dir_from_host(&mut self, root: &Path) -> Result<()> {
        fn walk(tree: &mut Tree, root: &Path, dir: &Path) -> Result<()> {
            let mut children: Vec<_> = std::fs::read_dir(dir)
                .with_context(|| format!("reading overlay {}", dir.display()))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("reading overlay {}", dir.display()))?;
            children.sort_by_key(|e| e.file_name());
            for c in children {
                let path = c.path();
                let rel = path
                    .strip_prefix(root)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let meta = std::fs::symlink_metadata(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let mode = meta.permissions().mode() & 0o7777;
                let ft = meta.file_type();
                if ft.is_symlink() {
                    let t = std::fs::read_link(&path)
                        .with_context(|| format!("reading symlink {}", path.display()))?;
                    tree.symlink(&rel, &t.to_string_lossy());
                } else if ft.is_dir() {
                    tree.dir(&rel, mode);
                    walk(tree, root, &path)?;
                } else if ft.is_file() {
                    let data = std::fs::read(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    // Group/other write bits from a loose umask would be a security hole on a node.
                    tree.file(&rel, mode & !0o022, data);
                } else {
                    bail!(
                        "{}: not a regular file, directory or symlink (mode {:o}); overlays hold only those",
                        path.display(),
                        meta.mode()
                    );
                }
            }
            Ok(())
        }
        walk(self, root, root)
    }

    /// Feeds everything that decides what this tree writes into `h`: paths, owners, modes and
    /// contents (a host file by its path and length: kiln's host files are content-addressed
    /// cache entries or checked for a change of size when they are streamed).
    pub fn digest(&self, h: &mut sha2::Sha256) {
        use sha2::Digest;
        for (path, e) in &self.entries {
            h.update((path.len() as u64).to_le_bytes());
            h.update(path.as_bytes());
            h.update([u8::from(e.implicit)]);
            h.update(e.mode.to_le_bytes());
            h.update(e.uid.to_le_bytes());
            h.update(e.gid.to_le_bytes());
            let (tag, bytes): (u8, Vec<u8>) = match &e.kind {
                Kind::File(d) => (0, sha2::Sha256::digest(d).to_vec()),
                Kind::HostFile { path, len } => {
                    let mut b = path.as_os_str().as_encoded_bytes().to_vec();
                    b.extend(len.to_le_bytes());
                    (1, b)
                }
                Kind::Dir => (2, Vec::new()),
                Kind::Symlink(t) => (3, t.as_bytes().to_vec()),
            };
            h.update([tag]);
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
        }
    }

    /// 4 KiB blocks this tree needs (for sizing the root filesystem).
    pub fn blocks(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match &e.kind {
                Kind::File(d) => (d.len() as u64).div_ceil(4096),
                Kind::HostFile { len, .. } => len.div_ceil(4096),
                Kind::Dir => 1,
                Kind::Symlink(t) => u64::from(t.len() >= 60),
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_implicit_and_later_trees_win() {
        let mut a = Tree::default();
        a.file("etc/ssh/sshd_config.d/kiln.conf", 0o644, "x");
        assert!(a.entries["etc"].implicit);
        assert!(a.entries["etc/ssh"].implicit);
        let mut b = Tree::default();
        b.dir("etc/ssh", 0o700);
        b.file("etc/ssh/sshd_config.d/kiln.conf", 0o600, "y");
        a.merge(b);
        assert_eq!(a.entries["etc/ssh"].mode, 0o700);
        assert_eq!(
            a.entries["etc/ssh/sshd_config.d/kiln.conf"].kind,
            Kind::File(b"y".to_vec())
        );
    }
}
