//! Board facts as data: Pi 5 board revisions (`variant`), per-board storage targets with the
//! one-time firmware settings they need, and the board-profile rules that guard them. Images
//! are read back with mtools (`mcopy`) and `kiln inspect`.

mod common;

use common::disk::*;
use common::*;

/// Replaces `from` (which must occur once or more; the first is replaced) in a workspace file.
fn edit(ws: &Workspace, file: &str, from: &str, to: &str) {
    let p = ws.path(file);
    let s = std::fs::read_to_string(&p).unwrap();
    assert!(s.contains(from), "fixture text `{from}` not in {file}");
    std::fs::write(&p, s.replacen(from, to, 1)).unwrap();
}

/// Line of the first line that starts with `needle` (comments mentioning it do not count).
fn line_of(ws: &Workspace, file: &str, needle: &str) -> usize {
    let s = std::fs::read_to_string(ws.path(file)).unwrap();
    s.lines()
        .position(|l| l.trim_start().starts_with(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("`{needle}` not in {file}"))
}

/// `kiln check` fails, without a panic, with a line `file:line:` holding every part.
fn expect_check_error(ws: &Workspace, file: &str, line: usize, parts: &[&str]) {
    let o = ws.kiln(&["check"]);
    let err = stderr(&o);
    assert!(!o.status.success(), "check passed; expected {parts:?}");
    assert_ne!(o.status.code(), Some(101), "kiln panicked:\n{err}");
    let prefix = format!("{file}:{line}:");
    assert!(
        err.lines()
            .any(|l| l.contains(&prefix) && parts.iter().all(|p| l.contains(p))),
        "no error line with `{prefix}` and {parts:?} in:\n{err}"
    );
}

const PI5_NODE: &str = "name = \"pi5-staging\"";

fn boot_file(img: &std::path::Path, path: &str) -> String {
    let (_, parts) = sfdisk(img);
    String::from_utf8(mcopy(img, parts[0].start, path)).unwrap()
}

#[test]
fn pi5_d0_variant_boots_the_d0_device_tree() {
    let ws = Workspace::new("boards-d0");
    edit(
        &ws,
        "kiln.toml",
        PI5_NODE,
        &format!("{PI5_NODE}\nvariant = \"d0\""),
    );
    let bases = make_bases(&ws.dir);
    let o = build(&ws, &["pi5-staging"], &bases.gz, None);
    assert_ok(&o, "kiln build pi5-staging (d0)");
    let img = ws.path("out/pi5-staging.img");
    let config = boot_file(&img, "config.txt");
    let dt: Vec<&str> = config
        .lines()
        .filter(|l| l.starts_with("device_tree="))
        .collect();
    assert_eq!(dt, ["device_tree=bcm2712-d-rpi-5-b.dtb"], "{config}");
    // The file it names is on the partition, with the kernel's bytes.
    let (_, parts) = sfdisk(&img);
    assert!(mcopy(&img, parts[0].start, "bcm2712-d-rpi-5-b.dtb") == fixture().rpi5_d_dtb);
    let id: serde_json::Value = serde_json::from_str(&boot_file(&img, "kiln.json")).unwrap();
    assert_eq!(id["variant"], "d0", "{id}");
    let o = ws.kiln(&["inspect", img.to_str().unwrap()]);
    assert_ok(&o, "kiln inspect");
    assert!(stdout(&o).contains("board variant d0"), "{}", stdout(&o));
    let o = ws.kiln(&["inspect", img.to_str().unwrap(), "--json"]);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["identity"]["variant"], "d0", "{j}");

    // Without a variant: the C0/C1 tree and no variant in the identity.
    edit(&ws, "kiln.toml", "variant = \"d0\"\n", "");
    assert_ok(&build(&ws, &["pi5-staging"], &bases.gz, None), "build");
    let config = boot_file(&img, "config.txt");
    assert!(
        config
            .lines()
            .any(|l| l == "device_tree=bcm2712-rpi-5-b.dtb"),
        "{config}"
    );
    let id: serde_json::Value = serde_json::from_str(&boot_file(&img, "kiln.json")).unwrap();
    assert!(id.get("variant").is_none(), "{id}");
}

#[test]
fn a_variant_whose_device_tree_the_kernel_lacks_fails_the_build() {
    let ws = Workspace::new("boards-d0-missing");
    // A revision whose tree this kernel does not ship (copied optionally, so only the
    // variant's own check can catch it).
    edit(
        &ws,
        "boards/rpi5.toml",
        "device_tree = \"bcm2712-d-rpi-5-b.dtb\"",
        "device_tree = \"bcm2712-e-rpi-5-b.dtb\"",
    );
    edit(
        &ws,
        "boards/rpi5.toml",
        "  { from = \"overlays\"",
        "  { from = \"broadcom/bcm2712-e-rpi-5-b.dtb\", to = \"bcm2712-e-rpi-5-b.dtb\", optional = true },\n  { from = \"overlays\"",
    );
    edit(
        &ws,
        "kiln.toml",
        PI5_NODE,
        &format!("{PI5_NODE}\nvariant = \"d0\""),
    );
    let bases = make_bases(&ws.dir);
    let o = build(&ws, &["pi5-staging"], &bases.gz, None);
    assert!(
        !o.status.success(),
        "build passed without the variant's tree"
    );
    let err = stderr(&o);
    assert!(
        err.contains("bcm2712-e-rpi-5-b.dtb") && err.contains("variant `d0`"),
        "{err}"
    );
    assert!(!ws.path("out/pi5-staging.img").exists());
}

#[test]
fn unknown_variants_are_refused_with_the_valid_ones() {
    let ws = Workspace::new("boards-variant-unknown");
    edit(
        &ws,
        "kiln.toml",
        PI5_NODE,
        &format!("{PI5_NODE}\nvariant = \"c1\""),
    );
    let line = line_of(&ws, "kiln.toml", "variant = \"c1\"");
    expect_check_error(
        &ws,
        "kiln.toml",
        line,
        &["node[0].variant", "`c1`", "rpi5", "expected one of: d0"],
    );

    // A board without variants says so.
    let ws = Workspace::new("boards-variant-none");
    edit(
        &ws,
        "kiln.toml",
        "name = \"rk1-2\"",
        "name = \"rk1-2\"\nvariant = \"d0\"",
    );
    let line = line_of(&ws, "kiln.toml", "variant = \"d0\"");
    expect_check_error(
        &ws,
        "kiln.toml",
        line,
        &["node[2].variant", "rk1", "has no variants"],
    );
}

#[test]
fn targets_are_per_board() {
    let ws = Workspace::new("boards-targets");
    // eMMC is an RK1 target, not a Pi 5 one.
    edit(&ws, "kiln.toml", "target = \"usb\"", "target = \"emmc\"");
    let line = line_of(&ws, "kiln.toml", "target = \"emmc\"");
    expect_check_error(
        &ws,
        "kiln.toml",
        line,
        &["node[0].target", "`emmc`", "rpi5", "nvme, sd, usb"],
    );

    // A [defaults] target that one node's board lacks names the default and the node.
    let ws = Workspace::new("boards-targets-default");
    edit(&ws, "kiln.toml", "target = \"usb\"\n", "");
    edit(
        &ws,
        "kiln.toml",
        "[defaults]\n",
        "[defaults]\ntarget = \"emmc\"\n",
    );
    let line = line_of(&ws, "kiln.toml", "target = \"emmc\"");
    expect_check_error(
        &ws,
        "kiln.toml",
        line,
        &["defaults.target", "pi5-staging", "rpi5"],
    );
}

#[test]
fn pi5_targets_print_their_eeprom_settings_and_add_no_dtparam() {
    let ws = Workspace::new("boards-eeprom");
    let bases = make_bases(&ws.dir);
    // The shipped inventory: the staging Pi boots from USB.
    let o = build(&ws, &["pi5-staging"], &bases.gz, None);
    assert_ok(&o, "build usb");
    let out = stdout(&o);
    assert!(
        out.contains("sudo rpi-eeprom-config --edit") && out.contains("BOOT_ORDER=0xf14"),
        "{out}"
    );
    let img = ws.path("out/pi5-staging.img");
    let config = boot_file(&img, "config.txt");
    assert!(!config.contains("dtparam"), "{config}");
    // kiln write says it again, where the user is about to boot the drive.
    let disk = ws.path("usb-drive.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(std::fs::metadata(&img).unwrap().len() + (64 << 20))
        .unwrap();
    let o = ws.kiln(&[
        "write",
        img.to_str().unwrap(),
        disk.to_str().unwrap(),
        "--yes",
    ]);
    assert_ok(&o, "kiln write");
    assert!(stdout(&o).contains("BOOT_ORDER=0xf14"), "{}", stdout(&o));

    // NVMe on the PCIe slot: NVMe in the boot order and PCIE_PROBE, still no dtparam.
    edit(&ws, "kiln.toml", "target = \"usb\"", "target = \"nvme\"");
    let o = build(&ws, &["pi5-staging"], &bases.gz, None);
    assert_ok(&o, "build nvme");
    let out = stdout(&o);
    assert!(
        out.contains("BOOT_ORDER=0xf416") && out.contains("PCIE_PROBE=1"),
        "{out}"
    );
    let config = boot_file(&img, "config.txt");
    assert!(!config.contains("pciex1"), "{config}");
    let o = ws.kiln(&["inspect", img.to_str().unwrap()]);
    assert!(
        stdout(&o).contains("boots from nvme") && stdout(&o).contains("PCIE_PROBE=1"),
        "{}",
        stdout(&o)
    );

    // An SD card needs nothing: no advice at all.
    edit(&ws, "kiln.toml", "target = \"nvme\"", "target = \"sd\"");
    let o = build(&ws, &["pi5-staging"], &bases.gz, None);
    assert_ok(&o, "build sd");
    assert!(!stdout(&o).contains("BOOT_ORDER"), "{}", stdout(&o));
}

#[test]
fn the_bmc_flashes_only_targets_it_can_write() {
    let ws = Workspace::new("boards-flash-nvme");
    edit(
        &ws,
        "kiln.toml",
        "name = \"rk1-3\"",
        "name = \"rk1-3\"\ntarget = \"nvme\"",
    );
    assert_ok(&ws.kiln(&["check"]), "check with an NVMe RK1");
    // The RK1's NVMe keeps its loader on the eMMC (`loader_on`): the BMC flashes that, and
    // only with the system image of the same build beside it.
    let o = ws.kiln_env(&["flash", "rk1-3"], &[("KILN_BMC_PASSWORD", "x")]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("rk1-3.img") && err.contains("kiln build rk1-3"),
        "{err}"
    );
    // A target the BMC cannot write and that keeps no loader elsewhere is refused outright.
    edit(&ws, "boards/rk1.toml", "loader_on = \"emmc\"", "");
    let o = ws.kiln_env(&["flash", "rk1-3"], &[("KILN_BMC_PASSWORD", "x")]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("rk1-3") && err.contains("`nvme`") && err.contains("kiln write"),
        "{err}"
    );
}

#[test]
fn board_profile_rules_for_targets_and_variants() {
    let cases: &[(&str, &str, &str, &[&str])] = &[
        // default_target must be declared.
        (
            "boards/rpi5.toml",
            "default_target = \"sd\"",
            "default_target = \"ssd\"",
            &["default_target", "`ssd`", "nvme, sd, usb"],
        ),
        // A variant's tree must be one the boot partition gets.
        (
            "boards/rpi5.toml",
            "device_tree = \"bcm2712-d-rpi-5-b.dtb\"",
            "device_tree = \"bcm2712-z.dtb\"",
            &[
                "variant.d0.device_tree",
                "bcm2712-z.dtb",
                "[devicetree] copy",
            ],
        ),
        // Firmware settings need the command that sets them.
        (
            "boards/rpi5.toml",
            "eeprom_tool = \"sudo rpi-eeprom-config --edit\"\n",
            "",
            &["target.nvme.eeprom", "eeprom_tool"],
        ),
        // A setting is one line: no newline can smuggle in another.
        (
            "boards/rpi5.toml",
            "eeprom = [\"BOOT_ORDER=0xf14\"]",
            "eeprom = [\"BOOT_ORDER=0xf14\\nPOWER_OFF_ON_HALT=1\"]",
            &["target.usb.eeprom", "not one line"],
        ),
        // extlinux boards take their tree from U-Boot.
        (
            "boards/rk1.toml",
            "[target.nvme]",
            "[variant.x]\ndescription = \"x\"\ndevice_tree = \"x.dtb\"\n\n[target.nvme]",
            &["variant.x.device_tree", "$fdtfile"],
        ),
        // Module names go into a shell hook: plain names only.
        (
            "boards/rk1.toml",
            "\"sdhci-of-dwcmshc\",",
            "\"sdhci; reboot\",",
            &["debian.initramfs_modules", "not a kernel module name"],
        ),
        (
            "boards/rk1.toml",
            "enable = [\"iscsid.service\"]",
            "enable = [\"iscsid\"]",
            &["debian.enable", "not a systemd unit name"],
        ),
    ];
    for (file, from, to, parts) in cases {
        let ws = Workspace::new("boards-rules");
        edit(&ws, file, from, to);
        let o = ws.kiln(&["check"]);
        let err = stderr(&o);
        assert!(!o.status.success(), "{file}: `{to}` passed the check");
        assert_ne!(o.status.code(), Some(101), "kiln panicked:\n{err}");
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("{file}:")) && parts.iter().all(|p| l.contains(p))),
            "{file}: `{to}`: no error with {parts:?} in:\n{err}"
        );
    }
}
