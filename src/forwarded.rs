//! Who the client is behind a reverse proxy (prism's gateway, nginx, a load
//! balancer): the peer of a connection from a trusted proxy is the proxy, and
//! the client is the last address in `X-Forwarded-For` that no trusted proxy
//! added. From anyone else the header is ignored, so a client cannot choose
//! the address its login failures are counted against.

use std::{fmt, net::IpAddr, str::FromStr};

use hyper::{HeaderMap, header::HeaderName};
use ipnet::IpNet;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustedProxies {
    Any,
    Nets(Vec<IpNet>),
}

impl TrustedProxies {
    /// Loopback only, as uvicorn's `--forwarded-allow-ips` defaults to: a
    /// gateway or nginx on the same machine works without configuration.
    pub fn loopback() -> TrustedProxies {
        TrustedProxies::Nets(vec![
            "127.0.0.0/8".parse().expect("a valid network"),
            "::1/128".parse().expect("a valid network"),
        ])
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        match self {
            TrustedProxies::Any => true,
            TrustedProxies::Nets(nets) => nets.iter().any(|n| n.contains(&ip)),
        }
    }

    /// The client of a request that came from `peer`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        // Later header lines were added later, like later entries of one.
        for line in headers.get_all(X_FORWARDED_FOR).iter().rev() {
            let Ok(line) = line.to_str() else {
                return client;
            };
            for entry in line.rsplit(',') {
                let Ok(ip) = entry.trim().parse::<IpAddr>() else {
                    // Past what the trusted proxies wrote, nothing is
                    // believed; a malformed entry ends the walk.
                    return client;
                };
                client = ip;
                if !self.trusts(ip) {
                    return client;
                }
            }
        }
        client
    }
}

/// `*`, or addresses and CIDR ranges separated by commas; empty trusts none.
impl FromStr for TrustedProxies {
    type Err = String;

    fn from_str(s: &str) -> Result<TrustedProxies, String> {
        if s.trim() == "*" {
            return Ok(TrustedProxies::Any);
        }
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<IpNet>()
                    .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{p:?} is neither an IP address nor a CIDR range"))
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies::Nets)
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrustedProxies::Any => f.write_str("*"),
            TrustedProxies::Nets(nets) => {
                let nets: Vec<String> = nets.iter().map(IpNet::to_string).collect();
                f.write_str(&nets.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(X_FORWARDED_FOR, l.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_a_trusted_peer_is_believed() {
        let trusted = TrustedProxies::loopback();
        let h = headers(&["203.0.113.7"]);
        assert_eq!(trusted.client(ip("127.0.0.1"), &h), ip("203.0.113.7"));
        assert_eq!(trusted.client(ip("::1"), &h), ip("203.0.113.7"));
        assert_eq!(
            trusted.client(ip("198.51.100.1"), &h),
            ip("198.51.100.1"),
            "an untrusted peer cannot name another client"
        );
        assert_eq!(
            trusted.client(ip("127.0.0.1"), &HeaderMap::new()),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn the_client_is_the_last_address_no_trusted_proxy_added() {
        let trusted: TrustedProxies = "127.0.0.1, 10.0.0.0/8".parse().unwrap();
        // A client that forged an entry, then a load balancer, then the gateway.
        let h = headers(&["192.0.2.66, 203.0.113.7", "10.1.2.3"]);
        assert_eq!(trusted.client(ip("127.0.0.1"), &h), ip("203.0.113.7"));
        // Garbage ends the walk at the last address believed.
        let h = headers(&["203.0.113.7, not-an-ip, 10.1.2.3"]);
        assert_eq!(trusted.client(ip("127.0.0.1"), &h), ip("10.1.2.3"));
        // Every entry a trusted proxy: the first is the client.
        let h = headers(&["10.0.0.1, 10.0.0.2"]);
        assert_eq!(trusted.client(ip("127.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn parses_addresses_ranges_any_and_none() {
        let t: TrustedProxies = "10.0.0.0/8,::1, 192.168.1.5".parse().unwrap();
        assert!(t.trusts(ip("10.9.9.9")));
        assert!(t.trusts(ip("192.168.1.5")));
        assert!(!t.trusts(ip("192.168.1.6")));
        assert_eq!(t.to_string(), "10.0.0.0/8,::1/128,192.168.1.5/32");
        assert_eq!("*".parse::<TrustedProxies>().unwrap(), TrustedProxies::Any);
        let none: TrustedProxies = "".parse().unwrap();
        assert!(!none.trusts(ip("127.0.0.1")));
        assert!("10.0.0.0/33".parse::<TrustedProxies>().is_err());
        assert!("proxy.internal".parse::<TrustedProxies>().is_err());
    }
}
