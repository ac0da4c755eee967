//! Who may ask for what.
//!
//! **Authentication** names the caller: a bearer token (a static token from a
//! file, or a JWT verified against a JWKS file), else a client certificate's
//! URI SAN (e.g. a SPIFFE id) on a mutual-TLS listener, else the transport
//! itself: `unix` for the unix socket, `anonymous` for loopback TCP. A
//! credential that is presented and fails is UNAUTHENTICATED; it never falls
//! back to the transport's identity.
//!
//! **Authorization** asks the [`policy::Policy`]: which grants match the
//! identity, whether one of them allows the operation, and for which tenants.
//! A JWT that names tenants narrows every grant to those tenants.
//!
//! Callers' identities are not secrets (they appear in errors and in the
//! audit log); the tokens that prove them are, and never print.

pub mod jwt;
pub mod policy;
pub mod tokens;

use std::{fmt, net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;
use rustls::pki_types::CertificateDer;

use crate::error::Error;
pub use policy::Policy;
pub use tokens::StaticTokens;

/// A file the auth settings name (tokens, policy, JWKS) that cannot be used:
/// the setting that names it, and why (never a secret from it). Whoever
/// loads the settings reports it, as an invalid configuration.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct SettingsError {
    pub setting: &'static str,
    pub reason: String,
}

impl SettingsError {
    pub fn new(setting: &'static str, reason: impl Into<String>) -> Self {
        Self {
            setting,
            reason: reason.into(),
        }
    }
}

/// One operation a role may grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    Encrypt,
    Decrypt,
    Rewrap,
    /// CreateTenant.
    AdminCreate,
    /// GetTenant, ListTenants.
    AdminRead,
    /// RotateTenantKey, RotateRootKey.
    AdminRotate,
    /// ShredTenant, ShredSubject.
    AdminShred,
    /// UpdateTenantPolicy.
    AdminPolicy,
    /// GetAuditHead: the audit log's latest hash, to anchor elsewhere.
    AuditRead,
    /// GenerateDataKey, DecryptDataKey, RewrapDataKey: data keys in the
    /// clear, for client-side encryption. Not in the `data` role.
    DataKey,
    /// BlindIndex, BlindIndexBatch.
    Index,
}

impl Permission {
    pub const ALL: [Permission; 11] = [
        Permission::Encrypt,
        Permission::Decrypt,
        Permission::Rewrap,
        Permission::AdminCreate,
        Permission::AdminRead,
        Permission::AdminRotate,
        Permission::AdminShred,
        Permission::AdminPolicy,
        Permission::AuditRead,
        Permission::DataKey,
        Permission::Index,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Permission::Encrypt => "encrypt",
            Permission::Decrypt => "decrypt",
            Permission::Rewrap => "rewrap",
            Permission::AdminCreate => "admin:create",
            Permission::AdminRead => "admin:read",
            Permission::AdminRotate => "admin:rotate",
            Permission::AdminShred => "admin:shred",
            Permission::AdminPolicy => "admin:policy",
            Permission::AuditRead => "audit:read",
            Permission::DataKey => "datakey",
            Permission::Index => "index",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Data-plane operations (Crypto); everything else is the control plane.
    pub fn is_data_plane(self) -> bool {
        matches!(
            self,
            Permission::Encrypt
                | Permission::Decrypt
                | Permission::Rewrap
                | Permission::DataKey
                | Permission::Index
        )
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a call arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The unix socket (its file mode decides who can connect).
    Unix,
    /// TCP without TLS: loopback only (the configuration refuses others).
    Loopback,
    /// TCP with TLS.
    Tls,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// `token:NAME`, `jwt:SUBJECT`, a certificate's URI SAN, `unix` or
    /// `anonymous`.
    pub identity: String,
    pub transport: Transport,
    /// The tenants a JWT says its bearer may act for; `None` when the
    /// credential names none.
    pub token_tenants: Option<Vec<String>>,
}

impl Caller {
    /// The identity of a caller that presented no credential.
    fn of_transport(transport: Transport) -> Self {
        Self {
            identity: match transport {
                Transport::Unix => "unix",
                Transport::Loopback | Transport::Tls => "anonymous",
            }
            .to_owned(),
            transport,
            token_tenants: None,
        }
    }
}

/// Put into every request by the server beside [`Peer`]: the edge calls
/// [`CallActivity::admitted`] for a call it lets through to a keywarden
/// method. Only such calls keep a connection open past its handshake and
/// idle timeouts (`server::conn`); calls refused at the edge, gRPC health
/// and reflection do not.
#[derive(Clone)]
pub struct CallActivity(Arc<dyn Fn() + Send + Sync>);

impl CallActivity {
    pub fn new(admitted: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Arc::new(admitted))
    }

    /// The call passed authentication and the policy's first check.
    pub fn admitted(&self) {
        (self.0)();
    }
}

/// The connection a call arrived on, as the server saw it: put into every
/// request's extensions by the server (`server::conn`), read by
/// authentication and by the audit log's name for an unauthenticated peer.
#[derive(Clone, Debug)]
pub struct Peer {
    pub transport: Transport,
    /// The client's address (TCP).
    pub addr: Option<SocketAddr>,
    /// The client's certificate chain, leaf first, when it presented one on
    /// a TLS listener (rustls verified it against the client CA).
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl Peer {
    /// How the audit log names a caller that could not be authenticated:
    /// `tcp <ip>` (without the port, so that a flood from many ports is one
    /// caller) or `unix socket`.
    pub fn name(&self) -> String {
        match self.addr {
            Some(addr) => format!("tcp {}", addr.ip()),
            None => "unix socket".to_owned(),
        }
    }
}

/// Authentication and authorization, as the server is configured. The
/// static tokens and the policy can be replaced while the sidecar serves
/// (`crate::reload`): each call reads the ones current when it is checked.
pub struct Guard {
    /// The tokens file's tokens and the embedded ones.
    tokens: ArcSwap<StaticTokens>,
    /// The embedded admin token: not from the tokens file, so kept when the
    /// file is reloaded.
    embedded: StaticTokens,
    pub jwt: Option<Arc<jwt::JwtVerifier>>,
    policy: ArcSwap<Policy>,
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("tokens", &self.tokens.load().len())
            .field("jwt", &self.jwt.is_some())
            .finish_non_exhaustive()
    }
}

impl Guard {
    /// A guard accepting the tokens `from_file` and `embedded`, JWTs if
    /// `jwt` is given, and calls as `policy` allows.
    pub fn new(
        from_file: StaticTokens,
        embedded: StaticTokens,
        jwt: Option<Arc<jwt::JwtVerifier>>,
        policy: Policy,
    ) -> Self {
        let mut tokens = from_file;
        tokens.extend(&embedded);
        Self {
            tokens: ArcSwap::from_pointee(tokens),
            embedded,
            jwt,
            policy: ArcSwap::from_pointee(policy),
        }
    }

    /// Accepts the tokens `from_file` (and the embedded ones, as before)
    /// from now on, instead of the tokens file's previous ones.
    pub fn replace_tokens(&self, from_file: StaticTokens) {
        let mut tokens = from_file;
        tokens.extend(&self.embedded);
        self.tokens.store(Arc::new(tokens));
    }

    /// Authorizes calls by `policy` from now on.
    pub fn replace_policy(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Names the caller of a call from its headers and connection (no body
    /// is needed), or refuses a credential that fails.
    pub fn authenticate(&self, headers: &http::HeaderMap, peer: &Peer) -> Result<Caller, Error> {
        let transport = peer.transport;
        if let Some(header) = headers.get(http::header::AUTHORIZATION) {
            let value = header
                .to_str()
                .map_err(|_| unauthenticated("the authorization header is not text"))?;
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .ok_or_else(|| {
                    unauthenticated("the authorization header must be \"Bearer <token>\"")
                })?
                .trim();
            return self.authenticate_token(token, transport);
        }
        if let Some(certs) = &peer.certs
            && let Some(leaf) = certs.first()
        {
            // rustls has already verified the chain against the client CA.
            let identity = certificate_identity(leaf.as_ref())?;
            return Ok(Caller {
                identity,
                transport,
                token_tenants: None,
            });
        }
        Ok(Caller::of_transport(transport))
    }

    fn authenticate_token(&self, token: &str, transport: Transport) -> Result<Caller, Error> {
        if token.starts_with(tokens::TOKEN_PREFIX) {
            let tokens = self.tokens.load();
            let name = tokens
                .find(token)
                .ok_or_else(|| unauthenticated("the bearer token is not a known API token"))?;
            return Ok(Caller {
                identity: format!("token:{name}"),
                transport,
                token_tenants: None,
            });
        }
        let Some(jwt) = &self.jwt else {
            return Err(unauthenticated(
                "the bearer token is not a known API token (and JWTs are not configured)",
            ));
        };
        let claims = jwt
            .verify(token)
            .map_err(|e| unauthenticated(e.to_string()))?;
        Ok(Caller {
            identity: format!("jwt:{}", claims.subject),
            transport,
            token_tenants: claims.tenants,
        })
    }

    /// Whether `caller` may do `permission` (for `tenant`, or for all
    /// tenants when the operation spans them).
    pub fn authorize(
        &self,
        caller: &Caller,
        permission: Permission,
        tenant: Option<&str>,
    ) -> Result<(), Error> {
        if self.policy.load().allows(caller, permission, tenant) {
            return Ok(());
        }
        Err(Error::PermissionDenied(match tenant {
            Some(tenant) => format!(
                "{} may not {} for tenant {tenant}",
                caller.identity,
                permission.name()
            ),
            None => format!(
                "{} may not {} across all tenants",
                caller.identity,
                permission.name()
            ),
        }))
    }
}

impl Guard {
    /// The check a call's headers allow, before its body is read: whether
    /// `caller` may do `permission` for some tenant (`tenant_scoped`, the
    /// body names it), or across all tenants (it does not).
    pub fn preauthorize(
        &self,
        caller: &Caller,
        permission: Permission,
        tenant_scoped: bool,
    ) -> Result<(), Error> {
        if !tenant_scoped {
            return self.authorize(caller, permission, None);
        }
        if self.policy.load().allows_some_tenant(caller, permission) {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "{} may not {} for any tenant",
            caller.identity,
            permission.name()
        )))
    }
}

fn unauthenticated(reason: impl Into<String>) -> Error {
    Error::Unauthenticated(reason.into())
}

/// The identity a client certificate proves: its first URI SAN. It must be
/// a URI (`scheme:rest`, no whitespace or control characters), and not one
/// of the names other credentials and keywarden itself use: `token:` and
/// `jwt:` identities, `unix`, `anonymous`, the audit log's `scheduler` and
/// its names for unauthenticated peers (`tcp <ip>`, `unix socket`). The
/// URI-and-no-space rule already rules out the latter four; the schemes are
/// checked by name. A CA that issues any URI must not mint `token:admin`.
fn certificate_identity(der: &[u8]) -> Result<String, Error> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|_| unauthenticated("the client certificate cannot be parsed"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| unauthenticated("the client certificate's subjectAltName is malformed"))?;
    let identity = san
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::URI(uri) => Some((*uri).to_owned()),
                _ => None,
            })
        })
        .ok_or_else(|| {
            unauthenticated(
                "the client certificate has no URI subjectAltName (e.g. a SPIFFE id) to name its holder",
            )
        })?;
    check_certificate_identity(&identity)?;
    Ok(identity)
}

/// The rule of [`certificate_identity`] for the URI it found.
fn check_certificate_identity(identity: &str) -> Result<(), Error> {
    let scheme = identity.split_once(':').map(|(scheme, _)| scheme);
    let is_uri = scheme.is_some_and(|s| {
        s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    }) && !identity
        .chars()
        .any(|c| c.is_whitespace() || c.is_control());
    if !is_uri {
        return Err(unauthenticated(
            "the client certificate's URI subjectAltName is not a URI (scheme:rest, no spaces)",
        ));
    }
    if matches!(scheme, Some(s) if s.eq_ignore_ascii_case("token") || s.eq_ignore_ascii_case("jwt"))
    {
        return Err(unauthenticated(
            "the client certificate's URI subjectAltName uses a name reserved for other credentials",
        ));
    }
    Ok(())
}

/// Whether `value` matches `pattern`: `*` matches anything, `prefix*`
/// anything starting with `prefix`, any other pattern only itself.
pub fn matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(matches("*", "acme"));
        assert!(matches("acme-*", "acme-eu"));
        assert!(!matches("acme-*", "acme"));
        assert!(matches("acme", "acme"));
        assert!(!matches("acme", "acme2"));
        assert!(!matches("acme", "acm"));
    }

    #[test]
    fn certificates_cannot_claim_names_keywarden_uses() {
        for ok in [
            "spiffe://prod.example/ns/billing/sa/api",
            "urn:uuid:0f5e",
            "https://svc.example/a",
        ] {
            assert!(check_certificate_identity(ok).is_ok(), "{ok}");
        }
        for reserved in [
            "token:admin",
            "TOKEN:admin",
            "jwt:alice",
            "unix",
            "anonymous",
            "scheduler",
            "tcp 127.0.0.1",
            "unix socket",
            "spiffe://a b",
            "spiffe://a\nb",
            ":nothing",
            "1x:y",
        ] {
            let e = check_certificate_identity(reserved).unwrap_err();
            assert!(matches!(e, Error::Unauthenticated(_)), "{reserved}: {e:?}");
        }
    }

    #[test]
    fn permission_names_round_trip() {
        for p in Permission::ALL {
            assert_eq!(Permission::parse(p.name()), Some(p));
        }
        assert_eq!(Permission::parse("admin"), None);
    }
}
