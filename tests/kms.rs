//! AWS KMS as the root-key provider, against moto's KMS API server: KMS
//! enforces each wrapped key's encryption context; tenants get the root key
//! they ask for (shared per region, dedicated, or their own) and never
//! another region's; a cold tenant costs one Decrypt however many requests
//! arrive at once; and through a proxy that cuts KMS off, cached tenants keep
//! working while the rest answer UNAVAILABLE, and recover without a restart.

mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aws_config::{BehaviorVersion, Region};
use common::{Kms, Options, TestSidecar, moto, proxy::Proxy};
use keywarden::{
    api::pb,
    audit::AuditLog,
    config::CacheConfig,
    ids::TenantId,
    keys::cache::FAILURE_BACKOFF,
    kms::{
        KmsError, Purpose, RootKeyProvider, WrapContext,
        aws::{AwsKms, AwsSettings},
    },
};
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};
use tonic::{Code, Status};

type Crypto = pb::crypto_client::CryptoClient<keywarden::client::Authed>;
type Admin = pb::admin_client::AdminClient<keywarden::client::Authed>;

/// What a call answers when the root-key provider cannot be reached.
const KMS_UNAVAILABLE: &str = "the root-key provider (KMS) is unavailable; retry later";

const OTHER_REGION: &str = "eu-central-1";

// ---- helpers ---------------------------------------------------------------

fn no_context() -> BTreeMap<String, String> {
    BTreeMap::new()
}

async fn create(
    admin: &mut Admin,
    id: &str,
    root_key: &str,
    region: &str,
) -> Result<pb::Tenant, Status> {
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: id.into(),
            root_key: root_key.into(),
            region: region.into(),
            policy: None,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn get(admin: &mut Admin, id: &str) -> Result<pb::Tenant, Status> {
    admin
        .get_tenant(pb::GetTenantRequest {
            tenant_id: id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn rotate(admin: &mut Admin, id: &str) -> Result<pb::Tenant, Status> {
    admin
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant_id: id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn shred(admin: &mut Admin, id: &str) -> pb::ShredTenantResponse {
    admin
        .shred_tenant(pb::ShredTenantRequest {
            tenant_id: id.into(),
            confirm: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn encrypt(
    c: &mut Crypto,
    tenant: &str,
    subject: &str,
    plaintext: &[u8],
) -> Result<pb::EncryptResponse, Status> {
    c.encrypt(pb::EncryptRequest {
        tenant_id: tenant.into(),
        subject_id: subject.into(),
        context: no_context(),
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
) -> Result<pb::DecryptResponse, Status> {
    c.decrypt(pb::DecryptRequest {
        tenant_id: tenant.into(),
        context: no_context(),
        ciphertext: ciphertext.to_vec(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Encrypts `plaintext` for `tenant` and decrypts it again.
async fn assert_round_trip(c: &mut Crypto, tenant: &str, subject: &str, plaintext: &[u8]) {
    let sealed = encrypt(c, tenant, subject, plaintext).await.unwrap();
    let opened = decrypt(c, tenant, &sealed.ciphertext).await.unwrap();
    assert_eq!(opened.plaintext, plaintext, "tenant {tenant}");
    assert_eq!(opened.key_version, sealed.key_version);
}

fn assert_status(result: Result<impl std::fmt::Debug, Status>, code: Code, message_start: &str) {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "message: {}", status.message());
    assert!(
        status.message().starts_with(message_start),
        "message {:?} should start with {message_start:?}",
        status.message()
    );
}

async fn assert_not_found(admin: &mut Admin, id: &str) {
    assert_status(
        get(admin, id).await,
        Code::NotFound,
        &format!("tenant {id} does not exist"),
    );
}

/// Every version's root key, oldest first.
fn version_root_keys(tenant: &pb::Tenant) -> Vec<&str> {
    tenant
        .versions
        .iter()
        .map(|v| v.root_key_id.as_str())
        .collect()
}

fn key_region(arn: &str) -> &str {
    arn.split(':').nth(3).unwrap_or_default()
}

fn now_seconds() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn aws() -> Options {
    Options {
        kms: Kms::Aws,
        ..Options::default()
    }
}

fn tenant_id(id: &str) -> TenantId {
    TenantId::parse("tenant_id", id).unwrap()
}

/// A KMS client for `region` on moto.
async fn client_in(region: &str) -> aws_sdk_kms::Client {
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .credentials_provider(moto::credentials())
        .endpoint_url(&moto::moto().endpoint)
        .load()
        .await;
    aws_sdk_kms::Client::new(&sdk)
}

/// Creates a symmetric KMS key in `region` and answers its ARN.
async fn create_key_in(region: &str, description: &str) -> String {
    client_in(region)
        .await
        .create_key()
        .description(description)
        .send()
        .await
        .unwrap()
        .key_metadata()
        .unwrap()
        .arn()
        .unwrap()
        .to_owned()
}

/// A provider with shared keys in the default region and eu-central-1.
async fn two_region_provider(key_a: &str, key_b: &str) -> Arc<dyn RootKeyProvider> {
    let settings = AwsSettings {
        default_region: moto::REGION.into(),
        shared_keys: vec![
            (moto::REGION.into(), key_a.into()),
            (OTHER_REGION.into(), key_b.into()),
        ],
        endpoint_url: Some(moto::moto().endpoint.clone()),
        attempt_timeout: Duration::from_secs(2),
        max_attempts: 2,
    };
    Arc::new(
        AwsKms::connect(&settings, Some(moto::credentials()))
            .await
            .unwrap(),
    )
}

/// moto's address, for a proxy in front of it.
fn moto_addr() -> SocketAddr {
    moto::moto()
        .endpoint
        .strip_prefix("http://")
        .unwrap()
        .parse()
        .unwrap()
}

/// A sidecar on `dir` whose KMS calls go through `proxy`.
async fn start_through(proxy: &Proxy, dir: &Arc<TempDir>, cache: CacheConfig) -> TestSidecar {
    let provider = common::provider(Kms::Aws, dir.path(), Some(&proxy.endpoint())).await;
    // Sidecars sharing this keystore may run at once; an audit log has one
    // writer, so each gets its own.
    let audit_dir = tempfile::tempdir_in(dir.path()).unwrap().keep();
    let options = Options {
        kms: Kms::Aws,
        cache,
        audit: Some(Arc::new(AuditLog::open(&audit_dir).unwrap())),
        ..Options::default()
    };
    TestSidecar::start_with_root(dir.clone(), options, provider).await
}

/// A sidecar on `dir` with the AWS provider, as a dedicated tenant's
/// lifecycle needs it.
async fn start_for_key_deletion(dir: &Arc<TempDir>) -> TestSidecar {
    let provider = common::provider(Kms::Aws, dir.path(), None).await;
    TestSidecar::start_with_root(dir.clone(), aws(), provider).await
}

// ---- the provider ----------------------------------------------------------

fn context(tenant: &TenantId, purpose: Purpose) -> WrapContext<'_> {
    WrapContext { tenant, purpose }
}

#[tokio::test]
async fn kms_refuses_a_tenant_key_presented_for_another_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let kms = common::provider(Kms::Aws, dir.path(), None).await;
    let root_key = kms.shared_key(None).unwrap();
    let (a, b) = (tenant_id("tenant-a"), tenant_id("tenant-b"));
    let a1 = context(&a, Purpose::TenantKey { version: 1 });

    let generated = kms.generate_data_key(&root_key, a1).await.unwrap();
    assert_eq!(generated.wrapped.root_key_id, root_key);

    for wrong in [
        context(&b, Purpose::TenantKey { version: 1 }),
        context(&a, Purpose::TenantKey { version: 2 }),
        context(&a, Purpose::SubjectIndex),
    ] {
        let refused = kms.decrypt(wrong, &generated.wrapped).await;
        assert!(
            matches!(refused, Err(KmsError::Refused)),
            "{wrong:?}: {refused:?}"
        );
    }
    let key = kms.decrypt(a1, &generated.wrapped).await.unwrap();
    assert_eq!(key.expose(), generated.key.expose());
}

// ---- placement -------------------------------------------------------------

#[tokio::test]
async fn a_dedicated_tenant_gets_its_own_kms_key_and_shredding_schedules_its_deletion() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let first = start_for_key_deletion(&dir).await;
    let shared = first.root.shared_key(None).unwrap();
    let mut admin = first.admin().await;

    let tenant = create(&mut admin, "dedicated-1", "dedicated", "")
        .await
        .unwrap();
    assert_eq!(tenant.tier, pb::TenantTier::Dedicated as i32);
    assert_eq!(tenant.region, "");
    let arn = tenant.root_key_id.clone();
    assert!(arn.starts_with("arn:aws:kms:eu-west-1:"), "{arn}");
    assert_ne!(arn, shared);
    assert_eq!(version_root_keys(&tenant), [arn.as_str()]);
    assert_eq!(
        version_root_keys(&get(&mut admin, "dedicated-1").await.unwrap()),
        [arn.as_str()]
    );
    assert_eq!(first.root.counts().create_key, 1);
    assert_eq!(moto::key_state(&arn).await, "Enabled");
    let tags = moto::client(&moto::moto().endpoint)
        .await
        .list_resource_tags()
        .key_id(&arn)
        .send()
        .await
        .unwrap();
    let tags: Vec<(&str, &str)> = tags
        .tags()
        .iter()
        .map(|t| (t.tag_key(), t.tag_value()))
        .collect();
    assert_eq!(tags, [("keywarden:tenant", "dedicated-1")]);

    let mut c = first.crypto().await;
    assert_round_trip(&mut c, "dedicated-1", "", b"invoice 77").await;
    assert_round_trip(&mut c, "dedicated-1", "alice", b"alice's address").await;
    let sealed = encrypt(&mut c, "dedicated-1", "", b"kept").await.unwrap();
    first.stop().await;

    // A cold sidecar unwraps through the dedicated key itself.
    let sidecar = start_for_key_deletion(&dir).await;
    let (mut admin, mut c) = (sidecar.admin().await, sidecar.crypto().await);
    let opened = decrypt(&mut c, "dedicated-1", &sealed.ciphertext)
        .await
        .unwrap();
    assert_eq!(opened.plaintext, b"kept");
    assert_eq!(sidecar.decrypts(), 1);

    let shredded = shred(&mut admin, "dedicated-1").await;
    assert!(!shredded.already_shredded);
    assert_eq!(shredded.root_key_id, arn);
    let deletion = shredded.root_key_deletion_date.unwrap();
    let in_seven_days = now_seconds() + 7 * 86_400;
    assert!(
        (deletion.seconds - in_seven_days).abs() <= 86_400,
        "deletion at {deletion:?}, expected about {in_seven_days}"
    );
    assert_eq!(moto::key_state(&arn).await, "PendingDeletion");
    assert_eq!(sidecar.root.counts().schedule_key_deletion, 1);

    let described = get(&mut admin, "dedicated-1").await.unwrap();
    assert_eq!(described.state, pb::TenantState::Shredded as i32);
    assert_eq!(described.tier, pb::TenantTier::Dedicated as i32);
    assert_eq!(described.root_key_deletion_date, Some(deletion));
    assert!(described.versions.is_empty());

    let again = shred(&mut admin, "dedicated-1").await;
    assert!(again.already_shredded);
    assert_eq!(again.root_key_id, arn);
    assert_eq!(again.root_key_deletion_date, Some(deletion));
    assert_eq!(sidecar.root.counts().schedule_key_deletion, 1);
}

#[tokio::test]
async fn a_customer_supplied_key_wraps_that_tenant_only() {
    let sidecar = TestSidecar::start_with(aws()).await;
    let shared = sidecar.root.shared_key(None).unwrap();
    let (mut admin, mut c) = (sidecar.admin().await, sidecar.crypto().await);
    let customer = moto::create_key("customer key of tenant customer-1").await;

    let tenant = create(&mut admin, "customer-1", &customer, "")
        .await
        .unwrap();
    assert_eq!(tenant.tier, pb::TenantTier::Customer as i32);
    assert_eq!(tenant.root_key_id, customer);
    assert_eq!(version_root_keys(&tenant), [customer.as_str()]);
    let rotated = rotate(&mut admin, "customer-1").await.unwrap();
    assert_eq!(rotated.primary_version, 2);
    assert_eq!(rotated.tier, pb::TenantTier::Customer as i32);
    assert_eq!(
        version_root_keys(&rotated),
        [customer.as_str(), customer.as_str()]
    );
    assert_round_trip(&mut c, "customer-1", "", b"ledger").await;

    // Named by an alias, the key is recorded by its ARN.
    let alias = "alias/keywarden-test-customer-2";
    let customer_2 = moto::create_key("customer key of tenant customer-2").await;
    moto::client(&moto::moto().endpoint)
        .await
        .create_alias()
        .alias_name(alias)
        .target_key_id(&customer_2)
        .send()
        .await
        .unwrap();
    let tenant = create(&mut admin, "customer-2", alias, "").await.unwrap();
    assert_eq!(tenant.tier, pb::TenantTier::Customer as i32);
    assert_eq!(tenant.root_key_id, customer_2);
    assert_eq!(version_root_keys(&tenant), [customer_2.as_str()]);

    let plain = create(&mut admin, "plain-1", "", "").await.unwrap();
    assert_eq!(plain.tier, pb::TenantTier::Shared as i32);
    assert_eq!(plain.root_key_id, shared);
    assert_eq!(version_root_keys(&plain), [shared.as_str()]);
    let rotated = rotate(&mut admin, "plain-1").await.unwrap();
    assert_eq!(
        version_root_keys(&rotated),
        [shared.as_str(), shared.as_str()]
    );

    assert_status(
        create(&mut admin, "customer-3", "alias/does-not-exist", "").await,
        Code::InvalidArgument,
        "root_key: ",
    );
    assert_not_found(&mut admin, "customer-3").await;
    assert_status(
        create(&mut admin, "customer-4", "", "ap-south-1").await,
        Code::InvalidArgument,
        "region: ",
    );
    assert_not_found(&mut admin, "customer-4").await;
    assert_status(
        create(&mut admin, "customer-5", "dedicated", "ap-south-1").await,
        Code::InvalidArgument,
        "root_key: ",
    );
    assert_not_found(&mut admin, "customer-5").await;
}

#[tokio::test]
async fn a_tenant_pinned_to_a_region_is_wrapped_only_by_that_regions_key() {
    let key_a = moto::create_key("shared root key, eu-west-1").await;
    let key_b = create_key_in(OTHER_REGION, "shared root key, eu-central-1").await;
    assert_eq!(key_region(&key_a), "eu-west-1");
    assert_eq!(key_region(&key_b), OTHER_REGION);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let first = TestSidecar::start_with_root(
        dir.clone(),
        aws(),
        two_region_provider(&key_a, &key_b).await,
    )
    .await;
    let (mut admin, mut c) = (first.admin().await, first.crypto().await);

    let tenant = create(&mut admin, "regional-1", "", OTHER_REGION)
        .await
        .unwrap();
    assert_eq!(tenant.tier, pb::TenantTier::Shared as i32);
    assert_eq!(tenant.region, OTHER_REGION);
    assert_eq!(tenant.root_key_id, key_b);
    assert_eq!(version_root_keys(&tenant), [key_b.as_str()]);
    let v1 = encrypt(&mut c, "regional-1", "", b"v1").await.unwrap();
    let rotated = rotate(&mut admin, "regional-1").await.unwrap();
    assert_eq!(rotated.root_key_id, key_b);
    assert_eq!(
        version_root_keys(&rotated),
        [key_b.as_str(), key_b.as_str()]
    );
    let v2 = encrypt(&mut c, "regional-1", "", b"v2").await.unwrap();
    assert_eq!((v1.key_version, v2.key_version), (1, 2));
    assert_round_trip(&mut c, "regional-1", "bob", b"bob's record").await;

    // A tenant in the default region stays with the default region's key.
    let home = create(&mut admin, "home-1", "", "").await.unwrap();
    assert_eq!(home.root_key_id, key_a);
    assert_eq!(version_root_keys(&home), [key_a.as_str()]);

    // A dedicated key is made in the tenant's region.
    let dedicated = create(&mut admin, "regional-2", "dedicated", OTHER_REGION)
        .await
        .unwrap();
    assert_eq!(dedicated.tier, pb::TenantTier::Dedicated as i32);
    assert_eq!(key_region(&dedicated.root_key_id), OTHER_REGION);
    assert_eq!(
        version_root_keys(&dedicated),
        [dedicated.root_key_id.as_str()]
    );

    // A customer key must live in the tenant's region.
    let west = moto::create_key("customer key in eu-west-1").await;
    assert_status(
        create(&mut admin, "regional-3", &west, OTHER_REGION).await,
        Code::InvalidArgument,
        "root_key: ",
    );
    assert_not_found(&mut admin, "regional-3").await;
    let central = create_key_in(OTHER_REGION, "customer key in eu-central-1").await;
    let customer = create(&mut admin, "regional-4", &central, OTHER_REGION)
        .await
        .unwrap();
    assert_eq!(customer.tier, pb::TenantTier::Customer as i32);
    assert_eq!(version_root_keys(&customer), [central.as_str()]);
    first.stop().await;

    // A cold sidecar unwraps both versions through eu-central-1.
    let sidecar =
        TestSidecar::start_with_root(dir, aws(), two_region_provider(&key_a, &key_b).await).await;
    let mut c = sidecar.crypto().await;
    for (sealed, plaintext) in [(&v1, b"v1"), (&v2, b"v2")] {
        let opened = decrypt(&mut c, "regional-1", &sealed.ciphertext)
            .await
            .unwrap();
        assert_eq!(opened.plaintext, plaintext);
        assert_eq!(opened.key_version, sealed.key_version);
    }
    assert_eq!(sidecar.decrypts(), 2);
}

#[tokio::test]
async fn with_the_local_provider_a_dedicated_key_is_refused() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    assert_status(
        create(&mut admin, "local-1", "dedicated", "").await,
        Code::FailedPrecondition,
        "the local root-key provider has one root key and cannot create a dedicated one",
    );
    assert_not_found(&mut admin, "local-1").await;
    assert_status(
        create(&mut admin, "local-2", "", "eu-west-1").await,
        Code::FailedPrecondition,
        "the local root-key provider has no regions",
    );
    assert_not_found(&mut admin, "local-2").await;
    assert_eq!(sidecar.root.counts().generate_data_key, 0);
}

// ---- load and faults -------------------------------------------------------

#[tokio::test]
async fn a_thousand_concurrent_requests_for_a_cold_tenant_make_one_kms_decrypt() {
    let first = TestSidecar::start_with(aws()).await;
    create(&mut first.admin().await, "cold", "", "")
        .await
        .unwrap();
    let dir = first.dir.clone();
    first.stop().await;

    let sidecar = TestSidecar::start_in(dir, aws()).await;
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(sidecar.channel().await);
    }
    let bearer = sidecar.admin_bearer();
    assert_eq!(sidecar.decrypts(), 0);

    let calls: Vec<_> = (0..1000)
        .map(|i| {
            let mut c =
                keywarden::client::crypto(channels[i % channels.len()].clone(), bearer.clone());
            tokio::spawn(async move {
                encrypt(&mut c, "cold", "", format!("{i}").as_bytes())
                    .await
                    .unwrap()
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().key_version, 1);
    }
    let counts = sidecar.root.counts();
    assert_eq!(counts.decrypt, 1);
    assert_eq!(counts.generate_data_key, 0);
}

/// What moto answers on a fresh connection through `proxy`: the start of an
/// HTTP response, or nothing if the connection is closed.
async fn http_through(proxy: &Proxy) -> String {
    let mut stream = TcpStream::connect(proxy.endpoint().strip_prefix("http://").unwrap())
        .await
        .unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    // Writing may fail on a connection the proxy has already dropped.
    let _ = stream.write_all(request).await;
    let mut answer = [0u8; 9];
    let read = timeout(Duration::from_secs(5), read_some(&mut stream, &mut answer))
        .await
        .expect("the proxy answers or closes within 5 s");
    String::from_utf8_lossy(&answer[..read]).into_owned()
}

/// Reads until `buf` is full or the peer closes (a reset counts as closed).
async fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
    }
    filled
}

#[tokio::test]
async fn the_proxy_forwards_until_set_down_and_then_cuts_every_connection() {
    let proxy = Proxy::start(moto_addr()).await;
    assert_eq!(http_through(&proxy).await, "HTTP/1.1 ");

    // A connection open (and idle) when the proxy goes down is closed.
    let mut open = TcpStream::connect(proxy.endpoint().strip_prefix("http://").unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.set_down(true);
    let mut buf = [0u8; 1];
    let read = timeout(Duration::from_secs(5), read_some(&mut open, &mut buf))
        .await
        .expect("the open connection is closed at once");
    assert_eq!(read, 0);
    // New connections are accepted and dropped.
    assert_eq!(http_through(&proxy).await, "");

    proxy.set_down(false);
    assert_eq!(http_through(&proxy).await, "HTTP/1.1 ");
}

#[tokio::test]
async fn while_kms_is_down_cached_tenants_keep_working_and_others_get_unavailable() {
    let proxy = Proxy::start(moto_addr()).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let first = start_through(&proxy, &dir, CacheConfig::default()).await;
    let mut admin = first.admin().await;
    for id in ["warm", "cold"] {
        create(&mut admin, id, "", "").await.unwrap();
    }
    first.stop().await;

    let sidecar = start_through(&proxy, &dir, CacheConfig::default()).await;
    let (mut admin, mut c) = (sidecar.admin().await, sidecar.crypto().await);
    assert_round_trip(&mut c, "warm", "", b"warming up").await;
    assert_round_trip(&mut c, "warm", "alice", b"warming up").await;
    let before = sidecar.root.counts();

    proxy.set_down(true);
    for subject in ["", "alice"] {
        let sealed = encrypt(&mut c, "warm", subject, b"during the outage")
            .await
            .unwrap();
        assert_eq!(sealed.key_version, 1);
        let opened = decrypt(&mut c, "warm", &sealed.ciphertext).await.unwrap();
        assert_eq!(opened.plaintext, b"during the outage");
    }
    assert_eq!(sidecar.root.counts(), before, "served from the cache");

    let cold = encrypt(&mut c, "cold", "", b"no key yet").await;
    let status = cold.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unavailable, KMS_UNAVAILABLE)
    );

    let created = create(&mut admin, "created-in-outage", "", "").await;
    assert_status(created, Code::Unavailable, KMS_UNAVAILABLE);
    assert_not_found(&mut admin, "created-in-outage").await;

    assert_status(
        rotate(&mut admin, "warm").await,
        Code::Unavailable,
        KMS_UNAVAILABLE,
    );
    let warm = get(&mut admin, "warm").await.unwrap();
    assert_eq!(warm.primary_version, 1);
    assert_eq!(warm.versions.len(), 1);

    proxy.set_down(false);
    // The last failure stands for the requests of one backoff; after it, KMS
    // is asked again, and answers.
    tokio::time::sleep(FAILURE_BACKOFF).await;
    let sealed = encrypt(&mut c, "cold", "", b"after the outage")
        .await
        .unwrap();
    let opened = decrypt(&mut c, "cold", &sealed.ciphertext).await.unwrap();
    assert_eq!(opened.plaintext, b"after the outage");
    assert_eq!(rotate(&mut admin, "warm").await.unwrap().primary_version, 2);
}

#[tokio::test]
async fn stale_if_error_serves_an_expired_key_through_an_outage_and_no_longer() {
    let proxy = Proxy::start(moto_addr()).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let first = start_through(&proxy, &dir, CacheConfig::default()).await;
    create(&mut first.admin().await, "warm", "", "")
        .await
        .unwrap();
    first.stop().await;

    let cache = |stale_if_error_seconds| CacheConfig {
        ttl_seconds: 1,
        stale_if_error_seconds,
        ..CacheConfig::default()
    };
    let stale = start_through(&proxy, &dir, cache(30)).await;
    let strict = start_through(&proxy, &dir, cache(0)).await;
    let (mut stale_c, mut strict_c) = (stale.crypto().await, strict.crypto().await);
    // Both cache the tenant key.
    let sealed = encrypt(&mut stale_c, "warm", "", b"before").await.unwrap();
    encrypt(&mut strict_c, "warm", "", b"before").await.unwrap();

    proxy.set_down(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Past the TTL: the reload fails, and the grace serves the expired key.
    let served = encrypt(&mut stale_c, "warm", "", b"stale").await.unwrap();
    assert_eq!(served.key_version, 1);
    let opened = decrypt(&mut stale_c, "warm", &sealed.ciphertext)
        .await
        .unwrap();
    assert_eq!(opened.plaintext, b"before");
    // The first Decrypt, then one failed reload: the second request, within
    // the failure backoff, is served stale without a KMS call of its own.
    assert_eq!(stale.decrypts(), 2);

    // Without a grace, the expired key is not served.
    assert_status(
        encrypt(&mut strict_c, "warm", "", b"strict").await,
        Code::Unavailable,
        KMS_UNAVAILABLE,
    );
}
