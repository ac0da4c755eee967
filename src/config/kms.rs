//! `[kms]`: the root-key provider and, for AWS KMS, its keys and retries.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use super::{
    ConfigError,
    types::{AT_LEAST_ONE, DELETION_WAITING_DAYS},
};
use crate::kms::aws::AwsSettings;

/// Which root-key provider holds the root key.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KmsProvider {
    /// A root key file in the data directory: development, single host.
    #[default]
    Local,
    /// AWS KMS (or any endpoint speaking its API).
    Aws,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegionKey {
    /// The region's shared root key: key id, ARN or alias.
    pub key_id: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct KmsConfig {
    pub provider: KmsProvider,
    /// AWS: the default region.
    pub region: Option<String>,
    /// AWS: the shared root key of the default region.
    pub key_id: Option<String>,
    /// AWS: another endpoint (VPC endpoint, local KMS API server).
    pub endpoint_url: Option<String>,
    /// AWS: shared root keys of further regions.
    pub regions: BTreeMap<String, RegionKey>,
    /// Days before KMS deletes a shredded tenant's dedicated key (7 to 30).
    pub deletion_waiting_days: u32,
    /// Longest wait for one attempt of one KMS call.
    pub attempt_timeout_ms: u64,
    /// Attempts per KMS call, the first included.
    pub max_attempts: u32,
}

impl Default for KmsConfig {
    fn default() -> Self {
        Self {
            provider: KmsProvider::Local,
            region: None,
            key_id: None,
            endpoint_url: None,
            regions: BTreeMap::new(),
            deletion_waiting_days: 30,
            attempt_timeout_ms: 2000,
            max_attempts: 3,
        }
    }
}

impl KmsConfig {
    /// The AWS provider's settings (after [`super::Config::validate`]).
    pub fn aws_settings(&self) -> Option<AwsSettings> {
        let region = self.region.clone()?;
        let mut shared_keys = vec![(region.clone(), self.key_id.clone()?)];
        shared_keys.extend(
            self.regions
                .iter()
                .map(|(r, k)| (r.clone(), k.key_id.clone())),
        );
        Some(AwsSettings {
            default_region: region,
            shared_keys,
            endpoint_url: self.endpoint_url.clone(),
            attempt_timeout: Duration::from_millis(self.attempt_timeout_ms),
            max_attempts: self.max_attempts,
        })
    }

    /// Each setting by itself; the provider's settings together in
    /// [`KmsConfig::check_provider`].
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        DELETION_WAITING_DAYS.check("kms.deletion_waiting_days", self.deletion_waiting_days)?;
        AT_LEAST_ONE.check_all([
            (
                "kms.max_attempts / kms.attempt_timeout_ms",
                self.max_attempts.into(),
            ),
            (
                "kms.max_attempts / kms.attempt_timeout_ms",
                self.attempt_timeout_ms,
            ),
        ])
    }

    /// What the provider needs, and what only AWS may have.
    pub(super) fn check_provider(&self) -> Result<(), ConfigError> {
        match self.provider {
            KmsProvider::Aws => {
                if self.region.as_deref().is_none_or(str::is_empty) {
                    return Err(ConfigError::new(
                        "kms.region",
                        "is required with provider = \"aws\"",
                    ));
                }
                if self.key_id.as_deref().is_none_or(str::is_empty) {
                    return Err(ConfigError::new(
                        "kms.key_id",
                        "is required with provider = \"aws\"",
                    ));
                }
            }
            KmsProvider::Local => {
                if self.key_id.is_some() || self.region.is_some() || !self.regions.is_empty() {
                    return Err(ConfigError::new(
                        "kms.provider",
                        "kms.key_id, kms.region and kms.regions need provider = \"aws\"",
                    ));
                }
            }
        }
        Ok(())
    }
}
