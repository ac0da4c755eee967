//! Tenant policies over real gRPC: automatic rotation and retention on
//! paused time, minimum decryption version, per-tenant size and rate limits
//! (RESOURCE_EXHAUSTED with a retry delay), and validation of policies.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{Options, TestSidecar, tokio_clock};
use keywarden::api::pb;
use tonic::Code;
use tonic_types::StatusExt;

type Crypto = pb::crypto_client::CryptoClient<keywarden::client::Authed>;
type Admin = pb::admin_client::AdminClient<keywarden::client::Authed>;

const DAY: u64 = 86_400;

async fn encrypt(
    c: &mut Crypto,
    tenant: &str,
    subject: &str,
    plaintext: &[u8],
) -> Result<pb::EncryptResponse, tonic::Status> {
    c.encrypt(pb::EncryptRequest {
        tenant_id: tenant.into(),
        subject_id: subject.into(),
        context: BTreeMap::new(),
        plaintext: plaintext.to_vec(),
        deterministic: false,
        key_version: 0,
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn decrypt(
    c: &mut Crypto,
    tenant: &str,
    ciphertext: &[u8],
) -> Result<Vec<u8>, tonic::Status> {
    c.decrypt(pb::DecryptRequest {
        tenant_id: tenant.into(),
        context: BTreeMap::new(),
        ciphertext: ciphertext.to_vec(),
    })
    .await
    .map(|r| r.into_inner().plaintext)
}

async fn create(admin: &mut Admin, tenant: &str, policy: Option<pb::TenantPolicy>) -> pb::Tenant {
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: tenant.into(),
            policy,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn tenant(admin: &mut Admin, id: &str) -> pb::Tenant {
    admin
        .get_tenant(pb::GetTenantRequest {
            tenant_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Moves paused time forward by `by` (the clock the sidecar's policies read
/// follows it), then lets real time run again so the keystore's pool timers
/// behave, and waits until `done` says the scheduler has acted.
async fn advance_until<F, Fut>(by: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(
            std::time::Instant::now() < deadline,
            "the scheduler did not act within 20 s after {by:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn automatic_rotation_and_retention_run_on_schedule() {
    let sidecar = TestSidecar::start_with(Options {
        clock: Some(tokio_clock()),
        policy_interval: Some(Duration::from_secs(60)),
        ..Options::default()
    })
    .await;
    let mut admin = sidecar.admin().await;
    let mut c = sidecar.crypto().await;
    let policy = pb::TenantPolicy {
        rotation_period_seconds: DAY,
        retention_seconds: 3 * DAY,
        ..Default::default()
    };
    create(&mut admin, "acme", Some(policy)).await;
    create(&mut admin, "plain", None).await;
    let v1 = encrypt(&mut c, "acme", "", b"day 0").await.unwrap();
    assert_eq!(v1.key_version, 1);
    // A subject key made now is sealed by version 1.
    let alice = encrypt(&mut c, "acme", "alice", b"alice's").await.unwrap();
    let plain = encrypt(&mut c, "plain", "", b"no policy").await.unwrap();

    let mut ciphertexts = vec![v1.ciphertext.clone()];
    for day in 1..=4u32 {
        advance_until(Duration::from_secs(DAY + 120), || {
            let sidecar = &sidecar;
            async move {
                tenant(&mut sidecar.admin().await, "acme")
                    .await
                    .primary_version
                    == day + 1
            }
        })
        .await;
        let sealed = encrypt(&mut c, "acme", "", format!("day {day}").as_bytes())
            .await
            .unwrap();
        assert_eq!(sealed.key_version, day + 1);
        ciphertexts.push(sealed.ciphertext);
    }
    // Day 4 + 8 minutes: versions made on day 0 and day 1 are past the
    // retention of 3 days; versions 3, 4 and 5 are not.
    let info = tenant(&mut admin, "acme").await;
    assert_eq!(info.primary_version, 5);
    assert_eq!(info.destroyed_versions, vec![1, 2], "{info:?}");
    let live: Vec<u32> = info.versions.iter().map(|v| v.version).collect();
    assert_eq!(live, vec![3, 4, 5]);
    for (version, ciphertext) in (1u32..).zip(&ciphertexts) {
        let opened = decrypt(&mut c, "acme", ciphertext).await;
        if version <= 2 {
            let status = opened.expect_err("a destroyed version must not decrypt");
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            assert!(
                status.message().contains(&format!(
                    "key version {version} of tenant acme no longer exists"
                )),
                "{}",
                status.message()
            );
        } else {
            assert_eq!(opened.unwrap(), format!("day {}", version - 1).as_bytes());
        }
    }
    // The subject key sealed by version 1 was moved before version 1 went.
    assert_eq!(
        decrypt(&mut c, "acme", &alice.ciphertext).await.unwrap(),
        b"alice's"
    );
    // A tenant without a policy is left alone.
    let plain_info = tenant(&mut admin, "plain").await;
    assert_eq!(plain_info.primary_version, 1);
    assert!(plain_info.destroyed_versions.is_empty());
    assert_eq!(
        decrypt(&mut c, "plain", &plain.ciphertext).await.unwrap(),
        b"no policy"
    );

    // Each of the scheduler's changes is in the audit log, in order, caller
    // "scheduler" (written just after the change: wait for the last one).
    let rotation = |v: u32| {
        (
            "AutomaticRotation".to_owned(),
            format!("version {v} is primary (rotation period)"),
        )
    };
    let destroy = |v: u32, moved: u32| {
        (
            "RetentionDestroy".to_owned(),
            format!("version {v} destroyed; {moved} subject keys moved to the primary"),
        )
    };
    let expected = vec![
        rotation(2),
        rotation(3),
        rotation(4),
        destroy(1, 1), // alice's key, sealed by version 1
        rotation(5),
        destroy(2, 0),
    ];
    let scheduled = || -> Vec<(String, String)> {
        std::fs::read_to_string(sidecar.dir.path().join("audit.log"))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .filter(|r| r["caller"] == "scheduler")
            .map(|r| {
                assert_eq!(r["tenant"], "acme", "{r}");
                assert_eq!(r["phase"], "answered", "{r}");
                assert_eq!(r["outcome"], "OK", "{r}");
                (
                    r["action"].as_str().unwrap().to_owned(),
                    r["detail"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while scheduled().len() < expected.len() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(scheduled(), expected);
    sidecar.stop().await;
}

#[tokio::test]
async fn policies_limit_sizes_rates_and_old_versions() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    let mut c = sidecar.crypto().await;
    create(&mut admin, "acme", None).await;
    let old = encrypt(&mut c, "acme", "", b"v1").await.unwrap();
    admin
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap();
    let updated = admin
        .update_tenant_policy(pb::UpdateTenantPolicyRequest {
            tenant_id: "acme".into(),
            policy: Some(pb::TenantPolicy {
                min_decrypt_version: 2,
                max_items_per_second: 5,
                burst: 5,
                max_plaintext_bytes: 16,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.policy.unwrap().max_items_per_second, 5);

    let status = decrypt(&mut c, "acme", &old.ciphertext).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("minimum decryption version is 2"),
        "{status:?}"
    );

    let status = encrypt(&mut c, "acme", "", &[0; 17]).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("policy allows 16"), "{status:?}");

    // The bucket holds 5 (one was taken by the refused decrypt, one by the
    // oversized encrypt): the rest go, then RESOURCE_EXHAUSTED with a delay.
    let mut refused = None;
    for _ in 0..10 {
        if let Err(status) = encrypt(&mut c, "acme", "", b"x").await {
            refused = Some(status);
            break;
        }
    }
    let status = refused.expect("the rate limit must refuse");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("5 items per second"),
        "{status:?}"
    );
    let retry = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("google.rpc.RetryInfo");
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_millis(200),
        "{retry:?}"
    );
    assert!(status.metadata().get("retry-after-ms").is_some());
    // Waiting as told is enough.
    tokio::time::sleep(retry).await;
    encrypt(&mut c, "acme", "", b"x").await.unwrap();
    // A batch larger than the burst can never fit.
    let status = c
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: vec![
                pb::EncryptItem {
                    plaintext: b"x".to_vec(),
                    ..Default::default()
                };
                6
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("burst of 5"), "{status:?}");
    sidecar.stop().await;
}

/// The minimum decryption version applies to subject data too: the tenant
/// version that wraps a subject's key protects it (the review at df0a846
/// decrypted it anyway). Every path refuses it: Decrypt, DecryptBatch,
/// Rewrap, DecryptStream, Encrypt and EncryptStream for that subject.
#[tokio::test]
async fn the_minimum_decryption_version_applies_to_subject_keys_on_every_path() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    let mut c = sidecar.crypto().await;
    create(&mut admin, "acme", None).await;
    // ada's key is wrapped by version 1; bob's, made after the rotation, by 2.
    let ada = encrypt(&mut c, "acme", "ada", b"ada's").await.unwrap();
    admin
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap();
    let bob = encrypt(&mut c, "acme", "bob", b"bob's").await.unwrap();
    assert_eq!((ada.key_version, bob.key_version), (1, 2));
    // A streaming envelope under ada's key, made before the policy changes.
    let mut ada_stream = Vec::new();
    let mut sealed = c
        .encrypt_stream(tokio_stream::iter([
            pb::EncryptStreamRequest {
                part: Some(pb::encrypt_stream_request::Part::Start(
                    pb::EncryptStreamStart {
                        tenant_id: "acme".into(),
                        subject_id: "ada".into(),
                        context: BTreeMap::new(),
                    },
                )),
            },
            pb::EncryptStreamRequest {
                part: Some(pb::encrypt_stream_request::Part::Chunk(
                    b"streamed".to_vec(),
                )),
            },
        ]))
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = sealed.message().await.unwrap() {
        ada_stream.extend(m.chunk);
    }
    admin
        .update_tenant_policy(pb::UpdateTenantPolicyRequest {
            tenant_id: "acme".into(),
            policy: Some(pb::TenantPolicy {
                min_decrypt_version: 2,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let refusal = "tenant acme's policy refuses a subject key wrapped by key version 1: \
                   its minimum decryption version is 2";
    let refused = |result: Result<(), tonic::Status>| {
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(status.message(), refusal);
    };
    refused(decrypt(&mut c, "acme", &ada.ciphertext).await.map(drop));
    refused(encrypt(&mut c, "acme", "ada", b"more").await.map(drop));
    refused(
        c.rewrap(pb::RewrapRequest {
            tenant_id: "acme".into(),
            context: BTreeMap::new(),
            ciphertext: ada.ciphertext.clone(),
        })
        .await
        .map(drop),
    );
    let batch = c
        .decrypt_batch(pb::DecryptBatchRequest {
            tenant_id: "acme".into(),
            items: vec![pb::DecryptItem {
                context: BTreeMap::new(),
                ciphertext: ada.ciphertext.clone(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    match &batch.results[0].result {
        Some(pb::decrypt_result::Result::Error(e)) => {
            assert_eq!(e.code, Code::FailedPrecondition as i32);
            assert_eq!(e.message, refusal);
        }
        other => panic!("{other:?}"),
    }
    use pb::{decrypt_stream_request::Part as DPart, encrypt_stream_request::Part as EPart};
    let stream_answer = async |c: &mut Crypto, envelope: Vec<u8>| -> Result<(), tonic::Status> {
        let mut stream = c
            .decrypt_stream(tokio_stream::iter([
                pb::DecryptStreamRequest {
                    part: Some(DPart::Start(pb::DecryptStreamStart {
                        tenant_id: "acme".into(),
                        context: BTreeMap::new(),
                    })),
                },
                pb::DecryptStreamRequest {
                    part: Some(DPart::Chunk(envelope)),
                },
            ]))
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        Ok(())
    };
    refused(stream_answer(&mut c, ada_stream.clone()).await);
    refused(
        c.encrypt_stream(tokio_stream::iter([pb::EncryptStreamRequest {
            part: Some(EPart::Start(pb::EncryptStreamStart {
                tenant_id: "acme".into(),
                subject_id: "ada".into(),
                context: BTreeMap::new(),
            })),
        }]))
        .await
        .map(drop),
    );
    // bob's key is wrapped by version 2: untouched.
    assert_eq!(
        decrypt(&mut c, "acme", &bob.ciphertext).await.unwrap(),
        b"bob's"
    );
    // Lowering the minimum again gives ada's data back.
    admin
        .update_tenant_policy(pb::UpdateTenantPolicyRequest {
            tenant_id: "acme".into(),
            policy: Some(pb::TenantPolicy::default()),
        })
        .await
        .unwrap();
    assert_eq!(
        decrypt(&mut c, "acme", &ada.ciphertext).await.unwrap(),
        b"ada's"
    );
    stream_answer(&mut c, ada_stream).await.unwrap();
    assert_eq!(
        encrypt(&mut c, "acme", "bob", b"more")
            .await
            .unwrap()
            .key_version,
        2
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn bad_policies_are_refused_and_change_nothing() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    create(&mut admin, "acme", None).await;
    for (policy, field) in [
        (
            pb::TenantPolicy {
                rotation_period_seconds: 60,
                ..Default::default()
            },
            "policy.rotation_period_seconds",
        ),
        (
            pb::TenantPolicy {
                retention_seconds: 10,
                ..Default::default()
            },
            "policy.retention_seconds",
        ),
        (
            pb::TenantPolicy {
                rotation_period_seconds: 2 * DAY,
                retention_seconds: DAY,
                ..Default::default()
            },
            "policy.retention_seconds",
        ),
        (
            pb::TenantPolicy {
                max_plaintext_bytes: u64::MAX,
                ..Default::default()
            },
            "policy.max_plaintext_bytes",
        ),
    ] {
        let status = admin
            .update_tenant_policy(pb::UpdateTenantPolicyRequest {
                tenant_id: "acme".into(),
                policy: Some(policy.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{status:?}");
        let status = admin
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: "other".into(),
                policy: Some(policy),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    assert_eq!(
        tenant(&mut admin, "acme").await.policy,
        Some(pb::TenantPolicy {
            subject_ids: "exact".into(),
            ..Default::default()
        })
    );
    let status = admin
        .get_tenant(pb::GetTenantRequest {
            tenant_id: "other".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = admin
        .update_tenant_policy(pb::UpdateTenantPolicyRequest {
            tenant_id: "nobody".into(),
            policy: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    sidecar.stop().await;
}

/// Tenant A floods at ten times its rate limit; tenant B's p99 latency is
/// measured unloaded and during the flood, on the same sidecar, and both are
/// printed. A benchmark-style measurement: the assertion is on the ratio,
/// over thousands of calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_does_not_slow_the_others() {
    // The flood must offer 10 times the limit and complete at least 8 times
    // it: a debug build on two shared cores completes about 1,500 calls/s.
    const LIMIT: u32 = if cfg!(debug_assertions) { 100 } else { 200 };
    // Enough calls for a stable p99: ~3 s of calls per phase when optimized.
    const CALLS: usize = if cfg!(debug_assertions) { 3000 } else { 10_000 };
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    let limited = pb::TenantPolicy {
        max_items_per_second: LIMIT,
        ..Default::default()
    };
    create(&mut admin, "noisy", Some(limited)).await;
    create(&mut admin, "quiet", None).await;

    async fn p99_of_quiet(c: &mut Crypto) -> Duration {
        let mut samples = Vec::with_capacity(CALLS);
        for i in 0..CALLS {
            let started = std::time::Instant::now();
            encrypt(c, "quiet", "", format!("{i}").as_bytes())
                .await
                .unwrap();
            samples.push(started.elapsed());
        }
        samples.sort();
        samples[CALLS * 99 / 100]
    }
    let mut quiet = sidecar.crypto().await;
    // Warm up, then measure unloaded.
    for _ in 0..200 {
        encrypt(&mut quiet, "quiet", "", b"warm").await.unwrap();
    }
    let unloaded = p99_of_quiet(&mut quiet).await;

    // The flood: 10 × LIMIT calls per second, paced, from its own connection.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counts = std::sync::Arc::new([
        std::sync::atomic::AtomicU64::new(0),
        std::sync::atomic::AtomicU64::new(0),
    ]);
    let flood = {
        let mut noisy = sidecar.crypto().await;
        let stop = stop.clone();
        let counts = counts.clone();
        tokio::spawn(async move {
            // Evenly paced: 10 × LIMIT calls per second.
            let per_tick = 10 * LIMIT / 1000;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut calls = tokio::task::JoinSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                // At most 2,000 calls in flight: a slow sidecar makes the
                // flood weaker (and the test fail), not the test process
                // grow without bound.
                for _ in 0..per_tick.min(2000u32.saturating_sub(calls.len() as u32)) {
                    let mut c = noisy.clone();
                    let counts = counts.clone();
                    // Fired without waiting for the answer, so the offered
                    // rate does not depend on the sidecar's latency.
                    calls.spawn(async move {
                        let slot = match encrypt(&mut c, "noisy", "", b"flood").await {
                            Ok(_) => 0,
                            Err(s) if s.code() == Code::ResourceExhausted => 1,
                            Err(s) => panic!("{s:?}"),
                        };
                        counts[slot].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    });
                }
                while calls.try_join_next().is_some() {}
            }
            while calls.join_next().await.is_some() {}
            let _ = &mut noisy;
        })
    };
    let flood_began = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flood_started = std::time::Instant::now();
    let before = counts[0].load(std::sync::atomic::Ordering::Relaxed)
        + counts[1].load(std::sync::atomic::Ordering::Relaxed);
    let loaded = p99_of_quiet(&mut quiet).await;
    let during = counts[0].load(std::sync::atomic::Ordering::Relaxed)
        + counts[1].load(std::sync::atomic::Ordering::Relaxed)
        - before;
    let rate = during as f64 / flood_started.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.await.unwrap();
    let elapsed = flood_began.elapsed();
    let ratio = loaded.as_secs_f64() / unloaded.as_secs_f64();
    println!(
        "noisy neighbour: tenant B p99 unloaded {unloaded:?}, during A's flood {loaded:?} \
         (ratio {ratio:.2}); A offered {rate:.0} calls/s against a limit of {LIMIT}/s: \
         {} served, {} refused",
        counts[0].load(std::sync::atomic::Ordering::Relaxed),
        counts[1].load(std::sync::atomic::Ordering::Relaxed),
    );
    assert!(
        rate >= 8.0 * f64::from(LIMIT),
        "the flood was too weak: {rate:.0}/s"
    );
    assert!(
        counts[1].load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the flood was never refused"
    );
    // The limit holds: A was served about its rate, no more.
    let served = counts[0].load(std::sync::atomic::Ordering::Relaxed) as f64;
    assert!(
        served <= 1.2 * f64::from(LIMIT) * elapsed.as_secs_f64() + f64::from(LIMIT),
        "{served}"
    );
    // On 2 cores the flood's own client shares the CPU with the sidecar. In
    // an optimized build the refusals are cheap enough for B's p99 to stay
    // within twice its unloaded figure (`cargo test --release --test
    // policies flooding -- --nocapture`; figures in docs/SECURITY.md). A
    // debug build spends ~10× more CPU per call, so there the ratio is
    // reported, not asserted.
    if cfg!(debug_assertions) {
        println!("(debug build: the ratio is reported; it is asserted in release builds)");
    } else {
        assert!(
            ratio <= 2.0,
            "tenant B's p99 grew {ratio:.2}× during the flood"
        );
    }
    sidecar.stop().await;
}

/// A tenant's subject id rule decides which spellings are one subject, on
/// every path, and the receipt says which rule an erasure used (the review
/// at df0a846: a shred of `ada@example.com` left `Ada@Example.com`'s data
/// readable, behind a valid receipt, with no rule anywhere).
#[tokio::test]
async fn subject_ids_follow_the_tenants_rule_and_receipts_state_it() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    let mut c = sidecar.crypto().await;
    let public_key = admin
        .get_audit_head(pb::GetAuditHeadRequest {})
        .await
        .unwrap()
        .into_inner()
        .receipt_public_key;
    let rule = |name: &str| {
        Some(pb::TenantPolicy {
            subject_ids: name.into(),
            ..Default::default()
        })
    };
    assert_eq!(
        create(&mut admin, "exact", None)
            .await
            .policy
            .unwrap()
            .subject_ids,
        "exact"
    );
    create(&mut admin, "nfc", rule("nfc")).await;
    let folded = create(&mut admin, "folded", rule("nfc-casefold")).await;
    assert_eq!(folded.policy.unwrap().subject_ids, "nfc-casefold");

    let nfd_zoe = "Zoe\u{308}@example.com";
    let nfc_zoe = "Zo\u{eb}@example.com";
    let shred = async |admin: &mut Admin, tenant: &str, subject: &str| {
        let r = admin
            .shred_subject(pb::ShredSubjectRequest {
                tenant_id: tenant.into(),
                subject_id: subject.into(),
            })
            .await
            .unwrap()
            .into_inner();
        keywarden::receipt::verify(&r.receipt, &public_key).unwrap()
    };
    let shredded = |r: Result<Vec<u8>, tonic::Status>| {
        let status = r.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    };

    // exact: byte for byte.
    let ada = encrypt(&mut c, "exact", "Ada@Example.com", b"ada")
        .await
        .unwrap();
    let zoe = encrypt(&mut c, "exact", nfd_zoe, b"zoe").await.unwrap();
    let receipt = shred(&mut admin, "exact", "ada@example.com").await;
    assert_eq!(receipt.subject_ids.as_deref(), Some("exact"));
    assert_eq!(receipt.destroyed_subject_keys, 0);
    let receipt = shred(&mut admin, "exact", nfc_zoe).await;
    assert_eq!(receipt.destroyed_subject_keys, 0);
    assert_eq!(
        decrypt(&mut c, "exact", &ada.ciphertext).await.unwrap(),
        b"ada"
    );
    assert_eq!(
        decrypt(&mut c, "exact", &zoe.ciphertext).await.unwrap(),
        b"zoe"
    );

    // nfc: canonically equivalent spellings are one subject; case is not.
    let ada = encrypt(&mut c, "nfc", "Ada@Example.com", b"ada")
        .await
        .unwrap();
    let zoe = encrypt(&mut c, "nfc", nfd_zoe, b"zoe").await.unwrap();
    let receipt = shred(&mut admin, "nfc", nfc_zoe).await;
    assert_eq!(
        (
            receipt.subject_ids.as_deref(),
            receipt.destroyed_subject_keys
        ),
        (Some("nfc"), 1)
    );
    shredded(decrypt(&mut c, "nfc", &zoe.ciphertext).await);
    assert_eq!(
        shred(&mut admin, "nfc", "ada@example.com")
            .await
            .destroyed_subject_keys,
        0
    );
    assert_eq!(
        decrypt(&mut c, "nfc", &ada.ciphertext).await.unwrap(),
        b"ada"
    );

    // nfc-casefold: case and canonical equivalence both fold.
    let ada = encrypt(&mut c, "folded", "Ada@Example.com", b"ada")
        .await
        .unwrap();
    let zoe = encrypt(&mut c, "folded", nfd_zoe, b"zoe").await.unwrap();
    let strasse = encrypt(&mut c, "folded", "Stra\u{df}e", b"street")
        .await
        .unwrap();
    for (spelling, sealed) in [
        ("ada@example.com", &ada),
        ("ZO\u{cb}@EXAMPLE.COM", &zoe),
        ("STRASSE", &strasse),
    ] {
        let receipt = shred(&mut admin, "folded", spelling).await;
        assert_eq!(
            (
                receipt.subject_ids.as_deref(),
                receipt.destroyed_subject_keys
            ),
            (Some("nfc-casefold"), 1),
            "{spelling}"
        );
        shredded(decrypt(&mut c, "folded", &sealed.ciphertext).await);
    }
    // The same subject shredded again under another spelling: the first
    // shred, and the same subject hash in the receipt.
    let again = shred(&mut admin, "folded", "ADA@example.com").await;
    let first = shred(&mut admin, "folded", "Ada@Example.com").await;
    assert!(again.already_shredded && first.already_shredded);
    assert_eq!(again.subject, first.subject);
    // New data for a shredded spelling is refused too.
    shredded(
        encrypt(&mut c, "folded", "ada@EXAMPLE.com", b"x")
            .await
            .map(|r| r.ciphertext),
    );

    // The rule is fixed at creation; an empty value keeps it.
    let update = |tenant: &str, subject_ids: &str| pb::UpdateTenantPolicyRequest {
        tenant_id: tenant.into(),
        policy: Some(pb::TenantPolicy {
            burst: 3,
            subject_ids: subject_ids.into(),
            ..Default::default()
        }),
    };
    let status = admin
        .update_tenant_policy(update("folded", "exact"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().starts_with("policy.subject_ids is fixed"),
        "{status:?}"
    );
    let kept = admin
        .update_tenant_policy(update("folded", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.policy.unwrap().subject_ids, "nfc-casefold");
    let status = admin
        .update_tenant_policy(update("folded", "lowercase"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("policy.subject_ids: must be"),
        "{status:?}"
    );
    sidecar.stop().await;
}

/// `max_subjects` bounds the subject keys encrypt callers can make a tenant
/// hold (finding 13 of the review of df0a846): the call that would make one
/// more is RESOURCE_EXHAUSTED on every path that creates one, subjects with a
/// key keep working, a shred frees a place, and the quota is per tenant.
#[tokio::test]
async fn the_subject_quota_bounds_new_subjects_on_every_path() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    let mut c = sidecar.crypto().await;
    let quota = |n: u64| {
        Some(pb::TenantPolicy {
            max_subjects: n,
            ..Default::default()
        })
    };
    assert_eq!(
        create(&mut admin, "acme", quota(2))
            .await
            .policy
            .unwrap()
            .max_subjects,
        2
    );
    create(&mut admin, "globex", None).await;
    let refusal = "tenant acme holds its quota of 2 subject keys (policy.max_subjects): \
                   a new subject needs a shred of another or a larger quota";
    let refused = |result: Result<(), tonic::Status>| {
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(status.message(), refusal);
        assert!(status.get_details_retry_info().is_none(), "{status:?}");
    };

    let ada = encrypt(&mut c, "acme", "ada", b"ada's").await.unwrap();
    encrypt(&mut c, "acme", "bob", b"bob's").await.unwrap();
    // The third subject, on each path that would create its key.
    refused(encrypt(&mut c, "acme", "carol", b"x").await.map(drop));
    let batch = c
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: vec![
                pb::EncryptItem {
                    subject_id: "carol".into(),
                    context: BTreeMap::new(),
                    plaintext: b"x".to_vec(),
                    deterministic: false,
                    key_version: 0,
                },
                pb::EncryptItem {
                    subject_id: "ada".into(),
                    context: BTreeMap::new(),
                    plaintext: b"more".to_vec(),
                    deterministic: false,
                    key_version: 0,
                },
                pb::EncryptItem {
                    subject_id: String::new(),
                    context: BTreeMap::new(),
                    plaintext: b"no subject".to_vec(),
                    deterministic: false,
                    key_version: 0,
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    match &batch.results[0].result {
        Some(pb::encrypt_result::Result::Error(e)) => {
            assert_eq!(e.code, Code::ResourceExhausted as i32);
            assert_eq!(e.message, refusal);
        }
        other => panic!("{other:?}"),
    }
    for result in &batch.results[1..] {
        assert!(
            matches!(result.result, Some(pb::encrypt_result::Result::Ok(_))),
            "{result:?}"
        );
    }
    let start = |subject: &str| pb::EncryptStreamRequest {
        part: Some(pb::encrypt_stream_request::Part::Start(
            pb::EncryptStreamStart {
                tenant_id: "acme".into(),
                subject_id: subject.into(),
                context: BTreeMap::new(),
            },
        )),
    };
    refused(
        c.encrypt_stream(tokio_stream::iter([start("carol")]))
            .await
            .map(drop),
    );
    // Subjects that hold a key are served; the quota is acme's alone.
    encrypt(&mut c, "acme", "bob", b"again").await.unwrap();
    assert_eq!(
        decrypt(&mut c, "acme", &ada.ciphertext).await.unwrap(),
        b"ada's"
    );
    for n in 0..5 {
        encrypt(&mut c, "globex", &format!("subject {n}"), b"x")
            .await
            .unwrap();
    }
    // A shred frees a place, which the next new subject takes.
    admin
        .shred_subject(pb::ShredSubjectRequest {
            tenant_id: "acme".into(),
            subject_id: "bob".into(),
        })
        .await
        .unwrap();
    let mut sealed = c
        .encrypt_stream(tokio_stream::iter([start("carol")]))
        .await
        .unwrap()
        .into_inner();
    while sealed.message().await.unwrap().is_some() {}
    refused(encrypt(&mut c, "acme", "dave", b"x").await.map(drop));
    // Lowering the quota below what is held refuses new subjects only;
    // raising it admits them; 0 lifts it.
    let set = async |admin: &mut Admin, n: u64| {
        admin
            .update_tenant_policy(pb::UpdateTenantPolicyRequest {
                tenant_id: "acme".into(),
                policy: quota(n),
            })
            .await
            .unwrap()
    };
    set(&mut admin, 1).await;
    encrypt(&mut c, "acme", "ada", b"still").await.unwrap();
    let status = encrypt(&mut c, "acme", "dave", b"x").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    set(&mut admin, 3).await;
    encrypt(&mut c, "acme", "dave", b"x").await.unwrap();
    set(&mut admin, 0).await;
    for n in 0..5 {
        encrypt(&mut c, "acme", &format!("more {n}"), b"x")
            .await
            .unwrap();
    }
    assert_eq!(
        tenant(&mut admin, "acme")
            .await
            .policy
            .unwrap()
            .max_subjects,
        0
    );
    sidecar.stop().await;
}
