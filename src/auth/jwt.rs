//! JWT bearer tokens: HS256, RS256 and ES256, verified with keys from a JWKS
//! file that is read again when it changes (key rotation at the identity
//! provider needs no restart). Issuer, audience and expiry are always
//! checked; `sub` names the caller (`jwt:SUB`), and a configurable claim
//! (default `tenants`) may name the tenants its bearer may act for.
//!
//! The algorithm comes from the token's header but must be one of the three,
//! and must agree with the key's type and the key's own `alg` if it has one:
//! a token cannot choose HS256 to turn a public RSA key into an HMAC secret.

use std::{
    fs,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation, decode, decode_header,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, Jwk, JwkSet},
};
use serde::Deserialize;
use serde_json::{Map, Value};
use thiserror::Error;

use super::SettingsError;

/// `[auth.jwt]`: where the keys are and what a token must say.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub jwks_file: PathBuf,
    pub issuer: String,
    pub audience: String,
    #[serde(default = "default_tenants_claim")]
    pub tenants_claim: String,
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    /// How often the JWKS file is checked for changes.
    #[serde(default = "default_reload")]
    pub reload_seconds: u64,
}

fn default_tenants_claim() -> String {
    "tenants".into()
}
fn default_leeway() -> u64 {
    30
}
fn default_reload() -> u64 {
    5
}

/// Why a JWT is refused. The messages name the rule, never the token.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("the JWT is malformed")]
    Malformed,
    #[error("the JWT's algorithm must be HS256, RS256 or ES256")]
    Algorithm,
    #[error(
        "no key in the JWKS verifies this JWT (unknown kid, or the key does not fit the algorithm)"
    )]
    UnknownKey,
    #[error("the JWT's signature does not verify")]
    Signature,
    #[error("the JWT has expired")]
    Expired,
    #[error("the JWT is not valid yet")]
    NotYetValid,
    #[error("the JWT's issuer is not the one configured")]
    Issuer,
    #[error("the JWT's audience does not include this service")]
    Audience,
    #[error("the JWT lacks the {0} claim")]
    MissingClaim(String),
    #[error("the JWT's {0} claim must be a string or a list of strings")]
    ClaimFormat(String),
}

/// What a verified JWT says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub subject: String,
    pub tenants: Option<Vec<String>>,
}

struct Keys {
    set: JwkSet,
    /// The file's modification time and length when read.
    stamp: Option<(SystemTime, u64)>,
}

/// Verifies JWTs against the configured JWKS file.
pub struct JwtVerifier {
    path: PathBuf,
    issuer: String,
    audience: String,
    tenants_claim: String,
    leeway: Duration,
    keys: RwLock<Arc<Keys>>,
    reload: Mutex<()>,
}

impl std::fmt::Debug for JwtVerifier {
    /// Names the file, not the keys (an HS256 key is a shared secret).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("jwks_file", &self.path)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

fn read_jwks(path: &PathBuf) -> Result<Keys, String> {
    let stamp = fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())));
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let set: JwkSet = serde_json::from_str(&text)
        // serde_json's message names a position, not the content.
        .map_err(|e| format!("{} is not a JWKS: {e}", path.display()))?;
    Ok(Keys { set, stamp })
}

impl JwtVerifier {
    pub fn load(config: &JwtConfig) -> Result<Self, SettingsError> {
        let keys = read_jwks(&config.jwks_file).map_err(|reason| SettingsError {
            setting: "auth.jwt.jwks_file",
            reason,
        })?;
        Ok(Self {
            path: config.jwks_file.clone(),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            tenants_claim: config.tenants_claim.clone(),
            leeway: Duration::from_secs(config.leeway_seconds),
            keys: RwLock::new(Arc::new(keys)),
            reload: Mutex::new(()),
        })
    }

    /// Reads the JWKS file again if its modification time or length changed.
    /// A file that no longer parses is logged and the keys in use are kept.
    pub fn reload_if_changed(&self) -> bool {
        let _one_at_a_time = self.reload.lock().unwrap_or_else(|p| p.into_inner());
        let current = fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        let known = self.keys.read().unwrap_or_else(|p| p.into_inner()).stamp;
        if current.is_none() || current == known {
            return false;
        }
        match read_jwks(&self.path) {
            Ok(keys) => {
                tracing::info!(jwks_file = %self.path.display(), keys = keys.set.keys.len(), "reloaded the JWKS");
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
                true
            }
            Err(reason) => {
                tracing::warn!(%reason, "the JWKS file changed but cannot be used; keeping the keys in use");
                false
            }
        }
    }

    /// Checks the JWKS file every `every`, for as long as the process runs.
    pub fn spawn_reloader(self: Arc<Self>, every: Duration) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let verifier = self.clone();
                let _ = tokio::task::spawn_blocking(move || verifier.reload_if_changed()).await;
            }
        });
    }

    pub fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        let header = decode_header(token).map_err(|_| {
            // A well-formed header naming an algorithm jsonwebtoken does not
            // know (e.g. "none") deserves the clearer refusal.
            let named_alg = token
                .split('.')
                .next()
                .and_then(|h| URL_SAFE_NO_PAD.decode(h).ok())
                .and_then(|h| serde_json::from_slice::<Map<String, Value>>(&h).ok())
                .is_some_and(|h| h.contains_key("alg"));
            if named_alg {
                JwtError::Algorithm
            } else {
                JwtError::Malformed
            }
        })?;
        if !matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::RS256 | Algorithm::ES256
        ) {
            return Err(JwtError::Algorithm);
        }
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        let jwk = match &header.kid {
            Some(kid) => keys.set.find(kid),
            // Without a kid, only an unambiguous set will do.
            None if keys.set.keys.len() == 1 => keys.set.keys.first(),
            None => None,
        }
        .ok_or(JwtError::UnknownKey)?;
        if !fits(jwk, header.alg) {
            return Err(JwtError::UnknownKey);
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|_| JwtError::UnknownKey)?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        let data = decode::<Map<String, Value>>(token, &key, &validation).map_err(|e| {
            match e.into_kind() {
                ErrorKind::ExpiredSignature => JwtError::Expired,
                ErrorKind::ImmatureSignature => JwtError::NotYetValid,
                ErrorKind::InvalidIssuer => JwtError::Issuer,
                ErrorKind::InvalidAudience => JwtError::Audience,
                ErrorKind::MissingRequiredClaim(claim) => JwtError::MissingClaim(claim),
                ErrorKind::InvalidSignature => JwtError::Signature,
                ErrorKind::InvalidAlgorithm => JwtError::UnknownKey,
                _ => JwtError::Malformed,
            }
        })?;
        let claims = data.claims;
        let subject = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(JwtError::ClaimFormat("sub".into())),
        };
        let tenants = match claims.get(&self.tenants_claim) {
            None => None,
            Some(Value::String(one)) => Some(vec![one.clone()]),
            Some(Value::Array(many)) => Some(
                many.iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| JwtError::ClaimFormat(self.tenants_claim.clone()))?,
            ),
            Some(_) => return Err(JwtError::ClaimFormat(self.tenants_claim.clone())),
        };
        Ok(Claims { subject, tenants })
    }
}

/// Whether `jwk` may verify a token signed with `alg`: its key type fits,
/// and its own `alg`, when given, is the same.
fn fits(jwk: &Jwk, alg: Algorithm) -> bool {
    let family_fits = matches!(
        (&jwk.algorithm, alg),
        (AlgorithmParameters::OctetKey(_), Algorithm::HS256)
            | (AlgorithmParameters::RSA(_), Algorithm::RS256)
            | (AlgorithmParameters::EllipticCurve(_), Algorithm::ES256)
    );
    let declared_fits = jwk
        .common
        .key_algorithm
        .is_none_or(|declared| declared.to_string().parse::<Algorithm>().ok() == Some(alg));
    family_fits && declared_fits
}
