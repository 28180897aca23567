//! Boot-loader blobs from the files users have: a bare loader (`u-boot-rockchip.bin`) or a whole
//! vendor disk image, plain or compressed (xz, gzip, zstd; told apart by their first bytes). From
//! a disk image kiln takes the bytes from the board's loader offset up to the image's first
//! partition, reading only that far.
//!
//! Trailing zero bytes are dropped: the image kiln writes is zero there anyway, so the written
//! image is the same either way, while trimming lets a vendor image whose first partition lies
//! past the board's accept a loader that fits, and makes "the loader bytes" (and their sha256)
//! something `kiln inspect` can measure from a finished image.

use crate::config::board::LoaderKind;
use crate::config::size::{MIB, human};
use crate::util::sha256_hex;
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// Rockchip idbloader header magic, as it lies on disk: U-Boot's tools/rkcommon.c writes
/// `cpu_to_le32(RK_MAGIC_V2)` with `RK_MAGIC_V2 = 0x534E4B52`, the header version its
/// `spl_infos` table gives the RK3588 (the boot ROM reads it at sector 64 = 32 KiB).
pub const RKNS: &[u8; 4] = b"RKNS";

/// How older SoCs' idbloader headers start on disk: `RK_MAGIC` 0x0ff0aa55 after rkcommon.c
/// RC4-encodes the header with its fixed key (barebox names it `RK_SIGNATURE_RC4`, 0xfcdc8c3b).
/// Named in errors, since it means a loader for another SoC.
const RK_MAGIC_V1: &[u8] = &[0x3b, 0x8c, 0xdc, 0xfc];

/// The most kiln decompresses from one file looking for a loader. No loader layout kiln knows
/// puts the first partition this far in; the bound keeps a wrong file from costing minutes.
pub const MAX_SCAN: u64 = 256 * MIB;

/// How the file was compressed (from its magic bytes, never its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Xz,
    Gzip,
    Zstd,
}

impl Compression {
    fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// What the (decompressed) file was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Form {
    /// The loader itself, header first.
    Bare,
    GptDiskImage,
    MbrDiskImage,
}

impl Form {
    fn name(self) -> &'static str {
        match self {
            Form::Bare => "bare loader",
            Form::GptDiskImage => "GPT disk image",
            Form::MbrDiskImage => "MBR disk image",
        }
    }
}

/// Which loader went into an image; kept in its identity (`kiln.json`) and the manifest. The
/// file is named without its directory: the image must not depend on where it was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderRecord {
    /// Artifact name (`uboot`).
    pub artifact: String,
    /// File name as given to `--artifact`, without its directory.
    pub file: String,
    pub form: Form,
    pub compression: Compression,
    /// Byte offset of the loader in the image (and, for a disk image, in the source).
    pub offset: u64,
    /// Loader length, trailing zeros dropped.
    pub size: u64,
    /// sha256 of those bytes.
    pub sha256: String,
}

impl LoaderRecord {
    /// `u-boot.img.xz (GPT disk image, xz)`.
    pub fn describe(&self) -> String {
        let c = match self.compression {
            Compression::None => String::new(),
            c => format!(", {}", c.name()),
        };
        format!("{} ({}{c})", self.file, self.form.name())
    }
}

/// A loader ready to write, and its record.
#[derive(Debug, Clone)]
pub struct Loader {
    pub data: Vec<u8>,
    pub record: LoaderRecord,
}

/// Reads the loader for `artifact` from `path`: `offset` is where the board writes it (and
/// where a disk image holds it), `room` the bytes from there to the board's first partition.
pub fn read(
    artifact: &str,
    path: &Path,
    kind: LoaderKind,
    offset: u64,
    room: u64,
) -> Result<Loader> {
    let what = format!("--artifact {artifact}={}", path.display());
    let (mut r, compression) = open(path).with_context(|| what.clone())?;
    let read_err = |e: std::io::Error| read_error(&what, compression, e);

    // The first `offset` bytes: a bare loader's header, or a disk image's partition table.
    let head_len = usize::try_from(offset)
        .ok()
        .filter(|_| offset <= MAX_SCAN)
        .ok_or_else(|| anyhow!("{what}: loader offset {offset} is beyond {MAX_SCAN}"))?;
    let mut head = vec![0u8; head_len];
    let n = read_full(&mut r, &mut head).map_err(read_err)?;
    head.truncate(n);

    let mut region = Region::new(room);
    let form = if head.starts_with(RKNS) {
        // The stream may go on past the board's room only with zeros (see Region).
        region.push(&head);
        let limit = MAX_SCAN - n as u64;
        let got = pump(&mut r, limit, &mut region).map_err(read_err)?;
        if got == limit && read_full(&mut r, &mut [0u8; 1]).map_err(read_err)? > 0 {
            bail!(
                "{what}: a {} loader larger than {}; expected at most {} (the room between byte {offset} and the first partition)",
                kind_name(kind),
                human(MAX_SCAN),
                human(room)
            );
        }
        Form::Bare
    } else {
        let (form, first) = match first_partition(&head) {
            Ok(t) => t,
            Err(Table::None) => bail!(
                "{what}: neither a {} loader (expected its header `RKNS` at byte 0, found {}) nor a disk image (no partition table: no 0x55AA boot signature at byte 510{}){}",
                kind_name(kind),
                show(&head, 0),
                if n < 512 {
                    format!("; the file holds only {n} bytes")
                } else {
                    String::new()
                },
                name_hint(path, compression)
            ),
            Err(Table::Bad(m)) => bail!("{what}: {m}"),
        };
        let table = form.name();
        if first <= offset {
            bail!(
                "{what}: a {table} whose first partition starts at byte {first}, at or before byte {offset} where the loader belongs; expected the first partition after the loader"
            );
        }
        if first > MAX_SCAN {
            bail!(
                "{what}: a {table} whose first partition starts at byte {first}, past {}; expected a boot-loader area before the first partition of at most that",
                human(MAX_SCAN)
            );
        }
        if (n as u64) < offset {
            bail!(
                "{what}: a {table} that ends at byte {n}, before its loader at byte {offset}; expected the image up to its first partition at byte {first} (is it truncated?)"
            );
        }
        let want = first - offset;
        let got = pump(&mut r, want, &mut region).map_err(read_err)?;
        if got < want {
            bail!(
                "{what}: a {table} that ends at byte {}, before its first partition at byte {first}; expected the loader area up to there (is it truncated?)",
                offset + got
            );
        }
        if !region.data.starts_with(RKNS) {
            bail!(
                "{what}: a {table} without a {} loader: found {} at byte {offset}, expected the idbloader header `RKNS` (52 4b 4e 53) there",
                kind_name(kind),
                show(&region.data, 0)
            );
        }
        form
    };

    let size = region.end;
    if size > room {
        let first = offset.saturating_add(room);
        bail!(
            "{what}: the loader ({}) is {} ({size} bytes) and would run from byte {offset} to {}, into the first partition at byte {first}; expected a loader of at most {} ({room} bytes)",
            form.name(),
            human(size),
            offset.saturating_add(size),
            human(room)
        );
    }
    let mut data = region.data;
    // `size <= room` and `data` holds the first `room` bytes, so this only drops zeros.
    data.truncate(usize::try_from(size).unwrap_or(data.len()));
    let record = LoaderRecord {
        artifact: artifact.to_string(),
        file: path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string()),
        form,
        compression,
        offset,
        size,
        sha256: sha256_hex(&data),
    };
    Ok(Loader { data, record })
}

fn kind_name(kind: LoaderKind) -> &'static str {
    match kind {
        LoaderKind::Rockchip => "Rockchip",
    }
}

/// Opens `path`, decompressing by its magic bytes.
fn open(path: &Path) -> Result<(Box<dyn Read>, Compression)> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut magic = [0u8; 6];
    let n = read_full(&mut f, &mut magic).with_context(|| format!("reading {}", path.display()))?;
    f.seek(SeekFrom::Start(0))
        .with_context(|| format!("rewinding {}", path.display()))?;
    let b = BufReader::with_capacity(1 << 20, f);
    Ok(match &magic[..n] {
        [0xfd, b'7', b'z', b'X', b'Z', 0x00] => (
            Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(b)),
            Compression::Xz,
        ),
        [0x1f, 0x8b, ..] => (
            Box::new(flate2::bufread::MultiGzDecoder::new(b)),
            Compression::Gzip,
        ),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => (
            Box::new(
                zstd::stream::read::Decoder::with_buffer(b)
                    .with_context(|| format!("starting zstd on {}", path.display()))?,
            ),
            Compression::Zstd,
        ),
        _ => (Box::new(b), Compression::None),
    })
}

fn read_error(what: &str, c: Compression, e: std::io::Error) -> anyhow::Error {
    match c {
        Compression::None => anyhow!("{what}: reading: {e}"),
        c => anyhow!(
            "{what}: not a valid {0} stream ({e}); expected a complete {0}-compressed loader or disk image (is the file truncated or corrupt?)",
            c.name()
        ),
    }
}

/// A hint when the name promises a compression the bytes do not have.
fn name_hint(path: &Path, c: Compression) -> String {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match (ext, c) {
        ("xz" | "gz" | "zst", Compression::None) => {
            format!(
                "; its name ends in .{ext} but it does not start with that format's magic bytes"
            )
        }
        _ => String::new(),
    }
}

/// Fills `buf` unless the stream ends first; returns the bytes read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Feeds at most `limit` bytes of `r` into `region`; returns how many there were.
fn pump(r: &mut dyn Read, limit: u64, region: &mut Region) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    while total < limit {
        let want = usize::try_from(limit - total).map_or(buf.len(), |l| l.min(buf.len()));
        let k = read_full(r, &mut buf[..want])?;
        if k == 0 {
            break;
        }
        region.push(&buf[..k]);
        total += k as u64;
        if k < want {
            break;
        }
    }
    Ok(total)
}

/// The loader area as it streams by: keeps its first `room` bytes only (memory stays bounded
/// by the board), and tracks where the last non-zero byte ends, past `room` too, so an
/// oversized loader is measured exactly and trailing zeros are dropped.
struct Region {
    data: Vec<u8>,
    room: u64,
    len: u64,
    /// One past the last non-zero byte.
    end: u64,
}

impl Region {
    fn new(room: u64) -> Region {
        Region {
            data: Vec::new(),
            room,
            len: 0,
            end: 0,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        let kept = self.data.len() as u64;
        let take = usize::try_from(self.room.saturating_sub(kept))
            .map_or(chunk.len(), |t| t.min(chunk.len()));
        self.data.extend_from_slice(&chunk[..take]);
        if let Some(i) = chunk.iter().rposition(|&b| b != 0) {
            self.end = self.len + i as u64 + 1;
        }
        self.len += chunk.len() as u64;
    }
}

/// Why no first partition was found.
#[derive(Debug)]
enum Table {
    /// No 0x55AA boot signature: not a disk image.
    None,
    /// A table that cannot be used, with the reason.
    Bad(String),
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// The table kind and first partition's byte offset, from the image's first bytes (up to the
/// loader offset: a table that reaches past it would overlap the loader).
fn first_partition(head: &[u8]) -> Result<(Form, u64), Table> {
    if head.len() < 512 || head[510..512] != [0x55, 0xaa] {
        return Err(Table::None);
    }
    let entries: Vec<&[u8]> = (0..4).map(|i| &head[446 + i * 16..462 + i * 16]).collect();
    if entries.iter().any(|e| e[4] == 0xee) {
        return gpt_first(head).map(|s| (Form::GptDiskImage, s));
    }
    entries
        .iter()
        .filter(|e| e[4] != 0 && le32(e, 8) != 0 && le32(e, 12) != 0)
        .map(|e| u64::from(le32(e, 8)) * 512)
        .min()
        .map(|s| (Form::MbrDiskImage, s))
        .ok_or_else(|| {
            Table::Bad("an MBR disk image with no partitions; expected a first partition to tell where the loader area ends".into())
        })
}

/// GPT on 512- or 4096-byte sectors; header and entry checksums must hold.
fn gpt_first(head: &[u8]) -> Result<u64, Table> {
    let bad = |m: String| Table::Bad(format!("a GPT disk image {m}"));
    let sector = [512usize, 4096]
        .into_iter()
        .find(|&s| head.len() >= s + 92 && &head[s..s + 8] == b"EFI PART")
        .ok_or_else(|| {
            bad(
                "(protective MBR) without a GPT header: expected `EFI PART` at byte 512 or 4096"
                    .into(),
            )
        })?;
    let h = &head[sector..];
    let hdr_size = le32(h, 12) as usize;
    if !(92..=sector.min(h.len())).contains(&hdr_size) {
        return Err(bad(format!(
            "whose GPT header size is {hdr_size}; expected 92 to {sector} within the file"
        )));
    }
    let mut hdr = h[..hdr_size].to_vec();
    hdr[16..20].fill(0);
    if crc32(&hdr) != le32(h, 16) {
        return Err(bad(format!(
            "whose GPT header at byte {sector} fails its CRC32; expected a valid GPT"
        )));
    }
    let (entries_lba, count, entry_size) = (le64(h, 72), le32(h, 80), le32(h, 84));
    if entry_size < 128 || !entry_size.is_multiple_of(8) {
        return Err(bad(format!(
            "whose GPT entries are {entry_size} bytes; expected 128 or a larger multiple of 8"
        )));
    }
    let start = entries_lba.checked_mul(sector as u64).ok_or_else(|| {
        bad(format!(
            "whose GPT entries start at LBA {entries_lba}, past any disk"
        ))
    })?;
    let len = u64::from(count) * u64::from(entry_size);
    let end = start.saturating_add(len);
    if end > head.len() as u64 || start < (2 * sector) as u64 {
        return Err(bad(format!(
            "whose GPT entries run from byte {start} to {end}; expected them between the header and byte {}, where the loader starts",
            head.len()
        )));
    }
    // In range of `head`, checked just above.
    let arr = &head[start as usize..end as usize];
    if crc32(arr) != le32(h, 88) {
        return Err(bad(
            "whose GPT partition entries fail their CRC32; expected a valid GPT".into(),
        ));
    }
    arr.chunks_exact(entry_size as usize)
        .filter(|e| e[..16].iter().any(|&b| b != 0))
        .map(|e| le64(e, 32))
        .min()
        .ok_or_else(|| {
            bad(
                "with no partitions; expected a first partition to tell where the loader area ends"
                    .into(),
            )
        })?
        .checked_mul(sector as u64)
        .ok_or_else(|| bad("whose first partition starts past any disk".into()))
}

fn crc32(b: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(b);
    c.sum()
}

/// The first four bytes at `at`, as hex and, when printable, as text.
fn show(b: &[u8], at: usize) -> String {
    let s = b.get(at..).unwrap_or(&[]);
    let s = &s[..s.len().min(4)];
    if s.is_empty() {
        return "nothing (the file ends there)".into();
    }
    let hex: Vec<String> = s.iter().map(|x| format!("{x:02x}")).collect();
    if s.iter().all(|c| c.is_ascii_graphic() || *c == b' ') {
        format!("`{}` ({})", String::from_utf8_lossy(s), hex.join(" "))
    } else if s == RK_MAGIC_V1 {
        format!(
            "{} (the RC4-encoded header of Rockchip SoCs before the RK35xx: a loader for another SoC)",
            hex.join(" ")
        )
    } else {
        hex.join(" ")
    }
}

/// The loader bytes of a finished image: from `offset` to the last non-zero byte before
/// `first` (the first partition), as [`read`] trims them. Returns (size, sha256).
pub fn measure(file: &File, offset: u64, first: u64) -> Result<(u64, String)> {
    use std::os::unix::fs::FileExt;
    let len = first
        .checked_sub(offset)
        .filter(|l| *l <= MAX_SCAN)
        .ok_or_else(|| {
            anyhow!("loader at byte {offset} and first partition at byte {first} do not fit a loader area")
        })?;
    let mut region = Region::new(len);
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let k = usize::try_from(len - pos).map_or(buf.len(), |l| l.min(buf.len()));
        file.read_exact_at(&mut buf[..k], offset + pos)
            .with_context(|| format!("reading the loader area at byte {}", offset + pos))?;
        region.push(&buf[..k]);
        pos += k as u64;
    }
    let mut data = region.data;
    data.truncate(usize::try_from(region.end).unwrap_or(data.len()));
    Ok((region.end, sha256_hex(&data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt_head(first_lba: u64) -> Vec<u8> {
        let mut d = vec![0u8; 32768];
        d[446 + 4] = 0xee;
        d[510] = 0x55;
        d[511] = 0xaa;
        let mut e = vec![0u8; 128 * 128];
        e[0] = 1; // a used entry: non-zero type GUID
        e[32..40].copy_from_slice(&first_lba.to_le_bytes());
        let mut h = vec![0u8; 92];
        h[..8].copy_from_slice(b"EFI PART");
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32(&e).to_le_bytes());
        let c = crc32(&h);
        h[16..20].copy_from_slice(&c.to_le_bytes());
        d[512..604].copy_from_slice(&h);
        d[1024..1024 + e.len()].copy_from_slice(&e);
        d
    }

    #[test]
    fn gpt_first_partition_and_checksums() {
        let d = gpt_head(32768);
        assert_eq!(first_partition(&d).unwrap(), (Form::GptDiskImage, 16 << 20));
        let mut bad = d.clone();
        bad[1024 + 32] ^= 1;
        assert!(matches!(first_partition(&bad), Err(Table::Bad(m)) if m.contains("CRC32")));
        let mut bad = d.clone();
        bad[512 + 20] ^= 1;
        assert!(matches!(first_partition(&bad), Err(Table::Bad(m)) if m.contains("header")));
    }

    #[test]
    fn gpt_entries_past_the_loader_offset_or_absurd_are_refused() {
        // Entries claimed at LBA 2^62: the multiplication overflows, and must not panic.
        let mut d = gpt_head(32768);
        d[512 + 72..512 + 80].copy_from_slice(&(1u64 << 62).to_le_bytes());
        let mut h = d[512..604].to_vec();
        h[16..20].fill(0);
        let c = crc32(&h);
        d[512 + 16..512 + 20].copy_from_slice(&c.to_le_bytes());
        assert!(matches!(first_partition(&d), Err(Table::Bad(_))));
        // Only 16 KiB read: the entries (ending at 17 KiB) reach past it.
        let d = gpt_head(32768);
        assert!(
            matches!(first_partition(&d[..16384]), Err(Table::Bad(m)) if m.contains("where the loader starts"))
        );
    }

    #[test]
    fn mbr_first_partition_and_no_table() {
        let mut d = vec![0u8; 32768];
        d[510] = 0x55;
        d[511] = 0xaa;
        assert!(matches!(first_partition(&d), Err(Table::Bad(_))));
        for (i, lba) in [(1usize, 65536u32), (0, 32768)] {
            let e = 446 + i * 16;
            d[e + 4] = 0x83;
            d[e + 8..e + 12].copy_from_slice(&lba.to_le_bytes());
            d[e + 12..e + 16].copy_from_slice(&2048u32.to_le_bytes());
        }
        assert_eq!(first_partition(&d).unwrap(), (Form::MbrDiskImage, 16 << 20));
        assert!(matches!(first_partition(&[0u8; 600]), Err(Table::None)));
        assert!(matches!(first_partition(&[0u8; 10]), Err(Table::None)));
    }

    #[test]
    fn region_keeps_room_and_finds_the_last_non_zero_byte() {
        let mut r = Region::new(8);
        r.push(&[1, 2, 0, 0]);
        r.push(&[0, 3, 0, 0, 0, 0]);
        assert_eq!((r.data.len(), r.end, r.len), (8, 6, 10));
        r.push(&[0, 0, 9]);
        assert_eq!((r.data.len(), r.end), (8, 13));
    }

    #[test]
    fn show_prints_hex_and_text() {
        assert_eq!(show(b"EFI PART", 0), "`EFI ` (45 46 49 20)");
        assert_eq!(show(&[0, 1, 2, 3, 4], 1), "01 02 03 04");
        assert_eq!(show(&[], 0), "nothing (the file ends there)");
    }
}
