//! What the edge costs a call before its body is read (docs/SECURITY.md
//! 12.2): naming the caller from its headers and checking that the policy
//! gives it the method's permission for some tenant, then the tenant check
//! after the body. A static token means a SHA-256 of the token and a
//! constant-time comparison with every known hash; no credential on the
//! unix socket means neither. The wire scan of a batch's counts is measured
//! beside the decode it precedes.
//!
//! `cargo bench --bench edge`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use keywarden::{
    api::{codec, pb},
    auth::{Guard, Peer, Permission, Policy, StaticTokens, Transport},
};
use prost::Message;
use secrecy::SecretString;

fn edge(c: &mut Criterion) {
    let token = SecretString::from("kwt_0123456789abcdef0123456789abcdef0123456789abc".to_owned());
    let mut tokens = StaticTokens::default();
    for i in 0..9 {
        tokens.add(
            &format!("other-{i}"),
            &SecretString::from(format!("kwt_other-{i}-0000000000000000000000000000000")),
        );
    }
    tokens.add("app", &token);
    let guard = Guard::new(
        tokens,
        StaticTokens::default(),
        None,
        Policy::parse(
            r#"
            [[grant]]
            identity = "unix"
            allow = ["data"]
            tenants = ["*"]
            [[grant]]
            identity = "token:app"
            allow = ["data"]
            tenants = ["acme-*"]
            "#,
            "bench",
        )
        .unwrap(),
    );
    let unix = Peer {
        transport: Transport::Unix,
        addr: None,
        certs: None,
    };
    let tcp = Peer {
        transport: Transport::Loopback,
        addr: Some("127.0.0.1:40000".parse().unwrap()),
        certs: None,
    };
    let bare = http::HeaderMap::new();
    let mut with_token = http::HeaderMap::new();
    {
        use secrecy::ExposeSecret;
        with_token.insert(
            "authorization",
            format!("Bearer {}", token.expose_secret()).parse().unwrap(),
        );
    }

    let mut group = c.benchmark_group("edge");
    group.bench_function("unix socket, no credential", |b| {
        b.iter(|| {
            let caller = guard.authenticate(black_box(&bare), &unix).unwrap();
            guard
                .preauthorize(&caller, Permission::Encrypt, true)
                .unwrap();
            guard
                .authorize(&caller, Permission::Encrypt, Some(black_box("acme-eu")))
                .unwrap();
        })
    });
    group.bench_function("static token of 10", |b| {
        b.iter(|| {
            let caller = guard.authenticate(black_box(&with_token), &tcp).unwrap();
            guard
                .preauthorize(&caller, Permission::Encrypt, true)
                .unwrap();
            guard
                .authorize(&caller, Permission::Encrypt, Some(black_box("acme-eu")))
                .unwrap();
        })
    });
    group.bench_function("anonymous refused", |b| {
        b.iter(|| {
            let caller = guard.authenticate(black_box(&bare), &tcp).unwrap();
            guard
                .preauthorize(&caller, Permission::Encrypt, true)
                .unwrap_err()
        })
    });
    group.finish();

    // The wire scan before decoding, against the decode, for a batch of 100
    // items of 128 bytes with two context entries each.
    codec::raise_max_batch_items(10_000);
    let batch = pb::EncryptBatchRequest {
        tenant_id: "acme-eu".into(),
        items: (0..100)
            .map(|_| pb::EncryptItem {
                subject_id: String::new(),
                context: [("table", "users"), ("column", "email")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                plaintext: vec![0x5a; 128],
                deterministic: false,
                key_version: 0,
            })
            .collect(),
    }
    .encode_to_vec();
    let shape = <pb::EncryptBatchRequest as codec::WireShape>::SHAPE;
    let mut group = c.benchmark_group("batch of 100");
    group.bench_function("wire scan", |b| {
        b.iter(|| codec::check(shape, black_box(&batch)).unwrap())
    });
    group.bench_function("decode", |b| {
        b.iter(|| pb::EncryptBatchRequest::decode(black_box(&batch[..])).unwrap())
    });
    group.finish();
}

criterion_group!(benches, edge);
criterion_main!(benches);
