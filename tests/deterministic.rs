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
    c.encrypt(pb::EncryptRequest {
        tenant_id: tenant.into(),
        subject_id: subject.into(),
        context: context.clone(),
        plaintext: plaintext.to_vec(),
        deterministic,
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
                },
                pb::EncryptItem {
                    subject_id: String::new(),
                    context: ctx(&[]),
                    plaintext: b"x".to_vec(),
                    deterministic: true,
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
