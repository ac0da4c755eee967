//! The authorization policy: grants that map identities to permissions and
//! tenants. A policy file (`auth.policy_file`) replaces the default policy
//! entirely:
//!
//! ```toml
//! [roles]                        # roles of your own, beside "data" and "admin"
//! auditor = ["admin:read", "audit:read"]
//!
//! [[grant]]
//! identity = "spiffe://prod.example/ns/billing/sa/api"   # exact, or a prefix ending in *
//! allow = ["data"]               # roles or single permissions
//! tenants = ["*"]                # tenant ids, or prefixes ending in *
//!
//! [[grant]]
//! identity = "jwt:*"             # end users' JWTs passed through by an app
//! allow = ["encrypt", "decrypt"]
//! tenants = ["*"]
//! tenants_from_token = true      # only the tenants the JWT names; none named, none allowed
//! ```
//!
//! Built-in roles: `data` (encrypt, decrypt, rewrap, index) and `admin` (every
//! admin:* permission and audit:read). The data plane and the control plane
//! are separate: no built-in role holds both; a grant gives both only when
//! it lists both. `datakey` (GenerateDataKey, DecryptDataKey,
//! RewrapDataKey) is in no built-in role: those calls hand keys to the
//! caller, so only a grant that names it (or a role of your own that lists
//! it) allows them.
//!
//! Whatever the grant, a JWT that names tenants narrows it to those tenants.
//! An operation across all tenants (ListTenants, RotateRootKey, GetAuditHead)
//! needs a grant for `*` and a credential that names no tenants.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use serde::Deserialize;

use super::SettingsError;
use super::{Caller, Permission, matches};

const DATA_ROLE: [Permission; 4] = [
    Permission::Encrypt,
    Permission::Decrypt,
    Permission::Rewrap,
    Permission::Index,
];
const ADMIN_ROLE: [Permission; 6] = [
    Permission::AdminCreate,
    Permission::AdminRead,
    Permission::AdminRotate,
    Permission::AdminShred,
    Permission::AdminPolicy,
    Permission::AuditRead,
];

/// The policy used when no policy file is configured, as a file would say it.
pub const DEFAULT_POLICY: &str = r#"
# The unix socket: the data plane, for every tenant. (Who can connect is
# decided by the socket file's mode and group.)
[[grant]]
identity = "unix"
allow = ["data"]
tenants = ["*"]

# The embedded admin token (admin.token in the data directory): the
# operator's credential, which the CLI uses; it may do everything.
[[grant]]
identity = "token:admin"
allow = ["admin", "data", "datakey"]
tenants = ["*"]
"#;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    identity: String,
    permissions: BTreeSet<Permission>,
    tenants: Vec<String>,
    tenants_from_token: bool,
}

/// Grants, any of which may allow a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    grants: Vec<Grant>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    roles: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    grant: Vec<GrantEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantEntry {
    identity: String,
    allow: Vec<String>,
    tenants: Vec<String>,
    #[serde(default)]
    tenants_from_token: bool,
}

impl Policy {
    pub fn default_policy() -> Self {
        Self::parse(DEFAULT_POLICY, "the default policy").expect("the default policy is valid")
    }

    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        let text = fs::read_to_string(path).map_err(|e| {
            SettingsError::new(
                "auth.policy_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses a policy; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, SettingsError> {
        let setting = "auth.policy_file";
        let file: PolicyFile = toml::from_str(text).map_err(|e| {
            let reason = crate::secret::toml_error_without_content(text, &e);
            SettingsError::new(setting, format!("{source}: {reason}"))
        })?;
        let mut roles: BTreeMap<String, BTreeSet<Permission>> = BTreeMap::new();
        roles.insert("data".into(), DATA_ROLE.into_iter().collect());
        roles.insert("admin".into(), ADMIN_ROLE.into_iter().collect());
        for (name, permissions) in &file.roles {
            if roles.contains_key(name) || Permission::parse(name).is_some() {
                return Err(SettingsError::new(
                    setting,
                    format!("{source}: role {name:?} is already defined (built in)"),
                ));
            }
            let set = permissions
                .iter()
                .map(|p| {
                    Permission::parse(p).ok_or_else(|| {
                        SettingsError::new(
                            setting,
                            format!("{source}: role {name}: unknown permission {p:?}"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            roles.insert(name.clone(), set);
        }
        let mut grants = Vec::new();
        for entry in file.grant {
            let mut permissions = BTreeSet::new();
            for item in &entry.allow {
                if let Some(p) = Permission::parse(item) {
                    permissions.insert(p);
                } else if let Some(role) = roles.get(item) {
                    permissions.extend(role.iter().copied());
                } else {
                    return Err(SettingsError::new(
                        setting,
                        format!(
                            "{source}: grant for {}: {item:?} is neither a role nor a permission",
                            entry.identity
                        ),
                    ));
                }
            }
            if entry.identity.is_empty() || entry.tenants.iter().any(String::is_empty) {
                return Err(SettingsError::new(
                    setting,
                    format!("{source}: identities and tenant patterns must not be empty"),
                ));
            }
            grants.push(Grant {
                identity: entry.identity,
                permissions,
                tenants: entry.tenants,
                tenants_from_token: entry.tenants_from_token,
            });
        }
        Ok(Self { grants })
    }

    /// Whether any grant allows `caller` to do `permission` for `tenant`
    /// (`None`: across all tenants).
    pub fn allows(&self, caller: &Caller, permission: Permission, tenant: Option<&str>) -> bool {
        self.grants.iter().any(|grant| {
            if !matches(&grant.identity, &caller.identity)
                || !grant.permissions.contains(&permission)
            {
                return false;
            }
            let token_allows = |tenant: &str| match &caller.token_tenants {
                Some(named) => named.iter().any(|t| t == tenant),
                None => !grant.tenants_from_token,
            };
            match tenant {
                Some(tenant) => {
                    grant.tenants.iter().any(|p| matches(p, tenant)) && token_allows(tenant)
                }
                None => {
                    grant.tenants.iter().any(|p| p == "*")
                        && caller.token_tenants.is_none()
                        && !grant.tenants_from_token
                }
            }
        })
    }

    /// Whether some grant may allow `caller` to do `permission` for some
    /// tenant: the check made on a call's headers, before its body (which
    /// names the tenant) is read. [`Policy::allows`] with the tenant then
    /// decides; this only refuses early what it would refuse for every
    /// tenant.
    pub fn allows_some_tenant(&self, caller: &Caller, permission: Permission) -> bool {
        self.grants.iter().any(|grant| {
            matches(&grant.identity, &caller.identity)
                && grant.permissions.contains(&permission)
                && match &caller.token_tenants {
                    Some(named) => named
                        .iter()
                        .any(|t| grant.tenants.iter().any(|p| matches(p, t))),
                    None => !grant.tenants_from_token,
                }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Transport;

    fn caller(identity: &str, tenants: Option<&[&str]>) -> Caller {
        Caller {
            identity: identity.into(),
            transport: Transport::Tls,
            token_tenants: tenants.map(|t| t.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn the_default_policy_separates_the_planes() {
        let policy = Policy::default_policy();
        let unix = Caller {
            identity: "unix".into(),
            transport: Transport::Unix,
            token_tenants: None,
        };
        assert!(policy.allows(&unix, Permission::Encrypt, Some("acme")));
        assert!(!policy.allows(&unix, Permission::AdminShred, Some("acme")));
        // The data role hands out no keys.
        assert!(!policy.allows(&unix, Permission::DataKey, Some("acme")));
        assert!(!policy.allows(&unix, Permission::AdminRead, None));
        let anonymous = caller("anonymous", None);
        for p in Permission::ALL {
            assert!(!policy.allows(&anonymous, p, Some("acme")), "{p}");
        }
        let admin = caller("token:admin", None);
        for p in Permission::ALL {
            assert!(policy.allows(&admin, p, Some("acme")), "{p}");
            assert!(policy.allows(&admin, p, None), "{p}");
        }
    }

    #[test]
    fn tenant_patterns_and_token_tenants() {
        let policy = Policy::parse(
            r#"
            [roles]
            reader = ["decrypt"]
            [[grant]]
            identity = "spiffe://prod/ns/billing/*"
            allow = ["data"]
            tenants = ["acme-*"]
            [[grant]]
            identity = "jwt:*"
            allow = ["reader", "encrypt"]
            tenants = ["*"]
            tenants_from_token = true
            "#,
            "test",
        )
        .unwrap();
        let billing = caller("spiffe://prod/ns/billing/sa/api", None);
        assert!(policy.allows(&billing, Permission::Encrypt, Some("acme-eu")));
        assert!(!policy.allows(&billing, Permission::Encrypt, Some("globex")));
        assert!(!policy.allows(&billing, Permission::AdminRead, Some("acme-eu")));

        let alice = caller("jwt:alice", Some(&["acme"]));
        assert!(policy.allows(&alice, Permission::Decrypt, Some("acme")));
        assert!(!policy.allows(&alice, Permission::Decrypt, Some("globex")));
        assert!(!policy.allows(&alice, Permission::Rewrap, Some("acme")));
        let unnamed = caller("jwt:bob", None);
        assert!(!policy.allows(&unnamed, Permission::Decrypt, Some("acme")));
        // A JWT naming tenants narrows even a grant without tenants_from_token.
        let narrowed = caller("spiffe://prod/ns/billing/x", Some(&["acme-1"]));
        assert!(policy.allows(&narrowed, Permission::Encrypt, Some("acme-1")));
        assert!(!policy.allows(&narrowed, Permission::Encrypt, Some("acme-2")));
    }

    #[test]
    fn some_tenant_is_what_allows_would_grant_for_at_least_one_tenant() {
        let policy = Policy::parse(
            r#"
            [[grant]]
            identity = "spiffe://prod/*"
            allow = ["decrypt"]
            tenants = ["acme-*"]
            [[grant]]
            identity = "jwt:*"
            allow = ["encrypt"]
            tenants = ["*"]
            tenants_from_token = true
            "#,
            "test",
        )
        .unwrap();
        let svc = caller("spiffe://prod/api", None);
        assert!(policy.allows_some_tenant(&svc, Permission::Decrypt));
        assert!(!policy.allows_some_tenant(&svc, Permission::Encrypt));
        assert!(!policy.allows_some_tenant(&caller("anonymous", None), Permission::Decrypt));
        // A JWT naming no tenant gets nothing from tenants_from_token.
        assert!(!policy.allows_some_tenant(&caller("jwt:bob", None), Permission::Encrypt));
        assert!(policy.allows_some_tenant(&caller("jwt:bob", Some(&["x"])), Permission::Encrypt));
        // A JWT naming tenants outside every grant's patterns.
        let narrowed = caller("spiffe://prod/api", Some(&["globex"]));
        assert!(!policy.allows_some_tenant(&narrowed, Permission::Decrypt));
        assert!(policy.allows_some_tenant(
            &caller("spiffe://prod/api", Some(&["acme-1"])),
            Permission::Decrypt
        ));
    }

    #[test]
    fn bad_policies_name_the_problem() {
        for (text, needle) in [
            (
                "[[grant]]\nidentity = \"x\"\nallow = [\"root\"]\ntenants = [\"*\"]\n",
                "neither a role",
            ),
            ("[roles]\nadmin = [\"encrypt\"]\n", "already defined"),
            ("[roles]\nr = [\"delete\"]\n", "unknown permission"),
            ("[[grant]]\nidentity = \"x\"\nallow = []\n", "tenants"),
        ] {
            let err = Policy::parse(text, "p.toml").unwrap_err();
            assert_eq!(err.setting, "auth.policy_file");
            assert!(err.reason.contains(needle), "{text}: {err}");
        }
    }
}
