//! Board profiles (`boards/*.toml`): what a board's boot chain needs from a disk image, as data.

use super::diag::{Diagnostic, Source};
use super::size::{ByteSize, MAX_DISK, MIB};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ops::Range;
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
    /// UEFI firmware starting systemd-boot from the EFI system partition's removable-media
    /// path (`EFI/BOOT/BOOT<arch>.EFI`, no NVRAM entry needed), which reads Boot Loader
    /// Specification entries from `loader/entries/`.
    SystemdBoot,
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
    /// `size = "auto"` only: free space left in the filesystem (default 64MiB); it grows to
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

/// A file of the base root filesystem copied onto the boot partition (`[[boot_file]]`), e.g.
/// the EFI loader.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseFileCopy {
    /// Path in the base, e.g. `usr/lib/systemd/boot/efi/systemd-bootx64.efi`.
    pub from: String,
    /// Path on the boot partition.
    pub to: String,
    /// The Debian package that ships `from`, for the message when the base lacks it.
    pub package: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
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
    /// The target that holds the board's loader blobs when this one cannot (the RK1's boot ROM
    /// reads no NVMe, so U-Boot stays on the eMMC). This target's image then carries no
    /// loader, and each node gets a second, loader-only image `<node>.<loader_on>.img`.
    pub loader_on: Option<String>,
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
    /// Absent on boards without device trees (x86).
    #[serde(default)]
    pub devicetree: DeviceTree,
    #[serde(default, rename = "boot_file")]
    pub boot_files: Vec<BaseFileCopy>,
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
    let (src, sha256, spec) = parse_file(path)?;
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

/// Reads and parses a profile (syntax, unknown keys, types), without the rules.
fn parse_file(path: &Path) -> Result<(Source, String, BoardFile), Vec<Diagnostic>> {
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
    Ok((src, sha256, spec))
}

/// Runs every rule of [`RULES`] on a profile that parses, keeping which rule said what: for
/// tests (each rule has a failing fixture) and tools. A profile that does not read or parse is
/// the `Err`, as from [`load_file`].
pub fn check_file(path: &Path) -> Result<Vec<(&'static str, Diagnostic)>, Vec<Diagnostic>> {
    let (src, _, spec) = parse_file(path)?;
    let cx = Ctx { src: &src };
    let mut out = Vec::new();
    for rule in RULES {
        let mut d = Vec::new();
        (rule.check)(&cx, &spec, &mut d);
        out.extend(d.into_iter().map(|d| (rule.id, d)));
    }
    Ok(out)
}

/// Every rule, in table order; a profile is valid when none of them reports anything.
fn validate(src: &Source, b: &BoardFile) -> Vec<Diagnostic> {
    let cx = Ctx { src };
    let mut d = Vec::new();
    for rule in RULES {
        (rule.check)(&cx, b, &mut d);
    }
    d
}

/// The ids of [`RULES`], in table order.
pub fn rule_ids() -> impl Iterator<Item = &'static str> {
    RULES.iter().map(|r| r.id)
}

/// What a rule sees besides the parsed profile: its text, for spans. serde's typed structs
/// drop spans, so rules point at `[[header]]` lines and `key =` lines found in the text.
pub struct Ctx<'a> {
    pub src: &'a Source,
}

impl Ctx<'_> {
    /// The `idx`-th `[[header]]` (0..0 when there is none).
    pub fn header_line(&self, header: &str, idx: usize) -> Range<usize> {
        let needle = format!("[[{header}]]");
        self.src
            .text
            .match_indices(&needle)
            .nth(idx)
            .map(|(p, _)| p..p + needle.len())
            .unwrap_or(0..0)
    }

    /// The first line that starts (after indentation) with `key` (0..0 when there is none).
    pub fn key_span(&self, key: &str) -> Range<usize> {
        self.src
            .text
            .lines()
            .scan(0usize, |off, l| {
                let start = *off;
                *off += l.len() + 1;
                Some((start, l))
            })
            .find(|(_, l)| l.trim_start().starts_with(key))
            .map(|(s, l)| s..s + l.len())
            .unwrap_or(0..0)
    }

    pub fn diag(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Diagnostic {
        self.src.diag(span, field, message)
    }
}

/// One board-profile rule: a check that reports what a profile gets wrong. Each has a failing
/// fixture, `tests/fixtures/boards/fail/<id>.toml`, and `tests/board_rules.rs` fails when a
/// rule has none, or a fixture names no rule.
pub struct Rule {
    /// Stable name (the fixture's file name).
    pub id: &'static str,
    /// One line: what the rule refuses.
    pub what: &'static str,
    pub check: fn(&Ctx, &BoardFile, &mut Vec<Diagnostic>),
}

/// Every board-profile rule, in the order their diagnostics are reported.
pub const RULES: &[Rule] = &[
    Rule {
        id: "name-matches-file",
        what: "`name` is the file name without .toml",
        check: name_matches_file,
    },
    Rule {
        id: "slots-nonzero",
        what: "`slots`, when given, is 1 or more",
        check: slots_nonzero,
    },
    Rule {
        id: "debian-variant",
        what: "[debian] variant is one mmdebstrap knows",
        check: debian_variant,
    },
    Rule {
        id: "debian-plain-names",
        what: "[debian] suite, components, extra_suites and packages are plain words",
        check: debian_plain_names,
    },
    Rule {
        id: "debian-module-names",
        what: "[debian] initramfs_modules and modules_load are kernel module names",
        check: debian_module_names,
    },
    Rule {
        id: "debian-unit-names",
        what: "[debian] enable lists systemd unit names",
        check: debian_unit_names,
    },
    Rule {
        id: "debian-package-suite",
        what: "a package's `/suite` is the recipe's suite or one of its extra_suites",
        check: debian_package_suite,
    },
    Rule {
        id: "partitions-present",
        what: "the profile has at least one [[partition]]",
        check: partitions_present,
    },
    Rule {
        id: "one-boot-one-root",
        what: "exactly one partition with content boot and one with content rootfs",
        check: one_boot_one_root,
    },
    Rule {
        id: "gpt-first-usable-lba-min",
        what: "a GPT's first_usable_lba is 34 or more",
        check: gpt_first_usable_lba_min,
    },
    Rule {
        id: "first-usable-lba-range",
        what: "first_usable_lba is at most 1 GiB in",
        check: first_usable_lba_range,
    },
    Rule {
        id: "partition-type",
        what: "a partition's `type` is a GPT type name or GUID, or an MBR type byte",
        check: partition_type,
    },
    Rule {
        id: "partition-start-aligned",
        what: "a partition's `start` is 1 MiB aligned",
        check: partition_start_aligned,
    },
    Rule {
        id: "partition-start-overlap",
        what: "a partition's `start` is past the table and the partitions before it",
        check: partition_start_overlap,
    },
    Rule {
        id: "fat-min-size",
        what: "a vfat partition is 64 MiB or more",
        check: fat_min_size,
    },
    Rule {
        id: "auto-size-root-only",
        what: "the boot partition has a fixed size",
        check: auto_size_root_only,
    },
    Rule {
        id: "boot-fs-vfat",
        what: "the boot partition is vfat",
        check: boot_fs_vfat,
    },
    Rule {
        id: "root-fs-ext4",
        what: "the root partition is ext4",
        check: root_fs_ext4,
    },
    Rule {
        id: "auto-size-last",
        what: "only the last partition is sized \"auto\"",
        check: auto_size_last,
    },
    Rule {
        id: "blob-artifact-declared",
        what: "a blob's artifact has an [[artifact]] table",
        check: blob_artifact_declared,
    },
    Rule {
        id: "blob-after-table",
        what: "a blob starts after the partition table",
        check: blob_after_table,
    },
    Rule {
        id: "blob-before-first-partition",
        what: "a blob starts before the first partition",
        check: blob_before_first_partition,
    },
    Rule {
        id: "extlinux-fdtdir",
        what: "extlinux boards give [devicetree] fdtdir",
        check: extlinux_fdtdir,
    },
    Rule {
        id: "rpi-device-tree",
        what: "rpi-firmware boards give [devicetree] device_tree",
        check: rpi_device_tree,
    },
    Rule {
        id: "targets-present",
        what: "the board has at least one [target.NAME]",
        check: targets_present,
    },
    Rule {
        id: "default-target-exists",
        what: "default_target names a [target.NAME] of the board",
        check: default_target_exists,
    },
    Rule {
        id: "target-names",
        what: "target names are lower-case letters, digits, - and _",
        check: target_names,
    },
    Rule {
        id: "target-lines-one-line",
        what: "a target's eeprom and config entries are one line each",
        check: target_lines_one_line,
    },
    Rule {
        id: "eeprom-needs-tool",
        what: "a target with eeprom settings has an eeprom_tool to set them",
        check: eeprom_needs_tool,
    },
    Rule {
        id: "target-loader-on",
        what: "a target's loader_on names another target that holds the loader itself, on a board with loader blobs",
        check: target_loader_on,
    },
    Rule {
        id: "target-config-rpi-only",
        what: "only rpi-firmware boards give targets config.txt lines",
        check: target_config_rpi_only,
    },
    Rule {
        id: "variant-names",
        what: "variant names are lower-case letters, digits, - and _",
        check: variant_names,
    },
    Rule {
        id: "variant-device-tree-extlinux",
        what: "extlinux boards' variants have no device_tree",
        check: variant_device_tree_extlinux,
    },
    Rule {
        id: "variant-device-tree-copied",
        what: "an rpi-firmware variant's device_tree is the `to` of a [devicetree] copy",
        check: variant_device_tree_copied,
    },
    Rule {
        id: "partition-count",
        what: "no more partitions than the table holds (GPT 128, MBR 4)",
        check: partition_count,
    },
    Rule {
        id: "partition-size-range",
        what: "a fixed partition size is whole sectors, more than 0, at most the largest disk",
        check: partition_size_range,
    },
    Rule {
        id: "fat32-max-size",
        what: "a vfat partition is at most what kiln's FAT32 holds",
        check: fat32_max_size,
    },
    Rule {
        id: "partition-start-range",
        what: "a partition's `start` is at most the largest disk",
        check: partition_start_range,
    },
    Rule {
        id: "headroom-range",
        what: "a partition's headroom is at most the largest disk",
        check: headroom_range,
    },
    Rule {
        id: "mbr-2tib",
        what: "MBR partitions start and end below 2 TiB",
        check: mbr_2tib,
    },
    Rule {
        id: "gpt-partition-name",
        what: "GPT partition names fit the entry (36 UTF-16 units, no control characters)",
        check: gpt_partition_name,
    },
    Rule {
        id: "partition-label",
        what: "a filesystem label is one mkfs accepts",
        check: partition_label,
    },
    Rule {
        id: "blob-offset-range",
        what: "a blob's offset is at most the largest disk",
        check: blob_offset_range,
    },
    Rule {
        id: "kernel-file-names",
        what: "kernel.file and kernel.initrd are plain boot partition paths",
        check: kernel_file_names,
    },
    Rule {
        id: "devicetree-copy-to",
        what: "a [devicetree] copy's `to` is a plain boot partition path",
        check: devicetree_copy_to,
    },
    Rule {
        id: "devicetree-copy-from",
        what: "a [devicetree] copy's `from` stays inside the kernel's device-tree directory",
        check: devicetree_copy_from,
    },
    Rule {
        id: "boot-files-vs-generated",
        what: "no boot file lands on a file kiln writes itself",
        check: boot_files_vs_generated,
    },
    Rule {
        id: "boot-files-distinct",
        what: "no two boot files land on the same FAT path (case-insensitive)",
        check: boot_files_distinct,
    },
    Rule {
        id: "cmdline-words",
        what: "kernel.cmdline entries are one word each",
        check: cmdline_words,
    },
    Rule {
        id: "console-words",
        what: "kernel.consoles entries are one word each",
        check: console_words,
    },
    Rule {
        id: "fdtdir-word",
        what: "[devicetree] fdtdir is one word",
        check: fdtdir_word,
    },
    Rule {
        id: "device-tree-names",
        what: "device_tree (board and variants) is a plain boot partition file name",
        check: device_tree_names,
    },
    Rule {
        id: "rpi-config-lines",
        what: "[rpi] config entries are one line each",
        check: rpi_config_lines,
    },
    Rule {
        id: "eeprom-tool-line",
        what: "eeprom_tool is one line",
        check: eeprom_tool_line,
    },
    Rule {
        id: "rpi-firmware-mbr",
        what: "rpi-firmware boards use an MBR",
        check: rpi_firmware_mbr,
    },
    Rule {
        id: "systemd-boot-gpt",
        what: "systemd-boot boards use a GPT",
        check: systemd_boot_gpt,
    },
    Rule {
        id: "systemd-boot-esp",
        what: "a systemd-boot board's boot partition has type esp",
        check: systemd_boot_esp,
    },
    Rule {
        id: "systemd-boot-loader",
        what: "a systemd-boot board copies its loader to EFI/BOOT/BOOT<arch>.EFI",
        check: systemd_boot_loader,
    },
    Rule {
        id: "boot-file-from",
        what: "[[boot_file]] from is a relative path in the base",
        check: boot_file_from,
    },
];

/// Names that end up on mmdebstrap's command line: no spaces, commas or shell syntax.
fn is_plain_word(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-+._:/~=".contains(&c))
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

/// Byte where the partition table ends: nothing else may start before it.
fn table_end(b: &BoardFile) -> u64 {
    match b.partition_table.kind {
        TableKind::Gpt => gpt_primary_end(b.partition_table.first_usable_lba),
        TableKind::Mbr => 512,
    }
}

// ---- identity ----

/// Boards are looked up by name (a node's `board`); the file name is how users find the
/// profile, so the two must agree.
fn name_matches_file(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    let src = cx.src;
    let stem = src
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if b.name != stem {
        d.push(cx.diag(
            cx.key_span("name"),
            "name",
            format!(
                "board `{}` is in {}; expected the file to be named {}.toml",
                b.name,
                src.path.display(),
                b.name
            ),
        ));
    }
}

/// Nodes pick a slot from 1 to `slots`: zero slots would make every node's slot invalid with
/// a confusing message; a board without slots leaves the key out.
fn slots_nonzero(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if let Some(s) = b.slots
        && s == 0
    {
        d.push(cx.diag(
            cx.key_span("slots"),
            "slots",
            "0 slots; expected 1 or more, or leave `slots` out for a board without slots",
        ));
    }
}

// ---- the Debian recipe (mmdebstrap's command line) ----

/// mmdebstrap refuses an unknown variant only after kiln has started a slow build; this
/// catches it in `kiln check`.
fn debian_variant(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
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
    let Some(r) = &b.debian else { return };
    if !VARIANTS.contains(&r.variant.as_str()) {
        d.push(cx.diag(
            cx.key_span("variant"),
            "debian.variant",
            format!(
                "unknown variant `{}`; expected one of: {}",
                r.variant,
                VARIANTS.join(", ")
            ),
        ));
    }
}

/// Suites, components and packages end up on mmdebstrap's command line (comma-joined): a
/// space, comma or shell syntax would split or change it.
fn debian_plain_names(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    let Some(r) = &b.debian else { return };
    let lists: [(&str, Vec<&String>); 4] = [
        ("suite", vec![&r.suite]),
        ("components", r.components.iter().collect()),
        ("extra_suites", r.extra_suites.iter().collect()),
        ("packages", r.packages.iter().collect()),
    ];
    for (field, values) in lists {
        for v in values {
            if !is_plain_word(v) {
                d.push(cx.diag(
                    cx.key_span(field),
                    format!("debian.{field}"),
                    format!(
                        "`{v}` is not a plain name; expected letters, digits and -+._:/~= only"
                    ),
                ));
            }
        }
    }
}

/// Module names are written one per line into initramfs-tools' modules file and
/// modules-load.d: anything but a module name would add lines or fail at boot.
fn debian_module_names(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    let Some(r) = &b.debian else { return };
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
                d.push(cx.diag(
                    cx.key_span(field),
                    format!("debian.{field}"),
                    format!("`{m}` is not a kernel module name; expected letters, digits, - and _"),
                ));
            }
        }
    }
}

/// Units are enabled with `systemctl enable` in the base: a name that is not a unit would fail
/// the base build late, or pass shell syntax through.
fn debian_unit_names(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    let Some(r) = &b.debian else { return };
    for u in &r.enable {
        let ok = u
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.@".contains(&c))
            && [".service", ".socket", ".timer", ".path", ".target"]
                .iter()
                .any(|x| u.len() > x.len() && u.ends_with(x));
        if !ok {
            d.push(cx.diag(
                cx.key_span("enable"),
                "debian.enable",
                format!("`{u}` is not a systemd unit name; expected e.g. iscsid.service"),
            ));
        }
    }
}

/// apt can only install `name/suite` from a suite in its sources; one the recipe does not
/// list fails the base build after the download.
fn debian_package_suite(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    let Some(r) = &b.debian else { return };
    for p in &r.packages {
        if let Some((_, suite)) = p.split_once('/')
            && suite != r.suite
            && !r.extra_suites.iter().any(|s| s == suite)
        {
            d.push(cx.diag(
                cx.key_span("packages"),
                "debian.packages",
                format!(
                    "`{p}` asks for suite `{suite}`, which the recipe does not use; expected it in extra_suites"
                ),
            ));
        }
    }
}

// ---- partitions ----

/// An image without partitions boots nothing; the build needs a boot and a root partition.
fn partitions_present(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if b.partitions.is_empty() {
        d.push(cx.diag(
            0..0,
            "partition",
            "no [[partition]]; expected a boot and a root partition",
        ));
    }
}

/// The build writes the boot files to the one boot partition and the root filesystem to the
/// one root partition (`root=PARTUUID` names it): none or two of either is ambiguous.
fn one_boot_one_root(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for want in [Content::Boot, Content::Rootfs] {
        let n = b.partitions.iter().filter(|p| p.content == want).count();
        if n != 1 && !b.partitions.is_empty() {
            d.push(cx.diag(
                0..0,
                "partition.content",
                format!("{n} partitions with content {want:?}; expected exactly one"),
            ));
        }
    }
}

/// The primary GPT with its 128 entries fills LBAs 0 to 33: a smaller first usable LBA puts
/// partitions over the table.
fn gpt_first_usable_lba_min(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if b.partition_table.kind == TableKind::Gpt && b.partition_table.first_usable_lba < 34 {
        d.push(cx.diag(
            cx.key_span("first_usable_lba"),
            "partition_table.first_usable_lba",
            "must be 34 or more (the primary GPT with 128 entries ends at LBA 33)",
        ));
    }
}

/// The LBA is multiplied by 512 for byte offsets: bounding it keeps that arithmetic far from
/// overflow (2^62 once panicked a debug build).
fn first_usable_lba_range(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if b.partition_table.first_usable_lba > MAX_FIRST_USABLE_LBA {
        d.push(cx.diag(
            cx.key_span("first_usable_lba"),
            "partition_table.first_usable_lba",
            format!(
                "{} is out of range; expected 34 to {MAX_FIRST_USABLE_LBA} (1 GiB)",
                b.partition_table.first_usable_lba
            ),
        ));
    }
}

/// The table writers need a type they can encode; an unknown one would fail after the root
/// filesystem was written.
fn partition_type(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, p) in b.partitions.iter().enumerate() {
        let at = cx.header_line("partition", i);
        let field = format!("partition[{i}].type");
        match b.partition_table.kind {
            TableKind::Gpt if gpt_type_guid(&p.type_).is_none() => d.push(cx.diag(
                at,
                field,
                format!(
                    "`{}` is not a GPT type; expected one of esp, basic-data, linux, linux-root-arm64, linux-root-amd64 or a GUID",
                    p.type_
                ),
            )),
            TableKind::Mbr if mbr_type_byte(&p.type_).is_none() => d.push(cx.diag(
                at,
                field,
                format!("`{}` is not an MBR type; expected a byte like 0x0c or 0x83", p.type_),
            )),
            _ => {}
        }
    }
}

/// Partitions start on 1 MiB boundaries, which map onto eMMC/SD erase blocks; an unaligned
/// start slows every write to the card.
fn partition_start_aligned(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, p) in b.partitions.iter().enumerate() {
        if let Some(start) = p.start
            && !start.0.is_multiple_of(MIB)
        {
            d.push(cx.diag(
                cx.header_line("partition", i),
                format!("partition[{i}].start"),
                format!("{start} is not 1 MiB aligned"),
            ));
        }
    }
}

/// A partition starting inside the table or the partition before it would overwrite them.
/// Walks the partitions as the old single pass did: a fixed start moves the end to it, a fixed
/// size (other than a too-small FAT, already refused) moves it on.
fn partition_start_overlap(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    let mut prev_end = table_end(b);
    for (i, p) in b.partitions.iter().enumerate() {
        if let Some(start) = p.start {
            if start.0 < prev_end {
                d.push(cx.diag(
                    cx.header_line("partition", i),
                    format!("partition[{i}].start"),
                    format!("{start} overlaps what comes before it (ends at byte {prev_end})"),
                ));
            }
            prev_end = start.0;
        }
        match (p.size, p.fs) {
            (PartSize::Fixed(s), FsKind::Vfat) if s.0 < 64 * MIB => {}
            (PartSize::Fixed(s), _) => prev_end = prev_end.saturating_add(s.0),
            _ => {}
        }
    }
}

/// kiln formats vfat as FAT32, which needs at least 65525 clusters: below 64 MiB mkfs would
/// make FAT16 or fail, and some firmware reads only FAT32.
fn fat_min_size(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, p) in b.partitions.iter().enumerate() {
        if let (PartSize::Fixed(s), FsKind::Vfat) = (p.size, p.fs)
            && s.0 < 64 * MIB
        {
            d.push(cx.diag(
                cx.header_line("partition", i),
                format!("partition[{i}].size"),
                format!("{s} is too small for FAT32; expected 64MiB or more"),
            ));
        }
    }
}

/// "auto" sizes the partition to the root filesystem's content; the boot partition has none
/// kiln measures, and it does not grow on first boot.
fn auto_size_root_only(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, p) in b.partitions.iter().enumerate() {
        if let (PartSize::Auto, Content::Boot) = (p.size, p.content) {
            d.push(cx.diag(
                cx.header_line("partition", i),
                format!("partition[{i}].size"),
                "\"auto\" is only for the root filesystem; expected a fixed size",
            ));
        }
    }
}

/// The Pi firmware and U-Boot read the boot files from FAT; on any other filesystem the
/// board does not boot.
fn boot_fs_vfat(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, p) in b.partitions.iter().enumerate() {
        if p.content == Content::Boot && p.fs != FsKind::Vfat {
            d.push(cx.diag(
                cx.header_line("partition", i),
                format!("partition[{i}].fs"),
                "the boot partition must be vfat (firmware and U-Boot read FAT)",
            ));
        }
    }
}

/// kiln writes the root filesystem with mkfs.ext4 -d, and first boot grows it with resize2fs.
fn root_fs_ext4(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, p) in b.partitions.iter().enumerate() {
        if p.content == Content::Rootfs && p.fs != FsKind::Ext4 {
            d.push(cx.diag(
                cx.header_line("partition", i),
                format!("partition[{i}].fs"),
                "the root partition must be ext4",
            ));
        }
    }
}

/// An "auto" partition grows to the end of the disk on first boot: one before another would
/// grow into it.
fn auto_size_last(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, p) in b.partitions.iter().enumerate() {
        if matches!(p.size, PartSize::Auto) && i + 1 != b.partitions.len() {
            d.push(cx.diag(
                cx.header_line("partition", i),
                format!("partition[{i}].size"),
                "only the last partition may be \"auto\" (it grows on first boot)",
            ));
        }
    }
}

// ---- blobs (boot loaders at fixed offsets) ----

/// A blob's bytes come from `--artifact NAME=`; without an [[artifact]] table kiln cannot say
/// what to pass or where to get it.
fn blob_artifact_declared(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, blob) in b.blobs.iter().enumerate() {
        if !b.artifacts.iter().any(|a| a.name == blob.artifact) {
            d.push(cx.diag(
                cx.header_line("blob", i),
                format!("blob[{i}].artifact"),
                format!(
                    "`{}` is not declared in an [[artifact]] table",
                    blob.artifact
                ),
            ));
        }
    }
}

/// A loader written over the partition table destroys it (or the table, written last, cuts
/// the loader).
fn blob_after_table(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    let table_end = table_end(b);
    for (i, blob) in b.blobs.iter().enumerate() {
        if blob.offset.0 < table_end {
            d.push(cx.diag(
                cx.header_line("blob", i),
                format!("blob[{i}].offset"),
                format!(
                    "{} overlaps the partition table (ends at byte {table_end})",
                    blob.offset
                ),
            ));
        }
    }
}

/// Loaders live in the gap before the first partition; one at or after its start would
/// overwrite the boot filesystem.
fn blob_before_first_partition(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    let Some(fs) = b.partitions.first().and_then(|p| p.start.map(|s| s.0)) else {
        return;
    };
    for (i, blob) in b.blobs.iter().enumerate() {
        if blob.offset.0 >= fs {
            d.push(cx.diag(
                cx.header_line("blob", i),
                format!("blob[{i}].offset"),
                format!(
                    "{} is at or after the first partition (byte {fs})",
                    blob.offset
                ),
            ));
        }
    }
}

// ---- device trees by boot style ----

/// U-Boot picks `$fdtfile` from `fdtdir`; a fixed `fdt` would boot the wrong tree on another
/// board revision, and under QEMU (no $fdtfile) skip the entry.
fn extlinux_fdtdir(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if b.boot == BootStyle::Extlinux && b.devicetree.fdtdir.is_none() {
        d.push(cx.diag(
            cx.key_span("[devicetree]"),
            "devicetree.fdtdir",
            "extlinux boards need `fdtdir` (U-Boot picks $fdtfile from it; never a fixed `fdt`)",
        ));
    }
}

/// config.txt names the device tree; with os_check the firmware refuses to boot without one
/// matching the board.
fn rpi_device_tree(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if b.boot == BootStyle::RpiFirmware && b.devicetree.device_tree.is_none() {
        d.push(cx.diag(
            cx.key_span("[devicetree]"),
            "devicetree.device_tree",
            "rpi-firmware boards need `device_tree` (config.txt names it explicitly)",
        ));
    }
}

// ---- targets and variants ----

/// Every node boots from a target; a board with none leaves nodes nothing to pick.
fn targets_present(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if b.targets.is_empty() {
        d.push(cx.diag(
            cx.key_span("default_target"),
            "target",
            "no [target.NAME] table; expected at least one storage device the board boots from",
        ));
    }
}

/// Nodes without `target` get `default_target`; it must be one the board has.
fn default_target_exists(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if !b.targets.contains_key(&b.default_target) {
        let names: Vec<&str> = b.targets.keys().map(String::as_str).collect();
        d.push(cx.diag(
            cx.key_span("default_target"),
            "default_target",
            format!(
                "`{}` is not a [target.*] of this board; expected one of: {}",
                b.default_target,
                names.join(", ")
            ),
        ));
    }
}

/// Target names appear in the inventory, in kiln.json and in messages: plain names only.
fn target_names(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for name in b.targets.keys() {
        if !is_name(name) {
            d.push(cx.diag(
                cx.key_span(&format!("[target.{name}]")),
                format!("target.{name}"),
                "target names are lower-case letters, digits, - and _",
            ));
        }
    }
}

/// eeprom settings are printed for users to paste and config lines go into config.txt: a
/// newline would inject another setting.
fn target_lines_one_line(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (name, t) in &b.targets {
        let at = cx.key_span(&format!("[target.{name}]"));
        for (field, lines) in [("eeprom", &t.eeprom), ("config", &t.config)] {
            for l in lines {
                if !is_one_line(l) {
                    d.push(cx.diag(
                        at.clone(),
                        format!("target.{name}.{field}"),
                        format!("{l:?} is not one line; expected a single setting without control characters"),
                    ));
                }
            }
        }
    }
}

/// Firmware settings are printed with the command that sets them; without one users are told
/// what to set but not how.
fn eeprom_needs_tool(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (name, t) in &b.targets {
        if !t.eeprom.is_empty() && b.eeprom_tool.is_none() {
            d.push(cx.diag(
                cx.key_span(&format!("[target.{name}]")),
                format!("target.{name}.eeprom"),
                "firmware settings need `eeprom_tool` (the command users run to set them)",
            ));
        }
    }
}

/// A loader-only image goes to a device that keeps the loader and nothing bootable: it must be
/// another target, not itself sent elsewhere, and there must be a loader to put there.
fn target_loader_on(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (name, t) in &b.targets {
        let Some(on) = &t.loader_on else { continue };
        let problem = match b.targets.get(on) {
            _ if on == name => Some(format!("`{on}` is this target itself; expected another [target.*] that keeps the loader")),
            None => Some(format!(
                "`{on}` is not a [target.*] of this board; expected one of: {}",
                b.targets.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
            )),
            Some(o) if o.loader_on.is_some() => Some(format!(
                "target `{on}` sends its own loader elsewhere; expected a target that keeps the loader"
            )),
            Some(_) if b.blobs.is_empty() => Some(
                "the board has no [[blob]]; expected loader_on only on boards whose loader lives outside the system's disk".to_string(),
            ),
            Some(_) => None,
        };
        if let Some(p) = problem {
            d.push(cx.diag(
                cx.key_span(&format!("[target.{name}]")),
                format!("target.{name}.loader_on"),
                p,
            ));
        }
    }
}

/// Only rpi-firmware boards have a config.txt; elsewhere the lines would silently do nothing.
fn target_config_rpi_only(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (name, t) in &b.targets {
        if !t.config.is_empty() && b.boot != BootStyle::RpiFirmware {
            d.push(cx.diag(
                cx.key_span(&format!("[target.{name}]")),
                format!("target.{name}.config"),
                "config.txt lines are only for rpi-firmware boards",
            ));
        }
    }
}

/// Variant names appear in the inventory, in kiln.json and in messages: plain names only.
fn variant_names(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for name in b.variants.keys() {
        if !is_name(name) {
            d.push(cx.diag(
                cx.key_span(&format!("[variant.{name}]")),
                format!("variant.{name}"),
                "variant names are lower-case letters, digits, - and _",
            ));
        }
    }
}

/// extlinux boards take the tree from U-Boot's `$fdtfile`; a variant's device_tree would be
/// ignored, so the variant would boot the wrong tree without a word.
fn variant_device_tree_extlinux(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if b.boot != BootStyle::Extlinux {
        return;
    }
    for (name, v) in &b.variants {
        if v.device_tree.is_some() {
            d.push(cx.diag(
                cx.key_span(&format!("[variant.{name}]")),
                format!("variant.{name}.device_tree"),
                "extlinux boards take the device tree from U-Boot's $fdtfile; expected no device_tree",
            ));
        }
    }
}

/// The firmware reads the variant's tree from the FAT root: it must be one of the copied
/// files, or the board does not boot.
fn variant_device_tree_copied(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if b.boot != BootStyle::RpiFirmware {
        return;
    }
    for (name, v) in &b.variants {
        if let Some(dt) = &v.device_tree
            && !b.devicetree.copy.iter().any(|c| c.to == *dt)
        {
            d.push(cx.diag(
                cx.key_span(&format!("[variant.{name}]")),
                format!("variant.{name}.device_tree"),
                format!(
                    "`{dt}` is not the `to` of any [devicetree] copy; expected the file the firmware will find on the boot partition"
                ),
            ));
        }
    }
}

// ---- ranges: numbers checked before any arithmetic uses them (layout adds starts, sizes,
// offsets and headroom), and what the table and the filesystems can hold; all of it would
// otherwise fail the build, or panic in a table writer, instead of `kiln check` ----

/// A GPT holds 128 entries and an MBR 4 primary partitions; the MBR writer has no slot for a
/// fifth.
fn partition_count(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    let (table, max_parts) = match b.partition_table.kind {
        TableKind::Gpt => ("a GPT", 128),
        TableKind::Mbr => ("an MBR", 4),
    };
    if b.partitions.len() > max_parts {
        d.push(cx.diag(
            cx.header_line("partition", max_parts),
            format!("partition[{max_parts}]"),
            format!(
                "{} partitions; {table} holds at most {max_parts}",
                b.partitions.len()
            ),
        ));
    }
}

/// Tables count whole 512-byte sectors; a zero, partial or huge size would be truncated or
/// overflow the layout arithmetic.
fn partition_size_range(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, p) in b.partitions.iter().enumerate() {
        if let PartSize::Fixed(s) = p.size
            && (s.0 == 0 || s.0 > MAX_DISK || !s.0.is_multiple_of(512))
        {
            d.push(cx.diag(
                cx.header_line("partition", i),
                format!("partition[{i}].size"),
                format!(
                    "{s} is out of range; expected a whole number of 512-byte sectors, more than 0 and at most {}",
                    ByteSize(MAX_DISK)
                ),
            ));
        }
    }
}

/// kiln formats FAT32 with clusters of at most 4 KiB, and FAT32 counts fewer than 2^28.
fn fat32_max_size(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, p) in b.partitions.iter().enumerate() {
        if let (PartSize::Fixed(s), FsKind::Vfat) = (p.size, p.fs)
            && s.0 > MAX_FAT32
        {
            d.push(cx.diag(
                cx.header_line("partition", i),
                format!("partition[{i}].size"),
                format!(
                    "{s} is too large for FAT32; expected at most {}",
                    ByteSize(MAX_FAT32)
                ),
            ));
        }
    }
}

/// A start past the largest disk kiln makes would overflow the layout arithmetic.
fn partition_start_range(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, p) in b.partitions.iter().enumerate() {
        if let Some(start) = p.start
            && start.0 > MAX_DISK
        {
            d.push(cx.diag(
                cx.header_line("partition", i),
                format!("partition[{i}].start"),
                format!(
                    "{start} is out of range; expected at most {}",
                    ByteSize(MAX_DISK)
                ),
            ));
        }
    }
}

/// Headroom is added to the root filesystem's size; a huge one would overflow it.
fn headroom_range(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, p) in b.partitions.iter().enumerate() {
        if let Some(h) = p.headroom
            && h.0 > MAX_DISK
        {
            d.push(cx.diag(
                cx.header_line("partition", i),
                format!("partition[{i}].headroom"),
                format!(
                    "{h} is out of range; expected at most {}",
                    ByteSize(MAX_DISK)
                ),
            ));
        }
    }
}

/// MBR entries hold 32-bit sector numbers: a start or size at or past 2 TiB does not fit.
fn mbr_2tib(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if b.partition_table.kind != TableKind::Mbr {
        return;
    }
    let too_far = |v: u64| v / 512 > u64::from(u32::MAX);
    for (i, p) in b.partitions.iter().enumerate() {
        let size_too_far = matches!(p.size, PartSize::Fixed(s) if too_far(s.0));
        if p.start.is_some_and(|s| too_far(s.0)) || size_too_far {
            d.push(cx.diag(
                cx.header_line("partition", i),
                format!(
                    "partition[{i}].{}",
                    if size_too_far { "size" } else { "start" }
                ),
                "an MBR addresses at most 2 TiB; expected a start and size below 2TiB, or a GPT",
            ));
        }
    }
}

/// A GPT entry holds a 36-character UTF-16 name; a longer one is cut by the table writer and
/// control characters confuse every tool that prints it.
fn gpt_partition_name(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if b.partition_table.kind != TableKind::Gpt {
        return;
    }
    for (i, p) in b.partitions.iter().enumerate() {
        if p.name.encode_utf16().count() > 36 || p.name.chars().any(char::is_control) {
            d.push(cx.diag(
                cx.header_line("partition", i),
                format!("partition[{i}].name"),
                format!(
                    "{:?} does not fit a GPT partition name; expected at most 36 characters, no control characters",
                    p.name
                ),
            ));
        }
    }
}

/// Labels go to the filesystem writers: FAT volume labels are 11 bytes of a restricted set
/// (what mkfs.fat accepts; kiln upper-cases them), ext4 labels 16 bytes.
fn partition_label(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, p) in b.partitions.iter().enumerate() {
        let label_ok = match p.fs {
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
            d.push(cx.diag(
                cx.header_line("partition", i),
                format!("partition[{i}].label"),
                format!(
                    "{:?} is not a {:?} label; expected {expected}",
                    p.label, p.fs
                ),
            ));
        }
    }
}

/// A blob offset past the largest disk would overflow the layout arithmetic.
fn blob_offset_range(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, blob) in b.blobs.iter().enumerate() {
        if blob.offset.0 > MAX_DISK {
            d.push(cx.diag(
                cx.header_line("blob", i),
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

// ---- the boot partition's files and the values written into its configuration ----

/// Files the profile puts on the boot partition, with valid paths only (the others are
/// reported by kernel-file-names and devicetree-copy-to): (path on the FAT, field, is a single
/// file, the key whose line an error points at).
fn boot_names(b: &BoardFile) -> Vec<(String, String, bool, &'static str)> {
    let mut names = Vec::new();
    for (field, key, v) in [
        ("kernel.file", "file", &b.kernel.file),
        ("kernel.initrd", "initrd", &b.kernel.initrd),
    ] {
        if is_boot_path(v) {
            names.push((v.clone(), field.to_string(), true, key));
        }
    }
    for (i, c) in b.devicetree.copy.iter().enumerate() {
        let to = c.to.strip_prefix('/').unwrap_or(&c.to);
        if is_boot_path(to) {
            names.push((
                to.to_string(),
                format!("devicetree.copy[{i}].to"),
                false,
                "copy",
            ));
        }
    }
    for (i, c) in b.boot_files.iter().enumerate() {
        if is_boot_path(&c.to) {
            names.push((c.to.clone(), format!("boot_file[{i}].to"), true, "to"));
        }
    }
    names
}

/// The kernel and initramfs names go into config.txt or extlinux.conf: a space or newline
/// would split or inject a line, and `..` would leave the partition.
fn kernel_file_names(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (field, key, v) in [
        ("kernel.file", "file", &b.kernel.file),
        ("kernel.initrd", "initrd", &b.kernel.initrd),
    ] {
        if !is_boot_path(v) {
            d.push(cx.diag(
                cx.key_span(key),
                field,
                format!(
                    "{v:?} is not a boot partition file name; expected a non-empty path of letters, digits and -_.+~,@= (no spaces, `.` or `..`)"
                ),
            ));
        }
    }
}

/// Device trees are copied to `to` on the FAT partition, and extlinux.conf or config.txt may
/// name them: the same plain paths as the kernel's.
fn devicetree_copy_to(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, c) in b.devicetree.copy.iter().enumerate() {
        let to = c.to.strip_prefix('/').unwrap_or(&c.to);
        if !is_boot_path(to) {
            d.push(cx.diag(
                cx.key_span("copy"),
                format!("devicetree.copy[{i}].to"),
                format!(
                    "{:?} is not a boot partition path; expected a non-empty path of letters, digits and -_.+~,@= (no spaces, `.` or `..`)",
                    c.to
                ),
            ));
        }
    }
}

/// `from` is looked up under the kernel's dtb directory in the base: `..` or an absolute path
/// would copy other files of the base onto the boot partition.
fn devicetree_copy_from(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, c) in b.devicetree.copy.iter().enumerate() {
        let from_ok = c
            .from
            .split('/')
            .all(|x| !x.is_empty() && x != "." && x != "..");
        if !from_ok {
            d.push(cx.diag(
                cx.key_span("copy"),
                format!("devicetree.copy[{i}].from"),
                format!(
                    "{:?} is not a path inside the kernel's device-tree directory; expected e.g. \"rockchip\" (no `..`, no leading /)",
                    c.from
                ),
            ));
        }
    }
}

/// kiln writes extlinux.conf, config.txt, cmdline.txt and kiln.json itself: a boot file at the
/// same path (FAT names ignore case), or a directory where one of them goes, would be
/// overwritten or break the write.
fn boot_files_vs_generated(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    let generated: &[&str] = match b.boot {
        BootStyle::Extlinux => &["extlinux/extlinux.conf", "kiln.json"],
        BootStyle::RpiFirmware => &["config.txt", "cmdline.txt", "kiln.json"],
        BootStyle::SystemdBoot => &["loader/loader.conf", "loader/entries", "kiln.json"],
    };
    let key = |s: &str| s.to_ascii_lowercase();
    for (path, field, file, at) in &boot_names(b) {
        // A generated file at the same path, or one under a name this one takes.
        for g in generated {
            let (p, gl) = (key(path), key(g));
            if p == gl
                || gl.starts_with(&format!("{p}/"))
                || (*file && p.starts_with(&format!("{gl}/")))
            {
                d.push(cx.diag(
                    cx.key_span(at),
                    field.clone(),
                    format!(
                        "`{path}` collides with `{g}`, which kiln writes on the boot partition; expected another name"
                    ),
                ));
            }
        }
    }
}

/// FAT names ignore case: two boot files on the same path (or a file where another needs a
/// directory) would overwrite each other, say the initramfs over the kernel.
fn boot_files_distinct(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    let key = |s: &str| s.to_ascii_lowercase();
    let names = boot_names(b);
    for (i, (path, field, file, at)) in names.iter().enumerate() {
        for (other, ofield, ofile, _) in &names[..i] {
            let (p, o) = (key(path), key(other));
            let clash = p == o
                || (*ofile && p.starts_with(&format!("{o}/")))
                || (*file && o.starts_with(&format!("{p}/")));
            if clash {
                d.push(cx.diag(
                    cx.key_span(at),
                    field.clone(),
                    format!(
                        "`{path}` collides with `{other}` ({ofield}) on the boot partition (FAT names ignore case); expected distinct names"
                    ),
                ));
            }
        }
    }
}

/// Command-line words are joined with spaces into cmdline.txt or an extlinux `append` line: a
/// space, quote or newline would add words or lines.
fn cmdline_words(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, w) in b.kernel.cmdline.iter().enumerate() {
        if !is_word(w) {
            d.push(cx.diag(
                cx.key_span("cmdline"),
                format!("kernel.cmdline[{i}]"),
                format!("{w:?} is not one command-line word; expected no spaces, quotes or control characters"),
            ));
        }
    }
}

/// Consoles become `console=` words on the command line: the same as cmdline words.
fn console_words(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, c) in b.kernel.consoles.iter().enumerate() {
        if !is_word(c) {
            d.push(cx.diag(
                cx.key_span("consoles"),
                format!("kernel.consoles[{i}]"),
                format!("{c:?} is not a console; expected `tty,baud` without spaces or control characters"),
            ));
        }
    }
}

/// `fdtdir` is written into extlinux.conf: a newline would inject, say, a fixed `fdt` line.
fn fdtdir_word(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if let Some(f) = &b.devicetree.fdtdir
        && !is_word(f)
    {
        d.push(cx.diag(
            cx.key_span("fdtdir"),
            "devicetree.fdtdir",
            format!("{f:?} is not a directory name; expected one word such as \"/dtbs/\""),
        ));
    }
}

/// `device_tree=` is a config.txt line (for the board and each variant): a newline would
/// inject another setting, such as a dtoverlay.
fn device_tree_names(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
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
            d.push(cx.diag(
                cx.key_span("device_tree"),
                field,
                format!("{dt:?} is not a boot partition file name; expected e.g. \"bcm2712-rpi-5-b.dtb\""),
            ));
        }
    }
}

/// Each [rpi] config entry is one config.txt line; a newline would inject another (a different
/// kernel=, say).
fn rpi_config_lines(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, l) in b.rpi.config.iter().enumerate() {
        if !is_one_line(l) {
            d.push(cx.diag(
                cx.key_span("config"),
                format!("rpi.config[{i}]"),
                format!(
                    "{l:?} is not one line; expected a single setting without control characters"
                ),
            ));
        }
    }
}

/// eeprom_tool is printed for users to run: control characters (escape sequences, newlines)
/// could hide or change what they paste.
fn eeprom_tool_line(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if let Some(t) = &b.eeprom_tool
        && !is_one_line(t)
    {
        d.push(cx.diag(
            cx.key_span("eeprom_tool"),
            "eeprom_tool",
            format!("{t:?} is not one line; expected a command without control characters"),
        ));
    }
}

// ---- UEFI (systemd-boot) ----

/// UEFI firmware finds the EFI system partition by its GPT type (UEFI spec 2.10, 13.3.3).
fn systemd_boot_gpt(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if b.boot == BootStyle::SystemdBoot && b.partition_table.kind != TableKind::Gpt {
        d.push(cx.diag(
            cx.key_span("kind"),
            "partition_table.kind",
            "systemd-boot boards use a GPT (the firmware finds the EFI system partition by its type)",
        ));
    }
}

/// The boot partition is the EFI system partition: type `esp`, or the firmware never looks in it.
fn systemd_boot_esp(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    // On an MBR, systemd-boot-gpt says what is wrong.
    if b.boot != BootStyle::SystemdBoot || b.partition_table.kind != TableKind::Gpt {
        return;
    }
    for (i, p) in b.partitions.iter().enumerate() {
        if p.content == Content::Boot && !p.type_.eq_ignore_ascii_case("esp") {
            d.push(cx.diag(
                cx.key_span("type"),
                format!("partition[{i}].type"),
                "the boot partition of a systemd-boot board is the EFI system partition; expected type = \"esp\"",
            ));
        }
    }
}

/// With no NVRAM entry (kiln writes images, never firmware variables), UEFI starts the
/// removable-media path `EFI/BOOT/BOOT<arch>.EFI` (UEFI spec 2.10, 3.5.1.1): the loader must be
/// there, copied from the base.
fn systemd_boot_loader(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if b.boot != BootStyle::SystemdBoot {
        return;
    }
    let want = match b.arch {
        Arch::Amd64 => "EFI/BOOT/BOOTX64.EFI",
        Arch::Arm64 => "EFI/BOOT/BOOTAA64.EFI",
    };
    if !b.boot_files.iter().any(|c| c.to.eq_ignore_ascii_case(want)) {
        d.push(cx.diag(
            cx.key_span("boot"),
            "boot_file",
            format!(
                "systemd-boot boards need a [[boot_file]] with to = \"{want}\" (the path UEFI starts without an NVRAM entry)"
            ),
        ));
    }
}

/// `[[boot_file]] from` is a path inside the base: relative, no `..`.
fn boot_file_from(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    for (i, c) in b.boot_files.iter().enumerate() {
        let ok = !c.from.is_empty()
            && !c.from.starts_with('/')
            && c.from
                .split('/')
                .all(|x| !x.is_empty() && x != "." && x != "..");
        if !ok {
            d.push(cx.diag(
                cx.key_span("from"),
                format!("boot_file[{i}].from"),
                format!(
                    "{:?} is not a path in the base; expected a relative path without `.` or `..` (e.g. usr/lib/systemd/boot/efi/systemd-bootx64.efi)",
                    c.from
                ),
            ));
        }
    }
}

/// kiln lays out rpi-firmware boards like Raspberry Pi OS (MBR, FAT32 type 0x0c): the layout
/// the EEPROM firmware is known to boot.
fn rpi_firmware_mbr(cx: &Ctx, b: &BoardFile, d: &mut Vec<Diagnostic>) {
    if b.boot == BootStyle::RpiFirmware && b.partition_table.kind != TableKind::Mbr {
        d.push(cx.diag(
            cx.key_span("kind"),
            "partition_table.kind",
            "rpi-firmware boards use an MBR here (what Raspberry Pi OS ships)",
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
