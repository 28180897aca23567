//! Byte sizes written the way people write them in board profiles: `16MiB`, `512KiB`, `32768`.

use serde::{Deserialize, Deserializer};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("`{s}` is not a size; expected e.g. 32768, 512KiB, 16MiB, 1GiB")
        })?;
        let mult = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" => KIB,
            "MiB" | "M" => MIB,
            "GiB" | "G" => GIB,
            other => {
                return Err(format!(
                    "unknown unit `{other}` in `{s}`; expected B, KiB, MiB or GiB"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= GIB && b.is_multiple_of(GIB) {
            write!(f, "{}GiB", b / GIB)
        } else if b >= MIB && b.is_multiple_of(MIB) {
            write!(f, "{}MiB", b / MIB)
        } else if b >= KIB && b.is_multiple_of(KIB) {
            write!(f, "{}KiB", b / KIB)
        } else {
            write!(f, "{b}B")
        }
    }
}

/// The largest disk, partition, offset or headroom a board profile may give: 16 TiB. Every
/// size from a user file is checked against it first, so sums of a few of them cannot overflow.
pub const MAX_DISK: u64 = 16 * 1024 * GIB;

/// A size as written: a byte count or a string with a unit. `extra` is what else the field
/// accepts (`, or "auto"`), for the message.
pub(crate) enum RawSize {
    Bytes(u64),
    Text(String),
}

pub(crate) struct RawSizeVisitor(pub &'static str);

impl serde::de::Visitor<'_> for RawSizeVisitor {
    type Value = RawSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a size: a number of bytes (32768) or a string such as \"512KiB\" or \"16MiB\"{}",
            self.0
        )
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawSize, E> {
        Ok(RawSize::Bytes(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawSize, E> {
        u64::try_from(v)
            .map(RawSize::Bytes)
            .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawSize, E> {
        Ok(RawSize::Text(v.to_string()))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(RawSizeVisitor(""))? {
            RawSize::Bytes(n) => Ok(ByteSize(n)),
            RawSize::Text(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// Human-readable size for summaries: `1.4 GiB`, `312.0 MiB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= GIB {
        format!("{:.1} GiB", b / GIB as f64)
    } else if bytes >= MIB {
        format!("{:.1} MiB", b / MIB as f64)
    } else if bytes >= KIB {
        format!("{:.1} KiB", b / KIB as f64)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(ByteSize::parse("32768").unwrap().0, 32768);
        assert_eq!(ByteSize::parse("16MiB").unwrap().0, 16 * MIB);
        assert_eq!(ByteSize::parse("512KiB").unwrap().0, 512 * KIB);
        assert!(ByteSize::parse("16MB").is_err());
        assert!(ByteSize::parse("MiB").is_err());
    }
}
