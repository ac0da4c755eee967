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

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;

/// gRPC's message header: a compression flag and a big-endian u32 length.
const MESSAGE_HEADER: usize = 5;

/// The budget, shared by every call.
#[derive(Clone)]
pub struct DecodeBudget {
    semaphore: Arc<Semaphore>,
    bytes: usize,
}

impl DecodeBudget {
    pub fn new(bytes: usize) -> Self {
        let bytes = bytes.min(Semaphore::MAX_PERMITS);
        Self {
            semaphore: Arc::new(Semaphore::new(bytes)),
            bytes,
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

    /// Advances over `chunk` and answers the bytes of the messages whose
    /// header completes in it, each counted only if it is at most `limit`
    /// long (its header not included).
    fn scan(&mut self, mut chunk: &[u8], limit: usize) -> usize {
        let mut need = 0usize;
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(chunk.len());
                if let Some(counter) = &mut self.counter
                    && !counter.feed(&chunk[..take])
                {
                    self.over = true;
                }
                self.remaining -= take;
                chunk = &chunk[take..];
                continue;
            }
            let take = (MESSAGE_HEADER - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&chunk[..take]);
            self.header_len += take;
            chunk = &chunk[take..];
            if self.header_len == MESSAGE_HEADER {
                self.header_len = 0;
                let len =
                    u32::from_be_bytes(self.header[1..].try_into().expect("4 bytes")) as usize;
                self.remaining = len;
                if let Some(counter) = &mut self.counter {
                    counter.reset();
                }
                if len <= limit {
                    need = need.saturating_add(len + MESSAGE_HEADER);
                }
            }
        }
        need
    }
}

pin_project_lite::pin_project! {
    /// A request body that takes its messages' shares of the budget before
    /// passing their bytes on.
    pub struct BudgetedBody<B> {
        #[pin]
        inner: B,
        budget: PollSemaphore,
        budget_bytes: usize,
        // The longest message the method accepts.
        limit: usize,
        release: Release,
        held: Arc<Held>,
        framing: Framing,
        // A chunk waiting for its shares, and how many bytes it needs.
        pending: Option<(Bytes, usize)>,
    }
}

impl<B> BudgetedBody<B> {
    /// `items`, for a batch method: its items' field number and limit,
    /// counted as the message arrives.
    pub fn new(
        inner: B,
        budget: &DecodeBudget,
        limit: usize,
        release: Release,
        held: Arc<Held>,
        items: Option<FieldCounter>,
    ) -> Self {
        Self {
            inner,
            budget: PollSemaphore::new(budget.semaphore.clone()),
            budget_bytes: budget.bytes,
            limit,
            release,
            held,
            framing: Framing {
                counter: items,
                ..Framing::default()
            },
            pending: None,
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
            if let Some((chunk, need)) = this.pending.take() {
                if need > 0 {
                    // At most the whole budget: a chunk may complete one
                    // message and start the largest.
                    let want = u32::try_from(need.min(*this.budget_bytes)).unwrap_or(u32::MAX);
                    match this.budget.poll_acquire_many(cx, want) {
                        Poll::Ready(Some(permit)) => this.held.push(permit),
                        // The semaphore is never closed.
                        Poll::Ready(None) => {}
                        Poll::Pending => {
                            *this.pending = Some((chunk, need));
                            return Poll::Pending;
                        }
                    }
                }
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if *this.release == Release::OnNextMessage && this.framing.at_boundary() {
                // Asked for more after whole messages: the handler has them.
                this.held.release();
            }
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        let need = this.framing.scan(&chunk, *this.limit);
                        if this.framing.over {
                            let max = this.framing.counter.map_or(0, |c| c.limit);
                            return Poll::Ready(Some(Err(Box::new(super::codec::too_many_items(
                                max,
                            )))));
                        }
                        *this.pending = Some((chunk, need));
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, convert::Infallible};

    use super::*;

    /// A request body of fixed chunks.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
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
                    framing.scan(chunk, usize::MAX);
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

    #[test]
    fn framing_counts_each_message_once_across_any_split() {
        let mut wire = message(10);
        wire.extend(message(0));
        wire.extend(message(100));
        wire.extend(message(1000)); // over the limit below: not counted
        for split in [1, 2, 3, 5, 7, 64, wire.len()] {
            let mut framing = Framing::default();
            let need: usize = wire.chunks(split).map(|c| framing.scan(c, 500)).sum();
            assert_eq!(need, 15 + 5 + 105, "split {split}");
            assert!(framing.at_boundary());
        }
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
            limit,
            release,
            held.clone(),
            None,
        ))
    }

    #[test]
    fn a_message_waits_until_the_budget_has_room_and_a_unary_call_holds_it_until_done() {
        let budget = DecodeBudget::new(100);
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
        let budget = DecodeBudget::new(100);
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
        let budget = DecodeBudget::new(100);
        let held = Arc::new(Held::default());
        let mut big = body(&budget, &[500], 50, Release::AtResponseEnd, &held);
        assert!(matches!(poll(&mut big), Poll::Ready(Some(_))));
        assert_eq!(budget.available(), 100);
    }
}
