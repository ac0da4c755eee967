//! What changed in the keystore, as other sidecars' caches must hear of it:
//! the payload of the PostgreSQL keystore's notifications
//! ([`super::postgres::events`]).

use crate::{
    ids::{SubjectKeyId, TenantId},
    time::UnixMillis,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A tenant was rotated or shredded, its policy changed, or a key version
    /// of it was destroyed: drop everything cached of it.
    Tenant(TenantId),
    /// A subject was shredded: drop its key.
    Subject(TenantId, SubjectKeyId),
}

impl Event {
    /// `tenant:<id>` or `subject:<id>:<32 hex digits>`; ids contain no ':'.
    pub fn encode(&self) -> String {
        match self {
            Event::Tenant(id) => format!("tenant:{id}"),
            Event::Subject(id, subject) => format!("subject:{id}:{}", hex::encode(subject.0)),
        }
    }

    /// [`Event::encode`] and `@<unix ms>`: when the writer announced the
    /// change, just before its commit (the invalidation lag's start).
    pub fn encode_at(&self, at: UnixMillis) -> String {
        format!("{}@{}", self.encode(), at.0)
    }

    /// A payload of either form: with its announcement time
    /// ([`Event::encode_at`]), or without (the form before it, which older
    /// sidecars send).
    pub fn decode_timed(payload: &str) -> Option<(Event, Option<UnixMillis>)> {
        match payload.split_once('@') {
            None => Some((Self::decode(payload)?, None)),
            Some((event, at)) => {
                if at.is_empty() || !at.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                Some((Self::decode(event)?, Some(UnixMillis(at.parse().ok()?))))
            }
        }
    }

    /// The form without a time.
    pub fn decode(payload: &str) -> Option<Event> {
        let mut parts = payload.split(':');
        let event = match (parts.next()?, parts.next()?, parts.next()) {
            ("tenant", id, None) => Event::Tenant(TenantId::parse("tenant", id).ok()?),
            ("subject", id, Some(hex_id)) => {
                let mut subject = [0u8; crate::envelope::SUBJECT_KEY_ID_LEN];
                hex::decode_to_slice(hex_id, &mut subject).ok()?;
                Event::Subject(TenantId::parse("tenant", id).ok()?, SubjectKeyId(subject))
            }
            _ => return None,
        };
        parts.next().is_none().then_some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_garbage_is_refused() {
        let t = TenantId::parse("t", "acme-1").unwrap();
        for event in [
            Event::Tenant(t.clone()),
            Event::Subject(t, SubjectKeyId([0xAB; 16])),
        ] {
            assert_eq!(Event::decode(&event.encode()), Some(event));
        }
        let event = Event::Tenant(TenantId::parse("t", "acme-1").unwrap());
        assert_eq!(
            Event::decode_timed(&event.encode_at(UnixMillis(1_700_000_000_123))),
            Some((event.clone(), Some(UnixMillis(1_700_000_000_123))))
        );
        // The old form still decodes, without a time.
        assert_eq!(
            Event::decode_timed("tenant:acme-1"),
            Some((event.clone(), None))
        );
        for bad in [
            "tenant:acme-1@",
            "tenant:acme-1@-1",
            "tenant:acme-1@1@2",
            "tenant:acme-1@x",
        ] {
            assert_eq!(Event::decode_timed(bad), None, "{bad:?}");
        }
        for bad in [
            "",
            "tenant",
            "tenant:",
            "tenant:a:b",
            "subject:a",
            "subject:a:zz",
            "other:a",
        ] {
            assert_eq!(Event::decode(bad), None, "{bad:?}");
        }
    }
}
