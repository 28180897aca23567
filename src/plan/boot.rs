//! The boot configuration a node's firmware or U-Boot reads, as text: derived from the board
//! profile and the node's plan alone, so the image stage (the boot partition) and the rootfs
//! stage (what `kiln-boot-sync` rewrites it from on the node) say the same.

use super::NodePlan;

/// The kernel command line: `root=PARTUUID=...`, the board's words, then the consoles
/// (the last `console=` becomes /dev/console).
pub fn cmdline(plan: &NodePlan) -> String {
    let k = &plan.board.spec.kernel;
    let mut words = vec![format!("root=PARTUUID={}", plan.root_partuuid())];
    words.extend(k.cmdline.iter().cloned());
    words.extend(k.consoles.iter().map(|c| format!("console={c}")));
    words.join(" ")
}

pub fn extlinux_conf(plan: &NodePlan, version: &str) -> String {
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

pub fn rpi_config_txt(plan: &NodePlan) -> String {
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

/// systemd-boot's `loader/loader.conf`: the kiln entry by default, a short menu, and no
/// command-line editor (at the console it would allow `init=/bin/sh`).
pub fn loader_conf(plan: &NodePlan) -> String {
    format!(
        "# Written by kiln for {}. systemd-boot reads this file.\n\
         default kiln.conf\n\
         timeout 3\n\
         editor no\n",
        plan.node.name
    )
}

/// A Boot Loader Specification (type 1) entry, `loader/entries/<id>.conf`: `linux` and
/// `initrd` are paths on the EFI system partition.
pub fn bls_entry(plan: &NodePlan, title: &str, version: &str, linux: &str, initrd: &str) -> String {
    format!(
        "# Written by kiln for {node}.\n\
         title {title}\n\
         version {version}\n\
         linux /{linux}\n\
         initrd /{initrd}\n\
         options {options}\n",
        node = plan.node.name,
        linux = linux.trim_start_matches('/'),
        initrd = initrd.trim_start_matches('/'),
        options = cmdline(plan),
    )
}
