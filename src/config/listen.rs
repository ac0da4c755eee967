//! Where the sidecar listens: `listen` and `KEYWARDEN_LISTEN`.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use serde::Deserialize;

/// Where the sidecar listens: TCP on loopback, or a unix socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    /// `host:port` (an IP address, or `localhost`) or `unix:/path`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/keywarden.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        let replaced = s
            .strip_prefix("localhost:")
            .map(|port| format!("127.0.0.1:{port}"));
        SocketAddr::from_str(replaced.as_deref().unwrap_or(s))
            .map(ListenAddr::Tcp)
            .map_err(|_| {
                format!("{s:?} is neither host:port (an IP address or localhost) nor unix:/path")
            })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
