use super::*;

fn deriver(byte: u8) -> MessageKeyDeriver {
    MessageKeyDeriver::new(&Key256::from_slice(&[byte; 32]).unwrap())
}

/// An envelope key with the build's default provider.
pub(super) fn key(byte: u8) -> EnvelopeKey {
    EnvelopeKey::new(
        Provider::default(),
        &Key256::from_slice(&[byte; 32]).unwrap(),
    )
}

pub(super) fn context(pairs: &[(&str, &str)]) -> Context {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

use crate::secret::Key256;

const V1: KeyRef = KeyRef::Tenant { version: 1 };

#[test]
fn round_trips_for_both_key_kinds_and_all_sizes() {
    let bytes = Key256::from_slice(&[7; 32]).unwrap();
    let ctx = context(&[("table", "users"), ("row", "42")]);
    let subject = KeyRef::Subject {
        id: [9; SUBJECT_KEY_ID_LEN],
        version: 1,
    };
    // Each provider opens what every provider sealed.
    for sealer in Provider::ALL {
        for opener in Provider::ALL {
            let (s, o) = (
                EnvelopeKey::new(sealer, &bytes),
                EnvelopeKey::new(opener, &bytes),
            );
            for key_ref in [V1, subject] {
                for len in [0usize, 1, 16, 1000, 1 << 20] {
                    let plaintext = vec![0x5A; len];
                    let sealed = seal(&s, key_ref, "acme", &ctx, &plaintext).unwrap();
                    let parsed = parse(&sealed).unwrap();
                    assert_eq!(parsed.key_ref, key_ref);
                    assert_eq!(open(&o, &parsed, "acme", &ctx).unwrap(), plaintext);
                }
            }
        }
    }
}

#[test]
fn overhead_is_fixed_and_within_64_bytes_for_tenant_keys() {
    let sealed = seal(&key(1), V1, "t", &Context::new(), b"").unwrap();
    assert_eq!(sealed.len(), TENANT_OVERHEAD);
    assert_eq!(TENANT_OVERHEAD, 51);
    const { assert!(TENANT_OVERHEAD <= 64) };
    let subject = KeyRef::Subject {
        id: [0; 16],
        version: 1,
    };
    let sealed = seal(&key(1), subject, "t", &Context::new(), b"abc").unwrap();
    assert_eq!(sealed.len(), SUBJECT_OVERHEAD + 3);
}

#[test]
fn two_seals_of_one_plaintext_differ() {
    let d = key(3);
    let a = seal(&d, V1, "t", &Context::new(), b"same").unwrap();
    let b = seal(&d, V1, "t", &Context::new(), b"same").unwrap();
    assert_ne!(a, b);
}

#[test]
fn any_flipped_bit_fails_to_parse_or_open() {
    for provider in Provider::ALL {
        let d = EnvelopeKey::new(provider, &Key256::from_slice(&[5; 32]).unwrap());
        let ctx = context(&[("f", "v")]);
        let sealed = seal(&d, V1, "acme", &ctx, b"secret field").unwrap();
        for bit in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let result = parse(&bad).and_then(|p| {
                // A flipped version field names another key; the real key of
                // that version would fail the tag, and so does this one.
                open(&d, &p, "acme", &ctx)
            });
            assert_eq!(result, Err(Undecryptable), "{provider}: bit {bit}");
        }
    }
}

#[test]
fn another_tenant_or_context_fails() {
    let d = key(5);
    let ctx = context(&[("f", "v")]);
    let sealed = seal(&d, V1, "acme", &ctx, b"x").unwrap();
    let parsed = parse(&sealed).unwrap();
    assert_eq!(open(&d, &parsed, "acme2", &ctx), Err(Undecryptable));
    assert_eq!(
        open(&d, &parsed, "acme", &Context::new()),
        Err(Undecryptable)
    );
    assert_eq!(
        open(&d, &parsed, "acme", &context(&[("f", "w")])),
        Err(Undecryptable)
    );
    assert_eq!(
        open(&d, &parsed, "acme", &context(&[("f", "v"), ("g", "")])),
        Err(Undecryptable)
    );
    assert_eq!(open(&key(6), &parsed, "acme", &ctx), Err(Undecryptable));
}

#[test]
fn associated_data_is_injective_across_boundaries() {
    // "ab"+"c" and "a"+"bc" must not encode alike.
    let a = associated_data(b"", "t", &context(&[("ab", "c")])).unwrap();
    let b = associated_data(b"", "t", &context(&[("a", "bc")])).unwrap();
    assert_ne!(a, b);
    let c = associated_data(b"", "tk", &Context::new()).unwrap();
    let d = associated_data(b"", "t", &context(&[("k", "")])).unwrap();
    assert_ne!(c, d);
}

#[test]
fn truncated_and_malformed_inputs_are_undecryptable() {
    let sealed = seal(&key(1), V1, "t", &Context::new(), b"hello").unwrap();
    for len in 0..sealed.len() {
        let result = parse(&sealed[..len]).and_then(|p| open(&key(1), &p, "t", &Context::new()));
        assert_eq!(result, Err(Undecryptable), "prefix of {len} bytes");
    }
    assert_eq!(parse(b"kw1:not binary at all").unwrap_err(), Undecryptable);
}

#[test]
fn derived_keys_depend_on_salt_and_key() {
    let d = deriver(1);
    assert_ne!(*d.derive(&[0; 16]), *d.derive(&[1; 16]));
    assert_ne!(*d.derive(&[0; 16]), *deriver(2).derive(&[0; 16]));
}

#[test]
fn debug_of_deriver_and_parsed_shows_no_secret() {
    let key_bytes = [0xC3u8; 32];
    let bytes = Key256::from_slice(&key_bytes).unwrap();
    let d = MessageKeyDeriver::new(&bytes);
    let k = EnvelopeKey::new(Provider::AwsLc, &bytes);
    let sealed = seal(&k, V1, "t", &Context::new(), b"PLAINTEXT-CANARY").unwrap();
    let printed = format!(
        "{d:?} {k:?} {:?} {:?}",
        parse(&sealed).unwrap(),
        Provider::RustCrypto.aead(&key_bytes)
    );
    assert!(!printed.contains("c3") && !printed.contains("C3") && !printed.contains("195"));
    assert_eq!(
        printed,
        "MessageKeyDeriver([REDACTED]) EnvelopeKey { provider: AwsLc, .. } \
         Parsed { key_ref: Tenant { version: 1 }, mode: Randomized, body_len: 16, .. } \
         AeadKey([REDACTED])"
    );
}
