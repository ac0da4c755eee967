//! EncryptStream and DecryptStream as a caller sees them, through real gRPC:
//! round trips at the segment boundaries and for 100 MiB, every way of
//! rearranging or cutting an envelope's segments ending the stream with
//! INVALID_ARGUMENT after only authentic plaintext, and bad input refused.

mod common;

use std::collections::BTreeMap;

use common::{Options, TestSidecar};
use futures::StreamExt;
use keywarden::{
    api::pb::{self, decrypt_stream_request::Part as DPart, encrypt_stream_request::Part as EPart},
    envelope::{
        Provider,
        stream::{SEGMENT_LEN, SEGMENT_PLAINTEXT_LEN, TENANT_HEADER_LEN},
    },
};
use sha2::{Digest, Sha256};
use tonic::{Code, Status};

type Crypto = pb::crypto_client::CryptoClient<keywarden::client::Authed>;

const P: usize = SEGMENT_PLAINTEXT_LEN;
const UNDECRYPTABLE: &str = "ciphertext could not be decrypted: it is malformed, was altered, or was made for another tenant or context";

fn ctx() -> BTreeMap<String, String> {
    BTreeMap::from([("object".to_owned(), "scan-0042.pdf".to_owned())])
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 131 + (i >> 9)) as u8).collect()
}

async fn sidecar(crypto: Provider) -> (TestSidecar, Crypto) {
    let sidecar = TestSidecar::start_with(Options {
        crypto,
        ..Options::default()
    })
    .await;
    let mut admin = sidecar.admin().await;
    for id in ["acme", "globex"] {
        admin
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let crypto = sidecar.crypto().await;
    (sidecar, crypto)
}

fn start(tenant: &str, subject: &str) -> pb::EncryptStreamRequest {
    pb::EncryptStreamRequest {
        part: Some(EPart::Start(pb::EncryptStreamStart {
            tenant_id: tenant.into(),
            subject_id: subject.into(),
            context: ctx(),
        })),
    }
}

/// What a stream call answered: the chunks' bytes and key versions, and how
/// the stream ended.
struct Answer {
    bytes: Vec<u8>,
    versions: Vec<u32>,
    end: Result<(), Status>,
}

/// A response of either stream call.
trait Chunk {
    fn parts(self) -> (Vec<u8>, u32);
}

impl Chunk for pb::EncryptStreamResponse {
    fn parts(self) -> (Vec<u8>, u32) {
        (self.chunk, self.key_version)
    }
}

impl Chunk for pb::DecryptStreamResponse {
    fn parts(self) -> (Vec<u8>, u32) {
        (self.chunk, self.key_version)
    }
}

/// Collects a stream call's responses until it ends.
async fn collect<R: Chunk>(call: Result<tonic::Response<tonic::Streaming<R>>, Status>) -> Answer {
    let mut answer = Answer {
        bytes: Vec::new(),
        versions: Vec::new(),
        end: Ok(()),
    };
    let mut responses = match call {
        Ok(r) => r.into_inner(),
        Err(status) => {
            answer.end = Err(status);
            return answer;
        }
    };
    while let Some(item) = responses.next().await {
        match item {
            Ok(r) => {
                let (bytes, version) = r.parts();
                answer.bytes.extend_from_slice(&bytes);
                answer.versions.push(version);
            }
            Err(status) => {
                answer.end = Err(status);
                assert!(responses.next().await.is_none(), "nothing after an error");
                break;
            }
        }
    }
    answer
}

/// Runs EncryptStream with `requests` as they are.
async fn encrypt_raw(c: &mut Crypto, requests: Vec<pb::EncryptStreamRequest>) -> Answer {
    collect(c.encrypt_stream(futures::stream::iter(requests)).await).await
}

/// Encrypts `plaintext` for acme, sent in chunks of `chunk` bytes.
async fn encrypt(c: &mut Crypto, subject: &str, plaintext: &[u8], chunk: usize) -> Vec<u8> {
    let mut requests = vec![start("acme", subject)];
    requests.extend(plaintext.chunks(chunk).map(|c| pb::EncryptStreamRequest {
        part: Some(EPart::Chunk(c.to_vec())),
    }));
    let answer = encrypt_raw(c, requests).await;
    answer.end.expect("the stream ends OK");
    answer.bytes
}

/// Runs DecryptStream on `envelope` sent in chunks of `chunk` bytes.
async fn decrypt(c: &mut Crypto, tenant: &str, envelope: &[u8], chunk: usize) -> Answer {
    let mut requests = vec![pb::DecryptStreamRequest {
        part: Some(DPart::Start(pb::DecryptStreamStart {
            tenant_id: tenant.into(),
            context: ctx(),
        })),
    }];
    requests.extend(envelope.chunks(chunk).map(|c| pb::DecryptStreamRequest {
        part: Some(DPart::Chunk(c.to_vec())),
    }));
    decrypt_raw(c, requests).await
}

async fn decrypt_raw(c: &mut Crypto, requests: Vec<pb::DecryptStreamRequest>) -> Answer {
    collect(c.decrypt_stream(futures::stream::iter(requests)).await).await
}

fn assert_fails(answer: &Answer, code: Code, message_start: &str) {
    let status = answer
        .end
        .as_ref()
        .expect_err("the stream should end with an error");
    assert_eq!(status.code(), code, "message: {}", status.message());
    assert!(
        status.message().starts_with(message_start),
        "message {:?} should start with {message_start:?}",
        status.message()
    );
}

async fn round_trips_at_the_segment_boundaries(crypto: Provider) {
    let (_sidecar, mut c) = sidecar(crypto).await;
    for len in [0, 1, P, P + 1, 3 * P - 7] {
        for chunk in [1, 4096, P, 1 << 20] {
            if len > 20_000 && chunk == 1 {
                continue;
            }
            let plaintext = data(len);
            let envelope = encrypt(&mut c, "", &plaintext, chunk).await;
            let segments = len.div_ceil(P).max(1);
            assert_eq!(envelope.len(), TENANT_HEADER_LEN + len + segments * 16);
            for back in [7, SEGMENT_LEN, 3 << 20] {
                let answer = decrypt(&mut c, "acme", &envelope, back).await;
                answer.end.unwrap();
                assert!(
                    answer.bytes == plaintext,
                    "{len} bytes in chunks of {chunk}/{back}"
                );
                assert!(answer.versions.iter().all(|&v| v == 1));
            }
        }
    }
    // A subject's stream, under the subject's key.
    let envelope = encrypt(&mut c, "user-1", b"about one person", 5).await;
    let answer = decrypt(&mut c, "acme", &envelope, 100).await;
    assert_eq!(answer.bytes, b"about one person");
}

/// 100 MiB each way; neither side holds the object in one message.
async fn round_trips_100_mib(crypto: Provider) {
    let (_sidecar, mut c) = sidecar(crypto).await;
    let plaintext = data(100 << 20);
    let envelope = encrypt(&mut c, "", &plaintext, 1 << 20).await;
    assert_eq!(
        envelope.len(),
        TENANT_HEADER_LEN + plaintext.len() + plaintext.len().div_ceil(P) * 16
    );
    let answer = decrypt(&mut c, "acme", &envelope, 3 << 20).await;
    answer.end.unwrap();
    assert_eq!(
        Sha256::digest(&answer.bytes),
        Sha256::digest(&plaintext),
        "the plaintext came back"
    );
    // Responses are at most 1 MiB each: the sidecar works a slice at a time.
    assert!(answer.versions.len() >= 100);
}

/// Splits an envelope into its header and its segments.
fn segments(envelope: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let (header, body) = envelope.split_at(TENANT_HEADER_LEN);
    (
        header.to_vec(),
        body.chunks(SEGMENT_LEN).map(<[u8]>::to_vec).collect(),
    )
}

async fn rearranged_or_cut_envelopes_end_with_invalid_argument_after_authentic_plaintext(
    crypto: Provider,
) {
    let (_sidecar, mut c) = sidecar(crypto).await;
    let plaintext = data(3 * P + 1000);
    let envelope = encrypt(&mut c, "", &plaintext, 1 << 20).await;
    let (header, s) = segments(&envelope);
    assert_eq!(s.len(), 4);
    let other = encrypt(&mut c, "", &data(3 * P + 1000), 1 << 20).await;
    let (_, o) = segments(&other);
    let cases: Vec<(&str, Vec<&Vec<u8>>)> = vec![
        ("a segment dropped", vec![&s[0], &s[2], &s[3]]),
        ("two segments swapped", vec![&s[0], &s[2], &s[1], &s[3]]),
        (
            "a segment duplicated",
            vec![&s[0], &s[1], &s[1], &s[2], &s[3]],
        ),
        (
            "a segment appended",
            vec![&s[0], &s[1], &s[2], &s[3], &s[3]],
        ),
        ("cut before the last segment", vec![&s[0], &s[1], &s[2]]),
        (
            "a segment of another envelope",
            vec![&s[0], &o[1], &s[2], &s[3]],
        ),
        ("the header alone", vec![]),
    ];
    for (name, parts) in cases {
        let mut bad = header.clone();
        parts.iter().for_each(|p| bad.extend_from_slice(p));
        for chunk in [1000, SEGMENT_LEN, 4 << 20] {
            let answer = decrypt(&mut c, "acme", &bad, chunk).await;
            assert_fails(&answer, Code::InvalidArgument, UNDECRYPTABLE);
            assert!(
                plaintext.starts_with(&answer.bytes),
                "{name}: only authentic plaintext was released"
            );
            assert!(answer.bytes.len() < plaintext.len(), "{name}");
        }
    }
    // Cut inside a segment, and bytes appended after the last one.
    for cut in [envelope.len() - 1, TENANT_HEADER_LEN + SEGMENT_LEN + 5, 10] {
        let answer = decrypt(&mut c, "acme", &envelope[..cut], 4096).await;
        assert_fails(&answer, Code::InvalidArgument, UNDECRYPTABLE);
        assert!(plaintext.starts_with(&answer.bytes));
    }
    let appended = [&envelope[..], b"!"].concat();
    assert_fails(
        &decrypt(&mut c, "acme", &appended, 4096).await,
        Code::InvalidArgument,
        UNDECRYPTABLE,
    );
    // Another tenant or another context: nothing is released.
    let answer = decrypt(&mut c, "globex", &envelope, 4096).await;
    assert_fails(&answer, Code::InvalidArgument, UNDECRYPTABLE);
    assert!(answer.bytes.is_empty());
    // A one-shot envelope is not a stream, and a stream is not a one-shot.
    let one_shot = c
        .encrypt(pb::EncryptRequest {
            tenant_id: "acme".into(),
            context: ctx(),
            plaintext: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    assert_fails(
        &decrypt(&mut c, "acme", &one_shot, 4096).await,
        Code::InvalidArgument,
        UNDECRYPTABLE,
    );
    let status = c
        .decrypt(pb::DecryptRequest {
            tenant_id: "acme".into(),
            context: ctx(),
            ciphertext: envelope[..TENANT_HEADER_LEN + 100].to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, UNDECRYPTABLE)
    );
}

async fn bad_requests_are_refused_clearly(crypto: Provider) {
    let (sidecar, mut c) = sidecar(crypto).await;
    let chunk = |bytes: &[u8]| pb::EncryptStreamRequest {
        part: Some(EPart::Chunk(bytes.to_vec())),
    };
    let no_start = encrypt_raw(&mut c, vec![chunk(b"data")]).await;
    assert_fails(
        &no_start,
        Code::InvalidArgument,
        "part: the first request of a stream must be a start",
    );
    let empty = encrypt_raw(&mut c, vec![]).await;
    assert_fails(&empty, Code::InvalidArgument, "part: the first request");
    let twice = encrypt_raw(
        &mut c,
        vec![start("acme", ""), chunk(b"a"), start("acme", "")],
    )
    .await;
    assert_fails(
        &twice,
        Code::InvalidArgument,
        "part: every request of a stream after the first must be a chunk",
    );
    assert_fails(
        &encrypt_raw(&mut c, vec![start("nobody", ""), chunk(b"a")]).await,
        Code::NotFound,
        "tenant nobody",
    );
    assert_fails(
        &encrypt_raw(&mut c, vec![start("no spaces", "")]).await,
        Code::InvalidArgument,
        "tenant_id",
    );
    assert_fails(
        &encrypt_raw(&mut c, vec![start("acme", &"s".repeat(300))]).await,
        Code::InvalidArgument,
        "subject_id",
    );
    let decrypt_without_start = decrypt_raw(
        &mut c,
        vec![pb::DecryptStreamRequest {
            part: Some(DPart::Chunk(vec![1, 2, 3])),
        }],
    )
    .await;
    assert_fails(
        &decrypt_without_start,
        Code::InvalidArgument,
        "part: the first request of a stream must be a start",
    );

    // Without credentials: refused before anything is read or made.
    let mut anonymous = keywarden::client::crypto(
        sidecar.channel().await,
        keywarden::client::Bearer::default(),
    );
    let refused = encrypt_raw(&mut anonymous, vec![start("acme", ""), chunk(b"a")]).await;
    assert_eq!(refused.end.unwrap_err().code(), Code::PermissionDenied);
    assert!(refused.bytes.is_empty());

    // A shredded tenant: FAILED_PRECONDITION both ways.
    let envelope = encrypt(&mut c, "", b"kept", 10).await;
    let mut admin = sidecar.admin().await;
    admin
        .shred_tenant(pb::ShredTenantRequest {
            tenant_id: "acme".into(),
            confirm: "acme".into(),
        })
        .await
        .unwrap();
    assert_fails(
        &encrypt_raw(&mut c, vec![start("acme", ""), chunk(b"a")]).await,
        Code::FailedPrecondition,
        "tenant acme was shredded",
    );
    assert_fails(
        &decrypt(&mut c, "acme", &envelope, 10).await,
        Code::FailedPrecondition,
        "tenant acme was shredded",
    );
}

async fn rotation_keeps_old_streams_readable_and_reports_versions(crypto: Provider) {
    let (sidecar, mut c) = sidecar(crypto).await;
    let old = encrypt(&mut c, "", &data(P + 10), 4096).await;
    sidecar
        .admin()
        .await
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap();
    let mut requests = vec![start("acme", "")];
    requests.push(pb::EncryptStreamRequest {
        part: Some(EPart::Chunk(data(10))),
    });
    let new = encrypt_raw(&mut c, requests).await;
    new.end.unwrap();
    assert!(new.versions.iter().all(|&v| v == 2));
    let answer = decrypt(&mut c, "acme", &old, 5000).await;
    answer.end.unwrap();
    assert_eq!(answer.bytes, data(P + 10));
    assert!(answer.versions.iter().all(|&v| v == 1));
}

/// A stream is one item against the tenant's rate, and its whole object
/// counts against the policy's plaintext limit; the per-item limit (here
/// the default 4 MiB) does not apply.
async fn tenant_policy_limits_apply_to_the_whole_stream(crypto: Provider) {
    let (sidecar, mut c) = sidecar(crypto).await;
    sidecar
        .admin()
        .await
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "small".into(),
            policy: Some(pb::TenantPolicy {
                max_plaintext_bytes: (3 * P) as u64,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let stream = |len: usize| {
        let mut requests = vec![start("small", "")];
        requests.extend(data(len).chunks(1000).map(|c| pb::EncryptStreamRequest {
            part: Some(EPart::Chunk(c.to_vec())),
        }));
        requests
    };
    encrypt_raw(&mut c, stream(3 * P)).await.end.unwrap();
    let over = encrypt_raw(&mut c, stream(3 * P + 1)).await;
    assert_fails(
        &over,
        Code::ResourceExhausted,
        "the stream's plaintext is over 196560 bytes, tenant small's policy limit",
    );
    // 5 MiB to a tenant without a limit: past the per-item 4 MiB.
    let big = data(5 << 20);
    let envelope = encrypt(&mut c, "", &big, 1 << 20).await;
    let answer = decrypt(&mut c, "acme", &envelope, 1 << 20).await;
    answer.end.unwrap();
    assert!(answer.bytes == big);
}

/// Runs each test once per crypto provider.
macro_rules! for_each_crypto {
    ($($name:ident),* $(,)?) => {
        mod rustcrypto {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Provider::RustCrypto).await
            })*
        }
        mod aws_lc {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Provider::AwsLc).await
            })*
        }
    };
}

for_each_crypto!(
    round_trips_at_the_segment_boundaries,
    round_trips_100_mib,
    rearranged_or_cut_envelopes_end_with_invalid_argument_after_authentic_plaintext,
    bad_requests_are_refused_clearly,
    rotation_keeps_old_streams_readable_and_reports_versions,
    tenant_policy_limits_apply_to_the_whole_stream,
);
