//! Keystore changes ([`Event`]) that other sidecars must hear about at once:
//! a rotation, shred, policy change or destroyed key version makes their
//! cached tenant state and keys stale. The PostgreSQL keystore publishes them
//! with NOTIFY inside the changing transaction (so an event is sent if and
//! only if the change commits) and every sidecar LISTENs and evicts. The
//! embedded SQLite keystore has one sidecar, which evicts locally. The cache
//! TTL stays the bound if all else fails.

use std::{future::Future, time::Duration};

use sqlx::postgres::PgListener;
use tokio::sync::mpsc::UnboundedSender;

pub use crate::store::Event;
use crate::{
    observe::metrics::{INVALIDATION_EVENTS, INVALIDATION_LAG_SECONDS},
    time::UnixMillis,
};

/// The PostgreSQL notification channel: [`Event::encode`]'s form, which
/// every sidecar version reads.
pub const CHANNEL: &str = "keywarden_events";

/// The second channel, beside [`CHANNEL`] in the same transaction: the same
/// event with the writer's time ([`Event::encode_at`]), for the invalidation
/// lag only. A channel of its own, so that sidecars from before it (which
/// listen on [`CHANNEL`] alone and would ignore a payload they cannot
/// decode) still evict on every event during a rolling upgrade.
pub const TIMING_CHANNEL: &str = "keywarden_events_timing";

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
            listener.listen_all([CHANNEL, TIMING_CHANNEL]).await?;
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
                Ok(Some(notification)) if notification.channel() == TIMING_CHANNEL => {
                    // The lag only: the eviction follows the event on CHANNEL.
                    if let Some((_, Some(at))) = Event::decode_timed(notification.payload()) {
                        // Clocks of two hosts: a negative lag is skew.
                        let lag_ms = (UnixMillis::now().0 - at.0).max(0);
                        metrics::histogram!(INVALIDATION_LAG_SECONDS)
                            .record(lag_ms as f64 / 1000.0);
                    }
                }
                Ok(Some(notification)) => match Event::decode(notification.payload()) {
                    Some(event) => {
                        metrics::counter!(INVALIDATION_EVENTS).increment(1);
                        apply(event)
                    }
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
