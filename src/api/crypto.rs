//! `keywarden.v1.Crypto`: encrypt, decrypt, batches, rewrap (streams in
//! `streams.rs`, data keys in `datakeys.rs`).

use tonic::{Request, Response, Status, Streaming};

use super::{
    Shared, check_context, pb, status,
    streams::{self, ResponseStream},
};
use crate::{
    auth::Permission,
    envelope::{Context, Mode},
    error::Error,
    ids::{SubjectId, TenantId},
    keys::{ActiveTenant, Decrypted, Sealed, check_key_version},
};

pub struct CryptoService {
    shared: Shared,
}

impl CryptoService {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    async fn encrypt_one(
        &self,
        tenant: &ActiveTenant,
        subject_id: &str,
        context: &Context,
        plaintext: &[u8],
        deterministic: bool,
        key_version: u32,
    ) -> Result<Sealed, Error> {
        check_key_version(mode(deterministic), !subject_id.is_empty(), key_version)?;
        let subject = match subject_id {
            "" => None,
            raw => Some(SubjectId::parse("subject_id", raw)?),
        };
        check_context(context)?;
        self.shared.check_plaintext("plaintext", plaintext)?;
        let tenant_limit = tenant.policy().max_plaintext_bytes;
        if tenant_limit > 0 && plaintext.len() as u64 > tenant_limit {
            crate::observe::metrics::refused(crate::observe::metrics::Refusal::Size);
            return Err(Error::ResourceExhausted {
                reason: format!(
                    "plaintext is {} bytes; tenant {}'s policy allows {tenant_limit}",
                    plaintext.len(),
                    tenant.id
                ),
                retry_after: None,
            });
        }
        self.shared
            .keys
            .encrypt(
                tenant,
                subject.as_ref(),
                context,
                plaintext,
                mode(deterministic),
                key_version,
            )
            .await
    }

    async fn decrypt_one(
        &self,
        tenant: &ActiveTenant,
        context: &Context,
        ciphertext: &[u8],
    ) -> Result<Decrypted, Error> {
        check_context(context)?;
        self.shared.keys.decrypt(tenant, context, ciphertext).await
    }

    /// The tenant a call names.
    async fn tenant(&self, raw: &str) -> Result<ActiveTenant, Error> {
        let id = TenantId::parse("tenant_id", raw)?;
        self.shared.keys.active_tenant(&id).await
    }

    /// Takes `items` from the tenant's rate.
    fn limit(&self, tenant: &ActiveTenant, items: usize) -> Result<(), Error> {
        self.shared.limiter.check(&tenant.id, tenant.rate(), items)
    }

    /// A batch for `tenant`: its size checked, one item per entry taken
    /// from the tenant's rate, then `step` on each entry in order. An
    /// entry's outcome is its answer alone.
    async fn batch<'a, I, T, R, Fut>(
        &self,
        tenant: &ActiveTenant,
        items: &'a [I],
        step: impl Fn(&'a I) -> Fut,
    ) -> Result<Vec<R>, Error>
    where
        Fut: Future<Output = Result<T, Error>>,
        R: From<Result<T, Error>>,
    {
        self.shared.check_batch(items.len())?;
        self.limit(tenant, items.len())?;
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            // Sealing a cached key never waits; without this a large batch
            // would hold its worker thread until done, stalling other calls.
            tokio::task::consume_budget().await;
            results.push(R::from(step(item).await));
        }
        Ok(results)
    }
}

/// The envelope suite a request's `deterministic` flag asks for.
fn mode(deterministic: bool) -> Mode {
    if deterministic {
        Mode::Deterministic
    } else {
        Mode::Randomized
    }
}

fn encrypted(sealed: Sealed) -> pb::EncryptResponse {
    pb::EncryptResponse {
        ciphertext: sealed.ciphertext,
        key_version: sealed.key_version,
    }
}

fn decrypted(opened: Decrypted) -> pb::DecryptResponse {
    pb::DecryptResponse {
        plaintext: opened.plaintext.to_vec(),
        key_version: opened.key_version,
    }
}

impl From<Result<Sealed, Error>> for pb::EncryptResult {
    fn from(outcome: Result<Sealed, Error>) -> Self {
        use pb::encrypt_result::Result as Item;
        Self {
            result: item(outcome, |s| Item::Ok(encrypted(s)), Item::Error),
        }
    }
}

impl From<Result<Decrypted, Error>> for pb::DecryptResult {
    fn from(outcome: Result<Decrypted, Error>) -> Self {
        use pb::decrypt_result::Result as Item;
        Self {
            result: item(outcome, |o| Item::Ok(decrypted(o)), Item::Error),
        }
    }
}

/// A batch entry's answer: its response, or its own error, which fails no
/// other entry.
fn item<T, A>(
    outcome: Result<T, Error>,
    ok: impl FnOnce(T) -> A,
    error: impl FnOnce(pb::ItemError) -> A,
) -> Option<A> {
    Some(match outcome {
        Ok(answer) => ok(answer),
        Err(e) => error(pb::ItemError {
            code: status::code(&e) as i32,
            message: e.to_string(),
        }),
    })
}

#[tonic::async_trait]
impl pb::crypto_server::Crypto for CryptoService {
    type EncryptStreamStream = ResponseStream<pb::EncryptStreamResponse>;
    type DecryptStreamStream = ResponseStream<pb::DecryptStreamResponse>;

    async fn encrypt_stream(
        &self,
        request: Request<Streaming<pb::EncryptStreamRequest>>,
    ) -> Result<Response<Self::EncryptStreamStream>, Status> {
        streams::encrypt(&self.shared, request).await
    }

    async fn decrypt_stream(
        &self,
        request: Request<Streaming<pb::DecryptStreamRequest>>,
    ) -> Result<Response<Self::DecryptStreamStream>, Status> {
        streams::decrypt(&self.shared, request).await
    }

    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let (caller, r) = self
            .shared
            .admit_request(request, "Encrypt", Permission::Encrypt)?;
        let result = async {
            // Before the tenant is read: a refusal costs no keystore read.
            check_key_version(
                mode(r.deterministic),
                !r.subject_id.is_empty(),
                r.key_version,
            )?;
            let tenant = self.tenant(&r.tenant_id).await?;
            self.limit(&tenant, 1)?;
            let sealed = self
                .encrypt_one(
                    &tenant,
                    &r.subject_id,
                    &r.context,
                    &r.plaintext,
                    r.deterministic,
                    r.key_version,
                )
                .await?;
            Ok(Response::new(encrypted(sealed)))
        }
        .await;
        self.shared
            .record_data_plane("Encrypt", &caller, &r.tenant_id, result)
            .await
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let (caller, r) = self
            .shared
            .admit_request(request, "Decrypt", Permission::Decrypt)?;
        let result = async {
            let tenant = self.tenant(&r.tenant_id).await?;
            self.limit(&tenant, 1)?;
            let opened = self.decrypt_one(&tenant, &r.context, &r.ciphertext).await?;
            Ok(Response::new(decrypted(opened)))
        }
        .await;
        self.shared
            .record_data_plane("Decrypt", &caller, &r.tenant_id, result)
            .await
    }

    async fn encrypt_batch(
        &self,
        request: Request<pb::EncryptBatchRequest>,
    ) -> Result<Response<pb::EncryptBatchResponse>, Status> {
        let (caller, r) =
            self.shared
                .admit_request(request, "EncryptBatch", Permission::Encrypt)?;
        let result = async {
            let tenant = &self.tenant(&r.tenant_id).await?;
            let results = self
                .batch(tenant, &r.items, |item| {
                    self.encrypt_one(
                        tenant,
                        &item.subject_id,
                        &item.context,
                        &item.plaintext,
                        item.deterministic,
                        item.key_version,
                    )
                })
                .await?;
            Ok(Response::new(pb::EncryptBatchResponse { results }))
        }
        .await;
        self.shared
            .record_data_plane("EncryptBatch", &caller, &r.tenant_id, result)
            .await
    }

    async fn decrypt_batch(
        &self,
        request: Request<pb::DecryptBatchRequest>,
    ) -> Result<Response<pb::DecryptBatchResponse>, Status> {
        let (caller, r) =
            self.shared
                .admit_request(request, "DecryptBatch", Permission::Decrypt)?;
        let result = async {
            let tenant = &self.tenant(&r.tenant_id).await?;
            let results = self
                .batch(tenant, &r.items, |item| {
                    self.decrypt_one(tenant, &item.context, &item.ciphertext)
                })
                .await?;
            Ok(Response::new(pb::DecryptBatchResponse { results }))
        }
        .await;
        self.shared
            .record_data_plane("DecryptBatch", &caller, &r.tenant_id, result)
            .await
    }

    async fn rewrap(
        &self,
        request: Request<pb::RewrapRequest>,
    ) -> Result<Response<pb::RewrapResponse>, Status> {
        let (caller, r) = self
            .shared
            .admit_request(request, "Rewrap", Permission::Rewrap)?;
        let result = async {
            let tenant = self.tenant(&r.tenant_id).await?;
            self.limit(&tenant, 1)?;
            check_context(&r.context)?;
            let rewrapped = self
                .shared
                .keys
                .rewrap(&tenant, &r.context, &r.ciphertext)
                .await?;
            Ok(Response::new(pb::RewrapResponse {
                ciphertext: rewrapped.ciphertext,
                key_version: rewrapped.key_version,
                previous_key_version: rewrapped.previous_key_version,
            }))
        }
        .await;
        self.shared
            .record_data_plane("Rewrap", &caller, &r.tenant_id, result)
            .await
    }

    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        super::datakeys::generate(&self.shared, request).await
    }

    async fn decrypt_data_key(
        &self,
        request: Request<pb::DecryptDataKeyRequest>,
    ) -> Result<Response<pb::DecryptDataKeyResponse>, Status> {
        super::datakeys::decrypt(&self.shared, request).await
    }

    async fn rewrap_data_key(
        &self,
        request: Request<pb::RewrapDataKeyRequest>,
    ) -> Result<Response<pb::RewrapDataKeyResponse>, Status> {
        super::datakeys::rewrap(&self.shared, request).await
    }
}
