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

/// Where the reader is in the stream of gRPC messages.
#[derive(Default)]
struct Framing {
    /// Bytes of the current message header read so far.
    header: [u8; MESSAGE_HEADER],
    header_len: usize,
    /// Payload bytes of the current message not yet seen.
    remaining: usize,
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
    pub fn new(
        inner: B,
        budget: &DecodeBudget,
        limit: usize,
        release: Release,
        held: Arc<Held>,
    ) -> Self {
        Self {
            inner,
            budget: PollSemaphore::new(budget.semaphore.clone()),
            budget_bytes: budget.bytes,
            limit,
            release,
            held,
            framing: Framing::default(),
            pending: None,
        }
    }
}

impl<B> Body for BudgetedBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
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
                        *this.pending = Some((chunk, need));
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                other => return Poll::Ready(other),
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
