//! `[admin]`: the admin listener (`/live`, `/ready`, `/metrics`) and the
//! per-tenant metrics.

use std::{fmt, net::SocketAddr, str::FromStr};

use serde::Deserialize;

use super::ConfigError;

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7401";
/// The most tenants `tenant_metrics_max` may allow.
pub const MAX_TENANT_METRICS: usize = 1000;

/// Where the admin listener listens, or that there is none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminListen {
    Off,
    Tcp(SocketAddr),
}

impl FromStr for AdminListen {
    type Err = String;

    /// `host:port` (an IP address, or `localhost`), or `off` (or empty).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() || s == "off" {
            return Ok(Self::Off);
        }
        let replaced = s
            .strip_prefix("localhost:")
            .map(|port| format!("127.0.0.1:{port}"));
        SocketAddr::from_str(replaced.as_deref().unwrap_or(s))
            .map(Self::Tcp)
            .map_err(|_| {
                format!("{s:?} is neither host:port (an IP address or localhost) nor \"off\"")
            })
    }
}

impl fmt::Display for AdminListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

impl<'de> Deserialize<'de> for AdminListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Per-tenant series: none, or the first `tenant_metrics_max` tenants seen.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TenantMetrics {
    #[default]
    Off,
    Top,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: AdminListen,
    pub tenant_metrics: TenantMetrics,
    /// Tenants with series of their own; the rest count as "other".
    pub tenant_metrics_max: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_ADMIN_LISTEN.parse().expect("the default parses"),
            tenant_metrics: TenantMetrics::Off,
            tenant_metrics_max: 20,
        }
    }
}

impl AdminConfig {
    /// Each setting by itself.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_TENANT_METRICS).contains(&self.tenant_metrics_max) {
            return Err(ConfigError::new(
                "admin.tenant_metrics_max",
                format!("must be between 1 and {MAX_TENANT_METRICS}"),
            ));
        }
        Ok(())
    }

    /// The per-tenant bound, or `None` when per-tenant series are off.
    pub fn tenant_bound(&self) -> Option<usize> {
        match self.tenant_metrics {
            TenantMetrics::Off => None,
            TenantMetrics::Top => Some(self.tenant_metrics_max),
        }
    }
}
