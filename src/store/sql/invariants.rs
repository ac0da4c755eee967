//! The keystore's invariants, as SQL both databases run alike.

/// The keystore's invariants as queries that every backend runs alike: each
/// names the rule and selects the ids of the tenants that break it.
///
/// A tenant key version is live (a row of `tenant_keys`) or destroyed by
/// retention (a row of `destroyed_versions`, which holds no key material);
/// an active tenant's versions, both kinds together, run 1..=primary.
pub const INVARIANTS: &[(&str, &str)] = &[
    (
        "an active tenant lacks its primary key version",
        "SELECT t.tenant_id AS tenant_id FROM tenants t WHERE t.shredded_at_ms IS NULL AND NOT EXISTS \
         (SELECT 1 FROM tenant_keys k WHERE k.tenant_id = t.tenant_id AND k.version = t.primary_version)",
    ),
    (
        "an active tenant lacks its subject-index key",
        "SELECT tenant_id FROM tenants WHERE shredded_at_ms IS NULL \
         AND (index_key_wrapped IS NULL OR index_key_root IS NULL)",
    ),
    (
        "an active tenant's versions (live and destroyed) do not run 1..=primary",
        "SELECT t.tenant_id AS tenant_id FROM tenants t JOIN ( \
           SELECT tenant_id, version FROM tenant_keys \
           UNION SELECT tenant_id, version FROM destroyed_versions) v ON v.tenant_id = t.tenant_id \
         WHERE t.shredded_at_ms IS NULL GROUP BY t.tenant_id, t.primary_version \
         HAVING count(*) <> t.primary_version OR min(v.version) <> 1 OR max(v.version) <> t.primary_version",
    ),
    (
        "a tenant key version is both live and destroyed",
        "SELECT k.tenant_id AS tenant_id FROM tenant_keys k JOIN destroyed_versions d \
         ON d.tenant_id = k.tenant_id AND d.version = k.version",
    ),
    (
        "an active tenant's primary version was destroyed",
        "SELECT t.tenant_id AS tenant_id FROM tenants t JOIN destroyed_versions d \
         ON d.tenant_id = t.tenant_id AND d.version = t.primary_version \
         WHERE t.shredded_at_ms IS NULL",
    ),
    (
        "a shredded tenant still has key material",
        "SELECT t.tenant_id AS tenant_id FROM tenants t WHERE t.shredded_at_ms IS NOT NULL AND (\
         t.index_key_wrapped IS NOT NULL \
         OR EXISTS (SELECT 1 FROM tenant_keys k WHERE k.tenant_id = t.tenant_id) \
         OR EXISTS (SELECT 1 FROM subject_keys s WHERE s.tenant_id = t.tenant_id) \
         OR EXISTS (SELECT 1 FROM blind_index_keys b WHERE b.tenant_id = t.tenant_id))",
    ),
    (
        "a subject key is wrapped by a tenant key version that does not exist (never made, or destroyed)",
        "SELECT s.tenant_id AS tenant_id FROM subject_keys s WHERE NOT EXISTS \
         (SELECT 1 FROM tenant_keys k WHERE k.tenant_id = s.tenant_id AND k.version = s.tenant_version)",
    ),
    (
        "a shredded subject still has a key",
        "SELECT s.tenant_id AS tenant_id FROM subject_keys s JOIN subject_tombstones d \
         ON d.tenant_id = s.tenant_id AND d.subject_key_id = s.subject_key_id",
    ),
    (
        "a blind-index key is wrapped by a tenant key version that does not exist (never made, or destroyed)",
        "SELECT b.tenant_id AS tenant_id FROM blind_index_keys b WHERE b.tenant_version IS NOT NULL \
         AND NOT EXISTS (SELECT 1 FROM tenant_keys k \
         WHERE k.tenant_id = b.tenant_id AND k.version = b.tenant_version)",
    ),
    (
        "a tenant's newest blind-index key version is retired",
        "SELECT b.tenant_id AS tenant_id FROM blind_index_keys b WHERE b.retired_at_ms IS NOT NULL \
         AND b.version = (SELECT max(c.version) FROM blind_index_keys c WHERE c.tenant_id = b.tenant_id)",
    ),
];
