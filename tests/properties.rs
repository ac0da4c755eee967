//! Property tests of the parsers: the invariants the fuzz targets (fuzz/,
//! scripts/fuzz) check for hours, checked here on every test run with a few
//! hundred random inputs each.
//!
//! - parsing never panics on arbitrary bytes (envelopes, streaming envelopes,
//!   their text form, receipts, audit logs, configuration and policy files);
//! - seal then open answers the plaintext, for both key kinds and providers,
//!   randomized or deterministic (and a deterministic seal is a function of
//!   its inputs);
//! - any single-byte change, truncation or extension of an envelope (one-shot
//!   or streaming) fails to open;
//! - the text form round trips, and has one text per envelope;
//! - blind-index transformations never panic on any text, are idempotent
//!   where Unicode says so (NFC, NFKC, trim), and a token has its length
//!   and unused bits zero.

use keywarden::{
    envelope::{
        self, Context, EnvelopeKey, KeyRef, Mode, Provider, SUBJECT_KEY_ID_LEN,
        blind::{self, Field, Transformation},
        stream::{self, SEGMENT_PLAINTEXT_LEN, StreamOpener, StreamSealer},
        text,
    },
    fuzzing,
    secret::Key256,
};
use proptest::prelude::*;

fn key(provider: Provider) -> EnvelopeKey {
    EnvelopeKey::new(provider, &Key256::from_slice(&[0x17; 32]).unwrap())
}

fn key_ref() -> impl Strategy<Value = KeyRef> {
    prop_oneof![
        any::<u32>().prop_map(|version| KeyRef::Tenant { version }),
        (any::<[u8; SUBJECT_KEY_ID_LEN]>(), any::<u32>())
            .prop_map(|(id, version)| KeyRef::Subject { id, version }),
    ]
}

fn context() -> impl Strategy<Value = Context> {
    proptest::collection::btree_map(".{0,12}", ".{0,24}", 0..4)
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Randomized), Just(Mode::Deterministic)]
}

fn provider() -> impl Strategy<Value = Provider> {
    prop_oneof![Just(Provider::RustCrypto), Just(Provider::AwsLc)]
}

fn open(provider: Provider, bytes: &[u8], tenant: &str, ctx: &Context) -> Option<Vec<u8>> {
    let parsed = envelope::parse(bytes).ok()?;
    envelope::open(&key(provider), &parsed, tenant, ctx).ok()
}

/// Opens a streaming envelope fed in chunks of `chunk` bytes: the result,
/// and the plaintext given out before it.
fn open_stream(
    provider: Provider,
    bytes: &[u8],
    ctx: &Context,
    chunk: usize,
) -> (Result<(), ()>, Vec<u8>) {
    let mut out = Vec::new();
    let Ok(Some(header)) = stream::parse_header(bytes) else {
        return (Err(()), out);
    };
    let Ok(mut opener) = StreamOpener::start(&key(provider), &bytes[..header.len], "acme", ctx)
    else {
        return (Err(()), out);
    };
    for piece in bytes[header.len..].chunks(chunk) {
        if opener.push(piece, &mut out).is_err() {
            return (Err(()), out);
        }
    }
    (opener.finish(&mut out).map_err(|_| ()), out)
}

fn seal_stream(
    provider: Provider,
    key_ref: KeyRef,
    ctx: &Context,
    plaintext: &[u8],
    chunk: usize,
) -> Vec<u8> {
    let (mut sealer, mut sealed) =
        StreamSealer::start(&key(provider), key_ref, "acme", ctx).unwrap();
    for piece in plaintext.chunks(chunk) {
        sealer.push(piece, &mut sealed).unwrap();
    }
    sealer.finish(&mut sealed).unwrap();
    sealed
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parsers_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = envelope::parse(&bytes);
        let _ = stream::parse_header(&bytes);
        let _ = stream::header_len(&bytes);
        // Every mode of every fuzz target: each panics on a broken invariant.
        fuzzing::envelope(&bytes);
        fuzzing::stream(&bytes);
        fuzzing::data_key(&bytes);
        fuzzing::receipt(&bytes);
        fuzzing::audit(&bytes);
        fuzzing::config(&bytes);
        fuzzing::policy(&bytes);
    }

    #[test]
    fn text_parsers_never_panic_on_arbitrary_text(text in "\\PC{0,300}") {
        let _ = text::decode(&text);
        for mode in [b'0', b'1'] {
            let mut input = vec![mode];
            input.extend_from_slice(text.as_bytes());
            fuzzing::receipt(&input);
            fuzzing::config(&input);
        }
        fuzzing::audit(text.as_bytes());
        fuzzing::policy(text.as_bytes());
    }

    #[test]
    fn seal_then_open_answers_the_plaintext(
        plaintext in proptest::collection::vec(any::<u8>(), 0..2048),
        key_ref in key_ref(),
        tenant in "[A-Za-z0-9._-]{1,32}",
        ctx in context(),
        sealer in provider(),
        opener in provider(),
        mode in mode(),
    ) {
        let seal = || envelope::seal_mode(mode, &key(sealer), key_ref, &tenant, &ctx, &plaintext).unwrap();
        let sealed = seal();
        let parsed = envelope::parse(&sealed).unwrap();
        prop_assert_eq!(parsed.key_ref, key_ref);
        prop_assert_eq!(parsed.mode, mode);
        prop_assert_eq!(mode == Mode::Deterministic, seal() == sealed);
        prop_assert_eq!(envelope::open(&key(opener), &parsed, &tenant, &ctx), Ok(plaintext));
    }

    #[test]
    fn any_single_byte_change_truncation_or_extension_fails_to_open(
        plaintext in proptest::collection::vec(any::<u8>(), 0..256),
        key_ref in key_ref(),
        ctx in context(),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
        cut in any::<prop::sample::Index>(),
        extra in any::<u8>(),
        mode in mode(),
    ) {
        let sealed = envelope::seal_mode(mode, &key(Provider::default()), key_ref, "acme", &ctx, &plaintext).unwrap();
        let mut changed = sealed.clone();
        changed[at.index(sealed.len())] ^= flip;
        prop_assert_eq!(open(Provider::default(), &changed, "acme", &ctx), None);
        prop_assert_eq!(open(Provider::default(), &sealed[..cut.index(sealed.len())], "acme", &ctx), None);
        let mut longer = sealed.clone();
        longer.push(extra);
        prop_assert_eq!(open(Provider::default(), &longer, "acme", &ctx), None);
        prop_assert_eq!(open(Provider::default(), &sealed, "acme", &ctx), Some(plaintext));
    }

    #[test]
    fn the_text_form_round_trips_with_one_text_per_envelope(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        junk in "\\PC{0,64}",
    ) {
        let encoded = text::encode(&bytes);
        prop_assert!(encoded.starts_with("kw1:"));
        prop_assert_eq!(text::decode(&encoded), Ok(bytes.clone()));
        prop_assert_eq!(text::decode(&format!(" {encoded}\n")), Ok(bytes));
        // Whatever decodes encodes back to the same text.
        if let Ok(decoded) = text::decode(&junk) {
            prop_assert_eq!(text::encode(&decoded), junk.trim());
        }
    }
}

proptest! {
    // Each case seals and opens up to three 64 KiB segments, twice.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn streams_round_trip_in_any_chunking_and_refuse_any_change(
        pattern in proptest::collection::vec(any::<u8>(), 1..64),
        len in 0..3 * SEGMENT_PLAINTEXT_LEN + 100,
        key_ref in key_ref(),
        ctx in context(),
        sealer in provider(),
        opener in provider(),
        push in 1usize..100_000,
        pull in 1usize..100_000,
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
        cut in any::<prop::sample::Index>(),
    ) {
        let plaintext: Vec<u8> = pattern.iter().copied().cycle().take(len).collect();
        let sealed = seal_stream(sealer, key_ref, &ctx, &plaintext, push);
        let (opened, out) = open_stream(opener, &sealed, &ctx, pull);
        prop_assert_eq!(opened, Ok(()));
        prop_assert!(out == plaintext, "a stream opened to other bytes");

        let mut changed = sealed.clone();
        changed[at.index(sealed.len())] ^= flip;
        let (opened, out) = open_stream(opener, &changed, &ctx, pull);
        prop_assert_eq!(opened, Err(()));
        prop_assert!(plaintext.starts_with(&out), "a changed stream gave out other bytes");

        let (opened, out) = open_stream(opener, &sealed[..cut.index(sealed.len())], &ctx, pull);
        prop_assert_eq!(opened, Err(()));
        prop_assert!(plaintext.starts_with(&out), "a cut stream gave out other bytes");
    }

    #[test]
    fn blind_index_transformations_and_tokens_hold_their_shape(
        text in "\\PC{0,40}",
        raw in proptest::collection::vec(any::<u8>(), 0..64),
        steps in proptest::collection::vec(
            prop_oneof![
                Just(Transformation::Nfc),
                Just(Transformation::Nfkc),
                Just(Transformation::CaseFold),
                Just(Transformation::Trim),
                (1u32..8).prop_map(Transformation::LastChars),
            ],
            0..blind::MAX_TRANSFORMATIONS,
        ),
        bits in blind::MIN_BITS..=blind::MAX_BITS,
        version in any::<u32>(),
        ctx in context(),
    ) {
        let out = blind::transform(text.as_bytes(), &steps, &blind::TransformBudget::of(usize::MAX)).unwrap();
        prop_assert!(std::str::from_utf8(&out).is_ok());
        for step in [Transformation::Nfc, Transformation::Nfkc, Transformation::Trim] {
            let once = blind::transform(text.as_bytes(), &[step], &blind::TransformBudget::of(usize::MAX)).unwrap().into_owned();
            let twice = blind::transform(&once, &[step], &blind::TransformBudget::of(usize::MAX)).unwrap().into_owned();
            prop_assert_eq!(once, twice);
        }
        // Bytes that are not text: as given without steps, refused with them.
        let as_given = blind::transform(&raw, &[], &blind::TransformBudget::of(usize::MAX)).unwrap().into_owned();
        prop_assert_eq!(as_given, raw.clone());
        if std::str::from_utf8(&raw).is_err() {
            prop_assert!(blind::transform(&raw, &[Transformation::Trim], &blind::TransformBudget::of(usize::MAX)).is_err());
        }
        let key = Key256::from_slice(&[0x17; 32]).unwrap();
        let fields = [
            Field { value: &out, transformations: &steps },
            Field { value: &raw, transformations: &[] },
        ];
        let token = blind::token(&key, version, bits, "acme", &ctx, &fields);
        prop_assert_eq!(token.len(), blind::token_len(bits));
        prop_assert_eq!(&token[..4], &version.to_be_bytes()[..]);
        let unused = (8 - bits % 8) % 8;
        prop_assert_eq!(token[token.len() - 1] & ((1u8 << unused) - 1), 0);
        prop_assert_eq!(token.clone(), blind::token(&key, version, bits, "acme", &ctx, &fields));
    }
}
