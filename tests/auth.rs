//! Who may ask for what, over real gRPC: JWTs (HS256, RS256, ES256 from a
//! JWKS file that is reloaded), client certificates over mutual TLS, static
//! tokens, the default policy, and the audit records of refusals.

mod common;

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use common::{Options, TestSidecar, pki::Pki};
use keywarden::{
    api::pb,
    client::{self, Authed, Bearer, ClientTls},
    config::{AuthConfig, ClientAuth, JwtConfig, TlsConfig},
};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256, PublicKeyData};
use secrecy::SecretString;
use serde_json::json;
use tonic::Code;

type Crypto = pb::crypto_client::CryptoClient<Authed>;

const ISSUER: &str = "https://idp.test/";
const AUDIENCE: &str = "keywarden";

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The signing keys of a test identity provider, and its JWKS.
struct Idp {
    hmac: Vec<u8>,
    ec: KeyPair,
    rsa: KeyPair,
}

impl Idp {
    fn new() -> Self {
        let mut hmac = vec![0u8; 32];
        getrandom::fill(&mut hmac).unwrap();
        Self {
            hmac,
            ec: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
            rsa: KeyPair::generate_for(&PKCS_RSA_SHA256).unwrap(),
        }
    }

    fn jwks(&self, ec_kid: &str) -> serde_json::Value {
        let point = self.ec.public_key_raw();
        assert_eq!(point.len(), 65);
        let spki = self.rsa.subject_public_key_info();
        let (_, info) =
            <x509_parser::x509::SubjectPublicKeyInfo as x509_parser::prelude::FromDer<_>>::from_der(
                &spki,
            )
            .unwrap();
        let x509_parser::public_key::PublicKey::RSA(rsa) = info.parsed().unwrap() else {
            panic!("not an RSA key")
        };
        let strip = |b: &[u8]| {
            b.iter()
                .skip_while(|x| **x == 0)
                .copied()
                .collect::<Vec<_>>()
        };
        json!({"keys": [
            {"kty": "oct", "kid": "hs", "alg": "HS256", "k": b64(&self.hmac)},
            {"kty": "EC", "kid": ec_kid, "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..])},
            {"kty": "RSA", "kid": "rs", "n": b64(&strip(rsa.modulus)), "e": b64(&strip(rsa.exponent))},
        ]})
    }

    fn sign(&self, alg: &str, kid: &str, claims: &serde_json::Value) -> String {
        let header = json!({"alg": alg, "typ": "JWT", "kid": kid});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = match alg {
            "HS256" => {
                let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.hmac);
                aws_lc_rs::hmac::sign(&key, input.as_bytes())
                    .as_ref()
                    .to_vec()
            }
            "ES256" => {
                let key = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
                    &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    &self.ec.serialize_der(),
                )
                .unwrap();
                key.sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes())
                    .unwrap()
                    .as_ref()
                    .to_vec()
            }
            "RS256" => {
                let key = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&self.rsa.serialize_der())
                    .unwrap();
                let mut signature = vec![0; key.public_modulus_len()];
                key.sign(
                    &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                    &aws_lc_rs::rand::SystemRandom::new(),
                    input.as_bytes(),
                    &mut signature,
                )
                .unwrap();
                signature
            }
            other => panic!("{other}"),
        };
        format!("{input}.{}", b64(&signature))
    }
}

fn claims(sub: &str, tenants: Option<&[&str]>) -> serde_json::Value {
    let mut c = json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": sub,
        "iat": now(), "exp": now() + 600,
    });
    if let Some(t) = tenants {
        c["tenants"] = json!(t);
    }
    c
}

fn bearer(token: &str) -> Bearer {
    Bearer::new(Some(&SecretString::from(token.to_owned()))).unwrap()
}

async fn crypto_as(sidecar: &TestSidecar, token: &str) -> Crypto {
    client::crypto(sidecar.channel().await, bearer(token))
}

async fn encrypt(c: &mut Crypto, tenant: &str) -> Result<Vec<u8>, tonic::Status> {
    c.encrypt(pb::EncryptRequest {
        tenant_id: tenant.into(),
        subject_id: String::new(),
        context: BTreeMap::new(),
        plaintext: b"hello".to_vec(),
        deterministic: false,
        key_version: 0,
    })
    .await
    .map(|r| r.into_inner().ciphertext)
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

async fn rewrap(c: &mut Crypto, tenant: &str, ciphertext: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    c.rewrap(pb::RewrapRequest {
        tenant_id: tenant.into(),
        context: BTreeMap::new(),
        ciphertext: ciphertext.to_vec(),
    })
    .await
    .map(|r| r.into_inner().ciphertext)
}

fn assert_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the call should be refused");
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(needle),
        "{:?} should contain {needle:?}",
        status.message()
    );
}

async fn create_tenants(sidecar: &TestSidecar, ids: &[&str]) {
    let mut admin = sidecar.admin().await;
    for id in ids {
        admin
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: (*id).into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn audit_lines_in(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A sidecar accepting JWTs from `idp`, with a policy that lets any JWT
/// bearer use the data plane for the tenants its token names.
async fn jwt_sidecar(files: &Path, idp: &Idp) -> TestSidecar {
    let jwks = write(files, "jwks.json", &idp.jwks("ec").to_string());
    let policy = write(
        files,
        "policy.toml",
        r#"
        [[grant]]
        identity = "token:admin"
        allow = ["admin", "data"]
        tenants = ["*"]

        [[grant]]
        identity = "jwt:*"
        allow = ["data"]
        tenants = ["*"]
        tenants_from_token = true
        "#,
    );
    TestSidecar::start_with(Options {
        auth: AuthConfig {
            policy_file: Some(policy),
            jwt: Some(JwtConfig {
                jwks_file: jwks,
                issuer: ISSUER.into(),
                audience: AUDIENCE.into(),
                tenants_claim: "tenants".into(),
                leeway_seconds: 5,
                reload_seconds: 1,
            }),
            ..AuthConfig::default()
        },
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn a_jwt_for_tenant_a_cannot_touch_tenant_b() {
    let files = tempfile::tempdir().unwrap();
    let idp = Idp::new();
    let sidecar = jwt_sidecar(files.path(), &idp).await;
    create_tenants(&sidecar, &["acme", "globex"]).await;
    let globex_ciphertext = encrypt(&mut sidecar.crypto().await, "globex")
        .await
        .unwrap();

    for (alg, kid) in [("HS256", "hs"), ("ES256", "ec"), ("RS256", "rs")] {
        let token = idp.sign(alg, kid, &claims("alice", Some(&["acme"])));
        let mut alice = crypto_as(&sidecar, &token).await;
        let mine = encrypt(&mut alice, "acme")
            .await
            .unwrap_or_else(|e| panic!("{alg}: {e:?}"));
        assert_eq!(decrypt(&mut alice, "acme", &mine).await.unwrap(), b"hello");
        rewrap(&mut alice, "acme", &mine).await.unwrap();

        let denied = "jwt:alice may not";
        assert_code(
            encrypt(&mut alice, "globex").await,
            Code::PermissionDenied,
            denied,
        );
        assert_code(
            decrypt(&mut alice, "globex", &globex_ciphertext).await,
            Code::PermissionDenied,
            denied,
        );
        assert_code(
            rewrap(&mut alice, "globex", &globex_ciphertext).await,
            Code::PermissionDenied,
            denied,
        );
        // A data-plane identity calling Admin.
        let mut admin = client::admin(sidecar.channel().await, bearer(&token));
        assert_code(
            admin
                .get_tenant(pb::GetTenantRequest {
                    tenant_id: "acme".into(),
                })
                .await,
            Code::PermissionDenied,
            "jwt:alice may not admin:read for any tenant",
        );
        assert_code(
            admin
                .shred_tenant(pb::ShredTenantRequest {
                    tenant_id: "acme".into(),
                    confirm: "acme".into(),
                })
                .await,
            Code::PermissionDenied,
            "may not admin:shred",
        );
    }
    // The policy binds JWT bearers to the tenants their token names: a token
    // naming none gets none.
    let unbound = idp.sign("ES256", "ec", &claims("bob", None));
    assert_code(
        encrypt(&mut crypto_as(&sidecar, &unbound).await, "acme").await,
        Code::PermissionDenied,
        "jwt:bob may not encrypt for any tenant",
    );

    // Every refusal is counted in the audit log, with the caller and, when
    // the body was read (refusals at the edge come before it), the tenant.
    sidecar.flush_audit_counts().await;
    let refused: Vec<_> = audit_lines_in(sidecar.dir.path())
        .into_iter()
        .filter(|r| r["phase"] == "refused")
        .collect();
    let counted: Vec<_> = refused
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap(),
                r["caller"].as_str().unwrap(),
                r.get("tenant").map(|t| t.as_str().unwrap()),
                r["outcome"].as_str().unwrap(),
                r["detail"].as_str().unwrap(),
            )
        })
        .collect();
    let denied = "PERMISSION_DENIED";
    assert_eq!(
        counted,
        [
            // Refused on their headers: alice has no admin grant, bob's
            // token names no tenant.
            ("GetTenant", "jwt:alice", None, denied, "3 calls"),
            ("ShredTenant", "jwt:alice", None, denied, "3 calls"),
            ("Encrypt", "jwt:bob", None, denied, "1 calls"),
            // Refused for the tenant the body named.
            ("Decrypt", "jwt:alice", Some("globex"), denied, "3 calls"),
            ("Encrypt", "jwt:alice", Some("globex"), denied, "3 calls"),
            ("Rewrap", "jwt:alice", Some("globex"), denied, "3 calls"),
        ]
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn expired_forged_and_misaddressed_jwts_are_unauthenticated() {
    let files = tempfile::tempdir().unwrap();
    let idp = Idp::new();
    let sidecar = jwt_sidecar(files.path(), &idp).await;
    create_tenants(&sidecar, &["acme"]).await;
    let other = Idp::new();
    let mut expired = claims("alice", Some(&["acme"]));
    expired["exp"] = json!(now() - 60);
    let mut wrong_audience = claims("alice", Some(&["acme"]));
    wrong_audience["aud"] = json!("someone-else");
    let mut wrong_issuer = claims("alice", Some(&["acme"]));
    wrong_issuer["iss"] = json!("https://evil.test/");
    let mut not_yet = claims("alice", Some(&["acme"]));
    not_yet["nbf"] = json!(now() + 3600);
    let good = claims("alice", Some(&["acme"]));
    let valid = idp.sign("ES256", "ec", &good);
    let (head, rest) = valid.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let altered_claims = format!(
        "{head}.{}.{signature}",
        b64(claims("alice", Some(&["acme", "globex"]))
            .to_string()
            .as_bytes())
    );
    let none_alg = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(good.to_string().as_bytes())
    );
    // HS256 "signed" with the RSA key's public modulus would be algorithm
    // confusion; the key id names an RSA key, so it must not verify.
    let confused = {
        let header = json!({"alg": "HS256", "kid": "rs"});
        format!(
            "{}.{}.{}",
            b64(header.to_string().as_bytes()),
            b64(good.to_string().as_bytes()),
            b64(&[0u8; 32])
        )
    };
    for (what, token, needle) in [
        ("expired", idp.sign("ES256", "ec", &expired), "expired"),
        (
            "wrong audience",
            idp.sign("ES256", "ec", &wrong_audience),
            "audience",
        ),
        (
            "wrong issuer",
            idp.sign("ES256", "ec", &wrong_issuer),
            "issuer",
        ),
        (
            "not yet valid",
            idp.sign("ES256", "ec", &not_yet),
            "not valid yet",
        ),
        ("another key", other.sign("ES256", "ec", &good), "signature"),
        (
            "another HMAC secret",
            other.sign("HS256", "hs", &good),
            "signature",
        ),
        ("altered claims", altered_claims, "signature"),
        ("alg none", none_alg, "algorithm"),
        ("algorithm confusion", confused, "no key"),
        ("unknown kid", idp.sign("ES256", "nope", &good), "no key"),
        ("garbage", "not.a.jwt".to_owned(), "malformed"),
        (
            "unknown static token",
            "kwt_nope".to_owned(),
            "not a known API token",
        ),
    ] {
        let result = encrypt(&mut crypto_as(&sidecar, &token).await, "acme").await;
        let status = result.expect_err(what);
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "{what}: {}",
            status.message()
        );
        assert!(
            status.message().contains(needle),
            "{what}: {}",
            status.message()
        );
        assert!(
            !status.message().contains(&token),
            "{what}: the token is echoed"
        );
    }
    sidecar.stop().await;
}

#[tokio::test]
async fn a_changed_jwks_file_is_picked_up_without_a_restart() {
    let files = tempfile::tempdir().unwrap();
    let idp = Idp::new();
    let sidecar = jwt_sidecar(files.path(), &idp).await;
    create_tenants(&sidecar, &["acme"]).await;
    let token = idp.sign("ES256", "ec-2", &claims("alice", Some(&["acme"])));
    assert_code(
        encrypt(&mut crypto_as(&sidecar, &token).await, "acme").await,
        Code::Unauthenticated,
        "no key",
    );
    // The identity provider rotates its key: the new JWKS names it ec-2.
    std::fs::write(files.path().join("jwks.json"), idp.jwks("ec-2").to_string()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match encrypt(&mut crypto_as(&sidecar, &token).await, "acme").await {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(e.code(), Code::Unauthenticated);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the new key was not picked up: {e:?}"),
        }
    }
    sidecar.stop().await;
}

#[tokio::test]
async fn client_certificates_name_callers_over_mutual_tls() {
    let files = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (server_cert, server_key) = pki.issue(&["127.0.0.1"]);
    let ca_file = write(files.path(), "ca.pem", &pki.ca_pem);
    let policy = write(
        files.path(),
        "policy.toml",
        r#"
        [[grant]]
        identity = "token:admin"
        allow = ["admin", "data"]
        tenants = ["*"]

        [[grant]]
        identity = "spiffe://test.example/ns/billing/*"
        allow = ["data"]
        tenants = ["acme"]
        "#,
    );
    let sidecar = TestSidecar::start_with(Options {
        auth: AuthConfig {
            policy_file: Some(policy),
            ..AuthConfig::default()
        },
        tls: Some(TlsConfig {
            cert_file: write(files.path(), "server.pem", &server_cert),
            key_file: write(files.path(), "server.key", &server_key),
            client_ca_file: Some(ca_file),
            client_auth: ClientAuth::Optional,
        }),
        ..Options::default()
    })
    .await;
    let tls = |identity: Option<(String, String)>| ClientTls {
        ca: pki.ca_pem.clone().into_bytes(),
        identity: identity.map(|(c, k)| (c.into_bytes(), SecretString::from(k))),
        domain: None,
    };
    // The admin token over TLS without a client certificate.
    let admin_channel = client::connect(&sidecar.addr, Some(&tls(None)))
        .await
        .unwrap();
    let mut admin = client::admin(admin_channel.clone(), sidecar.admin_bearer());
    for id in ["acme", "globex"] {
        admin
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let globex = encrypt(
        &mut client::crypto(admin_channel, sidecar.admin_bearer()),
        "globex",
    )
    .await
    .unwrap();

    let billing = pki.issue(&["spiffe://test.example/ns/billing/sa/api"]);
    let channel = client::connect(&sidecar.addr, Some(&tls(Some(billing))))
        .await
        .unwrap();
    let mut app = client::crypto(channel.clone(), Bearer::default());
    let mine = encrypt(&mut app, "acme").await.unwrap();
    assert_eq!(decrypt(&mut app, "acme", &mine).await.unwrap(), b"hello");
    let denied = "spiffe://test.example/ns/billing/sa/api may not";
    assert_code(
        encrypt(&mut app, "globex").await,
        Code::PermissionDenied,
        denied,
    );
    assert_code(
        decrypt(&mut app, "globex", &globex).await,
        Code::PermissionDenied,
        denied,
    );
    assert_code(
        rewrap(&mut app, "globex", &globex).await,
        Code::PermissionDenied,
        denied,
    );
    assert_code(
        client::admin(channel, Bearer::default())
            .list_tenants(pb::ListTenantsRequest::default())
            .await,
        Code::PermissionDenied,
        "may not admin:read across all tenants",
    );

    // Another workload's certificate gets nothing.
    let other = pki.issue(&["spiffe://test.example/ns/marketing/sa/web"]);
    let channel = client::connect(&sidecar.addr, Some(&tls(Some(other))))
        .await
        .unwrap();
    assert_code(
        encrypt(&mut client::crypto(channel, Bearer::default()), "acme").await,
        Code::PermissionDenied,
        "spiffe://test.example/ns/marketing/sa/web may not encrypt",
    );
    // A certificate from another CA does not get through the handshake.
    let stranger = Pki::new().issue(&["spiffe://test.example/ns/billing/sa/api"]);
    match client::connect(&sidecar.addr, Some(&tls(Some(stranger)))).await {
        Err(_) => {}
        Ok(channel) => {
            let status = encrypt(&mut client::crypto(channel, Bearer::default()), "acme")
                .await
                .expect_err("a certificate from another CA must not be accepted");
            assert_ne!(status.code(), Code::Ok);
            assert_ne!(status.code(), Code::PermissionDenied, "{status:?}");
        }
    }
    // Without TLS, the TLS listener does not answer gRPC.
    let plain = client::connect(&sidecar.addr, None).await;
    if let Ok(channel) = plain {
        encrypt(&mut client::crypto(channel, sidecar.admin_bearer()), "acme")
            .await
            .expect_err("plaintext to a TLS listener");
    }
    sidecar.stop().await;
}

#[tokio::test]
async fn static_tokens_and_the_default_policy() {
    let files = tempfile::tempdir().unwrap();
    let token = keywarden::auth::tokens::generate();
    let tokens = write(
        files.path(),
        "tokens.toml",
        &format!(
            "[[token]]\nname = \"billing\"\nsha256 = \"{}\"\n",
            hex::encode(keywarden::auth::tokens::hash(
                secrecy::ExposeSecret::expose_secret(&token)
            ))
        ),
    );
    let policy = write(
        files.path(),
        "policy.toml",
        "[[grant]]\nidentity = \"token:billing\"\nallow = [\"data\"]\ntenants = [\"acme\"]\n\
         [[grant]]\nidentity = \"token:admin\"\nallow = [\"admin\"]\ntenants = [\"*\"]\n",
    );
    let sidecar = TestSidecar::start_with(Options {
        auth: AuthConfig {
            tokens_file: Some(tokens),
            policy_file: Some(policy),
            ..AuthConfig::default()
        },
        ..Options::default()
    })
    .await;
    create_tenants(&sidecar, &["acme", "globex"]).await;
    let mut billing = crypto_as(&sidecar, secrecy::ExposeSecret::expose_secret(&token)).await;
    encrypt(&mut billing, "acme").await.unwrap();
    assert_code(
        encrypt(&mut billing, "globex").await,
        Code::PermissionDenied,
        "token:billing may not encrypt for tenant globex",
    );
    // This policy gives the admin token the control plane only.
    assert_code(
        encrypt(&mut sidecar.crypto().await, "acme").await,
        Code::PermissionDenied,
        "token:admin may not encrypt",
    );
    sidecar.stop().await;

    // The default policy: loopback TCP without a credential gets nothing.
    let default = TestSidecar::start().await;
    create_tenants(&default, &["acme"]).await;
    let mut anonymous = client::crypto(default.channel().await, Bearer::default());
    assert_code(
        encrypt(&mut anonymous, "acme").await,
        Code::PermissionDenied,
        "anonymous may not encrypt for any tenant",
    );
    let mut anonymous_admin = client::admin(default.channel().await, Bearer::default());
    assert_code(
        anonymous_admin
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: "evil".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "anonymous may not admin:create",
    );
    default.stop().await;
}

// ---------------------------------------------------------------------------
// TLS settings that would look like client authentication without enforcing
// it (issue 14, finding 8), against the real binary.

#[test]
fn client_auth_without_a_client_ca_stops_the_start_with_exit_78() {
    let files = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (cert, key) = pki.issue(&["127.0.0.1"]);
    let cert = write(files.path(), "server.pem", &cert);
    let key = write(files.path(), "server.key", &key);
    let data = files.path().join("data");
    let config = write(
        files.path(),
        "keywarden.toml",
        &format!(
            "listen = [\"127.0.0.1:7498\"]\n[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n\
             client_auth = \"required\"\n"
        ),
    );
    let mut command = common::process::keywarden();
    command
        .args(["serve", "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(&config);
    let (code, stderr) = common::process::exit_and_stderr(command);
    assert_eq!(code, 78, "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "keywarden: invalid configuration: tls.client_auth: is \"required\" but \
         tls.client_ca_file is not set, so no client certificate could be checked: set \
         tls.client_ca_file (or KEYWARDEN_TLS_CLIENT_CA_FILE) to the CA that signs client \
         certificates, or remove tls.client_auth for TLS without client certificates"
    );
    assert!(
        !data.exists(),
        "a refused configuration created the data dir"
    );

    // The same through the environment alone.
    let mut command = common::process::keywarden();
    command
        .env("KEYWARDEN_TLS_CERT_FILE", &cert)
        .env("KEYWARDEN_TLS_KEY_FILE", &key)
        .env("KEYWARDEN_TLS_CLIENT_AUTH", "optional")
        .args(["serve", "--listen", "127.0.0.1:7498", "--data-dir"])
        .arg(&data);
    let (code, stderr) = common::process::exit_and_stderr(command);
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.starts_with(
            "keywarden: invalid configuration: tls.client_auth: is \"optional\" but tls.client_ca_file is not set"
        ),
        "{stderr}"
    );
    assert!(
        !data.exists(),
        "a refused configuration created the data dir"
    );
}

#[tokio::test]
async fn a_certificate_from_the_environment_keeps_the_files_client_ca() {
    let files = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (cert, key) = pki.issue(&["127.0.0.1"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let socket = files.path().join("kw.sock");
    let data = files.path().join("data");
    // The file names the client CA (client_auth left to its default:
    // required with a CA) and a certificate the environment replaces.
    let config = write(
        files.path(),
        "keywarden.toml",
        &format!(
            "listen = [\"127.0.0.1:{port}\", \"unix:{}\"]\n[tls]\n\
             cert_file = \"/nonexistent/old-server.pem\"\nkey_file = {:?}\nclient_ca_file = {:?}\n",
            socket.display(),
            write(files.path(), "server.key", &key),
            write(files.path(), "ca.pem", &pki.ca_pem),
        ),
    );
    let mut command = common::process::keywarden();
    command
        .env(
            "KEYWARDEN_TLS_CERT_FILE",
            write(files.path(), "server.pem", &cert),
        )
        .args(["serve", "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(&config);
    let sidecar =
        common::process::Sidecar::spawn(command, &data, &socket, files.path().join("serve.log"));
    let addr = format!("127.0.0.1:{port}");
    let admin_token = SecretString::from(
        std::fs::read_to_string(data.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned(),
    );
    let bearer = Bearer::new(Some(&admin_token)).unwrap();
    let tls = |identity: Option<(String, String)>| ClientTls {
        ca: pki.ca_pem.clone().into_bytes(),
        identity: identity.map(|(c, k)| (c.into_bytes(), SecretString::from(k))),
        domain: None,
    };

    // With a certificate the CA signed, the handshake completes and the
    // admin token is honoured.
    let with_cert = client::connect(
        &addr,
        Some(&tls(Some(pki.issue(&["spiffe://test.example/ops"])))),
    )
    .await
    .unwrap();
    let head = client::admin(with_cert, bearer.clone())
        .get_audit_head(pb::GetAuditHeadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(head.receipt_public_key.starts_with("ed25519:"), "{head:?}");

    // Without one, not even the admin token gets a call through: the
    // handshake fails (the client learns it on its first call with TLS 1.3).
    let refused = match client::connect(&addr, Some(&tls(None))).await {
        Err(e) => {
            assert!(e.starts_with(&format!("cannot connect to {addr}")), "{e}");
            None
        }
        Ok(channel) => Some(
            client::admin(channel, bearer)
                .get_audit_head(pb::GetAuditHeadRequest {})
                .await
                .expect_err("a client without a certificate got a call through"),
        ),
    };
    if let Some(status) = refused {
        // The server's alert reaches the client as its first read fails.
        assert_eq!(status.code(), Code::Unknown, "{status:?}");
        assert!(
            format!("{status:?}").contains("received fatal alert: CertificateRequired"),
            "{status:?}"
        );
    }
    let log = sidecar.log();
    assert!(!log.contains("BEGIN"), "the log shows PEM: {log}");
}

#[test]
fn the_cli_refuses_to_send_a_token_over_plain_tcp_beyond_loopback() {
    let files = tempfile::tempdir().unwrap();
    let token_file = write(files.path(), "token", "kw_not_a_real_token_but_secret\n");
    // 192.0.2.1 is TEST-NET-1: nothing answers there, so a CLI that tried
    // would hang until its connect timeout instead of refusing at once.
    for (args, env) in [
        (vec!["--token-file", token_file.to_str().unwrap()], vec![]),
        (
            vec![],
            vec![("KEYWARDEN_TOKEN", "kw_not_a_real_token_but_secret")],
        ),
    ] {
        let started = std::time::Instant::now();
        let output = common::process::keywarden()
            .env("KEYWARDEN_DATA_DIR", "/nonexistent/keywarden-test")
            .envs(env.iter().copied())
            .args(["--addr", "192.0.2.1:7400"])
            .args(&args)
            .args(["tenant", "list"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run the keywarden client");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert_eq!(
            stderr.trim_end(),
            "INVALID_ARGUMENT: refusing to send a token to 192.0.2.1:7400 without TLS: set --tls-ca"
        );
        assert!(output.stdout.is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the CLI tried to connect before refusing"
        );
    }
}
