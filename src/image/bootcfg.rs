//! What the boot partition holds: kernel, initramfs, device trees and the firmware- or
//! U-Boot-facing configuration, derived from the board profile and the node plan.

use super::fat::BootFiles;
use crate::config::board::BootStyle;
use crate::plan::NodePlan;
use crate::plan::boot::{bls_entry, cmdline, extlinux_conf, loader_conf, rpi_config_txt};
use crate::rootfs::base::KernelFiles;
use anyhow::{Result, bail};

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
    for c in &spec.boot_files {
        let Some(data) = kernel.extra.get(&c.from) else {
            bail!(
                "the base has no /{}; board {} copies it to the boot partition as {} (install package {} in the base)",
                c.from,
                plan.board.name(),
                c.to,
                c.package
            );
        };
        files.insert(c.to.clone(), data.clone());
    }
    match spec.boot {
        BootStyle::SystemdBoot => {
            files.insert("loader/loader.conf".into(), loader_conf(plan).into_bytes());
            let title = format!(
                "{} ({}, kernel {})",
                plan.node.name,
                plan.board.name(),
                kernel.version
            );
            files.insert(
                "loader/entries/kiln.conf".into(),
                bls_entry(
                    plan,
                    &title,
                    &kernel.version,
                    &spec.kernel.file,
                    &spec.kernel.initrd,
                )
                .into_bytes(),
            );
        }
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
