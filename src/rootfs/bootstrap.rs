//! The Debian base root filesystem, built by mmdebstrap from a board's recipe and cached by the
//! recipe's hash: boards (and nodes) with the same recipe share one base tarball.

use crate::config::board::{Arch, DebianRecipe};
use crate::fetch::Cache;
use crate::tool::Tool;
use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Bumped when the way kiln drives mmdebstrap changes, so old cached bases are not reused.
const FORMAT: u32 = 2;

/// Per-machine identities the packages made at install time; the base is shared by every
/// node, so each node must make its own on first boot. SSH host keys are dropped (first boot
/// runs `ssh-keygen -A`); open-iscsi's InitiatorName is set to `GenerateName=yes`, which its
/// `iscsid.service` (`ExecStartPre=/usr/lib/open-iscsi/startup-checks.sh`) replaces with a
/// unique name on the node's first start (Debian open-iscsi's postinst and startup-checks.sh).
const CUSTOMIZE_HOOK: &str = r#"rm -f "$1"/etc/ssh/ssh_host_*; if [ -e "$1/etc/iscsi/initiatorname.iscsi" ]; then printf 'GenerateName=yes\n' > "$1/etc/iscsi/initiatorname.iscsi"; chmod 600 "$1/etc/iscsi/initiatorname.iscsi"; fi"#;

/// initramfs-tools hook (initramfs-tools(7), "Hook scripts") that adds and loads the board's
/// `initramfs_modules` in every initramfs, also those built later by `apt`. It is written
/// before the kernel package is installed, so the base's first initramfs has them. A module
/// the kernel lacks is reported, not fatal: the slow tier checks each board's list with
/// lsinitramfs.
const INITRAMFS_HOOK: &str = r#"#!/bin/sh
# Written by kiln from the board profile's [debian] initramfs_modules.
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
for m in @MODULES@; do
    if modprobe --set-version="$version" --show-depends "$m" >/dev/null 2>&1; then
        force_load "$m"
    else
        echo "W: kiln: kernel $version has no module $m" >&2
    fi
done
"#;

pub const INITRAMFS_HOOK_PATH: &str = "etc/initramfs-tools/hooks/kiln-modules";
pub const MODULES_LOAD_PATH: &str = "etc/modules-load.d/kiln.conf";

/// Everything that decides a base's content; its hash is the cache key.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Recipe {
    pub format: u32,
    pub arch: &'static str,
    pub debian: DebianRecipe,
    /// `[debian] mirror` of the inventory; mmdebstrap's default when `None`.
    pub mirror: Option<String>,
    pub customize_hook: &'static str,
}

impl Recipe {
    pub fn new(arch: Arch, debian: &DebianRecipe, mirror: Option<&str>) -> Recipe {
        Recipe {
            format: FORMAT,
            arch: arch.debian(),
            debian: debian.clone(),
            mirror: mirror.map(str::to_string),
            customize_hook: CUSTOMIZE_HOOK,
        }
    }

    /// The recipe of a base the plan asks for.
    pub fn of(base: &crate::plan::DebianBase) -> Recipe {
        Recipe::new(base.arch, &base.debian, base.mirror.as_deref())
    }

    pub fn key(&self) -> String {
        // Invariant: serialising plain strings and vectors to JSON cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        crate::util::sha256_hex(&json)
    }

    /// One line for messages: `trixie arm64 (+trixie-backports), 21 packages`.
    pub fn describe(&self) -> String {
        let extra = if self.debian.extra_suites.is_empty() {
            String::new()
        } else {
            format!(" (+{})", self.debian.extra_suites.join(", +"))
        };
        format!(
            "Debian {} {}{extra}, {} packages",
            self.debian.suite,
            self.arch,
            self.debian.packages.len()
        )
    }

    /// Adds each extra suite as a copy of the first `deb` line mmdebstrap wrote, so the mirror
    /// (default or the inventory's) is never named twice.
    fn setup_hook(&self) -> Option<String> {
        if self.debian.extra_suites.is_empty() {
            return None;
        }
        let mut s = String::from("set -e; l=\"$1/etc/apt/sources.list\"; ");
        for x in &self.debian.extra_suites {
            s.push_str(&format!(
                "awk -v s={} -v x={x} '$1==\"deb\" && !d {{for(i=2;i<=NF;i++) if($i==s){{$i=x; print; d=1; break}}}}' \"$l\" >> \"$1/etc/apt/sources.list.d/kiln-extra.list\"; ",
                self.debian.suite
            ));
        }
        Some(s)
    }

    /// Runs after the Essential packages and before the recipe's packages (mmdebstrap(1)), so
    /// the initramfs hook is in place when the kernel's postinst builds the first initramfs.
    /// Module names are validated as plain words by the board check.
    fn essential_hook(&self) -> Option<String> {
        let mods = &self.debian.initramfs_modules;
        if mods.is_empty() {
            return None;
        }
        let hook = INITRAMFS_HOOK.replace("@MODULES@", &mods.join(" "));
        Some(format!(
            "set -e; mkdir -p \"$1/etc/initramfs-tools/hooks\"; cat > \"$1/{INITRAMFS_HOOK_PATH}\" <<'KILN_EOF'\n{hook}KILN_EOF\nchmod 755 \"$1/{INITRAMFS_HOOK_PATH}\""
        ))
    }

    /// Modules to load at boot and units to enable (names validated by the board check).
    fn customize_hooks(&self) -> Vec<String> {
        let d = &self.debian;
        let mut v = Vec::new();
        if !d.modules_load.is_empty() {
            v.push(format!(
                "set -e; mkdir -p \"$1/etc/modules-load.d\"; printf '%s\\n' {} > \"$1/{MODULES_LOAD_PATH}\"",
                d.modules_load.join(" ")
            ));
        }
        if !d.enable.is_empty() {
            // The unit's own [Install] section decides the links; systemctl runs in the chroot
            // (through qemu-user for arm64) because the host may have no systemd.
            v.push(format!(
                "chroot \"$1\" systemctl enable {}",
                d.enable.join(" ")
            ));
        }
        v
    }

    pub fn argv(&self, out: &Path) -> Vec<String> {
        let d = &self.debian;
        let mut a = vec![
            format!("--variant={}", d.variant),
            format!("--arch={}", self.arch),
            format!("--components={}", d.components.join(",")),
        ];
        if !d.packages.is_empty() {
            a.push(format!("--include={}", d.packages.join(",")));
        }
        if let Some(h) = self.setup_hook() {
            a.push(format!("--setup-hook={h}"));
        }
        if let Some(h) = self.essential_hook() {
            a.push(format!("--essential-hook={h}"));
        }
        a.push(format!("--customize-hook={CUSTOMIZE_HOOK}"));
        for h in self.customize_hooks() {
            a.push(format!("--customize-hook={h}"));
        }
        a.push(d.suite.clone());
        a.push(out.to_string_lossy().into_owned());
        if let Some(m) = &self.mirror {
            a.push(m.clone());
        }
        a
    }
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Checks what mmdebstrap needs before a 15-minute run can fail on it.
pub fn preflight(arch: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("mmdebstrap").is_file()))
        .unwrap_or(false);
    if !found {
        bail!(
            "mmdebstrap is not installed; kiln uses it to build the Debian base. Fix: apt-get install mmdebstrap{}",
            if arch != host_arch() {
                " qemu-user-static binfmt-support"
            } else {
                ""
            }
        );
    }
    if arch != host_arch() {
        let qemu = match arch {
            "arm64" => "qemu-aarch64",
            "amd64" => "qemu-x86_64",
            other => other,
        };
        let dir = std::env::var_os("KILN_BINFMT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/proc/sys/fs/binfmt_misc"));
        let entry = dir.join(qemu);
        let enabled = std::fs::read_to_string(&entry)
            .map(|s| s.lines().next() == Some("enabled"))
            .unwrap_or(false);
        if !enabled {
            bail!(
                "{arch} programs cannot run on this {} host: no qemu-user binfmt handler at {}. \
                 mmdebstrap runs the {arch} packages' maintainer scripts through it. Fix: \
                 apt-get install qemu-user-static binfmt-support; if {} is empty, as root: \
                 mount -t binfmt_misc binfmt_misc {} && update-binfmts --enable {qemu}",
                host_arch(),
                entry.display(),
                dir.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// A base in the cache.
#[derive(Debug, Clone)]
pub struct CachedBase {
    pub path: PathBuf,
    pub key: String,
    /// False when this call built it.
    pub reused: bool,
}

pub fn cached_path(cache: &Cache, recipe: &Recipe) -> Result<PathBuf> {
    Ok(cache
        .dir("bases")?
        .join(format!("{}.tar.zst", recipe.key())))
}

/// Returns the cached base for `recipe`, running mmdebstrap first if there is none.
/// `on_line` gets mmdebstrap's progress lines (`I: ...`).
pub fn ensure(cache: &Cache, recipe: &Recipe, on_line: &dyn Fn(&str)) -> Result<CachedBase> {
    let key = recipe.key();
    let dest = cached_path(cache, recipe)?;
    if dest.is_file() {
        return Ok(CachedBase {
            path: dest,
            key,
            reused: true,
        });
    }
    preflight(recipe.arch)?;
    let dir = cache.dir("bases")?;
    sweep_partials(&dir);
    // mmdebstrap picks the compressor from the extension, so the temporary name keeps it.
    let tmp = dir.join(format!(".{key}.partial-{}.tar.zst", std::process::id()));
    // Ctrl-C or SIGTERM: the unfinished tarball goes (mmdebstrap is stopped first, below).
    let t = tmp.clone();
    let _remove_tmp = crate::cleanup::on_interrupt(move || {
        let _ = std::fs::remove_file(&t);
    });
    let log_path = dir.join(format!("{key}.log"));
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    std::fs::write(
        dir.join(format!("{key}.json")),
        serde_json::to_string_pretty(recipe)? + "\n",
    )?;
    let started = Instant::now();
    let run = Tool::new(
        &format!("mmdebstrap, building {}", recipe.describe()),
        "mmdebstrap",
    )
    .args(recipe.argv(&tmp))
    .run_logged(&mut log, &log_path, &|line| {
        if line.starts_with("I: ") || line.starts_with("W: ") || line.starts_with("E: ") {
            on_line(line);
        }
    });
    if let Err(e) = run {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("moving the base into {}", dest.display()))?;
    let _ = writeln!(log, "# done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(CachedBase {
        path: dest,
        key,
        reused: false,
    })
}

/// Removes unfinished base tarballs (`.<key>.partial-PID.tar.zst`) of kiln runs that are gone.
fn sweep_partials(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_suffix(".tar.zst")
            .filter(|n| n.starts_with('.'))
            .and_then(|n| n.rsplit_once(".partial-"))
            .and_then(|(_, p)| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !crate::cleanup::alive(pid)
            && std::fs::remove_file(e.path()).is_ok()
        {
            crate::progress::note(format!(
                "removed {}, left by an interrupted kiln run",
                e.path().display()
            ));
        }
    }
}

/// Ensures the bases of several boards at once: one mmdebstrap run per distinct recipe, all
/// in parallel (each is mostly one emulated process, so two recipes on two cores take about
/// the time of one). Results come back in the order asked, per board.
pub fn ensure_all(
    cache: &Cache,
    wanted: Vec<(String, Recipe)>,
) -> Vec<(String, Recipe, Result<CachedBase>)> {
    let unique: Vec<(String, Recipe)> = {
        let mut seen = std::collections::HashSet::new();
        wanted
            .iter()
            .filter(|(_, r)| seen.insert(r.key()))
            .cloned()
            .collect()
    };
    let results: Vec<(String, Result<CachedBase, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = unique
            .iter()
            .map(|(board, recipe)| {
                let pb = crate::progress::spinner(format!("{board}: mmdebstrap"));
                s.spawn(move || {
                    let r = ensure(cache, recipe, &|l| pb.set_message(format!("{board}: {l}")));
                    pb.finish_and_clear();
                    (recipe.key(), r.map_err(|e| format!("{e:#}")))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (String::new(), Err("mmdebstrap thread panicked".into())))
            })
            .collect()
    });
    wanted
        .into_iter()
        .map(|(board, recipe)| {
            let key = recipe.key();
            let r = results
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, r)| r.clone())
                .unwrap_or_else(|| Err("not built".into()))
                .map(|mut b| {
                    // Only the first board of a shared recipe built it.
                    b.reused = b.reused || unique.iter().all(|(n, _)| *n != board);
                    b
                })
                .map_err(|e| anyhow!(e));
            (board, recipe, r)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfinished_bases_of_gone_runs_are_swept_and_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("kiln-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        let stale = dir.join(format!(".abc.partial-{dead}.tar.zst"));
        let live = dir.join(format!(".abc.partial-{}.tar.zst", std::process::id()));
        let done = dir.join("abc.tar.zst");
        for f in [&stale, &live, &done] {
            std::fs::write(f, b"x").unwrap();
        }
        sweep_partials(&dir);
        assert!(!stale.exists());
        assert!(live.exists() && done.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn recipe(pkgs: &[&str]) -> DebianRecipe {
        DebianRecipe {
            suite: "trixie".into(),
            components: vec!["main".into()],
            variant: "apt".into(),
            extra_suites: vec!["trixie-backports".into()],
            packages: pkgs.iter().map(|s| s.to_string()).collect(),
            initramfs_modules: vec![],
            modules_load: vec![],
            enable: vec![],
        }
    }

    #[test]
    fn key_follows_the_recipe() {
        let a = Recipe::new(Arch::Arm64, &recipe(&["systemd"]), None);
        let b = Recipe::new(Arch::Arm64, &recipe(&["systemd"]), None);
        let c = Recipe::new(Arch::Arm64, &recipe(&["systemd", "curl"]), None);
        let d = Recipe::new(
            Arch::Arm64,
            &recipe(&["systemd"]),
            Some("http://m.invalid/debian"),
        );
        assert_eq!(a.key(), b.key());
        assert_ne!(a.key(), c.key());
        assert_ne!(a.key(), d.key());
    }

    #[test]
    fn argv_has_suite_output_and_hooks() {
        let r = Recipe::new(Arch::Arm64, &recipe(&["a", "b/trixie-backports"]), None);
        let argv = r.argv(Path::new("/tmp/x.tar.zst"));
        assert!(argv.contains(&"--include=a,b/trixie-backports".to_string()));
        assert!(
            argv.iter()
                .any(|a| a.starts_with("--setup-hook=") && a.contains("trixie-backports"))
        );
        let n = argv.len();
        assert_eq!(argv[n - 2], "trixie");
        assert_eq!(argv[n - 1], "/tmp/x.tar.zst");
    }
}
