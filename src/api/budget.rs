//! The decode budget: one bound, over every call on every connection, on
//! the request bytes being received and decoded at once.
//!
//! Without it, memory grows with the number of concurrent large requests:
//! tonic buffers each whole message before decoding it, and a decoded batch
//! is larger than its wire form. With it, a request body takes a share of
//! the budget for each gRPC message *before* the message's bytes are passed
//! on to be buffered (the 5-byte gRPC message header says how long the
//! message is), and a call that would exceed the budget waits: its bytes
//! stay in the client's HTTP/2 send window (flow control holds the sender
//! back), not in this process. So many large authorized calls queue instead
//! of exhausting memory; unauthenticated ones never reach this point (the
//! edge refuses them on their headers, [`super::edge`]).
//!
//! When a share is given back:
//! - a unary call keeps its request's share until its response has been
//!   sent (the decoded request and the response are alive until then);
//! - a client-streaming call gives back a message's share when it asks for
//!   the next message (the handler holds one message at a time).
//!
//! A message longer than the method accepts is not charged: tonic refuses
//! it as soon as it reads its header, without buffering it.
//!
//! What keeps a caller from holding shares without sending (the review of
//! issue 14, docs/SECURITY.md §12.2):
//! - **Its bytes must come.** Once a message's share is taken, its bytes
//!   must arrive at [`DecodeBudget::min_rate`] bytes per second after a
//!   grace of [`BODY_GRACE`]; slower, the call ends `DEADLINE_EXCEEDED` and
//!   its share is given back. A message announced and never sent holds its
//!   share for the grace only.
//! - **One caller, one share.** Each caller (an authenticated identity) may
//!   hold at most [`DecodeBudget::per_caller`] bytes over all its calls, so
//!   one caller, however many calls it opens, leaves the rest of the budget
//!   to the others.
//! - **A message's share is taken after the one before it is passed on.** A
//!   chunk that completes one message and starts the next is split there:
//!   a stream never waits for the next message's share while it holds the
//!   share of the one its handler has not read yet.
//!
//! Calls that are not keywarden's (gRPC health and reflection, whose
//! messages are a few bytes, under their own small limit) take no share.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tokio_util::sync::PollSemaphore;
use tonic::Status;

use crate::observe::metrics::{Refusal, refused};

mod items;
#[cfg(test)]
mod tests;

pub use items::FieldCounter;

/// gRPC's message header: a compression flag and a big-endian u32 length.
const MESSAGE_HEADER: usize = 5;

/// How long a message whose share was taken may send nothing before its
/// bytes must arrive at the minimum rate.
pub const BODY_GRACE: Duration = Duration::from_secs(5);

/// The budget, shared by every call.
#[derive(Clone)]
pub struct DecodeBudget {
    semaphore: Arc<Semaphore>,
    bytes: usize,
    per_caller: usize,
    min_rate: u64,
    callers: Arc<Mutex<Callers>>,
}

/// Each caller's share, alive while one of its calls holds it.
#[derive(Default)]
struct Callers {
    shares: HashMap<String, Weak<Semaphore>>,
    /// Sweep dead entries when the map reaches this size.
    sweep_at: usize,
}

impl DecodeBudget {
    /// `bytes` over all calls, at most `per_caller` of them for one caller,
    /// and a message's bytes arriving at least at `min_rate` bytes per
    /// second (after [`BODY_GRACE`]).
    pub fn new(bytes: usize, per_caller: usize, min_rate: u64) -> Self {
        let bytes = bytes.min(Semaphore::MAX_PERMITS);
        Self {
            semaphore: Arc::new(Semaphore::new(bytes)),
            bytes,
            per_caller: per_caller.clamp(1, bytes.max(1)),
            min_rate: min_rate.max(1),
            callers: Arc::default(),
        }
    }

    /// Bytes not taken by any call now.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// The whole budget.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The most one caller may hold.
    pub fn per_caller(&self) -> usize {
        self.per_caller
    }

    /// The slowest a message's bytes may arrive, in bytes per second.
    pub fn min_rate(&self) -> u64 {
        self.min_rate
    }

    /// `identity`'s share, shared by all its calls.
    fn caller(&self, identity: &str) -> Arc<Semaphore> {
        let mut callers = self.callers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(share) = callers.shares.get(identity).and_then(Weak::upgrade) {
            return share;
        }
        if callers.shares.len() >= callers.sweep_at {
            callers.shares.retain(|_, share| share.strong_count() > 0);
            callers.sweep_at = (callers.shares.len() * 2).max(64);
        }
        let share = Arc::new(Semaphore::new(self.per_caller));
        callers
            .shares
            .insert(identity.to_owned(), Arc::downgrade(&share));
        share
    }

    /// Callers whose share is alive (for tests).
    pub fn callers(&self) -> usize {
        let callers = self.callers.lock().unwrap_or_else(|p| p.into_inner());
        callers
            .shares
            .values()
            .filter(|share| share.strong_count() > 0)
            .count()
    }
}

/// Whose call a body belongs to, and whether it is charged at all.
pub enum Charge<'a> {
    /// An authenticated caller's call to a keywarden method.
    Caller(&'a str),
    /// gRPC health and reflection: no share.
    Free,
}

/// The call's message bytes came too slowly after its share was taken.
pub fn too_slow(min_rate: u64) -> Status {
    Status::deadline_exceeded(format!(
        "the request message's bytes arrived slower than {min_rate} bytes per second \
         (server.request_min_bytes_per_second) after a {} s grace",
        BODY_GRACE.as_secs()
    ))
}

/// When a call gives back its messages' shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// When its response is done: unary calls.
    AtResponseEnd,
    /// When it asks for its next message: client-streaming calls.
    OnNextMessage,
}

/// Shares of the budget a call holds; returned when dropped, i.e. when both
/// the request body and the response body (each holds the `Arc`) are gone.
#[derive(Default)]
pub struct Held(Mutex<Vec<OwnedSemaphorePermit>>);

impl Held {
    fn push(&self, permit: OwnedSemaphorePermit) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(permit);
    }

    fn release(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Where the reader is in the stream of gRPC messages.
#[derive(Default)]
struct Framing {
    /// Bytes of the current message header read so far.
    header: [u8; MESSAGE_HEADER],
    header_len: usize,
    /// Payload bytes of the current message not yet seen.
    remaining: usize,
    /// Counts a batch's items as they arrive.
    counter: Option<FieldCounter>,
    /// The counter saw more items than allowed.
    over: bool,
}

impl Framing {
    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.remaining == 0
    }

    /// Advances over the start of `chunk`, up to the end of the first
    /// message that ends in it (or all of it), and answers how many bytes it
    /// took and the share of the message whose header completed in them, if
    /// any (only if the message is at most `limit` long, its header not
    /// included). So a piece holds at most one header, and no bytes of the
    /// message after one that ends in it.
    fn scan(&mut self, chunk: &[u8], limit: usize) -> (usize, usize) {
        let mut at = 0;
        let mut need = 0;
        while at < chunk.len() {
            if self.remaining > 0 {
                let take = self.remaining.min(chunk.len() - at);
                if let Some(counter) = &mut self.counter
                    && !counter.feed(&chunk[at..at + take])
                {
                    self.over = true;
                }
                self.remaining -= take;
                at += take;
                if self.remaining == 0 {
                    break;
                }
                continue;
            }
            if need > 0 || (at > 0 && self.header_len == 0) {
                // A second header in one piece: it waits for the next.
                break;
            }
            let take = (MESSAGE_HEADER - self.header_len).min(chunk.len() - at);
            self.header[self.header_len..self.header_len + take]
                .copy_from_slice(&chunk[at..at + take]);
            self.header_len += take;
            at += take;
            if self.header_len == MESSAGE_HEADER {
                self.header_len = 0;
                let len =
                    u32::from_be_bytes(self.header[1..].try_into().expect("4 bytes")) as usize;
                self.remaining = len;
                if let Some(counter) = &mut self.counter {
                    counter.reset();
                }
                if len <= limit {
                    need = len + MESSAGE_HEADER;
                } else {
                    // tonic refuses the message (OUT_OF_RANGE) when it
                    // decodes it; counted here, once per message.
                    refused(Refusal::Size);
                }
                if len == 0 {
                    break;
                }
            }
        }
        (at, need)
    }
}

pin_project_lite::pin_project! {
    /// A request body that takes its messages' shares of the budget before
    /// passing their bytes on.
    pub struct BudgetedBody<B> {
        #[pin]
        inner: B,
        // The budget and the caller's share; None: a call not charged.
        budget: Option<(PollSemaphore, PollSemaphore)>,
        budget_bytes: usize,
        per_caller: usize,
        min_rate: u64,
        // The longest message the method accepts.
        limit: usize,
        release: Release,
        held: Arc<Held>,
        framing: Framing,
        // Bytes received but not yet scanned (after a split).
        rest: Option<Bytes>,
        // A piece waiting for its shares, how many bytes it needs, and the
        // caller's share once taken.
        pending: Option<(Bytes, usize, Option<OwnedSemaphorePermit>)>,
        // The message in progress: when its share was taken, the payload
        // bytes passed on since, and the instant by which more must come.
        clock: Option<(Instant, u64)>,
        deadline: Option<Pin<Box<Sleep>>>,
    }
}

impl<B> BudgetedBody<B> {
    /// `items`, for a batch method: its items' field number and limit,
    /// counted as the message arrives.
    pub fn new(
        inner: B,
        budget: &DecodeBudget,
        charge: Charge<'_>,
        limit: usize,
        release: Release,
        held: Arc<Held>,
        items: Option<FieldCounter>,
    ) -> Self {
        Self {
            inner,
            budget: match charge {
                Charge::Caller(identity) => Some((
                    PollSemaphore::new(budget.semaphore.clone()),
                    PollSemaphore::new(budget.caller(identity)),
                )),
                Charge::Free => None,
            },
            budget_bytes: budget.bytes,
            per_caller: budget.per_caller,
            min_rate: budget.min_rate,
            limit,
            release,
            held,
            framing: Framing {
                counter: items,
                ..Framing::default()
            },
            rest: None,
            pending: None,
            clock: None,
            deadline: None,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> Body for BudgetedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            if let Some((piece, need, mut mine)) = this.pending.take() {
                if need > 0
                    && let Some((budget, caller)) = this.budget
                {
                    // The caller's share first, then the budget's, each at
                    // most its whole: the largest message may take all of
                    // either. Every call takes them in this order.
                    if mine.is_none() {
                        let want = u32::try_from(need.min(*this.per_caller)).unwrap_or(u32::MAX);
                        match caller.poll_acquire_many(cx, want) {
                            Poll::Ready(permit) => mine = permit,
                            Poll::Pending => {
                                *this.pending = Some((piece, need, None));
                                return Poll::Pending;
                            }
                        }
                    }
                    let want = u32::try_from(need.min(*this.budget_bytes)).unwrap_or(u32::MAX);
                    match budget.poll_acquire_many(cx, want) {
                        Poll::Ready(permit) => {
                            // Neither semaphore is ever closed.
                            for permit in [permit, mine].into_iter().flatten() {
                                this.held.push(permit);
                            }
                        }
                        Poll::Pending => {
                            *this.pending = Some((piece, need, mine));
                            return Poll::Pending;
                        }
                    }
                }
                if need > 0 {
                    *this.clock = Some((Instant::now(), 0));
                }
                if let Some((_, passed)) = this.clock {
                    *passed += piece.len() as u64;
                }
                if this.framing.remaining == 0 && this.framing.header_len == 0 {
                    // The message is whole: its clock stops.
                    *this.clock = None;
                    *this.deadline = None;
                }
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            if *this.release == Release::OnNextMessage && this.framing.at_boundary() {
                // Asked for more after whole messages: the handler has them.
                this.held.release();
            }
            let chunk = match this.rest.take() {
                Some(rest) => rest,
                None => match this.inner.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(chunk) => chunk,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    },
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => {
                        if let Some((since, passed)) = *this.clock {
                            // Bytes due by now: min_rate a second after the grace.
                            let due = since
                                + BODY_GRACE
                                + Duration::from_secs_f64(passed as f64 / *this.min_rate as f64);
                            let sleep = this
                                .deadline
                                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                            if sleep.deadline() != due {
                                sleep.as_mut().reset(due);
                            }
                            ready!(sleep.as_mut().poll(cx));
                            refused(Refusal::Budget);
                            return Poll::Ready(Some(Err(Box::new(too_slow(*this.min_rate)))));
                        }
                        return Poll::Pending;
                    }
                },
            };
            let (took, need) = this.framing.scan(&chunk, *this.limit);
            if this.framing.over {
                refused(Refusal::Size);
                let max = this.framing.counter.map_or(0, |c| c.limit);
                return Poll::Ready(Some(Err(Box::new(super::codec::too_many_items(max)))));
            }
            let mut piece = chunk;
            if took < piece.len() {
                *this.rest = Some(piece.split_off(took));
            }
            *this.pending = Some((piece, need, None));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.rest.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
