//! Keystore changes that other sidecars must hear about at once: a rotation,
//! shred, policy change or destroyed key version makes their cached tenant
//! state and keys stale. The PostgreSQL
//! keystore publishes them with NOTIFY inside the changing transaction (so an
//! event is sent if and only if the change commits) and every sidecar LISTENs
//! and evicts. The embedded SQLite keystore has one sidecar, which evicts
//! locally. The cache TTL stays the bound if all else fails.

use std::{future::Future, time::Duration};

use sqlx::postgres::PgListener;
use tokio::sync::mpsc::UnboundedSender;

use crate::ids::{SubjectKeyId, TenantId};

/// The PostgreSQL notification channel.
pub const CHANNEL: &str = "keywarden_events";

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

/// What the listener reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signal {
    Event(Event),
    /// The listener (re)connected: events may have been missed meanwhile, so
    /// whatever they guard must be re-validated.
    Resync,
}

/// Listens on `url` until `stop` resolves or `out` closes, sending every
/// event, and [`Signal::Resync`] whenever the connection was (re)made.
pub async fn listen(url: &str, out: UnboundedSender<Signal>, stop: impl Future<Output = ()>) {
    let apply = |event| {
        let _ = out.send(Signal::Event(event));
    };
    let resync = || {
        let _ = out.send(Signal::Resync);
    };
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = async {
            let mut listener = PgListener::connect(url).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            () = &mut stop => return,
            result = connected => match result {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "keystore event listener cannot connect");
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        // Connected (again): anything may have changed while we were away.
        resync();
        backoff = Duration::from_millis(100);
        tracing::info!("listening for keystore events");
        loop {
            if out.is_closed() {
                return;
            }
            let received = tokio::select! {
                () = &mut stop => return,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(notification)) => match Event::decode(notification.payload()) {
                    Some(event) => apply(event),
                    None => tracing::warn!("ignored a malformed keystore event"),
                },
                // The connection was lost. Reconnect through the loop above
                // (PgListener's own reconnect would wait on a pool while the
                // database is down), and resynchronize once connected: events
                // in between are gone. Until then the cache keeps serving, as
                // in any keystore outage, bounded by its TTL.
                Ok(None) => {
                    tracing::warn!("keystore event listener lost its connection; reconnecting");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "keystore event listener failed; reconnecting");
                    break;
                }
            }
        }
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
