//! Board profiles (`boards/*.toml`): what a board's boot chain needs from a disk image, as data.

use super::diag::{Diagnostic, Source};
use super::size::{ByteSize, MAX_DISK, MIB};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Arm64,
    Amd64,
}

impl Arch {
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Arm64 => "arm64",
            Arch::Amd64 => "amd64",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootStyle {
    /// Raspberry Pi EEPROM firmware reading config.txt/cmdline.txt from a FAT partition.
    RpiFirmware,
    /// U-Boot distro boot reading /extlinux/extlinux.conf from the bootable partition.
    Extlinux,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Gpt,
    Mbr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Vfat,
    Ext4,
}

/// What a partition is filled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Content {
    /// Kernel, initramfs, device trees and the boot configuration.
    Boot,
    /// The root filesystem (base + overlays + per-node files).
    Rootfs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartSize {
    Fixed(ByteSize),
    /// Sized to the content plus headroom.
    Auto,
}

impl<'de> Deserialize<'de> for PartSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use super::size::{RawSize, RawSizeVisitor};
        // A visitor, not an untagged enum: its errors say what was expected instead of "data
        // did not match any variant".
        match d.deserialize_any(RawSizeVisitor(", or \"auto\""))? {
            RawSize::Bytes(n) => Ok(PartSize::Fixed(ByteSize(n))),
            RawSize::Text(s) if s == "auto" => Ok(PartSize::Auto),
            RawSize::Text(s) => ByteSize::parse(&s)
                .map(PartSize::Fixed)
                .map_err(|e| serde::de::Error::custom(format!("{e}, or \"auto\""))),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionTable {
    pub kind: TableKind,
    /// GPT only; kept at 34 (some Pi 5 EEPROMs and Windows mishandle other values).
    #[serde(default = "default_first_usable_lba")]
    pub first_usable_lba: u64,
}

fn default_first_usable_lba() -> u64 {
    34
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    pub name: String,
    pub fs: FsKind,
    pub content: Content,
    pub size: PartSize,
    /// Byte offset; when absent the partition follows the previous one, 1 MiB aligned.
    pub start: Option<ByteSize>,
    #[serde(default)]
    pub bootable: bool,
    /// Filesystem label.
    pub label: String,
    /// GPT: `esp`, `basic-data`, `linux`, `linux-root-arm64`, `linux-root-amd64` or a GUID.
    /// MBR: a type byte such as `0x0c` or `0x83`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `size = "auto"` only: free space left in the filesystem (default 256MiB); it grows to
    /// the whole disk on first boot.
    pub headroom: Option<ByteSize>,
}

/// A raw file written at a fixed byte offset of the disk (e.g. the RK1's U-Boot).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blob {
    /// Name of the artifact (`--artifact NAME=PATH`) that supplies the bytes.
    pub artifact: String,
    pub offset: ByteSize,
    /// What kind of boot loader the bytes are, if kiln should check them (and accept a whole
    /// vendor disk image holding one); absent: written as given.
    #[serde(default)]
    pub loader: Option<LoaderKind>,
}

/// Boot loaders kiln knows how to recognise (see `image::loader`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoaderKind {
    /// Rockchip idbloader (+ U-Boot proper): header magic `RKNS` at its first byte.
    Rockchip,
}

/// An input the user must supply because kiln cannot build or download it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactSpec {
    pub name: String,
    pub description: String,
    /// Where users get it; printed when it is missing.
    pub source: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    /// File name of the kernel on the boot partition.
    pub file: String,
    /// File name of the initramfs on the boot partition.
    pub initrd: String,
    /// Extra kernel command line words (`root=` is added by kiln).
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// Serial consoles, `tty,baud`; the last one becomes /dev/console.
    #[serde(default)]
    pub consoles: Vec<String>,
}

/// A file or directory copied from the kernel's device tree directory onto the boot partition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DtbCopy {
    /// Relative to the kernel's dtb directory, e.g. `rockchip` or `broadcom/bcm2712-rpi-5-b.dtb`.
    pub from: String,
    /// Path on the boot partition.
    pub to: String,
    #[serde(default)]
    pub optional: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTree {
    #[serde(default)]
    pub copy: Vec<DtbCopy>,
    /// extlinux: directory given to `fdtdir` (U-Boot appends `$fdtfile`).
    pub fdtdir: Option<String>,
    /// rpi-firmware: the `device_tree=` file.
    pub device_tree: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpiConfig {
    /// Extra lines for config.txt.
    #[serde(default)]
    pub config: Vec<String>,
}

/// A storage device the board boots from (`[target.NAME]`); a node picks one with `target`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub description: String,
    /// The Turing Pi BMC writes this device (`kiln flash`); otherwise `kiln write`.
    #[serde(default)]
    pub bmc_flash: bool,
    /// One-time firmware settings this device needs to boot (the Pi 5's EEPROM). An image
    /// cannot change them, so `kiln build` and `kiln write` print them.
    #[serde(default)]
    pub eeprom: Vec<String>,
    /// Extra config.txt lines for this device (rpi-firmware boards).
    #[serde(default)]
    pub config: Vec<String>,
}

/// A board revision that needs different boot files (`[variant.NAME]`); a node picks one with
/// `variant`, and without one gets the board's defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    pub description: String,
    /// rpi-firmware: the `device_tree=` file for this revision (copied by `[devicetree] copy`).
    pub device_tree: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardFile {
    pub name: String,
    pub description: String,
    pub arch: Arch,
    /// Number of carrier-board slots (Turing Pi 2: 4); absent for boards without slots.
    pub slots: Option<u8>,
    pub boot: BootStyle,
    pub partition_table: PartitionTable,
    #[serde(default, rename = "partition")]
    pub partitions: Vec<Partition>,
    #[serde(default, rename = "blob")]
    pub blobs: Vec<Blob>,
    #[serde(default, rename = "artifact")]
    pub artifacts: Vec<ArtifactSpec>,
    pub kernel: Kernel,
    pub devicetree: DeviceTree,
    #[serde(default)]
    pub rpi: RpiConfig,
    /// Command that edits the firmware settings of `[target.*] eeprom` (printed with them).
    pub eeprom_tool: Option<String>,
    /// Storage devices the board boots from; a node without `target` gets `default_target`.
    #[serde(rename = "target")]
    pub targets: BTreeMap<String, TargetSpec>,
    pub default_target: String,
    /// Board revisions with their own boot files.
    #[serde(default, rename = "variant")]
    pub variants: BTreeMap<String, VariantSpec>,
    /// How kiln builds this board's base root filesystem; without it, `--artifact base=` is needed.
    pub debian: Option<DebianRecipe>,
}

/// A Debian root filesystem recipe for mmdebstrap. The base cache is keyed by it, so boards with
/// the same recipe share one base.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DebianRecipe {
    /// Release, e.g. `trixie`.
    pub suite: String,
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    /// mmdebstrap variant (`apt` = Essential + apt, then only the listed packages).
    #[serde(default = "default_variant")]
    pub variant: String,
    /// Further suites from the same mirror, e.g. `trixie-backports`; packages pick them with
    /// apt's `name/suite` syntax.
    #[serde(default)]
    pub extra_suites: Vec<String>,
    pub packages: Vec<String>,
    /// Kernel modules the board needs before its root is mounted (storage, PCIe, USB): an
    /// initramfs-tools hook adds and loads them in every initramfs the base ever builds,
    /// including those `apt` builds for later kernels.
    #[serde(default)]
    pub initramfs_modules: Vec<String>,
    /// Kernel modules loaded at every boot (`/etc/modules-load.d/kiln.conf`).
    #[serde(default)]
    pub modules_load: Vec<String>,
    /// systemd units enabled in the base (e.g. `iscsid.service` for Longhorn).
    #[serde(default)]
    pub enable: Vec<String>,
}

fn default_components() -> Vec<String> {
    vec!["main".to_string()]
}

fn default_variant() -> String {
    "apt".to_string()
}

/// A validated board profile.
#[derive(Debug, Clone)]
pub struct Board {
    pub path: PathBuf,
    /// sha256 of the profile's bytes, so a build can tell which profile it came from.
    pub sha256: String,
    pub spec: BoardFile,
}

impl Board {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn artifact(&self, name: &str) -> Option<&ArtifactSpec> {
        self.spec.artifacts.iter().find(|a| a.name == name)
    }

    /// `nvme, sd, usb`: for messages about an unknown target.
    pub fn target_names(&self) -> String {
        let v: Vec<&str> = self.spec.targets.keys().map(String::as_str).collect();
        v.join(", ")
    }

    /// `d0`: for messages about an unknown variant.
    pub fn variant_names(&self) -> String {
        let v: Vec<&str> = self.spec.variants.keys().map(String::as_str).collect();
        if v.is_empty() {
            "none (this board has no variants)".into()
        } else {
            v.join(", ")
        }
    }
}

/// Reads every `*.toml` in `dir`, validating each; returns the boards by name.
pub fn load_dir(dir: &Path) -> Result<BTreeMap<String, Board>, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let mut boards = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            return Err(vec![Diagnostic {
                file: dir.to_path_buf(),
                line: 0,
                col: 0,
                field: "boards".into(),
                message: format!("cannot read the board directory: {e}"),
            }]);
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        match load_file(&path) {
            Ok(b) => {
                boards.insert(b.spec.name.clone(), b);
            }
            Err(mut d) => diags.append(&mut d),
        }
    }
    if diags.is_empty() {
        Ok(boards)
    } else {
        Err(diags)
    }
}

pub fn load_file(path: &Path) -> Result<Board, Vec<Diagnostic>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Diagnostic {
            file: path.to_path_buf(),
            line: 0,
            col: 0,
            field: "board".into(),
            message: format!("cannot read: {e}"),
        }]
    })?;
    let sha256 = crate::util::sha256_hex(text.as_bytes());
    let src = Source::new(path, text);
    let spec: BoardFile = toml::from_str(&src.text).map_err(|e| vec![src.from_toml_error(&e)])?;
    let diags = validate(&src, &spec);
    if diags.is_empty() {
        Ok(Board {
            path: path.to_path_buf(),
            sha256,
            spec,
        })
    } else {
        Err(diags)
    }
}

/// Names that end up on mmdebstrap's command line: no spaces, commas or shell syntax.
fn is_plain_word(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-+._:/~=".contains(&c))
}

fn validate_recipe(
    src: &Source,
    d: &mut Vec<Diagnostic>,
    r: &DebianRecipe,
    key_span: &dyn Fn(&str) -> std::ops::Range<usize>,
) {
    const VARIANTS: &[&str] = &[
        "extract",
        "custom",
        "essential",
        "apt",
        "required",
        "minbase",
        "buildd",
        "important",
        "debootstrap",
        "standard",
    ];
    if !VARIANTS.contains(&r.variant.as_str()) {
        d.push(src.diag(
            key_span("variant"),
            "debian.variant",
            format!(
                "unknown variant `{}`; expected one of: {}",
                r.variant,
                VARIANTS.join(", ")
            ),
        ));
    }
    let lists: [(&str, Vec<&String>); 4] = [
        ("suite", vec![&r.suite]),
        ("components", r.components.iter().collect()),
        ("extra_suites", r.extra_suites.iter().collect()),
        ("packages", r.packages.iter().collect()),
    ];
    for (field, values) in lists {
        for v in values {
            if !is_plain_word(v) {
                d.push(src.diag(
                    key_span(field),
                    format!("debian.{field}"),
                    format!(
                        "`{v}` is not a plain name; expected letters, digits and -+._:/~= only"
                    ),
                ));
            }
        }
    }
    let modules: [(&str, &Vec<String>); 2] = [
        ("initramfs_modules", &r.initramfs_modules),
        ("modules_load", &r.modules_load),
    ];
    for (field, values) in modules {
        for m in values {
            if m.is_empty()
                || !m
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            {
                d.push(src.diag(
                    key_span(field),
                    format!("debian.{field}"),
                    format!("`{m}` is not a kernel module name; expected letters, digits, - and _"),
                ));
            }
        }
    }
    for u in &r.enable {
        let ok = u
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.@".contains(&c))
            && [".service", ".socket", ".timer", ".path", ".target"]
                .iter()
                .any(|x| u.len() > x.len() && u.ends_with(x));
        if !ok {
            d.push(src.diag(
                key_span("enable"),
                "debian.enable",
                format!("`{u}` is not a systemd unit name; expected e.g. iscsid.service"),
            ));
        }
    }
    for p in &r.packages {
        if let Some((_, suite)) = p.split_once('/')
            && suite != r.suite
            && !r.extra_suites.iter().any(|s| s == suite)
        {
            d.push(src.diag(
                key_span("packages"),
                "debian.packages",
                format!(
                    "`{p}` asks for suite `{suite}`, which the recipe does not use; expected it in extra_suites"
                ),
            ));
        }
    }
}

/// A line kiln writes into a generated file or prints as a setting: one line, no control
/// characters (no newline can inject configuration).
fn is_one_line(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(char::is_control)
}

/// Names of targets and variants: they appear in the inventory and in messages.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_')
}

fn validate_targets_and_variants(
    src: &Source,
    d: &mut Vec<Diagnostic>,
    b: &BoardFile,
    key_span: &dyn Fn(&str) -> std::ops::Range<usize>,
) {
    if b.targets.is_empty() {
        d.push(src.diag(
            key_span("default_target"),
            "target",
            "no [target.NAME] table; expected at least one storage device the board boots from",
        ));
    }
    if !b.targets.contains_key(&b.default_target) {
        let names: Vec<&str> = b.targets.keys().map(String::as_str).collect();
        d.push(src.diag(
            key_span("default_target"),
            "default_target",
            format!(
                "`{}` is not a [target.*] of this board; expected one of: {}",
                b.default_target,
                names.join(", ")
            ),
        ));
    }
    for (name, t) in &b.targets {
        let at = key_span(&format!("[target.{name}]"));
        if !is_name(name) {
            d.push(src.diag(
                at.clone(),
                format!("target.{name}"),
                "target names are lower-case letters, digits, - and _",
            ));
        }
        for (field, lines) in [("eeprom", &t.eeprom), ("config", &t.config)] {
            for l in lines {
                if !is_one_line(l) {
                    d.push(src.diag(
                        at.clone(),
                        format!("target.{name}.{field}"),
                        format!("{l:?} is not one line; expected a single setting without control characters"),
                    ));
                }
            }
        }
        if !t.eeprom.is_empty() && b.eeprom_tool.is_none() {
            d.push(src.diag(
                at.clone(),
                format!("target.{name}.eeprom"),
                "firmware settings need `eeprom_tool` (the command users run to set them)",
            ));
        }
        if !t.config.is_empty() && b.boot != BootStyle::RpiFirmware {
            d.push(src.diag(
                at,
                format!("target.{name}.config"),
                "config.txt lines are only for rpi-firmware boards",
            ));
        }
    }
    for (name, v) in &b.variants {
        let at = key_span(&format!("[variant.{name}]"));
        if !is_name(name) {
            d.push(src.diag(
                at.clone(),
                format!("variant.{name}"),
                "variant names are lower-case letters, digits, - and _",
            ));
        }
        match (&v.device_tree, b.boot) {
            (Some(_), BootStyle::Extlinux) => d.push(src.diag(
                at,
                format!("variant.{name}.device_tree"),
                "extlinux boards take the device tree from U-Boot's $fdtfile; expected no device_tree",
            )),
            (Some(dt), BootStyle::RpiFirmware) => {
                // The firmware reads it from the FAT root: it must be one of the copied files.
                let copied = b.devicetree.copy.iter().any(|c| c.to == *dt);
                if !copied {
                    d.push(src.diag(
                        at,
                        format!("variant.{name}.device_tree"),
                        format!(
                            "`{dt}` is not the `to` of any [devicetree] copy; expected the file the firmware will find on the boot partition"
                        ),
                    ));
                }
            }
            (None, _) => {}
        }
    }
}

const GPT_TYPES: &[(&str, &str)] = &[
    ("esp", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
    ("basic-data", "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
    ("linux", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
    ("linux-root-arm64", "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"),
    ("linux-root-amd64", "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
];

/// GPT partition type GUID (textual, upper case) for a profile's `type`.
pub fn gpt_type_guid(t: &str) -> Option<String> {
    if let Some((_, g)) = GPT_TYPES.iter().find(|(n, _)| *n == t) {
        return Some((*g).to_string());
    }
    crate::util::parse_guid(t).map(|_| t.to_ascii_uppercase())
}

/// MBR partition type byte for a profile's `type` (`0x0c`, `0x83`, ...).
pub fn mbr_type_byte(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X"))?;
    u8::from_str_radix(hex, 16).ok().filter(|b| *b != 0)
}

/// Byte where the primary GPT (protective MBR + header + 128 entries) ends.
pub fn gpt_primary_end(first_usable_lba: u64) -> u64 {
    // Saturating: validation bounds the LBA, but layout code may see an unvalidated profile.
    first_usable_lba.saturating_mul(512)
}

/// The largest `first_usable_lba` accepted: 1 GiB in. Nothing puts partitions later, and the
/// bound keeps byte offsets derived from it far from overflow.
pub const MAX_FIRST_USABLE_LBA: u64 = 2 * 1024 * 1024;

fn validate(src: &Source, b: &BoardFile) -> Vec<Diagnostic> {
    let mut d = Vec::new();
    // serde's typed structs drop spans; find `[[header]]` lines and `key =` lines instead.
    let header_line = |header: &str, idx: usize| -> std::ops::Range<usize> {
        let needle = format!("[[{header}]]");
        src.text
            .match_indices(&needle)
            .nth(idx)
            .map(|(p, _)| p..p + needle.len())
            .unwrap_or(0..0)
    };
    let key_span = |key: &str| -> std::ops::Range<usize> {
        src.text
            .lines()
            .scan(0usize, |off, l| {
                let start = *off;
                *off += l.len() + 1;
                Some((start, l))
            })
            .find(|(_, l)| l.trim_start().starts_with(key))
            .map(|(s, l)| s..s + l.len())
            .unwrap_or(0..0)
    };

    let stem = src
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if b.name != stem {
        d.push(src.diag(
            key_span("name"),
            "name",
            format!(
                "board `{}` is in {}; expected the file to be named {}.toml",
                b.name,
                src.path.display(),
                b.name
            ),
        ));
    }
    if let Some(s) = b.slots
        && s == 0
    {
        d.push(src.diag(
            key_span("slots"),
            "slots",
            "0 slots; expected 1 or more, or leave `slots` out for a board without slots",
        ));
    }
    if let Some(r) = &b.debian {
        validate_recipe(src, &mut d, r, &key_span);
    }
    if b.partitions.is_empty() {
        d.push(src.diag(
            0..0,
            "partition",
            "no [[partition]]; expected a boot and a root partition",
        ));
    }
    for want in [Content::Boot, Content::Rootfs] {
        let n = b.partitions.iter().filter(|p| p.content == want).count();
        if n != 1 && !b.partitions.is_empty() {
            d.push(src.diag(
                0..0,
                "partition.content",
                format!("{n} partitions with content {want:?}; expected exactly one"),
            ));
        }
    }
    let mut prev_end: u64 = match b.partition_table.kind {
        TableKind::Gpt => gpt_primary_end(b.partition_table.first_usable_lba),
        TableKind::Mbr => 512,
    };
    if b.partition_table.kind == TableKind::Gpt && b.partition_table.first_usable_lba < 34 {
        d.push(src.diag(
            key_span("first_usable_lba"),
            "partition_table.first_usable_lba",
            "must be 34 or more (the primary GPT with 128 entries ends at LBA 33)",
        ));
    }
    if b.partition_table.first_usable_lba > MAX_FIRST_USABLE_LBA {
        d.push(src.diag(
            key_span("first_usable_lba"),
            "partition_table.first_usable_lba",
            format!(
                "{} is out of range; expected 34 to {MAX_FIRST_USABLE_LBA} (1 GiB)",
                b.partition_table.first_usable_lba
            ),
        ));
    }
    let first_start = b.partitions.first().and_then(|p| p.start.map(|s| s.0));
    for (i, p) in b.partitions.iter().enumerate() {
        let at = header_line("partition", i);
        let field = |f: &str| format!("partition[{i}].{f}");
        match b.partition_table.kind {
            TableKind::Gpt if gpt_type_guid(&p.type_).is_none() => d.push(src.diag(
                at.clone(),
                field("type"),
                format!(
                    "`{}` is not a GPT type; expected one of esp, basic-data, linux, linux-root-arm64, linux-root-amd64 or a GUID",
                    p.type_
                ),
            )),
            TableKind::Mbr if mbr_type_byte(&p.type_).is_none() => d.push(src.diag(
                at.clone(),
                field("type"),
                format!("`{}` is not an MBR type; expected a byte like 0x0c or 0x83", p.type_),
            )),
            _ => {}
        }
        if let Some(start) = p.start {
            if !start.0.is_multiple_of(MIB) {
                d.push(src.diag(
                    at.clone(),
                    field("start"),
                    format!("{start} is not 1 MiB aligned"),
                ));
            }
            if start.0 < prev_end {
                d.push(src.diag(
                    at.clone(),
                    field("start"),
                    format!("{start} overlaps what comes before it (ends at byte {prev_end})"),
                ));
            }
            prev_end = start.0;
        }
        match (p.size, p.content, p.fs) {
            (PartSize::Fixed(s), _, FsKind::Vfat) if s.0 < 64 * MIB => d.push(src.diag(
                at.clone(),
                field("size"),
                format!("{s} is too small for FAT32; expected 64MiB or more"),
            )),
            (PartSize::Auto, Content::Boot, _) => d.push(src.diag(
                at.clone(),
                field("size"),
                "\"auto\" is only for the root filesystem; expected a fixed size",
            )),
            (PartSize::Fixed(s), _, _) => prev_end = prev_end.saturating_add(s.0),
            _ => {}
        }
        if p.content == Content::Boot && p.fs != FsKind::Vfat {
            d.push(src.diag(
                at.clone(),
                field("fs"),
                "the boot partition must be vfat (firmware and U-Boot read FAT)",
            ));
        }
        if p.content == Content::Rootfs && p.fs != FsKind::Ext4 {
            d.push(src.diag(at.clone(), field("fs"), "the root partition must be ext4"));
        }
        if matches!(p.size, PartSize::Auto) && i + 1 != b.partitions.len() {
            d.push(src.diag(
                at.clone(),
                field("size"),
                "only the last partition may be \"auto\" (it grows on first boot)",
            ));
        }
    }
    for (i, blob) in b.blobs.iter().enumerate() {
        let at = header_line("blob", i);
        if !b.artifacts.iter().any(|a| a.name == blob.artifact) {
            d.push(src.diag(
                at.clone(),
                format!("blob[{i}].artifact"),
                format!(
                    "`{}` is not declared in an [[artifact]] table",
                    blob.artifact
                ),
            ));
        }
        let table_end = match b.partition_table.kind {
            TableKind::Gpt => gpt_primary_end(b.partition_table.first_usable_lba),
            TableKind::Mbr => 512,
        };
        if blob.offset.0 < table_end {
            d.push(src.diag(
                at.clone(),
                format!("blob[{i}].offset"),
                format!(
                    "{} overlaps the partition table (ends at byte {table_end})",
                    blob.offset
                ),
            ));
        }
        if let Some(fs) = first_start
            && blob.offset.0 >= fs
        {
            d.push(src.diag(
                at,
                format!("blob[{i}].offset"),
                format!(
                    "{} is at or after the first partition (byte {fs})",
                    blob.offset
                ),
            ));
        }
    }
    match b.boot {
        BootStyle::Extlinux if b.devicetree.fdtdir.is_none() => d.push(src.diag(
            key_span("[devicetree]"),
            "devicetree.fdtdir",
            "extlinux boards need `fdtdir` (U-Boot picks $fdtfile from it; never a fixed `fdt`)",
        )),
        BootStyle::RpiFirmware if b.devicetree.device_tree.is_none() => d.push(src.diag(
            key_span("[devicetree]"),
            "devicetree.device_tree",
            "rpi-firmware boards need `device_tree` (config.txt names it explicitly)",
        )),
        _ => {}
    }
    validate_targets_and_variants(src, &mut d, b, &key_span);
    validate_ranges(src, &mut d, b, &header_line);
    validate_boot_files(src, &mut d, b, &key_span);
    if b.boot == BootStyle::RpiFirmware && b.partition_table.kind != TableKind::Mbr {
        d.push(src.diag(
            key_span("kind"),
            "partition_table.kind",
            "rpi-firmware boards use an MBR here (what Raspberry Pi OS ships)",
        ));
    }
    d
}

/// Numbers of the profile, each checked against its range before any arithmetic uses it
/// (layout adds starts, sizes, offsets and headroom), and what the partition table and the
/// filesystems can hold (entries, names, labels): all of it would otherwise fail the build,
/// or panic in a table writer, instead of `kiln check`.
fn validate_ranges(
    src: &Source,
    d: &mut Vec<Diagnostic>,
    b: &BoardFile,
    header_line: &dyn Fn(&str, usize) -> std::ops::Range<usize>,
) {
    let (table, max_parts) = match b.partition_table.kind {
        TableKind::Gpt => ("a GPT", 128),
        TableKind::Mbr => ("an MBR", 4),
    };
    if b.partitions.len() > max_parts {
        d.push(src.diag(
            header_line("partition", max_parts),
            format!("partition[{max_parts}]"),
            format!(
                "{} partitions; {table} holds at most {max_parts}",
                b.partitions.len()
            ),
        ));
    }
    for (i, p) in b.partitions.iter().enumerate() {
        let at = header_line("partition", i);
        let field = |f: &str| format!("partition[{i}].{f}");
        if let PartSize::Fixed(s) = p.size
            && (s.0 == 0 || s.0 > MAX_DISK || !s.0.is_multiple_of(512))
        {
            d.push(src.diag(
                at.clone(),
                field("size"),
                format!(
                    "{s} is out of range; expected a whole number of 512-byte sectors, more than 0 and at most {}",
                    ByteSize(MAX_DISK)
                ),
            ));
        }
        // kiln formats FAT32 with clusters of at most 4 KiB, and FAT32 counts fewer than 2^28.
        if let (PartSize::Fixed(s), FsKind::Vfat) = (p.size, p.fs)
            && s.0 > MAX_FAT32
        {
            d.push(src.diag(
                at.clone(),
                field("size"),
                format!(
                    "{s} is too large for FAT32; expected at most {}",
                    ByteSize(MAX_FAT32)
                ),
            ));
        }
        if let Some(start) = p.start
            && start.0 > MAX_DISK
        {
            d.push(src.diag(
                at.clone(),
                field("start"),
                format!(
                    "{start} is out of range; expected at most {}",
                    ByteSize(MAX_DISK)
                ),
            ));
        }
        if let Some(h) = p.headroom
            && h.0 > MAX_DISK
        {
            d.push(src.diag(
                at.clone(),
                field("headroom"),
                format!(
                    "{h} is out of range; expected at most {}",
                    ByteSize(MAX_DISK)
                ),
            ));
        }
        // MBR entries hold 32-bit sector numbers.
        if b.partition_table.kind == TableKind::Mbr {
            let too_far = |v: u64| v / 512 > u64::from(u32::MAX);
            let size_too_far = matches!(p.size, PartSize::Fixed(s) if too_far(s.0));
            if p.start.is_some_and(|s| too_far(s.0)) || size_too_far {
                d.push(src.diag(
                    at.clone(),
                    field(if size_too_far { "size" } else { "start" }),
                    "an MBR addresses at most 2 TiB; expected a start and size below 2TiB, or a GPT",
                ));
            }
        }
        if b.partition_table.kind == TableKind::Gpt
            && (p.name.encode_utf16().count() > 36 || p.name.chars().any(char::is_control))
        {
            d.push(src.diag(
                at.clone(),
                field("name"),
                format!(
                    "{:?} does not fit a GPT partition name; expected at most 36 characters, no control characters",
                    p.name
                ),
            ));
        }
        let label_ok = match p.fs {
            // What mkfs.fat accepts in a volume label (kiln upper-cases it).
            FsKind::Vfat => {
                p.label.len() <= 11
                    && p.label
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b" !#$%&'()-@^_`{}~".contains(&c))
            }
            FsKind::Ext4 => p.label.len() <= 16 && !p.label.chars().any(char::is_control),
        };
        if !label_ok {
            let expected = match p.fs {
                FsKind::Vfat => "at most 11 ASCII letters, digits, spaces or !#$%&'()-@^_`{}~",
                FsKind::Ext4 => "at most 16 bytes without control characters",
            };
            d.push(src.diag(
                at,
                field("label"),
                format!(
                    "{:?} is not a {:?} label; expected {expected}",
                    p.label, p.fs
                ),
            ));
        }
    }
    for (i, blob) in b.blobs.iter().enumerate() {
        if blob.offset.0 > MAX_DISK {
            d.push(src.diag(
                header_line("blob", i),
                format!("blob[{i}].offset"),
                format!(
                    "{} is out of range; expected at most {}",
                    blob.offset,
                    ByteSize(MAX_DISK)
                ),
            ));
        }
    }
}

/// The largest FAT32 boot partition kiln formats (see `image::fat::cluster_size`).
const MAX_FAT32: u64 = 512 * 1024 * MIB;

/// A path on the FAT boot partition that kiln also writes into config.txt or extlinux.conf:
/// `/`-separated names of letters, digits and `-_.+~,@=`, none of them `.` or `..`. Strict on
/// purpose: a space or newline would split or inject a configuration line.
pub fn is_boot_path(s: &str) -> bool {
    !s.is_empty()
        && s.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.len() <= 255
                && c.bytes()
                    .all(|x| x.is_ascii_alphanumeric() || b"-_.+~,@=".contains(&x))
        })
}

/// One word of a kernel command line or boot configuration line: no whitespace, quotes or
/// control characters, which would split it or start another line.
fn is_word(s: &str) -> bool {
    !s.is_empty()
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"')
}

/// The boot partition's file names (kernel, initramfs, device-tree destinations) and the values
/// written into its configuration files: valid, and no two landing on the same FAT path (FAT
/// names are case-insensitive) or on a file kiln generates itself.
fn validate_boot_files(
    src: &Source,
    d: &mut Vec<Diagnostic>,
    b: &BoardFile,
    key_span: &dyn Fn(&str) -> std::ops::Range<usize>,
) {
    // (path on the FAT, field, is a single file, the key whose line the error points at).
    let mut names: Vec<(String, String, bool, &str)> = Vec::new();
    for (field, v) in [
        ("kernel.file", &b.kernel.file),
        ("kernel.initrd", &b.kernel.initrd),
    ] {
        let key = field.trim_start_matches("kernel.");
        if is_boot_path(v) {
            names.push((v.clone(), field.to_string(), true, key));
        } else {
            d.push(src.diag(
                key_span(key),
                field,
                format!(
                    "{v:?} is not a boot partition file name; expected a non-empty path of letters, digits and -_.+~,@= (no spaces, `.` or `..`)"
                ),
            ));
        }
    }
    for (i, c) in b.devicetree.copy.iter().enumerate() {
        let to = c.to.strip_prefix('/').unwrap_or(&c.to);
        let field = format!("devicetree.copy[{i}].to");
        if is_boot_path(to) {
            names.push((to.to_string(), field, false, "copy"));
        } else {
            d.push(src.diag(
                key_span("copy"),
                field,
                format!(
                    "{:?} is not a boot partition path; expected a non-empty path of letters, digits and -_.+~,@= (no spaces, `.` or `..`)",
                    c.to
                ),
            ));
        }
        let from_ok = c
            .from
            .split('/')
            .all(|x| !x.is_empty() && x != "." && x != "..");
        if !from_ok {
            d.push(src.diag(
                key_span("copy"),
                format!("devicetree.copy[{i}].from"),
                format!(
                    "{:?} is not a path inside the kernel's device-tree directory; expected e.g. \"rockchip\" (no `..`, no leading /)",
                    c.from
                ),
            ));
        }
    }
    let generated: &[&str] = match b.boot {
        BootStyle::Extlinux => &["extlinux/extlinux.conf", "kiln.json"],
        BootStyle::RpiFirmware => &["config.txt", "cmdline.txt", "kiln.json"],
    };
    let key = |s: &str| s.to_ascii_lowercase();
    for (i, (path, field, file, at)) in names.iter().enumerate() {
        // A generated file at the same path, or one under a name this one takes.
        for g in generated {
            let (p, gl) = (key(path), key(g));
            if p == gl
                || gl.starts_with(&format!("{p}/"))
                || (*file && p.starts_with(&format!("{gl}/")))
            {
                d.push(src.diag(
                    key_span(at),
                    field.clone(),
                    format!(
                        "`{path}` collides with `{g}`, which kiln writes on the boot partition; expected another name"
                    ),
                ));
            }
        }
        for (other, ofield, ofile, _) in &names[..i] {
            let (p, o) = (key(path), key(other));
            let clash = p == o
                || (*ofile && p.starts_with(&format!("{o}/")))
                || (*file && o.starts_with(&format!("{p}/")));
            if clash {
                d.push(src.diag(
                    key_span(at),
                    field.clone(),
                    format!(
                        "`{path}` collides with `{other}` ({ofield}) on the boot partition (FAT names ignore case); expected distinct names"
                    ),
                ));
            }
        }
    }
    // Values written into config.txt, cmdline.txt and extlinux.conf.
    for (i, w) in b.kernel.cmdline.iter().enumerate() {
        if !is_word(w) {
            d.push(src.diag(
                key_span("cmdline"),
                format!("kernel.cmdline[{i}]"),
                format!("{w:?} is not one command-line word; expected no spaces, quotes or control characters"),
            ));
        }
    }
    for (i, c) in b.kernel.consoles.iter().enumerate() {
        if !is_word(c) {
            d.push(src.diag(
                key_span("consoles"),
                format!("kernel.consoles[{i}]"),
                format!("{c:?} is not a console; expected `tty,baud` without spaces or control characters"),
            ));
        }
    }
    if let Some(f) = &b.devicetree.fdtdir
        && !is_word(f)
    {
        d.push(src.diag(
            key_span("fdtdir"),
            "devicetree.fdtdir",
            format!("{f:?} is not a directory name; expected one word such as \"/dtbs/\""),
        ));
    }
    let trees = std::iter::once((
        "devicetree.device_tree".to_string(),
        &b.devicetree.device_tree,
    ))
    .chain(
        b.variants
            .iter()
            .map(|(n, v)| (format!("variant.{n}.device_tree"), &v.device_tree)),
    );
    for (field, dt) in trees {
        if let Some(dt) = dt
            && !is_boot_path(dt)
        {
            d.push(src.diag(
                key_span("device_tree"),
                field,
                format!("{dt:?} is not a boot partition file name; expected e.g. \"bcm2712-rpi-5-b.dtb\""),
            ));
        }
    }
    for (i, l) in b.rpi.config.iter().enumerate() {
        if !is_one_line(l) {
            d.push(src.diag(
                key_span("config"),
                format!("rpi.config[{i}]"),
                format!(
                    "{l:?} is not one line; expected a single setting without control characters"
                ),
            ));
        }
    }
    if let Some(t) = &b.eeprom_tool
        && !is_one_line(t)
    {
        d.push(src.diag(
            key_span("eeprom_tool"),
            "eeprom_tool",
            format!("{t:?} is not one line; expected a command without control characters"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt_and_mbr_types() {
        assert_eq!(
            gpt_type_guid("esp").as_deref(),
            Some("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
        );
        assert!(gpt_type_guid("fat").is_none());
        assert_eq!(mbr_type_byte("0x0c"), Some(0x0c));
        assert_eq!(mbr_type_byte("12"), None);
    }
}
