//! Reading keystore rows, for every SQL backend alike: the columns have the
//! same names and decode to the same Rust types in SQLite and PostgreSQL.

use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::store::{
    Placement, RootWrapped, RootWrappedSlot, StoreError, SubjectKeyRecord, TenantKeyRecord,
    TenantPolicy, TenantRecord, TenantState, TenantWithPrimary, Tier, UnixMillis,
};
use crate::{
    ids::{SubjectKeyId, TenantId},
    kms::WrappedKey,
};

/// Column list of [`tenant_from_row`].
pub const TENANT_COLUMNS: &str = "tenant_id, created_at_ms, primary_version, shredded_at_ms, \
     index_key_wrapped, index_key_root, tier, region, root_key, root_key_deletion_at_ms, policy";

/// Columns and tables of [`tenant_with_primary_from_row`]: a tenant joined
/// with its primary key version's row, if any.
pub const TENANT_WITH_PRIMARY_FROM: &str = "t.*, k.wrapped AS primary_wrapped, \
     k.root_key_id AS primary_root FROM tenants t LEFT JOIN tenant_keys k \
     ON k.tenant_id = t.tenant_id AND k.version = t.primary_version";

/// Column list of [`tenant_state_from_row`].
pub const TENANT_STATE_COLUMNS: &str =
    "primary_version, shredded_at_ms, index_key_wrapped, index_key_root, root_key_deletion_at_ms";

/// Column list of [`tenant_key_from_row`].
pub const TENANT_KEY_COLUMNS: &str = "version, wrapped, root_key_id, created_at_ms";

/// Column list of [`subject_key_from_row`].
pub const SUBJECT_KEY_COLUMNS: &str = "subject_key_id, wrapped, tenant_version";

/// What a row must be able to decode: a sqlx row of either backend, or a
/// row of the SQLite keystore's synchronous readers.
pub trait KeystoreRow {
    fn text(&self, column: &str) -> Result<String, StoreError>;
    fn maybe_text(&self, column: &str) -> Result<Option<String>, StoreError>;
    fn int(&self, column: &str) -> Result<i64, StoreError>;
    fn maybe_int(&self, column: &str) -> Result<Option<i64>, StoreError>;
    fn bytes(&self, column: &str) -> Result<Vec<u8>, StoreError>;
    fn maybe_bytes(&self, column: &str) -> Result<Option<Vec<u8>>, StoreError>;
}

impl<R> KeystoreRow for R
where
    R: Row,
    for<'r> &'r str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    fn text(&self, column: &str) -> Result<String, StoreError> {
        self.try_get(column).map_err(corrupt)
    }
    fn maybe_text(&self, column: &str) -> Result<Option<String>, StoreError> {
        self.try_get(column).map_err(corrupt)
    }
    fn int(&self, column: &str) -> Result<i64, StoreError> {
        self.try_get(column).map_err(corrupt)
    }
    fn maybe_int(&self, column: &str) -> Result<Option<i64>, StoreError> {
        self.try_get(column).map_err(corrupt)
    }
    fn bytes(&self, column: &str) -> Result<Vec<u8>, StoreError> {
        self.try_get(column).map_err(corrupt)
    }
    fn maybe_bytes(&self, column: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.try_get(column).map_err(corrupt)
    }
}

pub fn tenant_id(raw: &str) -> Result<TenantId, StoreError> {
    TenantId::parse("tenant_id", raw)
        .map_err(|_| StoreError::Corrupt("invalid tenant id in keystore".into()))
}

pub fn version(raw: i64) -> Result<u32, StoreError> {
    u32::try_from(raw).map_err(|_| StoreError::Corrupt(format!("key version {raw} out of range")))
}

/// A row selected with [`TENANT_COLUMNS`].
pub fn tenant_from_row<R>(row: &R) -> Result<TenantRecord, StoreError>
where
    R: KeystoreRow,
{
    let tier = row.text("tier")?;
    let placement = Placement {
        tier: Tier::parse(&tier)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown tier {tier:?}")))?,
        region: row.maybe_text("region")?,
        root_key: row.maybe_text("root_key")?,
    };
    Ok(TenantRecord {
        id: tenant_id(&row.text("tenant_id")?)?,
        created_at: UnixMillis(row.int("created_at_ms")?),
        placement,
        policy: TenantPolicy::from_json(&row.text("policy")?)?,
        state: tenant_state_from_row(row)?,
    })
}

/// A row selected with [`TENANT_WITH_PRIMARY_FROM`].
pub fn tenant_with_primary_from_row<R>(row: &R) -> Result<TenantWithPrimary, StoreError>
where
    R: KeystoreRow,
{
    let primary = match (
        row.maybe_bytes("primary_wrapped")?,
        row.maybe_text("primary_root")?,
    ) {
        (Some(ciphertext), Some(root_key_id)) => Some(WrappedKey {
            root_key_id,
            ciphertext,
        }),
        _ => None,
    };
    Ok(TenantWithPrimary {
        record: tenant_from_row(row)?,
        primary,
    })
}

/// A row selected with [`TENANT_STATE_COLUMNS`] (or [`TENANT_COLUMNS`]):
/// what writes check, without the policy, so that one that does not parse
/// stops no write (above all no shred) that does not read it.
pub fn tenant_state_from_row<R>(row: &R) -> Result<TenantState, StoreError>
where
    R: KeystoreRow,
{
    Ok(match row.maybe_int("shredded_at_ms")? {
        Some(at) => TenantState::Shredded {
            at: UnixMillis(at),
            root_key_deletion: row.maybe_int("root_key_deletion_at_ms")?.map(UnixMillis),
        },
        None => TenantState::Active {
            primary_version: version(row.int("primary_version")?)?,
            index_key: WrappedKey {
                root_key_id: row.text("index_key_root")?,
                ciphertext: row.bytes("index_key_wrapped")?,
            },
        },
    })
}

/// A row selected with [`TENANT_KEY_COLUMNS`].
pub fn tenant_key_from_row<R>(row: &R) -> Result<TenantKeyRecord, StoreError>
where
    R: KeystoreRow,
{
    Ok(TenantKeyRecord {
        version: version(row.int("version")?)?,
        wrapped: WrappedKey {
            root_key_id: row.text("root_key_id")?,
            ciphertext: row.bytes("wrapped")?,
        },
        created_at: UnixMillis(row.int("created_at_ms")?),
    })
}

/// A row selected with [`SUBJECT_KEY_COLUMNS`].
pub fn subject_key_from_row<R>(row: &R) -> Result<(SubjectKeyId, SubjectKeyRecord), StoreError>
where
    R: KeystoreRow,
{
    let id = row.bytes("subject_key_id")?;
    let id = id
        .try_into()
        .map_err(|_| StoreError::Corrupt("invalid subject key id in keystore".into()))?;
    Ok((
        SubjectKeyId(id),
        SubjectKeyRecord {
            wrapped: row.bytes("wrapped")?,
            tenant_version: version(row.int("tenant_version")?)?,
        },
    ))
}

/// A row of `destroyed_versions`: version, destroyed_at_ms.
pub fn destroyed_version_from_row<R>(row: &R) -> Result<(u32, UnixMillis), StoreError>
where
    R: KeystoreRow,
{
    Ok((
        version(row.int("version")?)?,
        UnixMillis(row.int("destroyed_at_ms")?),
    ))
}

/// A row of `shared_root_wrapped`: tenant_id, slot (0 for the subject-index
/// key, else the version), wrapped, root.
pub fn root_wrapped_from_row<R>(row: &R) -> Result<RootWrapped, StoreError>
where
    R: KeystoreRow,
{
    let slot = match row.int("slot")? {
        0 => RootWrappedSlot::Index,
        v => RootWrappedSlot::Version(version(v)?),
    };
    Ok(RootWrapped {
        tenant: tenant_id(&row.text("tenant_id")?)?,
        slot,
        wrapped: WrappedKey {
            root_key_id: row.text("root")?,
            ciphertext: row.bytes("wrapped")?,
        },
    })
}

pub fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}
