//! Client prefixes (CIDR) for access lists: `ipnet` prefixes, written in the
//! config as `10.0.0.0/8`, `fd00::/8`, or a bare address for one host.

use core::net::IpAddr;

pub use ipnet::IpNet;

/// Parses a prefix or a bare address; host bits are cleared (`10.1.2.3/16` is `10.1.0.0/16`).
pub fn parse_prefix(text: &str) -> Result<IpNet, String> {
    let parsed = match text.parse::<IpAddr>() {
        Ok(host) => Ok(IpNet::from(host)),
        Err(_) => text.parse::<IpNet>(),
    };
    parsed.map(|net| net.trunc()).map_err(|_| match text.split_once('/').map(|(a, _)| a.parse::<IpAddr>()) {
        Some(Ok(address)) => {
            format!("prefix length in `{text}` must be at most {}", if address.is_ipv4() { 32 } else { 128 })
        }
        _ => format!("`{text}` is not an IP prefix (like 10.0.0.0/8 or fd00::/8)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn contains_respects_length_and_family() {
        let p = parse_prefix("10.1.0.0/16").expect("prefix");
        assert!(p.contains(&ip("10.1.200.3")));
        assert!(!p.contains(&ip("10.2.0.1")));
        assert!(!p.contains(&ip("fd00::1")));
        let all = parse_prefix("0.0.0.0/0").expect("prefix");
        assert!(all.contains(&ip("203.0.113.9")));
        let v6 = parse_prefix("fd00::/8").expect("prefix");
        assert!(v6.contains(&ip("fd12::1")));
        let host = parse_prefix("fd00::5").expect("prefix");
        assert!(host.contains(&ip("fd00::5")) && !host.contains(&ip("fd00::6")));
        assert_eq!(parse_prefix("10.1.2.3/16").expect("prefix").to_string(), "10.1.0.0/16");
    }

    #[test]
    fn rejects_bad_prefixes() {
        assert!(parse_prefix("10.0.0.0/33").is_err());
        assert!(parse_prefix("nonsense/8").is_err());
        assert!(parse_prefix("fd00::/129").is_err());
    }
}
