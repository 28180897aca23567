//! Day two on the node: the boot partition mounted at `/boot/firmware`, and `kiln-boot-sync`
//! run by Debian's kernel and initramfs hooks, with the board's boot data it needs
//! (`/etc/kiln/boot.env`; for the Pi firmware, the image's `config.txt`).

use crate::config::board::BootStyle;
use crate::plan::NodePlan;
use crate::plan::boot::{cmdline, rpi_config_txt};
use crate::tree::Tree;

const BOOT_SYNC_SH: &str = include_str!("../../firstboot/kiln-boot-sync.sh");

/// Where the boot partition is mounted on every node.
pub const BOOT_MOUNT: &str = "/boot/firmware";

/// The hook every kernel install, removal and initramfs update runs (named `zz-` to run after
/// initramfs-tools' own hook has made the initramfs).
const HOOK: &str = "#!/bin/sh\n\
# Installed by kiln: keep the boot partition in step with the installed kernels.\n\
exec /usr/lib/kiln/kiln-boot-sync\n";

/// After every dpkg run apt makes: the kernel hooks run in the middle of a transaction, and a
/// kernel removed as Debian's split packages (linux-image-V runs the hooks, linux-binary-V
/// holds /boot/vmlinuz-V) is only gone once the whole transaction is. Never fails apt.
const APT_HOOK: &str = "// Installed by kiln: bring the boot partition in step with the installed kernels once\n\
// dpkg is done (see /usr/lib/kiln/kiln-boot-sync).\n\
DPkg::Post-Invoke { \"if [ -x /usr/lib/kiln/kiln-boot-sync ]; then /usr/lib/kiln/kiln-boot-sync || echo 'kiln-boot-sync failed; the boot partition is as it was' >&2; fi\"; };\n";

/// A value for a shell file that is sourced: single-quoted, quotes escaped.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The board data `kiln-boot-sync` works from.
pub fn boot_env(plan: &NodePlan) -> String {
    let spec = &plan.board.spec;
    let copies: Vec<String> = spec
        .devicetree
        .copy
        .iter()
        .map(|c| {
            let need = if c.optional { "optional" } else { "required" };
            format!("{}:{}:{need}", c.from, c.to)
        })
        .collect();
    let style = match spec.boot {
        BootStyle::Extlinux => "extlinux",
        BootStyle::RpiFirmware => "rpi-firmware",
        BootStyle::SystemdBoot => "systemd-boot",
    };
    let vars = [
        ("KILN_BOOT_STYLE", style.to_string()),
        ("KILN_BOOT_DIR", BOOT_MOUNT.to_string()),
        ("KILN_KERNEL_FILE", spec.kernel.file.clone()),
        ("KILN_INITRD_FILE", spec.kernel.initrd.clone()),
        ("KILN_DTB_COPIES", copies.join(" ")),
        (
            "KILN_FDTDIR",
            spec.devicetree.fdtdir.clone().unwrap_or_default(),
        ),
        ("KILN_CMDLINE", cmdline(plan)),
        ("KILN_NODE", plan.node.name.clone()),
        ("KILN_BOARD", plan.board.name().to_string()),
    ];
    let mut s = String::from(
        "# Written by kiln from the board profile: what kiln-boot-sync puts on the boot partition.\n",
    );
    for (k, v) in vars {
        s.push_str(&format!("{k}={}\n", sh_quote(&v)));
    }
    s
}

/// `/etc/fstab`: the root is mounted by the kernel (`root=PARTUUID=… rw`); the boot partition
/// is mounted so that users and the kernel hooks see what will boot. `nofail`: a node whose
/// boot partition cannot be mounted still comes up (the hook then refuses to run).
pub fn fstab(plan: &NodePlan) -> String {
    format!(
        "# Written by kiln. / is mounted by the kernel (root=PARTUUID={root} rw).\n\
         PARTUUID={boot}\t{BOOT_MOUNT}\tvfat\tdefaults,noatime,nofail\t0\t0\n",
        root = plan.root_partuuid(),
        boot = plan.boot_partuuid(),
    )
}

/// Adds the mount, the sync script, its hooks and its data.
pub fn add(t: &mut Tree, plan: &NodePlan) {
    t.file("etc/fstab", 0o644, fstab(plan));
    t.dir(BOOT_MOUNT.trim_start_matches('/'), 0o755);
    t.file("usr/lib/kiln/kiln-boot-sync", 0o755, BOOT_SYNC_SH);
    for dir in [
        "etc/kernel/postinst.d",
        "etc/kernel/postrm.d",
        "etc/initramfs/post-update.d",
    ] {
        t.file(&format!("{dir}/zz-kiln-boot-sync"), 0o755, HOOK);
    }
    t.file("etc/apt/apt.conf.d/99kiln-boot-sync", 0o644, APT_HOOK);
    t.file("etc/kiln/boot.env", 0o644, boot_env(plan));
    if plan.board.spec.boot == BootStyle::RpiFirmware {
        t.file("etc/kiln/boot/config.txt", 0o644, rpi_config_txt(plan));
    }
}

#[cfg(test)]
mod tests {
    use super::sh_quote;

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
    }
}
