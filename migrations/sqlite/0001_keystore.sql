-- The keystore: wrapped keys, tenants and tombstones. No key here is usable
-- without the root key (tenant keys, subject-index keys) or a tenant key
-- (subject keys). Times are Unix milliseconds.

-- One row per tenant, kept as a tombstone after a shred (state = 'shredded',
-- primary_version = 0, index key NULL) so the id is never silently re-created.
CREATE TABLE tenants (
    tenant_id          TEXT    NOT NULL PRIMARY KEY,
    created_at_ms      INTEGER NOT NULL,
    primary_version    INTEGER NOT NULL,
    shredded_at_ms     INTEGER,
    -- The subject-index key, wrapped by the root key.
    index_key_wrapped  BLOB,
    index_key_root     TEXT,
    CHECK ((shredded_at_ms IS NULL) = (index_key_wrapped IS NOT NULL))
) STRICT;

-- Tenant key versions, wrapped by the root key.
CREATE TABLE tenant_keys (
    tenant_id      TEXT    NOT NULL REFERENCES tenants (tenant_id),
    version        INTEGER NOT NULL CHECK (version >= 1),
    wrapped        BLOB    NOT NULL,
    root_key_id    TEXT    NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, version)
) STRICT, WITHOUT ROWID;

-- Subject keys, wrapped by a tenant key version. subject_key_id is the keyed
-- hash of the subject id; the id itself is never stored.
CREATE TABLE subject_keys (
    tenant_id       TEXT    NOT NULL REFERENCES tenants (tenant_id),
    subject_key_id  BLOB    NOT NULL CHECK (length(subject_key_id) = 16),
    wrapped         BLOB    NOT NULL,
    tenant_version  INTEGER NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, subject_key_id)
) STRICT, WITHOUT ROWID;

-- Shredded subjects of active tenants.
CREATE TABLE subject_tombstones (
    tenant_id       TEXT    NOT NULL REFERENCES tenants (tenant_id),
    subject_key_id  BLOB    NOT NULL CHECK (length(subject_key_id) = 16),
    shredded_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, subject_key_id)
) STRICT, WITHOUT ROWID;
