//! Deterministic encryption through real gRPC (`deterministic` on Encrypt
//! and on EncryptBatch items; docs/FORMAT.md, "Deterministic envelopes"):
//! a sidecar on loopback with the SQLite keystore and the local root key.

mod common;

use std::collections::BTreeMap;

use common::{Options, TestSidecar};
use keywarden::{
    api::pb::{self, decrypt_stream_request::Part as DPart},
    config::RequestLimits,
    envelope::text,
};
use tonic::{Code, Status};

type Crypto = pb::crypto_client::CryptoClient<keywarden::client::Authed>;
type Admin = pb::admin_client::AdminClient<keywarden::client::Authed>;

const UNDECRYPTABLE: &str = "ciphertext could not be decrypted: it is malformed, was altered, or was made for another tenant or context";
const RESERVED: &str = "context: keys beginning with \"keywarden.\" are reserved";

/// Suite byte of a deterministic envelope, and of an ordinary one.
const DETERMINISTIC: u8 = 0x04;
const RANDOMIZED: u8 = 0x01;
/// Overhead of a deterministic envelope: header and the 16-byte SIV.
const TENANT_OVERHEAD: usize = 1 + 1 + 1 + 4 + 16;
const SUBJECT_OVERHEAD: usize = 1 + 1 + 1 + 16 + 4 + 16;

fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn create(admin: &mut Admin, id: &str) {
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn rotate(admin: &mut Admin, id: &str) -> u32 {
    admin
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .primary_version
}

async fn encrypt_as(
    c: &mut Crypto,
    tenant: &str,
    subject: &str,
    context: &BTreeMap<String, String>,
    plaintext: &[u8],
    deterministic: bool,
) -> Result<pb::EncryptResponse, Status> {
    encrypt_under(c, tenant, subject, context, plaintext, deterministic, 0).await
}

/// Encrypts with every field of EncryptRequest chosen.
async fn encrypt_under(
    c: &mut Crypto,
    tenant: &str,
    subject: &str,
    context: &BTreeMap<String, String>,
    plaintext: &[u8],
    deterministic: bool,
    key_version: u32,
) -> Result<pb::EncryptResponse, Status> {
    c.encrypt(pb::EncryptRequest {
        tenant_id: tenant.into(),
        subject_id: subject.into(),
        context: context.clone(),
        plaintext: plaintext.to_vec(),
        deterministic,
        key_version,
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Encrypts deterministically.
async fn seal(
    c: &mut Crypto,
    tenant: &str,
    subject: &str,
    context: &BTreeMap<String, String>,
    plaintext: &[u8],
) -> pb::EncryptResponse {
    encrypt_as(c, tenant, subject, context, plaintext, true)
        .await
        .unwrap()
}

async fn decrypt(
    c: &mut Crypto,
    tenant: &str,
    context: &BTreeMap<String, String>,
    ciphertext: &[u8],
) -> Result<pb::DecryptResponse, Status> {
    c.decrypt(pb::DecryptRequest {
        tenant_id: tenant.into(),
        context: context.clone(),
        ciphertext: ciphertext.to_vec(),
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn rewrap(
    c: &mut Crypto,
    tenant: &str,
    context: &BTreeMap<String, String>,
    ciphertext: &[u8],
) -> Result<pb::RewrapResponse, Status> {
    c.rewrap(pb::RewrapRequest {
        tenant_id: tenant.into(),
        context: context.clone(),
        ciphertext: ciphertext.to_vec(),
    })
    .await
    .map(tonic::Response::into_inner)
}

fn assert_status<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, message_start: &str) {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "message: {}", status.message());
    assert!(
        status.message().starts_with(message_start),
        "message {:?} should start with {message_start:?}",
        status.message()
    );
}

fn assert_undecryptable<T: std::fmt::Debug>(result: Result<T, Status>) {
    let status = result.expect_err("decryption should fail");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), UNDECRYPTABLE);
}

async fn start() -> (TestSidecar, Admin, Crypto) {
    start_with(Options::default()).await
}

async fn start_with(options: Options) -> (TestSidecar, Admin, Crypto) {
    let sidecar = TestSidecar::start_with(options).await;
    let (admin, crypto) = (sidecar.admin().await, sidecar.crypto().await);
    (sidecar, admin, crypto)
}

#[tokio::test]
async fn equal_inputs_give_equal_ciphertexts_that_decrypt_like_any_other() {
    let (_sidecar, mut admin, mut c) = start().await;
    create(&mut admin, "acme").await;
    let context = ctx(&[("table", "users"), ("column", "email")]);
    for subject in ["", "user-17"] {
        for len in [0usize, 1, 15, 16, 17, 1000] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let first = seal(&mut c, "acme", subject, &context, &plaintext).await;
            let second = seal(&mut c, "acme", subject, &context, &plaintext).await;
            assert_eq!(first.ciphertext, second.ciphertext, "{subject:?}, {len} B");
            assert_eq!(first.key_version, 1);
            let overhead = if subject.is_empty() {
                TENANT_OVERHEAD
            } else {
                SUBJECT_OVERHEAD
            };
            assert_eq!(first.ciphertext.len(), len + overhead);
            assert_eq!(first.ciphertext[..2], [0x01, DETERMINISTIC]);
            let opened = decrypt(&mut c, "acme", &context, &first.ciphertext)
                .await
                .unwrap();
            assert_eq!(opened.plaintext, plaintext);
            assert_eq!(opened.key_version, 1);
            // Without the flag, Encrypt stays randomized.
            let random = encrypt_as(&mut c, "acme", subject, &context, &plaintext, false)
                .await
                .unwrap();
            assert_eq!(random.ciphertext[1], RANDOMIZED);
            assert_ne!(random.ciphertext, first.ciphertext);
        }
    }
    // The text form carries a deterministic envelope as any other.
    let sealed = seal(&mut c, "acme", "", &context, b"ada@example.com").await;
    let text = text::encode(&sealed.ciphertext);
    assert!(text.starts_with("kw1:"));
    let back = text::decode(&text).unwrap();
    assert_eq!(
        decrypt(&mut c, "acme", &context, &back)
            .await
            .unwrap()
            .plaintext,
        b"ada@example.com"
    );
}

#[tokio::test]
async fn ciphertexts_differ_across_tenants_contexts_subjects_and_plaintexts() {
    let (_sidecar, mut admin, mut c) = start().await;
    create(&mut admin, "tenant-a").await;
    create(&mut admin, "tenant-b").await;
    let email = ctx(&[("column", "email")]);
    let base = seal(&mut c, "tenant-a", "", &email, b"ada@example.com").await;
    let others = [
        seal(&mut c, "tenant-b", "", &email, b"ada@example.com").await,
        seal(
            &mut c,
            "tenant-a",
            "",
            &ctx(&[("column", "name")]),
            b"ada@example.com",
        )
        .await,
        seal(&mut c, "tenant-a", "", &ctx(&[]), b"ada@example.com").await,
        seal(&mut c, "tenant-a", "ada", &email, b"ada@example.com").await,
        seal(&mut c, "tenant-a", "bob", &email, b"ada@example.com").await,
        seal(&mut c, "tenant-a", "", &email, b"ada@example.org").await,
    ];
    let mut all = vec![base.ciphertext.clone()];
    for other in &others {
        // The SIV and ciphertext differ, not only a header.
        assert_ne!(
            base.ciphertext[base.ciphertext.len() - 31..],
            other.ciphertext[other.ciphertext.len() - 31..]
        );
        all.push(other.ciphertext.clone());
    }
    all.sort();
    all.dedup();
    assert_eq!(all.len(), others.len() + 1, "every ciphertext is distinct");
    // Each opens only for its own tenant and context.
    assert_undecryptable(decrypt(&mut c, "tenant-b", &email, &base.ciphertext).await);
    assert_undecryptable(decrypt(&mut c, "tenant-a", &ctx(&[]), &base.ciphertext).await);
    // The subject's ciphertext is stable for that subject.
    let again = seal(&mut c, "tenant-a", "ada", &email, b"ada@example.com").await;
    assert_eq!(again.ciphertext, others[3].ciphertext);
}

#[tokio::test]
async fn any_changed_bit_truncation_extension_or_suite_rewrite_fails_with_the_one_message() {
    let (_sidecar, mut admin, mut c) = start().await;
    create(&mut admin, "acme").await;
    let context = ctx(&[("row", "42")]);
    for subject in ["", "alice"] {
        let sealed = seal(&mut c, "acme", subject, &context, b"card 4111")
            .await
            .ciphertext;
        for bit in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let result = decrypt(&mut c, "acme", &context, &bad).await;
            // A flipped subject key id names a subject with no key: that
            // lookup, not the ciphertext, answers (FORMAT.md, "Errors: no
            // oracle"); it is never a plaintext.
            if !subject.is_empty() && (3..19).contains(&(bit / 8)) {
                assert!(result.is_err(), "bit {bit} opened");
                continue;
            }
            // A flipped tenant key version names a version that does not
            // exist: refused, never opened.
            if subject.is_empty() && (3..7).contains(&(bit / 8)) {
                assert!(result.is_err(), "bit {bit} opened");
                continue;
            }
            assert_undecryptable(result);
        }
        for len in 0..sealed.len() {
            assert_undecryptable(decrypt(&mut c, "acme", &context, &sealed[..len]).await);
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert_undecryptable(decrypt(&mut c, "acme", &context, &longer).await);
        // Read as an ordinary envelope it is refused too.
        let mut as_randomized = sealed.clone();
        as_randomized[1] = RANDOMIZED;
        assert_undecryptable(decrypt(&mut c, "acme", &context, &as_randomized).await);
        // Rewrap refuses what Decrypt refuses, with the same message.
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_undecryptable(rewrap(&mut c, "acme", &context, &bad).await);
        assert_undecryptable(rewrap(&mut c, "acme", &ctx(&[]), &sealed).await);
        // Nothing above changed state: the original still opens.
        assert_eq!(
            decrypt(&mut c, "acme", &context, &sealed)
                .await
                .unwrap()
                .plaintext,
            b"card 4111"
        );
    }
    // An ordinary envelope read as deterministic is refused.
    let random = encrypt_as(&mut c, "acme", "", &context, b"0123456789", false)
        .await
        .unwrap()
        .ciphertext;
    let mut as_deterministic = random;
    as_deterministic[1] = DETERMINISTIC;
    assert_undecryptable(decrypt(&mut c, "acme", &context, &as_deterministic).await);
}

#[tokio::test]
async fn rotation_changes_the_ciphertext_and_rewrapping_every_row_restores_equality() {
    let (_sidecar, mut admin, mut c) = start().await;
    create(&mut admin, "acme").await;
    let context = ctx(&[("column", "email")]);
    let v1 = seal(&mut c, "acme", "", &context, b"ada@example.com").await;
    let v1_subject = seal(&mut c, "acme", "ada", &context, b"ada@example.com").await;
    let random_v1 = encrypt_as(&mut c, "acme", "", &context, b"ada@example.com", false)
        .await
        .unwrap();
    assert_eq!(rotate(&mut admin, "acme").await, 2);

    // New rows seal under version 2: the same value no longer matches.
    let v2 = seal(&mut c, "acme", "", &context, b"ada@example.com").await;
    assert_eq!(v2.key_version, 2);
    assert_ne!(v2.ciphertext, v1.ciphertext);
    assert_eq!(v2.ciphertext[3..7], 2u32.to_be_bytes());
    // The old row still decrypts.
    let opened = decrypt(&mut c, "acme", &context, &v1.ciphertext)
        .await
        .unwrap();
    assert_eq!(
        (opened.plaintext.as_slice(), opened.key_version),
        (&b"ada@example.com"[..], 1)
    );

    // Rewrapping the old row makes it the new row, byte for byte.
    let rewrapped = rewrap(&mut c, "acme", &context, &v1.ciphertext)
        .await
        .unwrap();
    assert_eq!(
        (rewrapped.key_version, rewrapped.previous_key_version),
        (2, 1)
    );
    assert_eq!(rewrapped.ciphertext, v2.ciphertext);
    // Rewrapping again changes nothing.
    let again = rewrap(&mut c, "acme", &context, &rewrapped.ciphertext)
        .await
        .unwrap();
    assert_eq!(again.ciphertext, v2.ciphertext);

    // A subject-key row stays under its subject key, deterministic: the
    // same bytes, and still equal to a fresh seal for that subject.
    let subject = rewrap(&mut c, "acme", &context, &v1_subject.ciphertext)
        .await
        .unwrap();
    assert_eq!(subject.ciphertext, v1_subject.ciphertext);
    assert_eq!(
        seal(&mut c, "acme", "ada", &context, b"ada@example.com")
            .await
            .ciphertext,
        v1_subject.ciphertext
    );

    // An ordinary row stays ordinary: randomized, under version 2.
    let random = rewrap(&mut c, "acme", &context, &random_v1.ciphertext)
        .await
        .unwrap();
    assert_eq!(random.ciphertext[1], RANDOMIZED);
    assert_eq!(random.key_version, 2);
    assert_ne!(random.ciphertext, v2.ciphertext);
}

#[tokio::test]
async fn batch_items_choose_deterministic_each_and_decrypt_batch_opens_them() {
    let (_sidecar, mut admin, mut c) = start().await;
    create(&mut admin, "acme").await;
    let item = |value: &str, subject: &str, deterministic: bool| pb::EncryptItem {
        subject_id: subject.into(),
        context: ctx(&[("column", "email")]),
        plaintext: value.as_bytes().to_vec(),
        deterministic,
        key_version: 0,
    };
    let items = vec![
        item("ada@example.com", "", true),
        item("ada@example.com", "", true),
        item("ada@example.com", "", false),
        item("bob@example.com", "", true),
        item("ada@example.com", "ada", true),
        item("ada@example.com", "ada", true),
    ];
    let results = c
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: items.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let sealed: Vec<Vec<u8>> = results
        .into_iter()
        .map(|r| match r.result {
            Some(pb::encrypt_result::Result::Ok(ok)) => ok.ciphertext,
            other => panic!("an item failed: {other:?}"),
        })
        .collect();
    assert_eq!(sealed[0], sealed[1]);
    assert_eq!(sealed[2][1], RANDOMIZED);
    assert_ne!(sealed[0], sealed[2]);
    assert_ne!(sealed[0], sealed[3]);
    assert_eq!(sealed[4], sealed[5]);
    assert_ne!(sealed[0], sealed[4]);
    // The unary call gives the same bytes as the batch.
    assert_eq!(
        seal(
            &mut c,
            "acme",
            "",
            &ctx(&[("column", "email")]),
            b"ada@example.com"
        )
        .await
        .ciphertext,
        sealed[0]
    );
    let opened = c
        .decrypt_batch(pb::DecryptBatchRequest {
            tenant_id: "acme".into(),
            items: sealed
                .iter()
                .map(|ciphertext| pb::DecryptItem {
                    context: ctx(&[("column", "email")]),
                    ciphertext: ciphertext.clone(),
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    for (result, item) in opened.into_iter().zip(&items) {
        match result.result {
            Some(pb::decrypt_result::Result::Ok(ok)) => assert_eq!(ok.plaintext, item.plaintext),
            other => panic!("an item did not open: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_shredded_subject_or_tenant_leaves_its_deterministic_ciphertexts_undecryptable() {
    let (_sidecar, mut admin, mut c) = start().await;
    create(&mut admin, "clinic").await;
    create(&mut admin, "gone").await;
    let context = ctx(&[("column", "ssn")]);
    let alice = seal(&mut c, "clinic", "alice", &context, b"078-05-1120").await;
    let bob = seal(&mut c, "clinic", "bob", &context, b"078-05-1120").await;
    let tenant_row = seal(&mut c, "gone", "", &context, b"078-05-1120").await;
    admin
        .shred_subject(pb::ShredSubjectRequest {
            tenant_id: "clinic".into(),
            subject_id: "alice".into(),
        })
        .await
        .unwrap();
    let erased = "the data subject's key in tenant clinic was shredded at ";
    assert_status(
        decrypt(&mut c, "clinic", &context, &alice.ciphertext).await,
        Code::FailedPrecondition,
        erased,
    );
    assert_status(
        rewrap(&mut c, "clinic", &context, &alice.ciphertext).await,
        Code::FailedPrecondition,
        erased,
    );
    assert_status(
        encrypt_as(&mut c, "clinic", "alice", &context, b"078-05-1120", true).await,
        Code::FailedPrecondition,
        erased,
    );
    // Bob is untouched.
    assert_eq!(
        decrypt(&mut c, "clinic", &context, &bob.ciphertext)
            .await
            .unwrap()
            .plaintext,
        b"078-05-1120"
    );

    admin
        .shred_tenant(pb::ShredTenantRequest {
            tenant_id: "gone".into(),
            confirm: "gone".into(),
        })
        .await
        .unwrap();
    let shredded = "tenant gone was shredded at ";
    assert_status(
        decrypt(&mut c, "gone", &context, &tenant_row.ciphertext).await,
        Code::FailedPrecondition,
        shredded,
    );
    assert_status(
        encrypt_as(&mut c, "gone", "", &context, b"078-05-1120", true).await,
        Code::FailedPrecondition,
        shredded,
    );
}

#[tokio::test]
async fn decrypt_stream_refuses_a_deterministic_envelope() {
    let (_sidecar, mut admin, mut c) = start().await;
    create(&mut admin, "acme").await;
    let context = ctx(&[("object", "x")]);
    let sealed = seal(&mut c, "acme", "", &context, &[7; 100]).await;
    let requests = vec![
        pb::DecryptStreamRequest {
            part: Some(DPart::Start(pb::DecryptStreamStart {
                tenant_id: "acme".into(),
                context,
            })),
        },
        pb::DecryptStreamRequest {
            part: Some(DPart::Chunk(sealed.ciphertext)),
        },
    ];
    let answer = match c.decrypt_stream(tokio_stream::iter(requests)).await {
        Err(status) => Err(status),
        Ok(response) => {
            let mut stream = response.into_inner();
            let mut plaintext = Vec::new();
            loop {
                match stream.message().await {
                    Ok(Some(m)) => plaintext.extend(m.chunk),
                    Ok(None) => break Ok(plaintext),
                    Err(status) => break Err(status),
                }
            }
        }
    };
    assert_undecryptable(answer);
}

#[tokio::test]
async fn bad_input_is_refused_as_for_an_ordinary_encrypt() {
    let (_sidecar, mut admin, mut c) = start_with(Options {
        limits: RequestLimits {
            max_plaintext_bytes: 1024,
            max_batch_items: 3,
            ..RequestLimits::default()
        },
        ..Options::default()
    })
    .await;
    create(&mut admin, "acme").await;
    let context = ctx(&[]);
    assert_status(
        encrypt_as(&mut c, "nobody", "", &context, b"x", true).await,
        Code::NotFound,
        "tenant nobody does not exist",
    );
    assert_status(
        encrypt_as(&mut c, "acme", "", &context, &[0; 1025], true).await,
        Code::InvalidArgument,
        "plaintext: is 1025 bytes; the limit is 1024 bytes",
    );
    encrypt_as(&mut c, "acme", "", &context, &[0; 1024], true)
        .await
        .unwrap();
    assert_status(
        encrypt_as(&mut c, "acme", &"s".repeat(257), &context, b"x", true).await,
        Code::InvalidArgument,
        "subject_id: is 257 bytes; at most 256 are allowed",
    );
    assert_status(
        encrypt_as(&mut c, "acme", "", &ctx(&[("", "v")]), b"x", true).await,
        Code::InvalidArgument,
        "context: keys must not be empty",
    );
    for reserved in ["keywarden.purpose", "keywarden."] {
        assert_status(
            encrypt_as(&mut c, "acme", "", &ctx(&[(reserved, "x")]), b"x", true).await,
            Code::InvalidArgument,
            RESERVED,
        );
    }
    let item = pb::EncryptItem {
        subject_id: String::new(),
        context: ctx(&[]),
        plaintext: b"x".to_vec(),
        deterministic: true,
        key_version: 0,
    };
    assert_status(
        c.encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: vec![item; 4],
        })
        .await,
        Code::InvalidArgument,
        "items: more than 3 items; the limit is 3 per batch",
    );
    // A batch item with a reserved context fails alone.
    let results = c
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: vec![
                pb::EncryptItem {
                    subject_id: String::new(),
                    context: ctx(&[("keywarden.subject", "x")]),
                    plaintext: b"x".to_vec(),
                    deterministic: true,
                    key_version: 0,
                },
                pb::EncryptItem {
                    subject_id: String::new(),
                    context: ctx(&[]),
                    plaintext: b"x".to_vec(),
                    deterministic: true,
                    key_version: 0,
                },
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    match &results[0].result {
        Some(pb::encrypt_result::Result::Error(e)) => {
            assert_eq!(
                (e.code, e.message.as_str()),
                (Code::InvalidArgument as i32, RESERVED)
            );
        }
        other => panic!("a reserved context sealed: {other:?}"),
    }
    assert!(matches!(
        results[1].result,
        Some(pb::encrypt_result::Result::Ok(_))
    ));
    // Malformed deterministic envelopes: the header alone, a SIV cut short.
    for malformed in [
        &[0x01, DETERMINISTIC][..],
        &[0x01, DETERMINISTIC, 0x01, 0, 0, 0, 1][..],
        &[0x01, DETERMINISTIC, 0x01, 0, 0, 0, 1, 9, 9, 9][..],
        &[
            0x01,
            DETERMINISTIC,
            0x03,
            0,
            0,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ][..],
    ] {
        assert_undecryptable(decrypt(&mut c, "acme", &context, malformed).await);
    }
}

#[tokio::test]
async fn deterministic_encrypt_needs_the_encrypt_permission_and_nothing_else() {
    use keywarden::{
        auth::tokens,
        client::{self, Bearer},
        config::AuthConfig,
    };
    use secrecy::{ExposeSecret, SecretString};

    let files = tempfile::tempdir().unwrap();
    let (writer, reader) = (tokens::generate(), tokens::generate());
    let tokens_file = files.path().join("tokens.toml");
    std::fs::write(
        &tokens_file,
        format!(
            "[[token]]\nname = \"writer\"\nsha256 = \"{}\"\n\
             [[token]]\nname = \"reader\"\nsha256 = \"{}\"\n",
            hex::encode(tokens::hash(writer.expose_secret())),
            hex::encode(tokens::hash(reader.expose_secret())),
        ),
    )
    .unwrap();
    let policy = files.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[grant]]\nidentity = \"token:writer\"\nallow = [\"encrypt\"]\ntenants = [\"acme\"]\n\
         [[grant]]\nidentity = \"token:reader\"\nallow = [\"decrypt\"]\ntenants = [\"acme\"]\n\
         [[grant]]\nidentity = \"token:admin\"\nallow = [\"admin\"]\ntenants = [\"*\"]\n",
    )
    .unwrap();
    let (sidecar, mut admin, _) = start_with(Options {
        auth: AuthConfig {
            tokens_file: Some(tokens_file),
            policy_file: Some(policy),
            ..AuthConfig::default()
        },
        ..Options::default()
    })
    .await;
    create(&mut admin, "acme").await;
    let channel = sidecar.channel().await;
    let as_caller =
        |token: &SecretString| client::crypto(channel.clone(), Bearer::new(Some(token)).unwrap());
    let (mut writer, mut reader) = (as_caller(&writer), as_caller(&reader));
    let context = ctx(&[("column", "email")]);
    let sealed = seal(&mut writer, "acme", "", &context, b"ada@example.com").await;
    assert_eq!(
        decrypt(&mut reader, "acme", &context, &sealed.ciphertext)
            .await
            .unwrap()
            .plaintext,
        b"ada@example.com"
    );
    // A decrypt-only caller cannot compute a deterministic ciphertext (and
    // so cannot confirm a guess against a stored one).
    let refused = encrypt_as(&mut reader, "acme", "", &context, b"ada@example.com", true)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().contains("token:reader may not encrypt"),
        "{}",
        refused.message()
    );
    // An encrypt-only caller cannot decrypt what it sealed.
    let refused = decrypt(&mut writer, "acme", &context, &sealed.ciphertext)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
}

// ---- key_version: sealing under an older tenant key version ----

/// Encrypts deterministically under tenant key version `key_version`.
async fn seal_at(
    c: &mut Crypto,
    tenant: &str,
    subject: &str,
    context: &BTreeMap<String, String>,
    plaintext: &[u8],
    key_version: u32,
) -> Result<pb::EncryptResponse, Status> {
    encrypt_under(c, tenant, subject, context, plaintext, true, key_version).await
}

fn item_at(
    plaintext: &[u8],
    subject: &str,
    deterministic: bool,
    key_version: u32,
) -> pb::EncryptItem {
    pb::EncryptItem {
        subject_id: subject.into(),
        context: ctx(&[("column", "email")]),
        plaintext: plaintext.to_vec(),
        deterministic,
        key_version,
    }
}

/// EncryptBatch for acme: per item, its response or its error's code and
/// message.
async fn batch_at(
    c: &mut Crypto,
    items: Vec<pb::EncryptItem>,
) -> Vec<Result<pb::EncryptResponse, (Code, String)>> {
    c.encrypt_batch(pb::EncryptBatchRequest {
        tenant_id: "acme".into(),
        items,
    })
    .await
    .unwrap()
    .into_inner()
    .results
    .into_iter()
    .map(|r| match r.result.unwrap() {
        pb::encrypt_result::Result::Ok(ok) => Ok(ok),
        pb::encrypt_result::Result::Error(e) => Err((Code::from(e.code), e.message)),
    })
    .collect()
}

async fn set_min_decrypt_version(admin: &mut Admin, version: u32) {
    admin
        .update_tenant_policy(pb::UpdateTenantPolicyRequest {
            tenant_id: "acme".into(),
            policy: Some(pb::TenantPolicy {
                min_decrypt_version: version,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

/// Admin GetTenant of acme.
async fn acme(admin: &mut Admin) -> pb::Tenant {
    admin
        .get_tenant(pb::GetTenantRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The lookup procedure the README gives: the live versions from Admin
/// GetTenant (at or above min_decrypt_version), one ciphertext per version
/// from one EncryptBatch, then `WHERE col IN (...)` over `rows`.
async fn lookup(admin: &mut Admin, c: &mut Crypto, rows: &[Vec<u8>], value: &[u8]) -> Vec<usize> {
    let info = acme(admin).await;
    let min = info.policy.map_or(0, |p| p.min_decrypt_version);
    let items = info
        .versions
        .iter()
        .filter(|v| v.version >= min)
        .map(|v| item_at(value, "", true, v.version))
        .collect();
    let candidates: Vec<Vec<u8>> = batch_at(c, items)
        .await
        .into_iter()
        .map(|r| r.unwrap().ciphertext)
        .collect();
    (0..rows.len())
        .filter(|&i| candidates.contains(&rows[i]))
        .collect()
}

/// Where ada's, bob's and eve's (no row) values are found in `rows`.
async fn look_up_all(admin: &mut Admin, c: &mut Crypto, rows: &[Vec<u8>]) -> [Vec<usize>; 3] {
    [
        lookup(admin, c, rows, b"ada@example.com").await,
        lookup(admin, c, rows, b"bob@example.com").await,
        lookup(admin, c, rows, b"eve@example.com").await,
    ]
}

#[tokio::test]
async fn key_version_gives_the_old_rows_ciphertext_so_lookups_find_every_row_during_a_rotation() {
    let (_sidecar, mut admin, mut c) = start().await;
    create(&mut admin, "acme").await;
    let context = ctx(&[("column", "email")]);
    let ada_v1 = seal(&mut c, "acme", "", &context, b"ada@example.com").await;
    assert_eq!(rotate(&mut admin, "acme").await, 2);
    let bob_v2 = seal(&mut c, "acme", "", &context, b"bob@example.com").await;
    assert_eq!(bob_v2.key_version, 2);

    // Under version 1 the value gives the old row, byte for byte.
    let at_v1 = seal_at(&mut c, "acme", "", &context, b"ada@example.com", 1)
        .await
        .unwrap();
    assert_eq!(at_v1.key_version, 1);
    assert_eq!(at_v1.ciphertext, ada_v1.ciphertext);
    assert_eq!(at_v1.ciphertext[1], DETERMINISTIC);
    assert_eq!(at_v1.ciphertext[3..7], 1u32.to_be_bytes());
    // Naming the primary is the same as naming none.
    let at_v2 = seal_at(&mut c, "acme", "", &context, b"ada@example.com", 2)
        .await
        .unwrap();
    let at_0 = seal_at(&mut c, "acme", "", &context, b"ada@example.com", 0)
        .await
        .unwrap();
    assert_eq!((at_v2.key_version, at_0.key_version), (2, 2));
    assert_eq!(at_v2.ciphertext, at_0.ciphertext);
    assert_ne!(at_v2.ciphertext, ada_v1.ciphertext);
    // It decrypts like the row it equals.
    let opened = decrypt(&mut c, "acme", &context, &at_v1.ciphertext)
        .await
        .unwrap();
    assert_eq!(
        (opened.plaintext.as_slice(), opened.key_version),
        (&b"ada@example.com"[..], 1)
    );

    // The table mid-rotation: ada on version 1, bob on version 2. A lookup
    // over every live version finds each, and keeps finding ada once her
    // row is rewrapped.
    let mut rows = vec![ada_v1.ciphertext.clone(), bob_v2.ciphertext.clone()];
    let found = [vec![0], vec![1], vec![]];
    assert_eq!(look_up_all(&mut admin, &mut c, &rows).await, found);
    rows[0] = rewrap(&mut c, "acme", &context, &rows[0])
        .await
        .unwrap()
        .ciphertext;
    assert_eq!(rows[0], at_v2.ciphertext);
    assert_eq!(look_up_all(&mut admin, &mut c, &rows).await, found);

    // Every row rewrapped: version 1 can go (min_decrypt_version 2), the
    // lookup computes one ciphertext and still finds both rows.
    set_min_decrypt_version(&mut admin, 2).await;
    assert_eq!(look_up_all(&mut admin, &mut c, &rows).await, found);
}

#[tokio::test]
async fn key_version_is_refused_without_deterministic_with_a_subject_and_for_versions_that_cannot_seal()
 {
    let (_sidecar, mut admin, mut c) = start().await;
    create(&mut admin, "acme").await;
    let context = ctx(&[("column", "email")]);
    assert_eq!(rotate(&mut admin, "acme").await, 2);

    // Malformed requests are refused before any keystore read: even for a
    // tenant that does not exist the answer is INVALID_ARGUMENT.
    for tenant in ["acme", "nobody"] {
        assert_status(
            encrypt_under(&mut c, tenant, "", &context, b"x", false, 1).await,
            Code::InvalidArgument,
            "key_version: is allowed only with deterministic = true",
        );
        assert_status(
            seal_at(&mut c, tenant, "ada", &context, b"x", 1).await,
            Code::InvalidArgument,
            "key_version: is not allowed with subject_id",
        );
    }
    // A version above the primary does not exist (yet).
    assert_status(
        seal_at(&mut c, "acme", "", &context, b"x", 3).await,
        Code::FailedPrecondition,
        "tenant acme's primary key version is 2: key version 3 is above it",
    );
    // Below min_decrypt_version: refused as Decrypt refuses such a version.
    let v1 = seal_at(&mut c, "acme", "", &context, b"x", 1)
        .await
        .unwrap();
    set_min_decrypt_version(&mut admin, 2).await;
    assert_status(
        decrypt(&mut c, "acme", &context, &v1.ciphertext).await,
        Code::FailedPrecondition,
        "tenant acme's policy refuses data of key version 1",
    );
    assert_status(
        seal_at(&mut c, "acme", "", &context, b"x", 1).await,
        Code::FailedPrecondition,
        "tenant acme's policy refuses sealing under key version 1: its minimum decryption version is 2",
    );
    assert_eq!(
        seal_at(&mut c, "acme", "", &context, b"x", 2)
            .await
            .unwrap()
            .key_version,
        2
    );

    // In a batch each refusal is its own item's answer.
    let answers: Vec<_> = batch_at(
        &mut c,
        vec![
            item_at(b"x", "", true, 2),
            item_at(b"x", "", false, 2),
            item_at(b"x", "ada", true, 2),
            item_at(b"x", "", true, 1),
            item_at(b"x", "", true, 7),
            item_at(b"x", "", true, 0),
        ],
    )
    .await
    .into_iter()
    .map(|r| r.map(|ok| ok.key_version))
    .collect();
    let refused = |i: usize, code: Code, start: &str| match &answers[i] {
        Err((c, message)) => assert!(*c == code && message.starts_with(start), "{c:?} {message}"),
        Ok(v) => panic!("item {i} sealed under version {v}"),
    };
    assert_eq!((&answers[0], &answers[5]), (&Ok(2), &Ok(2)));
    refused(
        1,
        Code::InvalidArgument,
        "key_version: is allowed only with deterministic",
    );
    refused(
        2,
        Code::InvalidArgument,
        "key_version: is not allowed with subject_id",
    );
    refused(
        3,
        Code::FailedPrecondition,
        "tenant acme's policy refuses sealing under key version 1",
    );
    refused(
        4,
        Code::FailedPrecondition,
        "tenant acme's primary key version is 2: key version 7",
    );
}

#[tokio::test]
async fn key_version_of_a_destroyed_version_is_refused() {
    const DAY: u64 = 86_400;
    let (_sidecar, mut admin, mut c) = start_with(Options {
        clock: Some(common::tokio_clock()),
        policy_interval: Some(std::time::Duration::from_secs(60)),
        ..Options::default()
    })
    .await;
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            policy: Some(pb::TenantPolicy {
                retention_seconds: DAY,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let context = ctx(&[("column", "email")]);
    let v1 = seal(&mut c, "acme", "", &context, b"x").await;
    assert_eq!(rotate(&mut admin, "acme").await, 2);
    assert_eq!(
        seal_at(&mut c, "acme", "", &context, b"x", 1)
            .await
            .unwrap()
            .ciphertext,
        v1.ciphertext
    );

    // A day later the retention policy destroys version 1.
    tokio::time::pause();
    tokio::time::advance(std::time::Duration::from_secs(DAY + 120)).await;
    tokio::time::resume();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let info = acme(&mut admin).await;
        if info.destroyed_versions == [1] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retention did not destroy version 1: {info:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let gone = "key version 1 of tenant acme no longer exists";
    assert_status(
        decrypt(&mut c, "acme", &context, &v1.ciphertext).await,
        Code::FailedPrecondition,
        gone,
    );
    assert_status(
        seal_at(&mut c, "acme", "", &context, b"x", 1).await,
        Code::FailedPrecondition,
        gone,
    );
    let results = batch_at(
        &mut c,
        vec![item_at(b"x", "", true, 1), item_at(b"x", "", true, 2)],
    )
    .await;
    assert_eq!(
        results[0].as_ref().unwrap_err(),
        &(Code::FailedPrecondition, gone.to_owned())
    );
    assert_eq!(results[1].as_ref().unwrap().key_version, 2);
}
