//! Opening TCP connections to `host:port` addresses, within the IP family a mesh allows.

use std::{fmt, io, net::IpAddr};

use tokio::net::TcpStream;

/// Which addresses of a name may be dialled (a mesh's `meshServiceDiscovery.ipPreference`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum IpFamily {
    /// Whatever the name resolves to, in the resolver's order.
    #[default]
    Any = 0,
    V4Only = 1,
    V6Only = 2,
}

impl IpFamily {
    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::V4Only,
            2 => Self::V6Only,
            _ => Self::Any,
        }
    }

    fn admits(self, ip: IpAddr) -> bool {
        match self {
            Self::Any => true,
            Self::V4Only => ip.is_ipv4(),
            Self::V6Only => ip.is_ipv6(),
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Any => "IP",
            Self::V4Only => "IPv4",
            Self::V6Only => "IPv6",
        })
    }
}

/// Connects to `addr` (`host:port`), trying its addresses of `family` in the resolver's order.
pub async fn connect(addr: &str, family: IpFamily) -> io::Result<TcpStream> {
    if family == IpFamily::Any {
        return TcpStream::connect(addr).await;
    }
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        if family.admits(a.ip()) {
            match TcpStream::connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!("{addr} has no {family} address"),
        )
    }))
}

/// The addresses of `addr` (`HOST:PORT`) in `family`, sorted and without repeats; empty when it
/// does not resolve.
pub async fn resolve(addr: &str, family: IpFamily) -> Vec<std::net::SocketAddr> {
    let mut out: Vec<_> = match tokio::net::lookup_host(addr).await {
        Ok(addrs) => addrs.filter(|a| family.admits(a.ip())).collect(),
        Err(_) => Vec::new(),
    };
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_family_keeps_to_its_addresses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let v4 = format!("127.0.0.1:{port}");
        assert!(connect(&v4, IpFamily::Any).await.is_ok());
        assert!(connect(&v4, IpFamily::V4Only).await.is_ok());
        let e = connect(&v4, IpFamily::V6Only).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrNotAvailable);
        assert!(e.to_string().contains("no IPv6 address"), "{e}");
    }
}
