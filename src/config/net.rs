//! IPv4 network arithmetic the inventory needs (no crate: four operations on a u32).

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network in CIDR form, e.g. `192.168.100.0/24`. The address must be the network
/// address (no host bits), so a typo like `192.168.100.1/24` is caught instead of guessed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expected = "expected an IPv4 network like 192.168.100.0/24";
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` has no /prefix; {expected}"))?;
        let network: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IPv4 address; {expected}"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("prefix `{prefix}` is not 0..=32; {expected}"))?;
        let net = Ipv4Net { network, prefix };
        if u32::from(network) & !net.mask() != 0 {
            let fixed = Ipv4Addr::from(u32::from(network) & net.mask());
            return Err(format!(
                "`{s}` has host bits set; expected the network address `{fixed}/{prefix}`"
            ));
        }
        Ok(net)
    }
}

impl<'de> Deserialize<'de> for Ipv4Net {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_tests_membership() {
        let n: Ipv4Net = "192.168.100.0/24".parse().unwrap();
        assert!(n.contains("192.168.100.11".parse().unwrap()));
        assert!(!n.contains("192.168.101.11".parse().unwrap()));
        assert_eq!(n.broadcast(), Ipv4Addr::new(192, 168, 100, 255));
    }

    #[test]
    fn rejects_host_bits_and_bad_prefix() {
        assert!("192.168.100.1/24".parse::<Ipv4Net>().is_err());
        assert!("192.168.100.0/33".parse::<Ipv4Net>().is_err());
        assert!("192.168.100.0".parse::<Ipv4Net>().is_err());
    }
}
