use std::time::Duration;

use super::*;
use crate::{
    envelope::{self, Context, KeyRef, Mode},
    ids::SubjectId,
    kms::{Purpose, WrapContext, local::LocalRootKey, metered::Metered},
    store::{SubjectKeyRecord, SubjectLookup, sqlite::SqliteKeystore},
};

const TTL: Duration = Duration::from_secs(300);

fn limits() -> CacheLimits {
    CacheLimits {
        max_entries: 1000,
        time_to_live: TTL,
        time_to_idle: Duration::from_secs(3600),
        stale_if_error: Duration::ZERO,
    }
}

async fn manager(dir: &tempfile::TempDir) -> (KeyManager, Arc<Metered>, Arc<dyn Keystore>) {
    let local = LocalRootKey::load_or_create(&dir.path().join("root.key"))
        .unwrap()
        .0;
    let root = Arc::new(Metered::new(Arc::new(local)));
    let store: Arc<dyn Keystore> = Arc::new(
        SqliteKeystore::open(&dir.path().join("keystore.sqlite3"))
            .await
            .unwrap(),
    );
    (
        KeyManager::new(
            root.clone(),
            store.clone(),
            limits(),
            KeySettings::default(),
        ),
        root,
        store,
    )
}

fn tenant(id: &str) -> TenantId {
    TenantId::parse("tenant_id", id).unwrap()
}

#[tokio::test]
async fn a_cached_key_is_unwrapped_again_once_its_ttl_has_passed() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, root, _) = manager(&dir).await;
    let id = tenant("acme");
    keys.create_tenant(&id, &PlacementRequest::default(), &Default::default())
        .await
        .unwrap();
    // The TTL passes on tokio's clock, moved by `advance`, never by sleeping.
    // The clock runs between jumps: stopped, it would auto-advance past
    // sqlx's pool timeouts while a query waits on SQLite's worker thread.
    let jump = |by: Duration| async move {
        tokio::time::pause();
        tokio::time::advance(by).await;
        tokio::time::resume();
    };
    // As a call does: resolve the tenant (and with it its primary key), seal.
    let encrypt = |plaintext: &'static [u8]| {
        let keys = &keys;
        let id = &id;
        async move {
            let t = keys.active_tenant(id).await.unwrap();
            keys.encrypt(&t, None, &Context::new(), plaintext, Mode::Randomized, 0)
                .await
                .unwrap();
        }
    };

    // Creation put the new key in the cache: no unwrap yet.
    encrypt(b"a").await;
    assert_eq!(root.counts().decrypt, 0);

    jump(TTL - Duration::from_secs(5)).await;
    encrypt(b"b").await;
    assert_eq!(root.counts().decrypt, 0);

    jump(Duration::from_secs(10)).await;
    encrypt(b"c").await;
    assert_eq!(root.counts().decrypt, 1);
    encrypt(b"d").await;
    assert_eq!(root.counts().decrypt, 1);
}

#[tokio::test]
async fn concurrent_first_uses_of_a_subject_make_one_subject_key_across_sidecars() {
    let dir = tempfile::tempdir().unwrap();
    let (one, _, store) = manager(&dir).await;
    // A second manager on the same keystore, as a second sidecar would be.
    let two = KeyManager::new(
        Arc::new(
            LocalRootKey::load_or_create(&dir.path().join("root.key"))
                .unwrap()
                .0,
        ),
        store.clone(),
        limits(),
        KeySettings::default(),
    );
    let id = tenant("acme");
    one.create_tenant(&id, &PlacementRequest::default(), &Default::default())
        .await
        .unwrap();
    let (t1, t2) = (
        one.active_tenant(&id).await.unwrap(),
        two.active_tenant(&id).await.unwrap(),
    );
    let context = Context::new();
    let subject = || SubjectId::parse("subject_id", "alice").unwrap();
    let (a, b) = tokio::join!(
        async {
            one.encrypt(
                &t1,
                Some(&subject()),
                &context,
                b"from one",
                Mode::Randomized,
                0,
            )
            .await
            .unwrap()
        },
        async {
            two.encrypt(
                &t2,
                Some(&subject()),
                &context,
                b"from two",
                Mode::Randomized,
                0,
            )
            .await
            .unwrap()
        },
    );
    // Same subject key id in both headers, and each side opens the other's.
    assert_eq!(a.ciphertext[3..19], b.ciphertext[3..19]);
    assert_eq!(
        &*one
            .decrypt(&t1, &context, &b.ciphertext)
            .await
            .unwrap()
            .plaintext,
        b"from two"
    );
    assert_eq!(
        &*two
            .decrypt(&t2, &context, &a.ciphertext)
            .await
            .unwrap()
            .plaintext,
        b"from one"
    );
    let shred = one.shred_tenant(&id).await.unwrap();
    assert_eq!(shred.shred.destroyed_subject_keys, 1);
}

#[tokio::test]
async fn concurrent_rotations_make_consecutive_versions() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, _, store) = manager(&dir).await;
    let id = tenant("acme");
    keys.create_tenant(&id, &PlacementRequest::default(), &Default::default())
        .await
        .unwrap();
    let keys = Arc::new(keys);
    let rotations: Vec<_> = (0..4)
        .map(|_| {
            let keys = keys.clone();
            let id = id.clone();
            tokio::spawn(async move { keys.rotate(&id).await.map(|info| info.versions.len()) })
        })
        .collect();
    for r in rotations {
        r.await.unwrap().unwrap();
    }
    let versions: Vec<u32> = store
        .tenant_keys(&id)
        .await
        .unwrap()
        .iter()
        .map(|k| k.version)
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn debug_of_every_secret_bearing_type_shows_no_secret_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, _, store) = manager(&dir).await;
    let id = tenant("acme");
    keys.create_tenant(&id, &PlacementRequest::default(), &Default::default())
        .await
        .unwrap();
    let t = keys.active_tenant(&id).await.unwrap();
    let plaintext = b"CANARY-PLAINTEXT-0123456789";
    let subject = SubjectId::parse("subject_id", "subject-canary@example.com").unwrap();
    let sealed = keys
        .encrypt(
            &t,
            Some(&subject),
            &Context::new(),
            plaintext,
            Mode::Randomized,
            0,
        )
        .await
        .unwrap();
    let opened = keys
        .decrypt(&t, &Context::new(), &sealed.ciphertext)
        .await
        .unwrap();
    let rewrapped = keys
        .rewrap(&t, &Context::new(), &sealed.ciphertext)
        .await
        .unwrap();
    let other_root = LocalRootKey::from_key(&Key256::generate().unwrap());
    let generated = other_root
        .generate_data_key(
            other_root.id(),
            WrapContext {
                tenant: &id,
                purpose: Purpose::TenantKey { version: 9 },
            },
        )
        .await
        .unwrap();
    let subject_id = keys.subject_key_id(&t, &subject).await.unwrap();
    let SubjectLookup::Key(record) = store.subject_key(&id, subject_id).await.unwrap() else {
        panic!("the subject key exists");
    };
    let key_bytes = *generated.key.expose();
    let deriver = EnvelopeKey::new(Provider::AwsLc, &generated.key);
    // What the tenant cache holds: the policy and the primary key.
    let cached = CachedTenant {
        policy: CallPolicy::from(&TenantPolicy::default()),
        state: CachedState::Active(SealingKey {
            key: EnvelopeKey::new(Provider::RustCrypto, &generated.key),
            tenant_version: 9,
        }),
    };

    let printed = format!(
        "{sealed:?} {opened:?} {rewrapped:?} {generated:?} {record:?} {subject:?} {deriver:?} {t:?} {cached:?} {:?} {:?}",
        keys.tenant_info(&id).await.unwrap(),
        envelope::parse(&sealed.ciphertext).unwrap(),
    );
    let needles: Vec<Vec<u8>> = vec![
        plaintext.to_vec(),
        b"subject-canary".to_vec(),
        hex::encode(key_bytes).into_bytes(),
        hex::encode_upper(key_bytes).into_bytes(),
        format!("{:?}", &key_bytes[..4])
            .trim_end_matches(']')
            .as_bytes()
            .to_vec(),
        hex::encode(&sealed.ciphertext[19..30]).into_bytes(),
        format!("{:?}", &sealed.ciphertext[19..23])
            .trim_end_matches(']')
            .as_bytes()
            .to_vec(),
        format!("{:?}", &generated.wrapped.ciphertext[..4])
            .trim_end_matches(']')
            .as_bytes()
            .to_vec(),
        format!("{:?}", &record.wrapped[19..23])
            .trim_end_matches(']')
            .as_bytes()
            .to_vec(),
        format!("{:?}", &plaintext[..4])
            .trim_end_matches(']')
            .as_bytes()
            .to_vec(),
    ];
    for needle in &needles {
        assert!(
            !printed
                .as_bytes()
                .windows(needle.len())
                .any(|w| w == needle.as_slice()),
            "Debug output contains {:?}:\n{printed}",
            String::from_utf8_lossy(needle)
        );
    }
    assert!(printed.contains("[REDACTED]"));
}

#[test]
fn a_cached_tenant_stays_small() {
    // One of these per cached tenant (BENCHMARKS.md, "Start-up and memory"):
    // the policy a call checks, the unwrapped primary key, load and use times.
    let size = std::mem::size_of::<cache::Held<CachedTenant>>();
    println!("Held<CachedTenant>: {size} bytes");
    assert!(size <= 104, "{size} bytes");
}

/// A forged subject key reference costs one keystore read, then none for a
/// cache lifetime (the review at df0a846: a batch of forged references cost a
/// read each, every time).
#[tokio::test]
async fn a_forged_subject_reference_is_looked_up_once_per_cache_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, _, store) = manager(&dir).await;
    let id = tenant("acme");
    keys.create_tenant(&id, &PlacementRequest::default(), &Default::default())
        .await
        .unwrap();
    let active = keys.active_tenant(&id).await.unwrap();
    let forged_id = SubjectKeyId([0x42; 16]);
    let forged = envelope::seal(
        &EnvelopeKey::new(Provider::RustCrypto, &Key256::from_slice(&[9; 32]).unwrap()),
        KeyRef::Subject {
            id: forged_id.0,
            version: SUBJECT_KEY_VERSION,
        },
        "acme",
        &Context::new(),
        b"x",
    )
    .unwrap();
    assert!(matches!(
        keys.decrypt(&active, &Context::new(), &forged).await,
        Err(Error::Undecryptable)
    ));
    // The keystore gains a row for that id behind the cache's back (a
    // garbage one: reading it would fail as corrupt, INTERNAL).
    store
        .insert_subject_key(
            &id,
            forged_id,
            SubjectKeyRecord {
                wrapped: vec![0; 83],
                tenant_version: 1,
            },
            UnixMillis(1),
        )
        .await
        .unwrap();
    // Answered from the cache of absent references: no keystore read.
    for _ in 0..3 {
        assert!(matches!(
            keys.decrypt(&active, &Context::new(), &forged).await,
            Err(Error::Undecryptable)
        ));
    }
    // Once the cache is dropped, the keystore is read again.
    keys.evict_all();
    assert!(matches!(
        keys.decrypt(&active, &Context::new(), &forged).await,
        Err(Error::Internal)
    ));
}
