//! What the boot partition holds: kernel, initramfs, device trees and the firmware- or
//! U-Boot-facing configuration, derived from the board profile and the node plan.

use super::fat::BootFiles;
use crate::config::board::BootStyle;
use crate::plan::NodePlan;
use crate::rootfs::base::KernelFiles;
use anyhow::{Result, bail};

/// The kernel command line: `root=PARTUUID=...`, the board's words, then the consoles
/// (the last `console=` becomes /dev/console).
pub fn cmdline(plan: &NodePlan) -> String {
    let k = &plan.board.spec.kernel;
    let mut words = vec![format!("root=PARTUUID={}", plan.root_partuuid())];
    words.extend(k.cmdline.iter().cloned());
    words.extend(k.consoles.iter().map(|c| format!("console={c}")));
    words.join(" ")
}

fn extlinux_conf(plan: &NodePlan, version: &str) -> String {
    let k = &plan.board.spec.kernel;
    // Invariant: board validation requires fdtdir for extlinux boards.
    let fdtdir = plan.board.spec.devicetree.fdtdir.as_deref().unwrap_or("/");
    format!(
        "# Written by kiln for {node}. U-Boot distro boot reads this file.\n\
         # `fdtdir` (not `fdt`): U-Boot loads $fdtfile from it, and where $fdtfile is unset\n\
         # (QEMU) it falls back to its own device tree instead of skipping this entry.\n\
         default kiln\n\
         menu title kiln: {node}\n\
         timeout 10\n\
         \n\
         label kiln\n\
         \x20   menu label {node} ({board}, kernel {ver})\n\
         \x20   kernel /{kernel}\n\
         \x20   initrd /{initrd}\n\
         \x20   fdtdir {fdtdir}\n\
         \x20   append {append}\n",
        node = plan.node.name,
        board = plan.board.name(),
        ver = version,
        kernel = k.file,
        initrd = k.initrd,
        append = cmdline(plan),
    )
}

fn rpi_config_txt(plan: &NodePlan) -> String {
    let spec = &plan.board.spec;
    let mut s = format!(
        "# Written by kiln for {}. Read by the Raspberry Pi 5 EEPROM firmware.\n\
         kernel={}\n\
         initramfs {} followkernel\n\
         device_tree={}\n\
         enable_uart=1\n",
        plan.node.name,
        spec.kernel.file,
        spec.kernel.initrd,
        plan.device_tree().unwrap_or_default(),
    );
    let target_lines = plan
        .target()
        .map(|t| t.config.as_slice())
        .unwrap_or_default();
    for l in spec.rpi.config.iter().chain(target_lines) {
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// Every file of the boot partition.
pub fn boot_files(plan: &NodePlan, kernel: &KernelFiles, identity_json: &str) -> Result<BootFiles> {
    let spec = &plan.board.spec;
    let mut files = BootFiles::new();
    files.insert(spec.kernel.file.clone(), kernel.vmlinuz.clone());
    files.insert(spec.kernel.initrd.clone(), kernel.initrd.clone());
    for c in &spec.devicetree.copy {
        let prefix = format!("{}/", c.from);
        let mut any = false;
        for (rel, data) in &kernel.dtbs {
            let dest = if *rel == c.from {
                c.to.clone()
            } else if let Some(rest) = rel.strip_prefix(&prefix) {
                format!("{}/{rest}", c.to)
            } else {
                continue;
            };
            files.insert(dest.trim_start_matches('/').to_string(), data.clone());
            any = true;
        }
        if !any && !c.optional {
            bail!(
                "kernel {} in the base has no device tree `{}` (looked under /usr/lib/linux-image-{}/ and /usr/lib/modules/{}/dtb/); board {} needs it",
                kernel.version,
                c.from,
                kernel.version,
                kernel.version,
                plan.board.name()
            );
        }
    }
    // The firmware reads the device tree config.txt names from the FAT root; a missing one
    // (say the D0 tree from a kernel without it) must fail the build, not the boot.
    if spec.boot == BootStyle::RpiFirmware
        && let Some(dt) = plan.device_tree()
        && !files.contains_key(dt)
    {
        bail!(
            "kernel {} in the base has no device tree for {}{}: `{dt}` is not among the files copied to the boot partition (from /usr/lib/linux-image-{}/ or /usr/lib/modules/{}/dtb/); use a base whose kernel ships it",
            kernel.version,
            plan.board.name(),
            plan.node
                .variant
                .as_deref()
                .map(|v| format!(" variant `{v}`"))
                .unwrap_or_default(),
            kernel.version,
            kernel.version,
        );
    }
    match spec.boot {
        BootStyle::Extlinux => {
            let conf = extlinux_conf(plan, &kernel.version);
            files.insert("extlinux/extlinux.conf".into(), conf.into_bytes());
        }
        BootStyle::RpiFirmware => {
            files.insert("config.txt".into(), rpi_config_txt(plan).into_bytes());
            files.insert(
                "cmdline.txt".into(),
                format!("{}\n", cmdline(plan)).into_bytes(),
            );
        }
    }
    files.insert("kiln.json".into(), identity_json.as_bytes().to_vec());
    Ok(files)
}
