//! `Crypto.EncryptStream` and `Crypto.DecryptStream`: objects of any size,
//! through [`crate::envelope::stream`].
//!
//! Each call is a pull-driven state machine: the response stream asks for its
//! next message only when tonic can send one, and only then is the next
//! request read and sealed or opened. So the sidecar holds one request chunk,
//! one segment and at most [`MAX_RESPONSE_CHUNK`] of output per stream, and
//! a slow reader slows the writer instead of filling memory.
//!
//! How a stream ends is the caller's integrity signal: OK only after the last
//! segment was sealed, or opened and authenticated; any failure ends the
//! stream with its error, never with a clean end.

use std::{pin::Pin, time::Duration};

use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::{Shared, check_context, pb};
use crate::{
    auth::{Caller, Permission},
    envelope::{
        Context, KeyRef,
        stream::{self, StreamOpener, StreamSealer},
    },
    error::Error,
    ids::{SubjectId, TenantId},
    keys::{ActiveTenant, KeyWatch},
};

/// Most bytes sent in one response: a large request chunk is sealed or
/// opened a slice at a time, so responses stay well under any client's
/// message limit (gRPC's default is 4 MiB).
pub const MAX_RESPONSE_CHUNK: usize = 1 << 20;

pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What both directions share.
struct Call<Req> {
    shared: Shared,
    caller: Caller,
    action: &'static str,
    tenant: ActiveTenant,
    requests: Streaming<Req>,
    /// The request chunk being worked through, and how far.
    input: Vec<u8>,
    consumed: usize,
    /// The tenant key version, sent on every response.
    key_version: u32,
    /// Set once the stream has ended (with its last message or an error).
    ended: bool,
    /// The key the stream uses, once resolved, and the watch that wakes
    /// when a shred, a retention destroy or an event may have destroyed it.
    key: Option<(KeyRef, KeyWatch)>,
    /// How long the stream waits for each message.
    message_timeout: Duration,
}

/// A stream's request: a start (the first) or a chunk (every later one).
trait StreamRequest: Send + 'static {
    type Start: Send;
    fn into_part(self) -> Option<Part<Self::Start>>;
    fn tenant_id(start: &Self::Start) -> &str;
}

enum Part<Start> {
    Start(Start),
    Chunk(Vec<u8>),
}

impl StreamRequest for pb::EncryptStreamRequest {
    type Start = pb::EncryptStreamStart;

    fn into_part(self) -> Option<Part<Self::Start>> {
        self.part.map(|part| match part {
            pb::encrypt_stream_request::Part::Start(start) => Part::Start(start),
            pb::encrypt_stream_request::Part::Chunk(chunk) => Part::Chunk(chunk),
        })
    }

    fn tenant_id(start: &Self::Start) -> &str {
        &start.tenant_id
    }
}

impl StreamRequest for pb::DecryptStreamRequest {
    type Start = pb::DecryptStreamStart;

    fn into_part(self) -> Option<Part<Self::Start>> {
        self.part.map(|part| match part {
            pb::decrypt_stream_request::Part::Start(start) => Part::Start(start),
            pb::decrypt_stream_request::Part::Chunk(chunk) => Part::Chunk(chunk),
        })
    }

    fn tenant_id(start: &Self::Start) -> &str {
        &start.tenant_id
    }
}

fn not_a_chunk() -> Error {
    Error::invalid(
        "part",
        "every request of a stream after the first must be a chunk",
    )
}

/// A stream's next message did not come in time.
fn message_late(timeout: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "the stream's next message did not arrive within {} s (server.stream_message_timeout_seconds)",
        timeout.as_secs()
    ))
}

fn no_start() -> Error {
    Error::invalid("part", "the first request of a stream must be a start")
}

/// What the next step of a call found.
enum Next {
    /// The next slice of input.
    Input(std::ops::Range<usize>),
    /// The caller closed its side: the input is complete.
    End,
}

impl<Req: StreamRequest> Call<Req> {
    /// Reads a stream's first request, admits the caller for the tenant it
    /// names, resolves that tenant and takes one item from its rate. A
    /// failure after admission is recorded as the call's outcome.
    async fn begin(
        shared: &Shared,
        request: Request<Streaming<Req>>,
        action: &'static str,
        permission: Permission,
    ) -> Result<(Self, Req::Start), Status> {
        let (metadata, extensions, mut requests) = request.into_parts();
        let message_timeout = Duration::from_secs(shared.server.stream_message_timeout_seconds);
        let first = tokio::time::timeout(message_timeout, requests.message())
            .await
            .map_err(|_| message_late(message_timeout))??;
        let start = match first.and_then(Req::into_part) {
            Some(Part::Start(start)) => Some(start),
            _ => None,
        };
        let head = Request::from_parts(metadata, extensions, ());
        let Some(tenant_id) = start.as_ref().map(|s| Req::tenant_id(s).to_owned()) else {
            // Nothing names a tenant: refused as malformed, and recorded.
            let caller = super::caller_of(&head, action)?;
            return Err(shared
                .record_data_plane::<()>(action, &caller, "", Err(no_start().into()))
                .await
                .expect_err("a failure is recorded as one"));
        };
        let caller = shared.admit(&head, action, permission, Some(&tenant_id))?;
        let resolved = async {
            let start = start.ok_or_else(no_start)?;
            let id = TenantId::parse("tenant_id", Req::tenant_id(&start))?;
            let tenant = shared.keys.active_tenant(&id).await?;
            shared.limiter.check(&tenant.id, tenant.rate(), 1)?;
            Ok::<_, Error>((tenant, start))
        }
        .await;
        match resolved {
            Ok((tenant, start)) => Ok((
                Self {
                    shared: shared.clone(),
                    caller,
                    action,
                    tenant,
                    requests,
                    input: Vec::new(),
                    consumed: 0,
                    key_version: 0,
                    ended: false,
                    key: None,
                    message_timeout,
                },
                start,
            )),
            Err(e) => Err(shared
                .record_data_plane::<()>(action, &caller, &tenant_id, Err(e.into()))
                .await
                .expect_err("a failure is recorded as one")),
        }
    }

    /// Ends the call before its first response with `error`, recorded.
    async fn refuse(&self, error: Error) -> Status {
        self.record(Err(error.into()))
            .await
            .expect_err("a failure is recorded as one")
    }

    /// From now on, ends the stream when its key is destroyed.
    fn watch_key(&mut self, key_ref: KeyRef) {
        let watch = self.shared.keys.watch(&self.tenant.id, key_ref);
        self.key = Some((key_ref, watch));
    }

    /// The next request, within the message timeout; meanwhile, if the
    /// stream's key may have been destroyed (or a cache lifetime passed),
    /// the key is resolved again and the stream ends if it is gone.
    async fn next_request(&mut self) -> Result<Option<Req>, Status> {
        let late = tokio::time::sleep(self.message_timeout);
        tokio::pin!(late);
        loop {
            let Some((key_ref, watch)) = &self.key else {
                return tokio::select! {
                    request = self.requests.message() => request,
                    () = &mut late => Err(message_late(self.message_timeout)),
                };
            };
            let key_ref = *key_ref;
            tokio::select! {
                request = self.requests.message() => return request,
                () = &mut late => return Err(message_late(self.message_timeout)),
                () = watch.changed() => {}
                () = tokio::time::sleep(self.shared.keys.recheck_every()) => {}
            }
            self.shared.keys.recheck(&self.tenant.id, key_ref).await?;
        }
    }

    /// The next input slice, reading a request when the last is used up.
    async fn next_input(&mut self) -> Result<Next, Status> {
        while self.consumed == self.input.len() {
            match self.next_request().await? {
                None => return Ok(Next::End),
                Some(request) => match request.into_part() {
                    Some(Part::Chunk(chunk)) => {
                        self.input = chunk;
                        self.consumed = 0;
                    }
                    _ => return Err(not_a_chunk().into()),
                },
            }
        }
        let end = self.input.len().min(self.consumed + MAX_RESPONSE_CHUNK);
        let range = self.consumed..end;
        self.consumed = end;
        Ok(Next::Input(range))
    }

    /// Records how the call ended, as `audit.data_plane` says; answers the
    /// error to end with, if recording it failed.
    async fn record(&self, result: Result<(), Status>) -> Result<(), Status> {
        self.shared
            .record_data_plane(self.action, &self.caller, self.tenant.id.as_str(), result)
            .await
    }

    /// Ends the stream with `error` (recorded first).
    async fn fail(&mut self, error: Status) -> Option<Result<Vec<u8>, Status>> {
        self.ended = true;
        Some(Err(self.record(Err(error)).await.err().unwrap_or_else(
            || Status::internal("a failed stream was recorded as successful"),
        )))
    }
}

pub async fn encrypt(
    shared: &Shared,
    request: Request<Streaming<pb::EncryptStreamRequest>>,
) -> Result<Response<ResponseStream<pb::EncryptStreamResponse>>, Status> {
    let (mut call, start) =
        Call::begin(shared, request, "EncryptStream", Permission::Encrypt).await?;
    let prepared = async {
        let subject = match start.subject_id.as_str() {
            "" => None,
            raw => Some(SubjectId::parse("subject_id", raw)?),
        };
        check_context(&start.context)?;
        shared
            .keys
            .encrypt_stream(&call.tenant, subject.as_ref(), &start.context)
            .await
    }
    .await;
    let (sealer, header, key_version) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => return Err(call.refuse(e).await),
    };
    call.key_version = key_version;
    if let Ok(Some(parsed)) = stream::parse_header(&header) {
        call.watch_key(parsed.key_ref);
    }
    let state = Sealing {
        limit: call.tenant.policy().max_plaintext_bytes,
        call,
        sealer: Some(sealer),
        header: Some(header),
        total: 0,
    };
    let responses = futures::stream::unfold(state, |mut state| async move {
        let item = state.next().await?;
        let key_version = state.call.key_version;
        Some((
            item.map(|chunk| pb::EncryptStreamResponse { chunk, key_version }),
            state,
        ))
    });
    Ok(Response::new(Box::pin(responses)))
}

/// An EncryptStream under way.
struct Sealing {
    call: Call<pb::EncryptStreamRequest>,
    /// `None` once the last segment is sealed.
    sealer: Option<StreamSealer>,
    /// The envelope's header, until it is sent (first).
    header: Option<Vec<u8>>,
    /// Plaintext bytes so far, against the tenant policy's `limit` (0: none).
    total: u64,
    limit: u64,
}

impl Sealing {
    /// The next response's bytes; `None` after the stream ended.
    async fn next(&mut self) -> Option<Result<Vec<u8>, Status>> {
        if self.call.ended {
            return None;
        }
        if let Some(header) = self.header.take() {
            return Some(Ok(header));
        }
        let Some(sealer) = self.sealer.as_mut() else {
            // The last segment went out.
            self.call.ended = true;
            return None;
        };
        let mut out = Vec::new();
        let step = match self.call.next_input().await {
            Err(status) => Err(status),
            Ok(Next::Input(range)) => {
                self.total += range.len() as u64;
                if self.limit > 0 && self.total > self.limit {
                    crate::observe::metrics::refused(crate::observe::metrics::Refusal::Size);
                    Err(Error::ResourceExhausted {
                        reason: format!(
                            "the stream's plaintext is over {} bytes, tenant {}'s policy limit",
                            self.limit, self.call.tenant.id
                        ),
                        retry_after: None,
                    }
                    .into())
                } else {
                    sealer
                        .push(&self.call.input[range], &mut out)
                        .map_err(|e| Error::internal(e).into())
                }
            }
            Ok(Next::End) => {
                let sealer = self.sealer.take().expect("checked above");
                sealer
                    .finish(&mut out)
                    .map_err(|e| Error::internal(e).into())
            }
        };
        match step {
            // The last segment goes out only once the call is recorded as a
            // success: if it cannot be, the caller gets the error instead, and
            // never a whole envelope followed by an error.
            Ok(()) if self.sealer.is_none() => match self.call.record(Ok(())).await {
                Ok(()) => Some(Ok(out)),
                Err(status) => {
                    self.call.ended = true;
                    Some(Err(status))
                }
            },
            Ok(()) => Some(Ok(out)),
            Err(status) => self.call.fail(status).await,
        }
    }
}

pub async fn decrypt(
    shared: &Shared,
    request: Request<Streaming<pb::DecryptStreamRequest>>,
) -> Result<Response<ResponseStream<pb::DecryptStreamResponse>>, Status> {
    let (call, start) = Call::begin(shared, request, "DecryptStream", Permission::Decrypt).await?;
    if let Err(e) = check_context(&start.context) {
        return Err(call.refuse(e).await);
    }
    let state = Opening {
        call,
        context: start.context,
        header: Vec::new(),
        opener: None,
        failed: None,
    };
    let responses = futures::stream::unfold(state, |mut state| async move {
        let item = state.next().await?;
        let key_version = state.call.key_version;
        Some((
            item.map(|chunk| pb::DecryptStreamResponse { chunk, key_version }),
            state,
        ))
    });
    Ok(Response::new(Box::pin(responses)))
}

/// A DecryptStream under way.
struct Opening {
    call: Call<pb::DecryptStreamRequest>,
    context: Context,
    /// The envelope's first bytes, until they hold its whole header.
    header: Vec<u8>,
    /// Set once the header is read and its key resolved.
    opener: Option<StreamOpener>,
    /// A failure found after some plaintext of the same input: that
    /// plaintext is sent first, then the stream ends with this.
    failed: Option<Error>,
}

impl Opening {
    /// The next response's plaintext; `None` after the stream ended.
    async fn next(&mut self) -> Option<Result<Vec<u8>, Status>> {
        loop {
            if self.call.ended {
                return None;
            }
            if let Some(error) = self.failed.take() {
                return self.call.fail(error.into()).await;
            }
            let step = match self.call.next_input().await {
                Err(status) => Err(status),
                Ok(Next::Input(range)) => self.take(range).await.map_err(Status::from),
                Ok(Next::End) => match self.opener.take() {
                    None => Err(Error::Undecryptable.into()),
                    Some(opener) => {
                        let mut out = Vec::new();
                        match opener.finish(&mut out) {
                            Ok(()) => {
                                self.call.ended = true;
                                // The whole envelope authenticated: send the last
                                // plaintext, then end OK if the call can be recorded.
                                return match self.call.record(Ok(())).await {
                                    Ok(()) => Some(Ok(out)),
                                    Err(status) => Some(Err(status)),
                                };
                            }
                            // Nothing of the failed segment is in `out`.
                            Err(_) => Err(Error::Undecryptable.into()),
                        }
                    }
                },
            };
            match step {
                Ok(out) if out.is_empty() => continue,
                Ok(out) => return Some(Ok(out)),
                Err(status) => return self.call.fail(status).await,
            }
        }
    }

    /// Takes a slice of input: header bytes until the header is whole, then
    /// segments. Answers the plaintext of the segments it completed; when a
    /// segment fails after others authenticated, their plaintext, with the
    /// failure kept for the next step.
    async fn take(&mut self, range: std::ops::Range<usize>) -> Result<Vec<u8>, Error> {
        let mut input = &self.call.input[range];
        if self.opener.is_none() {
            // The header's length is known from its first three bytes.
            while let Some(need) = header_len(&self.header)?
                .or((self.header.len() < 3).then_some(3))
                .filter(|&need| self.header.len() < need)
            {
                if input.is_empty() {
                    return Ok(Vec::new());
                }
                let take = (need - self.header.len()).min(input.len());
                self.header.extend_from_slice(&input[..take]);
                input = &input[take..];
            }
            let (opener, key_version) = self
                .call
                .shared
                .keys
                .decrypt_stream(&self.call.tenant, &self.header, &self.context)
                .await?;
            self.call.key_version = key_version;
            if let Ok(Some(parsed)) = stream::parse_header(&self.header) {
                // Field by field: `input` borrows the call's input meanwhile.
                let watch = self
                    .call
                    .shared
                    .keys
                    .watch(&self.call.tenant.id, parsed.key_ref);
                self.call.key = Some((parsed.key_ref, watch));
            }
            self.opener = Some(opener);
        }
        let opener = self.opener.as_mut().expect("set above");
        let mut out = Vec::new();
        if opener.push(input, &mut out).is_err() {
            if out.is_empty() {
                return Err(Error::Undecryptable);
            }
            self.failed = Some(Error::Undecryptable);
        }
        Ok(out)
    }
}

/// The length of the header that starts with `bytes`, once three bytes tell.
fn header_len(bytes: &[u8]) -> Result<Option<usize>, Error> {
    if bytes.len() < 3 {
        return Ok(None);
    }
    stream::header_len(bytes)
        .map(Some)
        .map_err(|_| Error::Undecryptable)
}
