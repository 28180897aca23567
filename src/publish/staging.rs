//! The output directory as one set. A build holds an exclusive lock on the directory from
//! start to end, writes everything it makes (per node the image and its companions, then
//! SHA256SUMS and kiln-manifest.json) into `OUT/.kiln-staging-PID/`, and moves it into place
//! only once all of it is complete. Until that moment the previous set is untouched: a failure,
//! Ctrl-C or SIGTERM removes the staging directory, and a SIGKILL leaves it for the next build
//! to remove.
//!
//! Commit order, chosen so that a kill between two renames is visible and is finished by the
//! next build:
//!
//! 1. The staging directory (every file fsynced) gets a list of the companions of rebuilt
//!    images that this build did not make (an old `.xz` beside a new image would not match
//!    it), and is renamed to `OUT/.kiln-commit-PID/`. That rename is the commit point: from
//!    now on the set is complete on disk and only has to be moved.
//! 2. The old SHA256SUMS and manifest are removed (they describe files about to change), then
//!    the listed stale companions.
//! 3. Images and companions are renamed into place, then the manifest, then SHA256SUMS, last;
//!    then the empty commit directory is removed.
//!
//! So whenever `OUT/SHA256SUMS` exists, every file it names is the one it describes. A build
//! killed inside step 2 or 3 leaves no SHA256SUMS (`sha256sum --check` fails: detectable) and a
//! `.kiln-commit-PID/` directory; the next build, once it holds the lock, replays steps 2–3
//! (each is idempotent) before anything else. Everything else kiln leaves in OUT is removed
//! then: staging directories (no build holds the lock, so none is in progress) and
//! `.*.partial-PID` files whose process is gone.

use crate::cleanup;
use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

const STAGING: &str = ".kiln-staging-";
const COMMITTING: &str = ".kiln-commit-";
/// Inside a commit directory: companions to remove, one name a line.
const REMOVE_LIST: &str = ".remove";
/// Moved last, in this order: SHA256SUMS is the last file of a set to appear.
const INDEX: [&str; 2] = ["kiln-manifest.json", "SHA256SUMS"];
/// What `publish` writes beside `<node>.img`.
const COMPANIONS: [&str; 4] = ["zst", "xz", "gz", "bmap"];

/// An output directory locked by this process for the length of a build.
///
/// The lock is a `flock` on the directory itself rather than on a lock file in it: nothing is
/// left behind to list or to go stale, and the kernel drops it when the process ends, however
/// it ends. The holder's pid is in the name of its staging directory, made right after.
pub struct OutDir {
    dir: PathBuf,
    /// Holds the flock; closing it (also when the process dies) releases the lock.
    _lock: File,
}

impl OutDir {
    /// Creates `dir` if needed, takes its lock (failing at once if another build has it) and
    /// finishes or removes whatever an interrupted build left there.
    pub fn lock(dir: &Path) -> Result<OutDir> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating output directory {}", dir.display()))?;
        let f = File::open(dir)
            .with_context(|| format!("opening output directory {}", dir.display()))?;
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let who = match holder(dir) {
                    Some(pid) => format!("another kiln build (pid {pid})"),
                    None => "another kiln build".to_string(),
                };
                bail!(
                    "{who} is writing into {} (it holds the directory's lock); wait for it to finish, or build into another --out directory",
                    dir.display()
                );
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("locking output directory {}", dir.display()));
            }
        }
        let out = OutDir {
            dir: dir.to_path_buf(),
            _lock: f,
        };
        cleanup::critical(|| out.recover())?;
        Ok(out)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Finishes a set a killed build was moving into place, and removes staging directories
    /// and partial files nobody is writing any more. Runs with the lock held.
    fn recover(&self) -> Result<()> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .with_context(|| format!("listing {}", self.dir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            let path = self.dir.join(&name);
            if let Some(pid) = name.strip_prefix(COMMITTING) {
                crate::progress::note(format!(
                    "{}: a kiln build (pid {pid}) was killed while moving its outputs into place; finishing that",
                    self.dir.display()
                ));
                apply(&self.dir, &path).with_context(|| {
                    format!(
                        "finishing the interrupted commit in {} (remove it to give up on that set)",
                        path.display()
                    )
                })?;
            } else if let Some(pid) = name.strip_prefix(STAGING) {
                remove_any(&path)?;
                crate::progress::note(format!(
                    "{}: removed the unfinished outputs of an interrupted kiln build (pid {pid})",
                    self.dir.display()
                ));
            } else if let Some(pid) = partial_pid(&name)
                && !cleanup::alive(pid)
            {
                remove_any(&path)?;
                crate::progress::note(format!(
                    "{}: removed {name}, left by an interrupted kiln run (pid {pid})",
                    self.dir.display()
                ));
            }
        }
        Ok(())
    }

    /// A fresh staging directory for this build's files, removed unless committed (also on
    /// Ctrl-C and SIGTERM).
    pub fn stage(&self) -> Result<Staging> {
        let dir = self.dir.join(format!("{STAGING}{}", std::process::id()));
        std::fs::create_dir(&dir)
            .with_context(|| format!("creating staging directory {}", dir.display()))?;
        let d = dir.clone();
        let guard = cleanup::on_interrupt(move || cleanup::remove_tree(&d));
        Ok(Staging {
            out: self.dir.clone(),
            dir,
            _guard: guard,
            committed: false,
        })
    }
}

/// The pid of the build that holds `dir`'s lock, from its staging or commit directory.
fn holder(dir: &Path) -> Option<String> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix(STAGING)
                .or_else(|| n.strip_prefix(COMMITTING))
                .map(str::to_string)
        })
}

/// `.<name>.partial-PID` or `.<name>.partial-PID.<suffix>` (kiln's temporary files): the pid.
fn partial_pid(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    let (_, rest) = name.rsplit_once(".partial-")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn remove_any(path: &Path) -> Result<()> {
    let r = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.with_context(|| format!("removing {}", path.display()))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to)
        .with_context(|| format!("renaming {} to {}", from.display(), to.display()))
}

/// The files of a set in a staging or commit directory (its own bookkeeping and any
/// temporary file excluded).
fn set_names(dir: &Path) -> Result<BTreeSet<String>> {
    Ok(std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect())
}

/// Steps 2 and 3 of the commit (see the module comment); safe to run again after a kill.
fn apply(out: &Path, commit: &Path) -> Result<()> {
    for n in INDEX {
        // Still staged: the old one is stale. Already moved: it is the new one; keep it.
        if commit.join(n).exists() {
            remove_if_present(&out.join(n))?;
        }
    }
    if let Ok(list) = std::fs::read_to_string(commit.join(REMOVE_LIST)) {
        for n in list.lines().filter(|n| !n.is_empty() && !n.contains('/')) {
            remove_if_present(&out.join(n))?;
        }
    }
    sync_dir(out)?;
    let names = set_names(commit)?;
    let mut first = true;
    for n in names.iter().filter(|n| !INDEX.contains(&n.as_str())) {
        rename(&commit.join(n), &out.join(n))?;
        if first {
            first = false;
            cleanup::checkpoint("commit")?;
        }
    }
    sync_dir(out)?;
    for n in INDEX {
        if names.contains(n) {
            rename(&commit.join(n), &out.join(n))?;
        }
    }
    sync_dir(out)?;
    // What is left are temporary files nobody writes any more.
    remove_any(commit)?;
    sync_dir(out)
}

/// A build's files on their way into the output directory.
pub struct Staging {
    out: PathBuf,
    dir: PathBuf,
    _guard: cleanup::Guard,
    committed: bool,
}

impl Staging {
    /// Where the build writes; files keep the names they will have in the output directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a staged file will be once committed.
    pub fn final_path(&self, staged: &Path) -> PathBuf {
        match staged.file_name() {
            Some(n) => self.out.join(n),
            None => staged.to_path_buf(),
        }
    }

    /// Moves the staged set into the output directory (see the module comment). Every staged
    /// file must already be fsynced (`AtomicFile::commit` and the compressors do that).
    pub fn commit(mut self) -> Result<()> {
        let staged = set_names(&self.dir)?;
        let mut stale = String::new();
        for n in staged.iter().filter(|n| n.ends_with(".img")) {
            for ext in COMPANIONS {
                let c = format!("{n}.{ext}");
                if !staged.contains(&c) && self.out.join(&c).exists() {
                    stale.push_str(&c);
                    stale.push('\n');
                }
            }
        }
        let list = self.dir.join(REMOVE_LIST);
        File::create(&list)
            .and_then(|mut f| {
                f.write_all(stale.as_bytes())?;
                f.sync_all()
            })
            .with_context(|| format!("writing {}", list.display()))?;
        sync_dir(&self.dir)?;
        let commit = self.out.join(format!("{COMMITTING}{}", std::process::id()));
        cleanup::critical(|| {
            rename(&self.dir, &commit)?;
            self.committed = true;
            sync_dir(&self.out)?;
            apply(&self.out, &commit).with_context(|| {
                format!(
                    "moving the new outputs into {} stopped part-way; the set there is incomplete \
(no SHA256SUMS) until the next kiln build into it finishes moving {}",
                    self.out.display(),
                    commit.display()
                )
            })
        })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            cleanup::remove_tree(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_names_give_their_pid() {
        assert_eq!(partial_pid(".rk1-1.img.partial-1234"), Some(1234));
        assert_eq!(partial_pid(".k.partial-77.tar.zst"), Some(77));
        assert_eq!(partial_pid(".rk1-1.img.partial-12.mke2fs.conf"), Some(12));
        assert_eq!(partial_pid("rk1-1.img"), None);
        assert_eq!(partial_pid(".kiln.lock"), None);
        assert_eq!(partial_pid(".x.partial-"), None);
    }

    fn files(dir: &Path) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let n = e.file_name().to_string_lossy().into_owned();
                (n, std::fs::read_to_string(e.path()).unwrap_or_default())
            })
            .collect();
        v.sort();
        v
    }

    /// A commit replayed from any point a kill can leave it at ends in the same complete set.
    #[test]
    fn apply_finishes_a_commit_from_any_point() {
        let new_set = [
            "a.img",
            "a.img.bmap",
            "a.img.zst",
            "kiln-manifest.json",
            "SHA256SUMS",
        ];
        // How far a killed commit got: files of `new_set` (in commit order) already moved.
        for moved in 0..=new_set.len() {
            for index_removed in [false, true] {
                let root = std::env::temp_dir().join(format!(
                    "kiln-apply-{}-{moved}-{index_removed}",
                    std::process::id()
                ));
                let _ = std::fs::remove_dir_all(&root);
                let (out, commit) = (root.join("out"), root.join("out/.kiln-commit-1"));
                std::fs::create_dir_all(&commit).unwrap();
                for n in [
                    "a.img",
                    "a.img.xz",
                    "a.img.zst",
                    "b.img",
                    "kiln-manifest.json",
                ] {
                    std::fs::write(out.join(n), "old").unwrap();
                }
                std::fs::write(out.join("SHA256SUMS"), "old").unwrap();
                std::fs::write(commit.join(REMOVE_LIST), "a.img.xz\n").unwrap();
                for n in new_set {
                    std::fs::write(commit.join(n), "new").unwrap();
                }
                if index_removed || moved > 0 {
                    for n in INDEX {
                        let _ = std::fs::remove_file(out.join(n));
                    }
                    let _ = std::fs::remove_file(out.join("a.img.xz"));
                }
                for n in &new_set[..moved] {
                    std::fs::rename(commit.join(n), out.join(n)).unwrap();
                }
                apply(&out, &commit).unwrap();
                let want: Vec<(String, String)> = [
                    ("SHA256SUMS", "new"),
                    ("a.img", "new"),
                    ("a.img.bmap", "new"),
                    ("a.img.zst", "new"),
                    ("b.img", "old"),
                    ("kiln-manifest.json", "new"),
                ]
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
                assert_eq!(
                    files(&out),
                    want,
                    "moved {moved}, index removed {index_removed}"
                );
                std::fs::remove_dir_all(&root).unwrap();
            }
        }
    }
}
