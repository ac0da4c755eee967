-- Where a tenant's keys are wrapped (issue: root keys in AWS KMS).
--   tier      'shared': the configured root key of the tenant's region;
--             'dedicated': a KMS key keywarden created for this tenant alone;
--             'customer': a KMS key the tenant supplied.
--   region    NULL: the default region.
--   root_key  NULL for 'shared' (resolved from the configuration at each use,
--             so re-pointing the shared key moves new versions to it); the key
--             ARN otherwise.
--   root_key_deletion_at_ms  for a shredded dedicated tenant: when KMS deletes
--             its key; NULL until the deletion is scheduled.
ALTER TABLE tenants ADD COLUMN tier TEXT NOT NULL DEFAULT 'shared'
    CHECK (tier IN ('shared', 'dedicated', 'customer'));
ALTER TABLE tenants ADD COLUMN region TEXT;
ALTER TABLE tenants ADD COLUMN root_key TEXT;
ALTER TABLE tenants ADD COLUMN root_key_deletion_at_ms INTEGER;
