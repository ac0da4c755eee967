//! Entry points for the fuzz targets (fuzz/, one line each) and for the
//! property tests (tests/properties.rs): each takes arbitrary bytes, feeds
//! them to one parser, and panics when an invariant of that parser breaks.
//! A return without a panic is a pass. docs/SECURITY.md §12.14 says how long
//! each has been fuzzed and what it found.
//!
//! The first byte of the input picks a mode where a parser has more than one
//! way in (arbitrary bytes, or a valid input made here and then changed), so
//! the fuzzer reaches the accepting paths too, which it could never reach by
//! forging a tag or a signature. The keys here are fixed and public: nothing
//! sealed under them is secret.

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::{
    audit,
    auth::{Caller, Permission, Transport, policy::Policy},
    config::Config,
    envelope::{
        self, Context, EnvelopeKey, KeyRef, Mode, NONCE_LEN, Provider, SALT_LEN,
        SUBJECT_KEY_ID_LEN, client_stream, datakey,
        stream::{self, StreamOpener, StreamSealer},
        text,
    },
    receipt,
    secret::Key256,
};

/// The tenant every envelope here is sealed for.
const TENANT: &str = "fuzz-tenant";

fn key(provider: Provider) -> EnvelopeKey {
    EnvelopeKey::new(
        provider,
        &Key256::from_slice(&[0x42; 32]).expect("32 bytes"),
    )
}

fn context() -> Context {
    [("table".to_owned(), "fuzz".to_owned())].into()
}

/// The providers this build may use (one in a FIPS build).
fn providers() -> impl Iterator<Item = Provider> {
    Provider::ALL.into_iter().filter(|p| p.allowed())
}

/// A small deterministic generator of chunk sizes and positions, seeded by
/// the input, so one input always runs the same way.
struct Stir(u64);

impl Stir {
    fn new(seed: &[u8]) -> Self {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for &b in seed.iter().take(16) {
            state = (state ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
        }
        Self(state | 1)
    }

    /// A number below `bound` (at least 1).
    fn below(&mut self, bound: usize) -> usize {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % bound.max(1) as u64) as usize
    }
}

/// The data-key formats: wrapped data keys (`envelope::datakey`, suite
/// 0x05) and client streams (`envelope::client_stream`, suite 0x06).
///
/// - mode 0: the bytes as a wrapped data key. Parsing never panics; every
///   provider answers alike; one that opens is exactly what `wrap_with`
///   makes of its data key, salt and nonce.
/// - mode 1: the bytes as a client stream. Its header parses only when
///   whole (no shorter prefix parses), and opening it under a fixed data key
///   never panics and never passes the commitment by chance.
/// - mode 2: the bytes as a plaintext, sealed as a client stream and opened
///   again; then one byte changed, and it no longer opens.
pub fn data_key(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let data_key = Key256::from_slice(&[0x17; 32]).expect("32 bytes");
    let ctx = context();
    match mode % 3 {
        0 => {
            let Ok(key_ref) = datakey::parse(rest) else {
                return;
            };
            let mut opened = providers().map(|p| datakey::unwrap(&key(p), rest, TENANT, &ctx));
            let first = opened.next().expect("at least one provider");
            for other in opened {
                assert_eq!(
                    first.as_ref().map(|k| *k.expose()).ok(),
                    other.as_ref().map(|k| *k.expose()).ok(),
                    "providers disagree on a wrapped data key"
                );
            }
            if let Ok(opened) = first {
                let h = rest.len() - 32 - 16;
                let again = datakey::wrap_with(
                    &key(Provider::default()),
                    key_ref,
                    TENANT,
                    &ctx,
                    &opened,
                    rest[h - 28..h - 12].try_into().expect("salt"),
                    rest[h - 12..h].try_into().expect("nonce"),
                )
                .expect("wraps");
                assert_eq!(again, rest, "a wrapped data key has one encoding");
            }
        }
        1 => {
            let header = match client_stream::parse_header(rest) {
                Ok(Some(header)) => header,
                Ok(None) => {
                    assert!(rest.len() < client_stream::SUBJECT_HEADER_LEN);
                    return;
                }
                Err(_) => return,
            };
            for cut in 0..header.len {
                assert!(
                    !matches!(client_stream::parse_header(&rest[..cut]), Ok(Some(_))),
                    "a prefix of {cut} bytes parses as a whole header"
                );
            }
            for provider in providers() {
                // Only a header made under this data key passes the
                // commitment; the fuzzer cannot make one.
                assert!(
                    client_stream::open(provider, &data_key, rest, TENANT, &ctx).is_err(),
                    "a made-up client stream opened"
                );
            }
        }
        _ => {
            let wrapped = datakey::wrap(
                &key(Provider::default()),
                KeyRef::Tenant { version: 1 },
                TENANT,
                &ctx,
                &data_key,
            )
            .expect("wraps");
            let providers: Vec<Provider> = providers().collect();
            let mut stir = Stir::new(rest);
            let sealer = providers[stir.below(providers.len())];
            let opener = providers[stir.below(providers.len())];
            let sealed = client_stream::seal(sealer, &data_key, &wrapped, TENANT, &ctx, rest)
                .expect("seals");
            let opened = client_stream::open(opener, &data_key, &sealed, TENANT, &ctx)
                .expect("opens what was sealed");
            assert!(*opened == rest, "opens to the plaintext");
            let mut changed = sealed.clone();
            let at = stir.below(changed.len());
            changed[at] ^= 1 << stir.below(8);
            assert!(
                client_stream::open(opener, &data_key, &changed, TENANT, &ctx).is_err(),
                "a changed byte at {at} opened"
            );
        }
    }
}

/// One-shot envelopes (`envelope::parse`, `open`, `seal`) and their text form
/// (`envelope::text`).
///
/// - mode 0: the bytes as an envelope. Parsing never panics; every provider
///   answers alike; an envelope that opens is exactly what `seal` makes of
///   its plaintext, salt and nonce (one encoding per message).
/// - mode 1: the bytes as a plaintext, sealed and opened again; then one
///   byte changed, or the envelope cut short, and it no longer opens.
/// - mode 2: the bytes as the text form: what decodes encodes back to the
///   same text, and any bytes encode to text that decodes to them.
pub fn envelope(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => envelope_bytes(rest),
        1 => envelope_changed(rest),
        _ => envelope_text(rest),
    }
}

fn envelope_bytes(bytes: &[u8]) {
    let Ok(parsed) = envelope::parse(bytes) else {
        return;
    };
    let ctx = context();
    let mut opened = providers().map(|p| envelope::open(&key(p), &parsed, TENANT, &ctx));
    let first = opened.next().expect("at least one provider");
    for other in opened {
        assert_eq!(first, other, "providers disagree on an envelope");
    }
    if let Ok(plaintext) = first {
        let again = match parsed.mode {
            Mode::Deterministic => envelope::seal_deterministic(
                &key(Provider::default()),
                parsed.key_ref,
                TENANT,
                &ctx,
                &plaintext,
            )
            .expect("an opened plaintext seals again"),
            Mode::Randomized => reseal(bytes, &parsed, &ctx, &plaintext),
        };
        assert_eq!(again, bytes, "an envelope opened that seal would not make");
    }
}

/// Seals `plaintext` again with the salt and nonce of the randomized
/// envelope `bytes`.
fn reseal(bytes: &[u8], parsed: &envelope::Parsed<'_>, ctx: &Context, plaintext: &[u8]) -> Vec<u8> {
    let header_len = match parsed.key_ref {
        KeyRef::Tenant { .. } => 3 + 4,
        KeyRef::Subject { .. } => 3 + SUBJECT_KEY_ID_LEN + 4,
    };
    let salt: &[u8; SALT_LEN] = bytes[header_len..header_len + SALT_LEN]
        .try_into()
        .expect("a parsed envelope holds a salt");
    let nonce: &[u8; NONCE_LEN] = bytes[header_len + SALT_LEN..header_len + SALT_LEN + NONCE_LEN]
        .try_into()
        .expect("a parsed envelope holds a nonce");
    envelope::seal_with(
        &key(Provider::default()),
        parsed.key_ref,
        TENANT,
        ctx,
        plaintext,
        salt,
        nonce,
    )
    .expect("an opened plaintext seals again")
}

fn envelope_changed(rest: &[u8]) {
    let mut stir = Stir::new(rest);
    let key_ref = if stir.below(2) == 0 {
        KeyRef::Tenant {
            version: u32::try_from(stir.below(1 << 20)).expect("small"),
        }
    } else {
        KeyRef::Subject {
            id: [rest.first().copied().unwrap_or(7); SUBJECT_KEY_ID_LEN],
            version: 1,
        }
    };
    let ctx = context();
    let providers: Vec<Provider> = providers().collect();
    let sealer = providers[stir.below(providers.len())];
    let opener = providers[stir.below(providers.len())];
    let mode = if stir.below(2) == 0 {
        Mode::Randomized
    } else {
        Mode::Deterministic
    };
    let sealed =
        envelope::seal_mode(mode, &key(sealer), key_ref, TENANT, &ctx, rest).expect("seals");
    let parsed = envelope::parse(&sealed).expect("what seal made parses");
    assert_eq!(parsed.key_ref, key_ref);
    assert_eq!(
        envelope::open(&key(opener), &parsed, TENANT, &ctx).as_deref(),
        Ok(rest),
        "a sealed plaintext did not open"
    );
    // Another tenant or context does not open it.
    assert!(envelope::open(&key(opener), &parsed, "other-tenant", &ctx).is_err());
    assert!(envelope::open(&key(opener), &parsed, TENANT, &Context::new()).is_err());

    let at = stir.below(sealed.len());
    let flip = u8::try_from(stir.below(255) + 1).expect("1 to 255");
    let mut changed = sealed.clone();
    changed[at] ^= flip;
    assert!(
        open_bytes(opener, &changed).is_none(),
        "changing byte {at} of {} by {flip:#04x} still opens",
        sealed.len()
    );
    let cut = stir.below(sealed.len());
    assert!(
        open_bytes(opener, &sealed[..cut]).is_none(),
        "the first {cut} of {} bytes still open",
        sealed.len()
    );
    let mut longer = sealed;
    longer.push(flip);
    assert!(
        open_bytes(opener, &longer).is_none(),
        "an appended byte still opens"
    );
}

fn open_bytes(provider: Provider, bytes: &[u8]) -> Option<Vec<u8>> {
    let parsed = envelope::parse(bytes).ok()?;
    envelope::open(&key(provider), &parsed, TENANT, &context()).ok()
}

fn envelope_text(rest: &[u8]) {
    let encoded = text::encode(rest);
    assert_eq!(text::decode(&encoded).as_deref(), Ok(rest));
    if let Ok(input) = std::str::from_utf8(rest)
        && let Ok(bytes) = text::decode(input)
    {
        assert_eq!(
            text::encode(&bytes),
            input.trim(),
            "two texts decode to the same bytes"
        );
    }
}

/// Streaming envelopes (`envelope::stream`): the header parser and the
/// opener, and the sealer they must agree with.
///
/// - mode 0: the bytes as a streaming envelope, fed to the opener in chunks
///   the input chooses. Nothing panics, whatever the chunking; a header that
///   parses has the length `header_len` says.
/// - mode 1: the bytes, repeated to cover up to five segments, sealed and
///   opened in chunks the input chooses; then one byte changed, or the
///   envelope cut short, and the opener fails, having given out only a
///   prefix of the plaintext (segments that authenticated).
pub fn stream(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        stream_bytes(rest);
    } else {
        stream_changed(mode, rest);
    }
}

fn stream_bytes(bytes: &[u8]) {
    let parsed = match stream::parse_header(bytes) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            assert!(bytes.len() < stream::SUBJECT_HEADER_LEN);
            return;
        }
        Err(_) => return,
    };
    assert_eq!(stream::header_len(bytes), Ok(parsed.len));
    // Every shorter prefix is undecided or refused, never another header.
    for cut in 0..parsed.len {
        assert!(
            !matches!(stream::parse_header(&bytes[..cut]), Ok(Some(_))),
            "a prefix of {cut} bytes parses as a whole header"
        );
    }
    let mut stir = Stir::new(bytes);
    let (header, body) = bytes.split_at(parsed.len);
    for provider in providers() {
        let Ok(mut opener) = StreamOpener::start(&key(provider), header, TENANT, &context()) else {
            continue;
        };
        let mut out = Vec::new();
        let mut body = body;
        let mut result = Ok(());
        while !body.is_empty() && result.is_ok() {
            let (chunk, rest) = body.split_at(stir.below(body.len()) + 1);
            result = opener.push(chunk, &mut out);
            body = rest;
        }
        if result.is_ok() {
            result = opener.finish(&mut out);
        }
        // Nothing the fuzzer made can authenticate under the fixed key
        // unless it is a sealed stream; an authentic one is a whole object.
        if result.is_err() {
            assert!(out.len() % stream::SEGMENT_PLAINTEXT_LEN == 0);
        }
    }
}

fn stream_changed(mode: u8, rest: &[u8]) {
    let mut stir = Stir::new(rest);
    let repeat = if rest.is_empty() {
        0
    } else {
        // Up to five segments' worth.
        let most = 5 * stream::SEGMENT_PLAINTEXT_LEN / rest.len();
        stir.below(most.min(usize::from(mode)) + 1)
    };
    let plaintext = rest.repeat(repeat.max(1));
    let key_ref = if stir.below(2) == 0 {
        KeyRef::Tenant { version: 3 }
    } else {
        KeyRef::Subject {
            id: [9; SUBJECT_KEY_ID_LEN],
            version: 2,
        }
    };
    let providers: Vec<Provider> = providers().collect();
    let sealer_provider = providers[stir.below(providers.len())];
    let opener_provider = providers[stir.below(providers.len())];
    let ctx = context();

    let (mut sealer, mut sealed) =
        StreamSealer::start(&key(sealer_provider), key_ref, TENANT, &ctx).expect("starts");
    let mut input = plaintext.as_slice();
    while !input.is_empty() {
        let (chunk, more) = input.split_at(stir.below(input.len().min(100_000)) + 1);
        sealer.push(chunk, &mut sealed).expect("seals");
        input = more;
    }
    sealer.finish(&mut sealed).expect("finishes");

    let open = |bytes: &[u8], stir: &mut Stir| -> (Result<(), ()>, Vec<u8>) {
        let mut out = Vec::new();
        let header = match stream::parse_header(bytes) {
            Ok(Some(header)) => header,
            _ => return (Err(()), out),
        };
        let Ok(mut opener) =
            StreamOpener::start(&key(opener_provider), &bytes[..header.len], TENANT, &ctx)
        else {
            return (Err(()), out);
        };
        let mut body = &bytes[header.len..];
        while !body.is_empty() {
            let (chunk, more) = body.split_at(stir.below(body.len().min(100_000)) + 1);
            if opener.push(chunk, &mut out).is_err() {
                return (Err(()), out);
            }
            body = more;
        }
        (opener.finish(&mut out).map_err(|_| ()), out)
    };

    assert_eq!(
        stream::parse_header(&sealed).map(|h| h.map(|h| h.key_ref)),
        Ok(Some(key_ref))
    );
    let (opened, out) = open(&sealed, &mut stir);
    assert_eq!(opened, Ok(()), "a sealed stream did not open");
    assert!(out == plaintext, "a sealed stream opened to other bytes");

    let at = stir.below(sealed.len());
    let flip = u8::try_from(stir.below(255) + 1).expect("1 to 255");
    let mut changed = sealed.clone();
    changed[at] ^= flip;
    let (opened, out) = open(&changed, &mut stir);
    assert_eq!(
        opened,
        Err(()),
        "changing byte {at} by {flip:#04x} still opens"
    );
    assert!(
        plaintext.starts_with(&out),
        "a changed stream gave out other bytes"
    );

    let cut = stir.below(sealed.len());
    let (opened, out) = open(&sealed[..cut], &mut stir);
    assert_eq!(opened, Err(()), "a stream cut at {cut} still opens");
    assert!(
        plaintext.starts_with(&out),
        "a cut stream gave out other bytes"
    );
}

/// The seed of the receipt key here.
const RECEIPT_SEED: [u8; 32] = [0x24; 32];

/// Erasure receipts (`receipt::verify`).
///
/// - mode 0: the bytes as a receipt's text form, checked against the fixed
///   key: never a panic, and never a receipt (nothing here is signed).
/// - mode 1: the bytes' first line, signed by the fixed key, so the JSON
///   parser behind the signature is reached: a receipt that checks out names
///   the key that signed it and the version this build reads.
pub fn receipt(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let pair = Ed25519KeyPair::from_seed_unchecked(&RECEIPT_SEED).expect("a 32-byte seed");
    let public_key = format!(
        "ed25519:{}",
        URL_SAFE_NO_PAD.encode(pair.public_key().as_ref())
    );
    if mode % 2 == 0 {
        assert!(receipt::verify(text, &public_key).is_err());
        // The input as the public key, too.
        let _ = receipt::verify(text, text);
        return;
    }
    let json = text.split('\n').next().unwrap_or_default();
    let signature = URL_SAFE_NO_PAD.encode(pair.sign(json.as_bytes()).as_ref());
    let signed = format!("{json}\ned25519:{signature}\n");
    if let Ok(receipt) = receipt::verify(&signed, &public_key) {
        assert_eq!(receipt.signer, public_key);
        assert_eq!(receipt.version, receipt::RECEIPT_VERSION);
        // The trailing newline is optional; nothing else may differ.
        assert_eq!(
            receipt::verify(signed.trim_end_matches('\n'), &public_key).as_ref(),
            Ok(&receipt)
        );
        assert!(receipt::verify(&format!("{signed}\n"), &public_key).is_err());
    }
}

/// The audit log's verifier (`audit::verify`): never a panic, and a log that
/// verifies has one record per line, but for a partial record at its end
/// (the remains of a failed write, on a last line of its own); partial
/// records elsewhere share a line with a record.
pub fn audit(data: &[u8]) {
    if let Ok(verified) = audit::verify(data) {
        let lines = data.split(|b| *b == b'\n').count() - usize::from(data.ends_with(b"\n"));
        let lines = if data.is_empty() { 0 } else { lines };
        let torn_ends = verified.partial.iter().filter(|p| p.at_end).count();
        assert!(torn_ends <= 1, "more than one end: {:?}", verified.partial);
        if torn_ends == 1 {
            assert!(!data.ends_with(b"\n"), "a partial end before a newline");
            let last = verified.partial.last().expect("one");
            assert!(
                last.at_end && last.line == lines,
                "{last:?} of {lines} lines"
            );
            assert!(last.bytes > 0, "an empty partial record");
        }
        assert!(
            verified
                .partial
                .iter()
                .all(|p| p.line >= 1 && p.line <= lines)
        );
        assert_eq!(
            verified.records + u64::try_from(torn_ends).expect("fits"),
            u64::try_from(lines).expect("fits"),
            "a verified log's records are not its lines"
        );
    }
}

/// The configuration (`Config::from_toml`, `Config::apply_env`,
/// `Config::validate`): never a panic; an error names a setting.
///
/// - mode 0: the bytes as the TOML file;
/// - mode 1: the bytes as `NAME=value` lines of `KEYWARDEN_*` variables
///   applied over the defaults.
pub fn config(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let config = if mode % 2 == 0 {
        match Config::from_toml(text, "fuzz.toml") {
            Ok(config) => config,
            Err(e) => {
                assert!(e.setting.starts_with("fuzz.toml"), "{}", e.setting);
                return;
            }
        }
    } else {
        let vars: Vec<(&str, &str)> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let mut config = Config::default();
        if let Err(e) = config.apply_env(|name| {
            vars.iter()
                .rev()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }) {
            assert!(e.setting.starts_with("KEYWARDEN_"), "{}", e.setting);
            return;
        }
        config
    };
    match config.validate() {
        Err(e) => assert!(!e.setting.is_empty()),
        // What the server builds from a valid configuration must not
        // overflow: the key cache adds its time to live and grace.
        Ok(()) => {
            let limits = config.cache.limits();
            assert!(
                limits
                    .time_to_live
                    .checked_add(limits.stale_if_error)
                    .is_some()
            );
            let _ = limits.sweep_interval();
        }
    }
}

/// The policy file (`Policy::parse`): never a panic; a policy that parses
/// answers every question without one.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::parse(text, "fuzz") else {
        return;
    };
    for identity in ["token:admin", "unix", "anonymous", "jwt:someone"] {
        for tenants in [None, Some(vec!["acme".to_owned()])] {
            let caller = Caller {
                identity: identity.to_owned(),
                transport: Transport::Tls,
                token_tenants: tenants,
            };
            for permission in Permission::ALL {
                for tenant in [None, Some("acme"), Some("a*")] {
                    let _ = policy.allows(&caller, permission, tenant);
                }
            }
        }
    }
}
