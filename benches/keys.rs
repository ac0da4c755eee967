//! Key resolution from a warm cache: what a data-plane call pays to find its
//! tenant and key before sealing, on a real key manager (local root key,
//! SQLite keystore in a temporary directory) whose caches hold the keys.
//!
//! Each iteration runs one future to completion on a current-thread tokio
//! runtime; `block_on_ready` is that harness's own cost, to subtract.
//!
//! `cargo bench --bench keys`

use std::{hint::black_box, sync::Arc};

use criterion::{Criterion, criterion_group, criterion_main};
use keywarden::{
    config::CacheConfig,
    ids::{SubjectId, TenantId},
    keys::{KeyManager, KeySettings, PlacementRequest},
    kms::local::LocalRootKey,
    store::{Event, TenantPolicy, sqlite::SqliteKeystore},
};

fn resolution(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = rt.block_on(async {
        let root = LocalRootKey::load_or_create(&dir.path().join("root.key"))
            .unwrap()
            .0;
        let store = SqliteKeystore::open(&dir.path().join("keystore.sqlite"))
            .await
            .unwrap();
        KeyManager::new(
            Arc::new(root),
            Arc::new(store),
            CacheConfig::default().limits(),
            KeySettings::default(),
        )
    });
    let id = TenantId::parse("tenant_id", "acme").unwrap();
    let subject = SubjectId::parse("subject_id", "user-8812").unwrap();
    let tenant = rt.block_on(async {
        keys.create_tenant(&id, &PlacementRequest::default(), &TenantPolicy::default())
            .await
            .unwrap();
        let tenant = keys.active_tenant(&id).await.unwrap();
        // Warm: the subject key exists and every key is cached.
        keys.encryption_key(&tenant, Some(&subject)).await.unwrap();
        tenant
    });

    let mut group = c.benchmark_group("resolve");
    group.bench_function("block_on_ready", |b| {
        b.iter(|| rt.block_on(async { black_box(1) }))
    });
    group.bench_function("active_tenant", |b| {
        b.iter(|| rt.block_on(keys.active_tenant(black_box(&id))).unwrap())
    });
    group.bench_function("tenant_primary_key", |b| {
        b.iter(|| {
            rt.block_on(keys.encryption_key(black_box(&tenant), None))
                .unwrap()
        })
    });
    // A miss: the tenant evicted (as an event from another sidecar does),
    // then resolved again: one keystore read, one unwrap by the local root
    // key, one cache insert. `evict` alone is the part to subtract.
    let event = Event::Tenant(id.clone());
    group.bench_function("evict", |b| {
        b.iter(|| rt.block_on(keys.apply_event(black_box(&event))))
    });
    group.bench_function("evict_and_active_tenant_miss", |b| {
        b.iter(|| {
            rt.block_on(async {
                keys.apply_event(black_box(&event)).await;
                keys.active_tenant(black_box(&id)).await.unwrap()
            })
        })
    });
    group.bench_function("subject_key", |b| {
        b.iter(|| {
            rt.block_on(keys.encryption_key(black_box(&tenant), Some(&subject)))
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, resolution);
criterion_main!(benches);
