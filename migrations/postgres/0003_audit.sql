-- The shared audit log (audit.sink = "postgres"): one hash chain for every
-- sidecar of the keystore.
--   audit_log   one row per record: its sequence number and its JSON line
--               (the same line a file sink writes, "hash" included).
--   audit_head  one row: the latest sequence number and hash. A writer locks
--               it (SELECT ... FOR UPDATE), so records from many sidecars
--               form one chain in one order.
-- Rows of audit_log are never updated or deleted: a trigger refuses both, so
-- even the application's role cannot rewrite history (the table's owner can
-- drop the trigger; `keywarden audit verify --postgres` still names the first
-- broken record).
CREATE TABLE audit_log (
    seq     BIGINT PRIMARY KEY CHECK (seq >= 1),
    record  TEXT   NOT NULL
);

CREATE TABLE audit_head (
    only_row  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    seq       BIGINT  NOT NULL,
    hash      TEXT    NOT NULL
);

INSERT INTO audit_head (only_row, seq, hash)
VALUES (TRUE, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE FUNCTION audit_log_is_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();
