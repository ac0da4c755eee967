-- The keystore on PostgreSQL, shared by many sidecars. The same tables as the
-- SQLite keystore (migrations/sqlite), in PostgreSQL's types. No key here is
-- usable without the root key (tenant keys, subject-index keys) or a tenant
-- key (subject keys). Times are Unix milliseconds.

-- Tenant ids are compared bytewise (COLLATE "C"), as in SQLite, whatever the
-- database's locale: pagination follows the primary key's index.

-- One row per tenant, kept as a tombstone after a shred. Multi-row changes of
-- a tenant lock this row first (SELECT ... FOR UPDATE), which serializes
-- rotations, shreds and subject-key creation per tenant across sidecars.
CREATE TABLE tenants (
    tenant_id                TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    created_at_ms            BIGINT  NOT NULL,
    primary_version          BIGINT  NOT NULL,
    shredded_at_ms           BIGINT,
    index_key_wrapped        BYTEA,
    index_key_root           TEXT,
    tier                     TEXT    NOT NULL DEFAULT 'shared'
                             CHECK (tier IN ('shared', 'dedicated', 'customer')),
    region                   TEXT,
    root_key                 TEXT,
    root_key_deletion_at_ms  BIGINT,
    CHECK ((shredded_at_ms IS NULL) = (index_key_wrapped IS NOT NULL))
);

CREATE TABLE tenant_keys (
    tenant_id      TEXT COLLATE "C" NOT NULL REFERENCES tenants (tenant_id),
    version        BIGINT  NOT NULL CHECK (version >= 1),
    wrapped        BYTEA   NOT NULL,
    root_key_id    TEXT    NOT NULL,
    created_at_ms  BIGINT  NOT NULL,
    PRIMARY KEY (tenant_id, version)
);

CREATE TABLE subject_keys (
    tenant_id       TEXT COLLATE "C" NOT NULL REFERENCES tenants (tenant_id),
    subject_key_id  BYTEA   NOT NULL CHECK (length(subject_key_id) = 16),
    wrapped         BYTEA   NOT NULL,
    tenant_version  BIGINT  NOT NULL,
    created_at_ms   BIGINT  NOT NULL,
    PRIMARY KEY (tenant_id, subject_key_id)
);

CREATE TABLE subject_tombstones (
    tenant_id       TEXT COLLATE "C" NOT NULL REFERENCES tenants (tenant_id),
    subject_key_id  BYTEA   NOT NULL CHECK (length(subject_key_id) = 16),
    shredded_at_ms  BIGINT  NOT NULL,
    PRIMARY KEY (tenant_id, subject_key_id)
);
