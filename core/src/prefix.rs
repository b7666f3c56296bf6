//! IP prefixes (CIDR) for access lists.

use core::fmt;
use core::net::IpAddr;
use core::str::FromStr;

/// An address prefix such as `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPrefix {
    network: IpAddr,
    len: u8,
}

impl IpPrefix {
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then(|| IpPrefix { network: mask(addr, len), len })
    }

    pub fn is_ipv4(&self) -> bool {
        self.network.is_ipv4()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.len) == self.network
    }
}

impl FromStr for IpPrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("`{s}` is not an IP prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(len) => len.parse::<u8>().map_err(|_| format!("bad prefix length in `{s}`"))?,
            None => max,
        };
        IpPrefix::new(addr, len).ok_or_else(|| format!("prefix length in `{s}` exceeds {max}"))
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            IpAddr::V4((bits & mask).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            IpAddr::V6((bits & mask).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn contains_respects_length_and_family() {
        let p: IpPrefix = "10.1.0.0/16".parse().expect("prefix");
        assert!(p.contains(ip("10.1.200.3")));
        assert!(!p.contains(ip("10.2.0.1")));
        assert!(!p.contains(ip("fd00::1")));
        let all: IpPrefix = "0.0.0.0/0".parse().expect("prefix");
        assert!(all.contains(ip("203.0.113.9")));
        let v6: IpPrefix = "fd00::/8".parse().expect("prefix");
        assert!(v6.contains(ip("fd12::1")));
        let host: IpPrefix = "fd00::5".parse().expect("prefix");
        assert!(host.contains(ip("fd00::5")) && !host.contains(ip("fd00::6")));
    }

    #[test]
    fn rejects_bad_prefixes() {
        assert!("10.0.0.0/33".parse::<IpPrefix>().is_err());
        assert!("nonsense/8".parse::<IpPrefix>().is_err());
        assert!("fd00::/129".parse::<IpPrefix>().is_err());
    }
}
