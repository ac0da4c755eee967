use aes_siv::{
    KeyInit,
    aead::generic_array::GenericArray,
    siv::{Aes128Siv, Aes256Siv},
};

use super::*;
use crate::envelope::{
    self, FORMAT_V1, Mode, parse,
    tests::{context, key},
};

const V1: KeyRef = KeyRef::Tenant { version: 1 };
const SUBJECT: KeyRef = KeyRef::Subject {
    id: [9; 16],
    version: 1,
};

#[test]
fn the_crate_computes_rfc_5297_and_aes_256_siv() {
    // RFC 5297 appendix A.1, deterministic authenticated encryption (the
    // RFC's AES-SIV with 2 x 128-bit keys): the S2V and CTR construction.
    let mut siv = Aes128Siv::new(GenericArray::from_slice(
        &hex::decode("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").unwrap(),
    ));
    let ad = hex::decode("101112131415161718191a1b1c1d1e1f2021222324252627").unwrap();
    let plaintext = hex::decode("112233445566778899aabbccddee").unwrap();
    assert_eq!(
        hex::encode(siv.encrypt([&ad], &plaintext).unwrap()),
        "85632d07c6e8f37f950acd320a2ecc9340c02b9690c4dc04daef7f6afe5c"
    );
    // The same input with the 2 x 256-bit key this suite uses (the
    // AES-CMAC-SIV-512 vector of the miscreant and RustCrypto test suites).
    let mut siv = Aes256Siv::new(GenericArray::from_slice(
        &hex::decode(
            "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f06f6e6d6c6b6a69686766656463626160\
             f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff000102030405060708090a0b0c0d0e0f",
        )
        .unwrap(),
    ));
    assert_eq!(
        hex::encode(siv.encrypt([&ad], &plaintext).unwrap()),
        "f125274c598065cfc26b0e71575029088b035217e380cac8919ee800c126"
    );
}

#[test]
fn equal_inputs_give_equal_envelopes_and_they_open() {
    let k = key(1);
    let ctx = context(&[("column", "email")]);
    for key_ref in [V1, SUBJECT] {
        for len in [0usize, 1, 15, 16, 17, 1000] {
            let plaintext = vec![0x5A; len];
            let a = seal_deterministic(&k, key_ref, "acme", &ctx, &plaintext).unwrap();
            let b = seal_deterministic(&k, key_ref, "acme", &ctx, &plaintext).unwrap();
            assert_eq!(a, b);
            let overhead = match key_ref {
                KeyRef::Tenant { .. } => DETERMINISTIC_TENANT_OVERHEAD,
                KeyRef::Subject { .. } => DETERMINISTIC_SUBJECT_OVERHEAD,
            };
            assert_eq!(a.len(), overhead + len);
            assert_eq!(&a[..2], &[FORMAT_V1, SUITE_DETERMINISTIC]);
            let parsed = parse(&a).unwrap();
            assert_eq!(parsed.key_ref, key_ref);
            assert_eq!(parsed.mode, Mode::Deterministic);
            assert_eq!(
                envelope::open(&k, &parsed, "acme", &ctx).unwrap(),
                plaintext
            );
        }
    }
    assert_eq!(DETERMINISTIC_TENANT_OVERHEAD, 23);
    assert_eq!(DETERMINISTIC_SUBJECT_OVERHEAD, 39);
}

#[test]
fn envelopes_differ_across_plaintexts_tenants_contexts_keys_and_references() {
    let ctx = context(&[("column", "email")]);
    let base = seal_deterministic(&key(1), V1, "acme", &ctx, b"alice").unwrap();
    let others = [
        seal_deterministic(&key(1), V1, "acme", &ctx, b"alicf").unwrap(),
        seal_deterministic(&key(1), V1, "acme2", &ctx, b"alice").unwrap(),
        seal_deterministic(
            &key(1),
            V1,
            "acme",
            &context(&[("column", "name")]),
            b"alice",
        )
        .unwrap(),
        seal_deterministic(&key(2), V1, "acme", &ctx, b"alice").unwrap(),
        seal_deterministic(
            &key(1),
            KeyRef::Tenant { version: 2 },
            "acme",
            &ctx,
            b"alice",
        )
        .unwrap(),
    ];
    for other in others {
        // Not only the header: the SIV and the ciphertext differ too.
        assert_ne!(base[7..], other[7..]);
    }
}

#[test]
fn the_siv_key_is_not_a_message_or_stream_key() {
    // A randomized envelope and a deterministic one under one key never
    // share a derived key: labels differ.
    let k = key(3);
    let siv_key = k.kdf.derive_512(SIV_LABEL, &SIV_KEY_CONTEXT);
    let dek = k.kdf.derive(&SIV_KEY_CONTEXT);
    assert_ne!(&siv_key[..32], &dek[..]);
    assert_ne!(&siv_key[32..], &dek[..]);
}

#[test]
fn any_flipped_bit_truncation_or_extension_fails() {
    let k = key(5);
    let ctx = context(&[("f", "v")]);
    for key_ref in [V1, SUBJECT] {
        let sealed = seal_deterministic(&k, key_ref, "acme", &ctx, b"secret field").unwrap();
        for bit in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let result = parse(&bad).and_then(|p| envelope::open(&k, &p, "acme", &ctx));
            assert_eq!(result, Err(Undecryptable), "bit {bit}");
        }
        for len in 0..sealed.len() {
            let result = parse(&sealed[..len]).and_then(|p| envelope::open(&k, &p, "acme", &ctx));
            assert_eq!(result, Err(Undecryptable), "prefix of {len} bytes");
        }
        let mut longer = sealed.clone();
        longer.push(0);
        let result = parse(&longer).and_then(|p| envelope::open(&k, &p, "acme", &ctx));
        assert_eq!(result, Err(Undecryptable));
    }
}

#[test]
fn another_tenant_context_or_key_fails() {
    let k = key(5);
    let ctx = context(&[("f", "v")]);
    let sealed = seal_deterministic(&k, V1, "acme", &ctx, b"x").unwrap();
    let parsed = parse(&sealed).unwrap();
    let open =
        |key: &EnvelopeKey, tenant: &str, ctx: &Context| envelope::open(key, &parsed, tenant, ctx);
    assert_eq!(open(&k, "acme2", &ctx), Err(Undecryptable));
    assert_eq!(open(&k, "acme", &Context::new()), Err(Undecryptable));
    assert_eq!(
        open(&k, "acme", &context(&[("f", "w")])),
        Err(Undecryptable)
    );
    assert_eq!(open(&key(6), "acme", &ctx), Err(Undecryptable));
}

#[test]
fn a_suite_byte_rewritten_between_0x01_and_0x04_never_opens() {
    let k = key(7);
    let ctx = Context::new();
    // A randomized envelope read as deterministic: its salt is taken for the
    // SIV, the rest for ciphertext, under another key and header.
    let randomized = envelope::seal(&k, V1, "acme", &ctx, b"0123456789abcdef").unwrap();
    let mut forged = randomized.clone();
    forged[1] = SUITE_DETERMINISTIC;
    let result = parse(&forged).and_then(|p| envelope::open(&k, &p, "acme", &ctx));
    assert_eq!(result, Err(Undecryptable));
    // And the converse, with a plaintext long enough to parse as 0x01.
    let deterministic = seal_deterministic(&k, V1, "acme", &ctx, &[0x41; 64]).unwrap();
    let mut forged = deterministic.clone();
    forged[1] = envelope::SUITE_AES256GCM_CMAC_KDF;
    let result = parse(&forged).and_then(|p| envelope::open(&k, &p, "acme", &ctx));
    assert_eq!(result, Err(Undecryptable));
}

#[test]
fn debug_of_a_parsed_deterministic_envelope_shows_no_plaintext() {
    let sealed = seal_deterministic(&key(1), V1, "t", &Context::new(), b"CANARY").unwrap();
    assert_eq!(
        format!("{:?}", parse(&sealed).unwrap()),
        "Parsed { key_ref: Tenant { version: 1 }, mode: Deterministic, body_len: 6, .. }"
    );
}
