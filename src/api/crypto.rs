//! `keywarden.v1.Crypto`: encrypt, decrypt, batches, rewrap, blind indexes
//! (streams in `streams.rs`, data keys in `datakeys.rs`).

use std::borrow::Cow;

use tonic::{Request, Response, Status, Streaming};

use super::{
    Shared, check_context, pb, status,
    streams::{self, ResponseStream},
};
use crate::{
    auth::Permission,
    envelope::{
        Context, Mode,
        blind::{self, Field, Transformation},
    },
    error::Error,
    ids::{SubjectId, TenantId},
    keys::{ActiveTenant, BlindIndexed, Decrypted, IndexVersions, Sealed, check_key_version},
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
        check_tenant_size(tenant, "plaintext", plaintext)?;
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

/// A blind-index request, checked before the tenant is looked up. Its
/// values are transformed only when its item is hashed, one item at a time:
/// a transformation can make a value longer (NFKC up to 11 times), and a
/// batch transformed at once would hold every item's longer form.
struct IndexQuery<'a> {
    context: &'a Context,
    bits: u32,
    versions: IndexVersions,
    /// Each value as given (UTF-8 when it has transformations), and its
    /// transformations.
    values: Vec<(&'a [u8], Vec<Transformation>)>,
}

impl CryptoService {
    /// Checks a blind-index request's fields against the limits and parses
    /// its transformations (applied later, by [`Self::blind_index_one`]).
    fn index_query<'a>(
        &self,
        context: &'a Context,
        values: &'a [pb::IndexValue],
        bits: u32,
        key_version: u32,
        all_versions: bool,
    ) -> Result<IndexQuery<'a>, Error> {
        check_context(context)?;
        if !(blind::MIN_BITS..=blind::MAX_BITS).contains(&bits) {
            return Err(Error::invalid(
                "bits",
                format!(
                    "is {bits}; it must be {} to {}",
                    blind::MIN_BITS,
                    blind::MAX_BITS
                ),
            ));
        }
        if values.is_empty() {
            return Err(Error::invalid("values", "a token needs at least one value"));
        }
        if values.len() > blind::MAX_VALUES {
            return Err(Error::invalid(
                "values",
                format!(
                    "more than {0}; a token takes 1 to {0} values",
                    blind::MAX_VALUES
                ),
            ));
        }
        let versions = match (key_version, all_versions) {
            (0, false) => IndexVersions::Primary,
            (0, true) => IndexVersions::AllLive,
            (v, false) => IndexVersions::Exactly(v),
            (_, true) => {
                return Err(Error::invalid(
                    "all_versions",
                    "is allowed only with key_version 0",
                ));
            }
        };
        let mut checked = Vec::with_capacity(values.len());
        for value in values {
            self.shared.check_plaintext("values", &value.value)?;
            let steps = transformations(&value.transformations)?;
            if !steps.is_empty() {
                if value.value.len() > blind::MAX_TEXT_VALUE_BYTES {
                    return Err(Error::invalid(
                        "values",
                        format!(
                            "a value with transformations is at most {} bytes",
                            blind::MAX_TEXT_VALUE_BYTES
                        ),
                    ));
                }
                std::str::from_utf8(&value.value).map_err(|_| not_text())?;
            }
            checked.push((value.value.as_slice(), steps));
        }
        Ok(IndexQuery {
            context,
            bits,
            versions,
            values: checked,
        })
    }

    /// One item's tokens; its transformations take from `budget`, the
    /// call's ([`blind::TransformBudget`]).
    async fn blind_index_one(
        &self,
        tenant: &ActiveTenant,
        query: &IndexQuery<'_>,
        budget: &blind::TransformBudget,
    ) -> Result<BlindIndexed, Error> {
        let mut transformed: Vec<Cow<'_, [u8]>> = Vec::with_capacity(query.values.len());
        for (value, steps) in &query.values {
            check_tenant_size(tenant, "a value", value)?;
            transformed.push(blind::transform(value, steps, budget).map_err(untransformable)?);
            if !steps.is_empty() {
                // A value's transformations take up to milliseconds: let
                // the worker thread serve other calls between values.
                tokio::task::yield_now().await;
            }
        }
        let fields: Vec<Field<'_>> = transformed
            .iter()
            .zip(&query.values)
            .map(|(value, (_, steps))| Field {
                value,
                transformations: steps,
            })
            .collect();
        self.shared
            .keys
            .blind_index(tenant, query.versions, query.bits, query.context, &fields)
            .await
    }
}

/// RESOURCE_EXHAUSTED when `bytes` pass the tenant policy's
/// `max_plaintext_bytes` (0: no limit of its own).
fn check_tenant_size(tenant: &ActiveTenant, field: &str, bytes: &[u8]) -> Result<(), Error> {
    let tenant_limit = tenant.policy().max_plaintext_bytes;
    if tenant_limit > 0 && bytes.len() as u64 > tenant_limit {
        crate::observe::metrics::refused(crate::observe::metrics::Refusal::Size);
        return Err(Error::ResourceExhausted {
            reason: format!(
                "{field} is {} bytes; tenant {}'s policy allows {tenant_limit}",
                bytes.len(),
                tenant.id
            ),
            retry_after: None,
        });
    }
    Ok(())
}

fn not_text() -> Error {
    Error::invalid("values", "a value with transformations must be UTF-8 text")
}

fn untransformable(e: blind::TransformError) -> Error {
    match e {
        blind::TransformError::NotText => not_text(),
        blind::TransformError::TooLong => Error::invalid(
            "values",
            format!(
                "a transformation made a value longer than {} bytes",
                blind::MAX_TRANSFORMED_BYTES
            ),
        ),
        blind::TransformError::OverBudget => Error::invalid(
            "values",
            format!(
                "the transformations of one call read at most {} bytes of text",
                blind::MAX_TRANSFORM_BYTES_PER_CALL
            ),
        ),
    }
}

/// A value's transformations as the API gives them, checked.
fn transformations(asked: &[pb::IndexTransformation]) -> Result<Vec<Transformation>, Error> {
    use pb::index_transformation::Kind;
    if asked.len() > blind::MAX_TRANSFORMATIONS {
        return Err(Error::invalid(
            "transformations",
            format!("more than {} for one value", blind::MAX_TRANSFORMATIONS),
        ));
    }
    asked
        .iter()
        .map(|t| {
            let kind = Kind::try_from(t.kind).unwrap_or(Kind::Unspecified);
            let simple = |step: Transformation| {
                if t.count == 0 {
                    Ok(step)
                } else {
                    Err(Error::invalid(
                        "transformations",
                        "count is for LAST_CHARS only",
                    ))
                }
            };
            match kind {
                Kind::Unspecified => Err(Error::invalid(
                    "transformations",
                    "kind must be NFC, NFKC, CASE_FOLD, TRIM or LAST_CHARS",
                )),
                Kind::Nfc => simple(Transformation::Nfc),
                Kind::Nfkc => simple(Transformation::Nfkc),
                Kind::CaseFold => simple(Transformation::CaseFold),
                Kind::Trim => simple(Transformation::Trim),
                Kind::LastChars if (1..=blind::MAX_LAST_CHARS).contains(&t.count) => {
                    Ok(Transformation::LastChars(t.count))
                }
                Kind::LastChars => Err(Error::invalid(
                    "transformations",
                    format!("LAST_CHARS needs a count of 1 to {}", blind::MAX_LAST_CHARS),
                )),
            }
        })
        .collect()
}

fn indexed(answer: BlindIndexed) -> pb::BlindIndexResponse {
    pb::BlindIndexResponse {
        tokens: answer.tokens,
        key_version: answer.primary_version,
    }
}

impl From<Result<BlindIndexed, Error>> for pb::BlindIndexResult {
    fn from(outcome: Result<BlindIndexed, Error>) -> Self {
        use pb::blind_index_result::Result as Item;
        Self {
            result: item(outcome, |a| Item::Ok(indexed(a)), Item::Error),
        }
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

    async fn blind_index(
        &self,
        request: Request<pb::BlindIndexRequest>,
    ) -> Result<Response<pb::BlindIndexResponse>, Status> {
        let (caller, r) = self
            .shared
            .admit_request(request, "BlindIndex", Permission::Index)?;
        let result = async {
            let query =
                self.index_query(&r.context, &r.values, r.bits, r.key_version, r.all_versions)?;
            let tenant = self.tenant(&r.tenant_id).await?;
            self.limit(&tenant, 1)?;
            let answer = self
                .blind_index_one(&tenant, &query, &blind::TransformBudget::per_call())
                .await?;
            Ok(Response::new(indexed(answer)))
        }
        .await;
        self.shared
            .record_data_plane("BlindIndex", &caller, &r.tenant_id, result)
            .await
    }

    async fn blind_index_batch(
        &self,
        request: Request<pb::BlindIndexBatchRequest>,
    ) -> Result<Response<pb::BlindIndexBatchResponse>, Status> {
        let (caller, r) =
            self.shared
                .admit_request(request, "BlindIndexBatch", Permission::Index)?;
        let result = async {
            self.shared.check_batch(r.items.len())?;
            // Every item checked and transformed before the tenant's keys
            // are looked up; an item that fails fails alone.
            let queries: Vec<Result<IndexQuery<'_>, Error>> = r
                .items
                .iter()
                .map(|item| {
                    self.index_query(
                        &item.context,
                        &item.values,
                        item.bits,
                        item.key_version,
                        item.all_versions,
                    )
                })
                .collect();
            let tenant = &self.tenant(&r.tenant_id).await?;
            let budget = &blind::TransformBudget::per_call();
            let results = self
                .batch(tenant, &queries, |query| async move {
                    match query {
                        Ok(query) => self.blind_index_one(tenant, query, budget).await,
                        Err(e) => Err(clone_refusal(e)),
                    }
                })
                .await?;
            Ok(Response::new(pb::BlindIndexBatchResponse { results }))
        }
        .await;
        self.shared
            .record_data_plane("BlindIndexBatch", &caller, &r.tenant_id, result)
            .await
    }
}

/// An item's refusal, answered as its own error. Only refusals made by
/// [`CryptoService::index_query`] reach here: all INVALID_ARGUMENT.
fn clone_refusal(e: &Error) -> Error {
    match e {
        Error::InvalidArgument { field, reason } => Error::InvalidArgument {
            field,
            reason: reason.clone(),
        },
        other => Error::invalid("values", other.to_string()),
    }
}
