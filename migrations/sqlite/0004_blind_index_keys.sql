-- Blind-index keys (issue 17): per tenant, versioned 1.., each a 32-byte key
-- wrapped by a tenant key version in the stored-key wrap, domain 0x02
-- (docs/FORMAT.md, "How blind-index keys are stored"). The newest version is
-- the primary. A retired version keeps its row, without key material
-- (wrapped and tenant_version NULL, retired_at_ms set), so its number is never
-- made again; a tenant shred deletes every row.
CREATE TABLE blind_index_keys (
    tenant_id       TEXT    NOT NULL REFERENCES tenants (tenant_id),
    version         INTEGER NOT NULL CHECK (version >= 1),
    wrapped         BLOB,
    tenant_version  INTEGER,
    created_at_ms   INTEGER NOT NULL,
    retired_at_ms   INTEGER,
    PRIMARY KEY (tenant_id, version),
    CHECK ((wrapped IS NULL) = (tenant_version IS NULL)),
    CHECK ((wrapped IS NULL) = (retired_at_ms IS NOT NULL))
) STRICT, WITHOUT ROWID;

-- Retention finds the blind-index keys a tenant key version still wraps, and
-- refuses to destroy the version while there are any.
CREATE INDEX blind_index_keys_by_version ON blind_index_keys (tenant_id, tenant_version);
