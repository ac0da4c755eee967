-- Guards for the shared audit log (issue 14, finding 6): 0003's trigger
-- refused UPDATE and DELETE of a record, but not TRUNCATE, and audit_head
-- could be set back, after which `keywarden audit verify --postgres` found
-- a short or empty log intact.
--
-- Who these stop: any role that does not own the tables, including the
-- sidecars' runtime role in the two-role setup (README, "Database roles"),
-- and the owner by mistake. Who they do not stop: the tables' owner (with
-- store.migrate = true, the default, the sidecars' own role) can drop or
-- disable triggers, and a superuser can also skip them with
-- session_replication_role = replica. Against those, anchor the head
-- elsewhere and give it to `keywarden audit verify --anchor SEQ:HASH`.

-- No TRUNCATE of the records (a statement-level trigger: TRUNCATE fires no
-- row triggers).
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();

-- The head only moves forward, and only to the last record: an UPDATE must
-- name the record with the highest seq and carry that record's hash (the
-- 64 hex digits before its closing '"}', docs/SECURITY.md 5.2), or leave
-- the row as it is. No DELETE, no TRUNCATE.
CREATE FUNCTION audit_head_moves_forward() RETURNS trigger AS $$
DECLARE
    last_seq BIGINT;
    last_record TEXT;
BEGIN
    IF TG_OP <> 'UPDATE' THEN
        RAISE EXCEPTION 'audit_head cannot be deleted or truncated';
    END IF;
    IF NEW.seq = OLD.seq AND NEW.hash = OLD.hash AND NEW.only_row = OLD.only_row THEN
        RETURN NEW;
    END IF;
    IF NEW.seq <= OLD.seq THEN
        RAISE EXCEPTION 'audit_head only moves forward: it is at record %, not %', OLD.seq, NEW.seq;
    END IF;
    SELECT seq, record INTO last_seq, last_record
        FROM audit_log ORDER BY seq DESC LIMIT 1;
    IF last_seq IS DISTINCT FROM NEW.seq
        OR right(last_record, 75) <> (',"hash":"' || NEW.hash || '"}') THEN
        RAISE EXCEPTION 'audit_head must name the last record of audit_log and its hash';
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER audit_head_forward
    BEFORE UPDATE OR DELETE ON audit_head
    FOR EACH ROW EXECUTE FUNCTION audit_head_moves_forward();

CREATE TRIGGER audit_head_no_truncate
    BEFORE TRUNCATE ON audit_head
    FOR EACH STATEMENT EXECUTE FUNCTION audit_head_moves_forward();
