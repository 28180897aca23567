//! Board profiles (`boards/*.toml`): what a board's boot chain needs from a disk image, as data.

use super::diag::{Diagnostic, Source};
use super::size::{ByteSize, MIB};
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
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(PartSize::Fixed(ByteSize(n))),
            Raw::Str(s) if s == "auto" => Ok(PartSize::Auto),
            Raw::Str(s) => ByteSize::parse(&s)
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
    /// Extra lines for config.txt when the node's target is NVMe.
    #[serde(default)]
    pub nvme: Vec<String>,
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
    first_usable_lba * 512
}

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
            (PartSize::Fixed(s), _, _) => prev_end = prev_end.max(prev_end + s.0),
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
    if b.boot == BootStyle::RpiFirmware && b.partition_table.kind != TableKind::Mbr {
        d.push(src.diag(
            key_span("kind"),
            "partition_table.kind",
            "rpi-firmware boards use an MBR here (what Raspberry Pi OS ships)",
        ));
    }
    d
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
