//! Root keys in AWS KMS, through aws-sdk-kms.
//!
//! The same code talks to AWS and to a local KMS API server (the tests run
//! moto's server mode); only the endpoint URL differs. Credentials come from
//! the standard AWS chain (environment, web identity / IRSA, ECS and EC2
//! roles): nothing secret sits in keywarden's configuration.
//!
//! Every call carries the KMS encryption context of its [`WrapContext`]
//! (tenant, purpose, version): KMS itself refuses to unwrap a tenant key for
//! another tenant, whatever permissions the caller holds.
//!
//! Faults: each call has a per-attempt and a total timeout; throttling, 5xx
//! answers and transport errors are retried by the SDK's standard retry
//! strategy (exponential backoff with jitter) up to `max_attempts`. What is
//! still failing then is [`KmsError::Unavailable`], which the API answers as
//! UNAVAILABLE.

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_kms::{
    Client,
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    primitives::Blob,
    types::{KeySpec, KeyState, KeyUsageType, Tag},
};
use zeroize::Zeroizing;

use super::{GeneratedKey, KmsError, RootKeyProvider, WrapContext, WrappedKey};
use crate::{ids::TenantId, observe::metrics, secret::Key256, time::UnixMillis};

/// How to reach AWS KMS and which root keys to use.
#[derive(Clone, Debug)]
pub struct AwsSettings {
    /// The region of tenants that name none.
    pub default_region: String,
    /// The shared root key (id, ARN or alias) per region; must include the
    /// default region.
    pub shared_keys: Vec<(String, String)>,
    /// Another endpoint than AWS's (a VPC endpoint, a local KMS API server).
    pub endpoint_url: Option<String>,
    /// Longest wait for one attempt of one call.
    pub attempt_timeout: Duration,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
}

pub struct AwsKms {
    /// One client per configured region: a KMS key lives in one region.
    clients: HashMap<String, Client>,
    /// The shared root key's ARN per region.
    shared: HashMap<String, String>,
    default_region: String,
}

impl AwsKms {
    /// Builds a client per region and resolves every shared key to its ARN
    /// (DescribeKey), so a wrong key id stops the start, not the first call.
    /// `credentials` overrides the default chain (tests).
    pub async fn connect(
        settings: &AwsSettings,
        credentials: Option<aws_credential_types::provider::SharedCredentialsProvider>,
    ) -> Result<Self, KmsError> {
        let mut clients = HashMap::new();
        let mut shared = HashMap::new();
        for (region, key) in &settings.shared_keys {
            let mut loader =
                aws_config::defaults(BehaviorVersion::latest()).region(Region::new(region.clone()));
            if let Some(credentials) = &credentials {
                loader = loader.credentials_provider(credentials.clone());
            }
            let sdk = loader.load().await;
            let mut config = aws_sdk_kms::config::Builder::from(&sdk)
                .retry_config(
                    RetryConfig::standard().with_max_attempts(settings.max_attempts.max(1)),
                )
                .timeout_config(
                    TimeoutConfig::builder()
                        .connect_timeout(settings.attempt_timeout)
                        .operation_attempt_timeout(settings.attempt_timeout)
                        .operation_timeout(
                            settings.attempt_timeout * (settings.max_attempts.max(1) + 1),
                        )
                        .build(),
                );
            if let Some(url) = &settings.endpoint_url {
                config = config.endpoint_url(url);
            }
            let client = Client::from_conf(config.build());
            // Counted here: the provider is metered only once it is built.
            let timer = metrics::timed(metrics::KMS_CALLS, metrics::KMS_CALL_SECONDS, "describe");
            let described = describe_usable(&client, key, region).await;
            timer.finish(&described);
            let arn = described?;
            clients.insert(region.clone(), client);
            shared.insert(region.clone(), arn);
        }
        if !shared.contains_key(&settings.default_region) {
            return Err(KmsError::KeyNotUsable(format!(
                "no shared root key is configured for the default region {}",
                settings.default_region
            )));
        }
        Ok(Self {
            clients,
            shared,
            default_region: settings.default_region.clone(),
        })
    }

    fn region<'a>(&'a self, region: Option<&'a str>) -> &'a str {
        region.unwrap_or(&self.default_region)
    }

    fn client(&self, region: &str) -> Result<&Client, KmsError> {
        self.clients.get(region).ok_or_else(|| {
            KmsError::KeyNotUsable(format!(
                "region {region} is not configured: add a root key for it under kms.regions"
            ))
        })
    }

    /// The client of the region a key ARN names.
    fn client_for_key(&self, arn: &str) -> Result<&Client, KmsError> {
        let region = arn_region(arn)
            .ok_or_else(|| KmsError::Failed(format!("root key id {arn} is not a KMS key ARN")))?;
        self.client(region)
    }
}

/// The region of a KMS key ARN (`arn:aws:kms:REGION:ACCOUNT:key/ID`).
fn arn_region(arn: &str) -> Option<&str> {
    let mut parts = arn.split(':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("arn"), Some(_), Some("kms"), Some(region)) if !region.is_empty() => Some(region),
        _ => None,
    }
}

fn encryption_context(ctx: WrapContext<'_>) -> HashMap<String, String> {
    ctx.pairs()
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// DescribeKey: the key must exist, be enabled, be a symmetric encryption
/// key, and live in `region`. Answers its ARN.
async fn describe_usable(client: &Client, key: &str, region: &str) -> Result<String, KmsError> {
    let described = client
        .describe_key()
        .key_id(key)
        .send()
        .await
        .map_err(|e| classify("DescribeKey", e))?;
    let meta = described
        .key_metadata()
        .ok_or_else(|| KmsError::Failed("DescribeKey answered no key metadata".into()))?;
    let arn = meta.arn().unwrap_or_default().to_owned();
    let unusable = |why: &str| KmsError::KeyNotUsable(format!("KMS key {key} {why}"));
    if meta.key_state() != Some(&KeyState::Enabled) {
        return Err(unusable("is not enabled"));
    }
    // KeyUsage defaults to ENCRYPT_DECRYPT for symmetric keys; some KMS API
    // servers (moto) leave it out.
    let wrong_usage = meta
        .key_usage()
        .is_some_and(|usage| usage != &KeyUsageType::EncryptDecrypt);
    if wrong_usage || meta.key_spec() != Some(&KeySpec::SymmetricDefault) {
        return Err(unusable("is not a symmetric encryption key"));
    }
    if arn_region(&arn) != Some(region) {
        return Err(unusable(&format!("is not in region {region}")));
    }
    Ok(arn)
}

/// Sorts an SDK error into the provider's errors. The strings are for the log.
fn classify<E, R>(operation: &str, e: SdkError<E, R>) -> KmsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let detail = || format!("{operation}: {}", DisplayErrorContext(&e));
    match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            KmsError::Unavailable(detail())
        }
        SdkError::ServiceError(service) => match service.err().code() {
            Some("InvalidCiphertextException" | "IncorrectKeyException") => KmsError::Refused,
            Some(
                "ThrottlingException"
                | "KMSInternalException"
                | "DependencyTimeoutException"
                | "KeyUnavailableException"
                | "LimitExceededException"
                | "InternalFailure"
                | "ServiceUnavailable",
            )
            | None => KmsError::Unavailable(detail()),
            Some(
                "NotFoundException"
                | "DisabledException"
                | "InvalidArnException"
                | "KMSInvalidStateException",
            ) => KmsError::KeyNotUsable(format!(
                "{operation}: the KMS key is missing, disabled or pending deletion"
            )),
            Some(_) => KmsError::Failed(detail()),
        },
        _ => KmsError::Failed(detail()),
    }
}

#[async_trait]
impl RootKeyProvider for AwsKms {
    fn kind(&self) -> &'static str {
        "aws"
    }

    fn shared_key(&self, region: Option<&str>) -> Result<String, KmsError> {
        let region = self.region(region);
        self.shared.get(region).cloned().ok_or_else(|| {
            KmsError::KeyNotUsable(format!(
                "region {region} is not configured: add a root key for it under kms.regions"
            ))
        })
    }

    async fn resolve_key(&self, key: &str, region: Option<&str>) -> Result<String, KmsError> {
        let region = self.region(region);
        describe_usable(self.client(region)?, key, region).await
    }

    async fn create_dedicated_key(
        &self,
        tenant: &TenantId,
        region: Option<&str>,
    ) -> Result<String, KmsError> {
        let region = self.region(region);
        let tag = Tag::builder()
            .tag_key("keywarden:tenant")
            .tag_value(tenant.as_str())
            .build()
            .map_err(|e| KmsError::Failed(e.to_string()))?;
        let created = self
            .client(region)?
            .create_key()
            .description(format!("keywarden root key of tenant {tenant}"))
            .key_usage(KeyUsageType::EncryptDecrypt)
            .key_spec(KeySpec::SymmetricDefault)
            .tags(tag)
            .send()
            .await
            .map_err(|e| classify("CreateKey", e))?;
        created
            .key_metadata()
            .and_then(|m| m.arn())
            .map(str::to_owned)
            .ok_or_else(|| KmsError::Failed("CreateKey answered no key ARN".into()))
    }

    async fn generate_data_key(
        &self,
        root_key_id: &str,
        ctx: WrapContext<'_>,
    ) -> Result<GeneratedKey, KmsError> {
        let out = self
            .client_for_key(root_key_id)?
            .generate_data_key()
            .key_id(root_key_id)
            .number_of_bytes(32)
            .set_encryption_context(Some(encryption_context(ctx)))
            .send()
            .await
            .map_err(|e| classify("GenerateDataKey", e))?;
        let plaintext = Zeroizing::new(out.plaintext.map(Blob::into_inner).unwrap_or_default());
        let key = Key256::from_slice(&plaintext).ok_or_else(|| {
            KmsError::Failed("GenerateDataKey answered a key that is not 32 bytes".into())
        })?;
        let ciphertext = out
            .ciphertext_blob
            .map(Blob::into_inner)
            .ok_or_else(|| KmsError::Failed("GenerateDataKey answered no ciphertext".into()))?;
        Ok(GeneratedKey {
            key,
            wrapped: WrappedKey {
                root_key_id: root_key_id.to_owned(),
                ciphertext,
            },
        })
    }

    async fn decrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
    ) -> Result<Key256, KmsError> {
        let out = self
            .client_for_key(&wrapped.root_key_id)?
            .decrypt()
            .key_id(&wrapped.root_key_id)
            .ciphertext_blob(Blob::new(wrapped.ciphertext.clone()))
            .set_encryption_context(Some(encryption_context(ctx)))
            .send()
            .await
            .map_err(|e| classify("Decrypt", e))?;
        let plaintext = Zeroizing::new(out.plaintext.map(Blob::into_inner).unwrap_or_default());
        Key256::from_slice(&plaintext).ok_or(KmsError::Refused)
    }

    async fn re_encrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
        to_root_key_id: &str,
    ) -> Result<WrappedKey, KmsError> {
        // ReEncrypt runs in the destination key's region.
        let out = self
            .client_for_key(to_root_key_id)?
            .re_encrypt()
            .ciphertext_blob(Blob::new(wrapped.ciphertext.clone()))
            .source_key_id(&wrapped.root_key_id)
            .set_source_encryption_context(Some(encryption_context(ctx)))
            .destination_key_id(to_root_key_id)
            .set_destination_encryption_context(Some(encryption_context(ctx)))
            .send()
            .await
            .map_err(|e| classify("ReEncrypt", e))?;
        let ciphertext = out
            .ciphertext_blob
            .map(Blob::into_inner)
            .ok_or_else(|| KmsError::Failed("ReEncrypt answered no ciphertext".into()))?;
        Ok(WrappedKey {
            root_key_id: to_root_key_id.to_owned(),
            ciphertext,
        })
    }

    async fn schedule_key_deletion(
        &self,
        root_key_id: &str,
        waiting_days: u32,
    ) -> Result<UnixMillis, KmsError> {
        // The bare key id: the client is already the key's region, and some
        // KMS API servers (moto 5.2) refuse an ARN here although AWS takes both.
        let key_id = root_key_id
            .rsplit_once(":key/")
            .map_or(root_key_id, |(_, id)| id);
        let out = self
            .client_for_key(root_key_id)?
            .schedule_key_deletion()
            .key_id(key_id)
            .pending_window_in_days(i32::try_from(waiting_days).unwrap_or(30))
            .send()
            .await
            .map_err(|e| classify("ScheduleKeyDeletion", e))?;
        let date = out
            .deletion_date()
            .ok_or_else(|| KmsError::Failed("ScheduleKeyDeletion answered no date".into()))?;
        Ok(UnixMillis(
            date.secs().saturating_mul(1000) + i64::from(date.subsec_nanos() / 1_000_000),
        ))
    }

    async fn health(&self) -> Result<(), KmsError> {
        let key = self.shared_key(None)?;
        describe_usable(
            self.client(&self.default_region)?,
            &key,
            &self.default_region,
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arn_regions() {
        assert_eq!(
            arn_region("arn:aws:kms:eu-west-1:123456789012:key/abc"),
            Some("eu-west-1")
        );
        assert_eq!(
            arn_region("arn:aws-cn:kms:cn-north-1:1:key/abc"),
            Some("cn-north-1")
        );
        assert_eq!(arn_region("alias/keywarden"), None);
        assert_eq!(arn_region("arn:aws:s3:::bucket"), None);
    }
}
