-- Blind-index keys (as migrations/sqlite/0004_blind_index_keys.sql): per
-- tenant, versioned 1.., each wrapped by a tenant key version in the
-- stored-key wrap, domain 0x02. The newest version is the primary; a retired
-- version keeps its row without key material; a tenant shred deletes them.
CREATE TABLE blind_index_keys (
    tenant_id       TEXT COLLATE "C" NOT NULL REFERENCES tenants (tenant_id),
    version         BIGINT  NOT NULL CHECK (version >= 1),
    wrapped         BYTEA,
    tenant_version  BIGINT,
    created_at_ms   BIGINT  NOT NULL,
    retired_at_ms   BIGINT,
    PRIMARY KEY (tenant_id, version),
    CHECK ((wrapped IS NULL) = (tenant_version IS NULL)),
    CHECK ((wrapped IS NULL) = (retired_at_ms IS NOT NULL))
);

CREATE INDEX blind_index_keys_by_version ON blind_index_keys (tenant_id, tenant_version);
