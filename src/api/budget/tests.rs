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
                deterministic: true,
                key_version: 0,
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
