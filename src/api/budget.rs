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

/// Counts one top-level field of a protobuf message fed in pieces, and
/// says when it occurs more than `limit` times: a batch's items, counted
/// while the message arrives, so an oversized batch is refused after the
/// bytes of its first `limit + 1` items, not after all of them.
#[derive(Clone, Copy, Debug)]
pub struct FieldCounter {
    field: u32,
    limit: usize,
    count: usize,
    state: Wire,
}

#[derive(Clone, Copy, Debug)]
enum Wire {
    /// Reading a field's key (a varint).
    Key { value: u64, shift: u32 },
    /// Skipping a varint value.
    Varint,
    /// Reading a length-delimited field's length.
    Len { value: u64, shift: u32 },
    /// Skipping this many bytes of a value.
    Skip(u64),
    /// Not protobuf: counting stops (the decoder will refuse the message).
    Lost,
}

impl FieldCounter {
    pub fn new(field: u32, limit: usize) -> Self {
        Self {
            field,
            limit,
            count: 0,
            state: Wire::Key { value: 0, shift: 0 },
        }
    }

    /// A new message starts.
    fn reset(&mut self) {
        *self = Self::new(self.field, self.limit);
    }

    /// Feeds the next bytes of the message; `false` once the field occurred
    /// more than `limit` times.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while let Some((&byte, rest)) = bytes.split_first() {
            match &mut self.state {
                Wire::Lost => return true,
                Wire::Skip(n) => {
                    let take = usize::try_from(*n).unwrap_or(usize::MAX).min(bytes.len());
                    *n -= take as u64;
                    if *n == 0 {
                        self.state = Wire::Key { value: 0, shift: 0 };
                    }
                    bytes = &bytes[take..];
                    continue;
                }
                Wire::Varint => {
                    if byte & 0x80 == 0 {
                        self.state = Wire::Key { value: 0, shift: 0 };
                    }
                }
                Wire::Key { value, shift } | Wire::Len { value, shift } => {
                    if *shift > 63 {
                        self.state = Wire::Lost;
                        return true;
                    }
                    *value |= u64::from(byte & 0x7f) << *shift;
                    *shift += 7;
                    if byte & 0x80 == 0 {
                        let value = *value;
                        self.state = match self.state {
                            Wire::Key { .. } => {
                                if value >> 3 == u64::from(self.field) {
                                    self.count += 1;
                                    if self.count > self.limit {
                                        return false;
                                    }
                                }
                                match value & 7 {
                                    0 => Wire::Varint,
                                    1 => Wire::Skip(8),
                                    2 => Wire::Len { value: 0, shift: 0 },
                                    5 => Wire::Skip(4),
                                    _ => Wire::Lost,
                                }
                            }
                            _ if value == 0 => Wire::Key { value: 0, shift: 0 },
                            _ => Wire::Skip(value),
                        };
                    }
                }
            }
            bytes = rest;
        }
        true
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
                            return Poll::Ready(Some(Err(Box::new(too_slow(*this.min_rate)))));
                        }
                        return Poll::Pending;
                    }
                },
            };
            let (took, need) = this.framing.scan(&chunk, *this.limit);
            if this.framing.over {
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

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, convert::Infallible};

    use super::*;

    /// A request body of fixed chunks, then its end, or with `STALL` nothing
    /// ever again (a sender that stopped).
    struct Chunks<const STALL: bool = false>(VecDeque<Bytes>);

    impl<const STALL: bool> Body for Chunks<STALL> {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            match self.0.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                None if STALL => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
        m.extend(std::iter::repeat_n(7, len));
        m
    }

    #[test]
    fn a_batch_over_its_item_limit_is_seen_while_it_arrives() {
        use prost::Message;
        let batch = |items: usize| {
            crate::api::pb::EncryptBatchRequest {
                tenant_id: "acme".into(),
                items: vec![crate::api::pb::EncryptItem::default(); items],
            }
            .encode_to_vec()
        };
        for (items, over) in [(0, false), (10, false), (11, true), (1000, true)] {
            let payload = batch(items);
            let mut wire = message_header_of(payload.len());
            wire.extend(&payload);
            for split in [1, 3, 7, wire.len()] {
                let mut framing = Framing {
                    counter: Some(FieldCounter::new(2, 10)),
                    ..Framing::default()
                };
                for chunk in wire.chunks(split) {
                    scan_all(&mut framing, chunk, usize::MAX);
                }
                assert_eq!(framing.over, over, "{items} items, split {split}");
            }
        }
        // Items with content, and fields of every wire type around them.
        let mut counter = FieldCounter::new(2, 2);
        let message = crate::api::pb::EncryptBatchRequest {
            tenant_id: "a".repeat(300),
            items: vec![
                crate::api::pb::EncryptItem {
                    subject_id: "s".into(),
                    context: [("k".to_owned(), "v".to_owned())].into(),
                    plaintext: vec![1; 200],
                };
                2
            ],
        }
        .encode_to_vec();
        assert!(message.chunks(5).all(|c| counter.feed(c)));
        assert_eq!(counter.count, 2);
    }

    fn message_header_of(len: usize) -> Vec<u8> {
        let mut h = vec![0];
        h.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
        h
    }

    /// Scans all of `chunk`, piece by piece as the body does; answers each
    /// piece's share.
    fn scan_all(framing: &mut Framing, mut chunk: &[u8], limit: usize) -> Vec<usize> {
        let mut needs = Vec::new();
        while !chunk.is_empty() {
            let (took, need) = framing.scan(chunk, limit);
            assert!(took > 0);
            needs.push(need);
            chunk = &chunk[took..];
        }
        needs
    }

    #[test]
    fn framing_counts_each_message_once_across_any_split() {
        let mut wire = message(10);
        wire.extend(message(0));
        wire.extend(message(100));
        wire.extend(message(1000)); // over the limit below: not counted
        for split in [1, 2, 3, 5, 7, 64, wire.len()] {
            let mut framing = Framing::default();
            let needs: Vec<usize> = wire
                .chunks(split)
                .flat_map(|c| scan_all(&mut framing, c, 500))
                .collect();
            assert_eq!(needs.iter().sum::<usize>(), 15 + 5 + 105, "split {split}");
            assert!(framing.at_boundary());
        }
        // A piece ends where a message ends: one header per piece.
        let mut framing = Framing::default();
        assert_eq!(scan_all(&mut framing, &wire, 500), [15, 5, 105, 0]);
    }

    fn poll(body: &mut Pin<Box<BudgetedBody<Chunks>>>) -> Poll<Option<Bytes>> {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        body.as_mut()
            .poll_frame(&mut cx)
            .map(|f| f.map(|f| f.unwrap().into_data().unwrap()))
    }

    fn body(
        budget: &DecodeBudget,
        messages: &[usize],
        limit: usize,
        release: Release,
        held: &Arc<Held>,
    ) -> Pin<Box<BudgetedBody<Chunks>>> {
        let chunks = messages.iter().map(|&len| Bytes::from(message(len)));
        Box::pin(BudgetedBody::new(
            Chunks(chunks.collect()),
            budget,
            Charge::Caller("caller"),
            limit,
            release,
            held.clone(),
            None,
        ))
    }

    #[test]
    fn a_message_waits_until_the_budget_has_room_and_a_unary_call_holds_it_until_done() {
        let budget = DecodeBudget::new(100, 100, 1 << 20);
        let held = Arc::new(Held::default());
        let mut first = body(&budget, &[90], 1000, Release::AtResponseEnd, &held);
        assert!(matches!(poll(&mut first), Poll::Ready(Some(_))));
        assert_eq!(budget.available(), 5);
        // A second call's message of 10 + 5 bytes does not fit: it waits.
        let other_held = Arc::new(Held::default());
        let mut other = body(&budget, &[10], 1000, Release::AtResponseEnd, &other_held);
        assert!(poll(&mut other).is_pending());
        // The first call's body ends, but a unary call holds its share until
        // its response is done too (the response body holds `held`).
        assert!(matches!(poll(&mut first), Poll::Ready(None)));
        drop(first);
        assert!(poll(&mut other).is_pending());
        drop(held);
        assert!(matches!(poll(&mut other), Poll::Ready(Some(_))));
        assert_eq!(budget.available(), 100 - 15);
        drop(other);
        drop(other_held);
        assert_eq!(budget.available(), 100);
    }

    #[test]
    fn a_stream_gives_a_message_back_when_it_asks_for_the_next() {
        let budget = DecodeBudget::new(100, 100, 1 << 20);
        let held = Arc::new(Held::default());
        let mut stream = body(&budget, &[60, 60], 1000, Release::OnNextMessage, &held);
        assert!(matches!(poll(&mut stream), Poll::Ready(Some(_))));
        assert_eq!(budget.available(), 35);
        // 65 more would not fit beside the first; asking for them gives the
        // first back.
        assert!(matches!(poll(&mut stream), Poll::Ready(Some(_))));
        assert_eq!(budget.available(), 35);
        assert!(matches!(poll(&mut stream), Poll::Ready(None)));
        assert_eq!(budget.available(), 100);
    }

    #[test]
    fn a_message_over_the_limit_is_not_charged() {
        let budget = DecodeBudget::new(100, 100, 1 << 20);
        let held = Arc::new(Held::default());
        let mut big = body(&budget, &[500], 50, Release::AtResponseEnd, &held);
        assert!(matches!(poll(&mut big), Poll::Ready(Some(_))));
        assert_eq!(budget.available(), 100);
    }

    /// Messages as one chunk.
    fn together(messages: &[usize]) -> Bytes {
        Bytes::from(
            messages
                .iter()
                .flat_map(|&len| message(len))
                .collect::<Vec<u8>>(),
        )
    }

    /// Issue 14's attack review: one stream sent two messages that each
    /// needed most of the budget in one chunk. The whole chunk waited for
    /// the second message's share while holding the first's: forever. Now
    /// the chunk is split where the first message ends.
    #[test]
    fn a_chunk_holding_two_messages_is_split_so_a_stream_never_waits_on_itself() {
        let budget = DecodeBudget::new(100, 100, 1 << 20);
        let held = Arc::new(Held::default());
        let mut stream = Box::pin(BudgetedBody::new(
            Chunks([together(&[60, 60])].into()),
            &budget,
            Charge::Caller("caller"),
            1000,
            Release::OnNextMessage,
            held.clone(),
            None,
        ));
        let first = poll(&mut stream);
        assert!(
            matches!(&first, Poll::Ready(Some(b)) if b.len() == 65),
            "{first:?}"
        );
        assert_eq!(budget.available(), 35);
        let second = poll(&mut stream);
        assert!(
            matches!(&second, Poll::Ready(Some(b)) if b.len() == 65),
            "{second:?}"
        );
        assert_eq!(budget.available(), 35);
        assert!(matches!(poll(&mut stream), Poll::Ready(None)));
        assert_eq!(budget.available(), 100);
    }

    #[test]
    fn one_caller_holds_at_most_its_share_and_others_pass() {
        let budget = DecodeBudget::new(100, 40, 1 << 20);
        let caller = |name: &'static str, len: usize| {
            let held = Arc::new(Held::default());
            let body = Box::pin(BudgetedBody::new(
                Chunks([Bytes::from(message(len))].into()),
                &budget,
                Charge::Caller(name),
                1000,
                Release::AtResponseEnd,
                held.clone(),
                None,
            ));
            (body, held)
        };
        let (mut first, first_held) = caller("mallory", 30);
        assert!(matches!(poll(&mut first), Poll::Ready(Some(_))));
        // mallory's second call would pass its share of 40: it waits, though
        // the budget has room.
        let (mut second, _second_held) = caller("mallory", 30);
        assert!(poll(&mut second).is_pending());
        assert_eq!(budget.available(), 65);
        // Another caller passes.
        let (mut other, other_held) = caller("alice", 30);
        assert!(matches!(poll(&mut other), Poll::Ready(Some(_))));
        assert_eq!(budget.available(), 30);
        drop((first, first_held));
        assert!(matches!(poll(&mut second), Poll::Ready(Some(_))));
        drop((other, other_held));
        assert_eq!(budget.callers(), 1);
        // A message larger than a caller's share takes all of it (and its
        // whole size of the budget).
        let (mut large, _large_held) = caller("bob", 60);
        assert!(matches!(poll(&mut large), Poll::Ready(Some(_))));
        assert_eq!(budget.available(), 100 - 35 - 65);
        let (mut more, _more_held) = caller("bob", 0);
        assert!(poll(&mut more).is_pending());
    }

    #[test]
    fn health_and_reflection_take_no_share() {
        let budget = DecodeBudget::new(100, 100, 1 << 20);
        let mut free = Box::pin(BudgetedBody::new(
            Chunks([Bytes::from(message(90))].into()),
            &budget,
            Charge::Free,
            1000,
            Release::AtResponseEnd,
            Arc::new(Held::default()),
            None,
        ));
        assert!(matches!(poll(&mut free), Poll::Ready(Some(_))));
        assert_eq!((budget.available(), budget.callers()), (100, 0));
    }

    /// Issue 14's attack review: a caller announced 16 MiB messages and sent
    /// nothing more, holding the budget for the call's whole ceiling. Now
    /// the bytes must come at the minimum rate after the grace.
    #[tokio::test(start_paused = true)]
    async fn a_message_whose_bytes_do_not_come_ends_after_the_grace_and_gives_its_share_back() {
        let budget = DecodeBudget::new(2000, 2000, 100);
        let held = Arc::new(Held::default());
        let mut wire = message(1000);
        wire.truncate(5 + 200);
        let mut body = Box::pin(BudgetedBody::new(
            Chunks::<true>([Bytes::from(wire)].into()),
            &budget,
            Charge::Caller("mallory"),
            10_000,
            Release::OnNextMessage,
            held.clone(),
            None,
        ));
        let start = Instant::now();
        let first = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        assert_eq!(first.unwrap().unwrap().into_data().unwrap().len(), 205);
        assert_eq!(budget.available(), 2000 - 1005);
        // 205 bytes at 100 a second are due by 5 s + 2.05 s.
        let error = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx))
            .await
            .unwrap()
            .unwrap_err();
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(7050) && waited < Duration::from_millis(7100),
            "{waited:?}"
        );
        let status = error.downcast::<Status>().unwrap();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        drop(body);
        drop(held);
        assert_eq!(budget.available(), 2000);
    }
}
