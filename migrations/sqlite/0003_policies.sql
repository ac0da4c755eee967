-- Tenant policies and retention.
--   policy   the tenant's policy as JSON (keywarden::store::TenantPolicy);
--            '{}': every setting at its default.
--   destroyed_versions  tenant key versions destroyed by retention: their key
--            row is deleted and recorded here, so an active tenant's versions,
--            live and destroyed together, still run 1..=primary. No key
--            material; kept when the tenant is shredded.
ALTER TABLE tenants ADD COLUMN policy TEXT NOT NULL DEFAULT '{}';

CREATE TABLE destroyed_versions (
    tenant_id        TEXT    NOT NULL REFERENCES tenants (tenant_id),
    version          INTEGER NOT NULL CHECK (version >= 1),
    destroyed_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, version)
) STRICT, WITHOUT ROWID;

-- Retention finds the subject keys a version still wraps, and refuses to
-- destroy a version while there are any.
CREATE INDEX subject_keys_by_version ON subject_keys (tenant_id, tenant_version);
