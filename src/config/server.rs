//! `[limits]` (what one request may hold) and `[server]` (what a connection
//! or call may hold, and for how long).

use serde::Deserialize;

use super::{
    ConfigError,
    types::{AT_LEAST_ONE, STREAM_WINDOW_BYTES},
};

/// `[limits]`: the size of a request and its items, and each tenant's rate.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RequestLimits {
    /// Largest plaintext of one Encrypt or batch item, in bytes.
    pub max_plaintext_bytes: usize,
    /// Most items in one EncryptBatch or DecryptBatch.
    pub max_batch_items: usize,
    /// Largest gRPC request message, in bytes (bounds a whole batch).
    pub max_request_bytes: usize,
    /// Items per second one tenant may encrypt, decrypt or rewrap on this
    /// sidecar (a batch counts its items), unless its policy says otherwise;
    /// 0: no limit.
    pub tenant_items_per_second: u32,
    /// How many items a tenant may use at once above its rate (the bucket's
    /// size); 0: one second's worth.
    pub tenant_burst: u32,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_plaintext_bytes: 4 << 20,
            max_batch_items: 10_000,
            max_request_bytes: 16 << 20,
            tenant_items_per_second: 0,
            tenant_burst: 0,
        }
    }
}

/// Bounds and timeouts of connections and calls: how much a stranger, or a
/// caller, can hold, and for how long (docs/SECURITY.md 12.2, 12.3).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Connections served at once, over every listener; the next waits in
    /// the kernel's accept queue until one closes.
    pub max_connections: usize,
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow-control window of a call: request bytes a client may
    /// send before the sidecar reads them. A connection's window is
    /// `max_concurrent_streams` times this. One call's upload is at most
    /// this much per round trip. 16 KiB to 16 MiB.
    pub stream_window_bytes: u32,
    /// A new connection must finish its TLS handshake and send its first
    /// call's headers within this, or it is closed.
    pub handshake_timeout_seconds: u64,
    /// A connection with no call open for this long is closed (GOAWAY).
    pub idle_timeout_seconds: u64,
    /// An HTTP/2 PING is sent after this long without a frame from the
    /// client; 0: no keepalive pings.
    pub keepalive_interval_seconds: u64,
    /// A PING not answered within this closes the connection.
    pub keepalive_timeout_seconds: u64,
    /// The longest a unary call may take (a shorter `grpc-timeout` from the
    /// client wins); then DEADLINE_EXCEEDED.
    pub call_timeout_seconds: u64,
    /// The longest a streaming call may take, likewise.
    pub stream_timeout_seconds: u64,
    /// A stream's first message, and each next one, must arrive within
    /// this; else the stream ends with DEADLINE_EXCEEDED.
    pub stream_message_timeout_seconds: u64,
    /// Bytes of request messages being received and decoded at once, over
    /// every call; a call over the budget waits (its sender is held back by
    /// HTTP/2 flow control) instead of taking memory. At least the largest
    /// request (`limits.max_request_bytes`) plus its 5-byte frame header.
    pub decode_budget_bytes: usize,
    /// Of the decode budget, the most one caller (an authenticated identity)
    /// may hold over all its calls; a message larger than this takes all of
    /// it. At least 1024, at most `decode_budget_bytes`.
    pub decode_budget_per_caller_bytes: usize,
    /// Once a message has its share of the budget, its bytes must arrive at
    /// least this fast, after a 5-second grace; else DEADLINE_EXCEEDED.
    pub request_min_bytes_per_second: u64,
    /// Largest Admin request message, in bytes (Crypto's is
    /// `limits.max_request_bytes`).
    pub admin_max_request_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_concurrent_streams: 128,
            stream_window_bytes: 64 << 10,
            handshake_timeout_seconds: 10,
            idle_timeout_seconds: 300,
            keepalive_interval_seconds: 30,
            keepalive_timeout_seconds: 10,
            call_timeout_seconds: 60,
            stream_timeout_seconds: 3600,
            stream_message_timeout_seconds: 30,
            decode_budget_bytes: 32 << 20,
            decode_budget_per_caller_bytes: 16 << 20,
            request_min_bytes_per_second: 256 << 10,
            admin_max_request_bytes: 64 << 10,
        }
    }
}

impl ServerConfig {
    /// Each setting by itself; with `[limits]`, [`super::Config::validate`].
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        AT_LEAST_ONE.check_all([
            ("server.max_connections", self.max_connections as u64),
            (
                "server.max_concurrent_streams",
                u64::from(self.max_concurrent_streams),
            ),
            (
                "server.handshake_timeout_seconds",
                self.handshake_timeout_seconds,
            ),
            ("server.idle_timeout_seconds", self.idle_timeout_seconds),
            (
                "server.keepalive_timeout_seconds",
                self.keepalive_timeout_seconds,
            ),
            ("server.call_timeout_seconds", self.call_timeout_seconds),
            ("server.stream_timeout_seconds", self.stream_timeout_seconds),
            (
                "server.stream_message_timeout_seconds",
                self.stream_message_timeout_seconds,
            ),
            (
                "server.request_min_bytes_per_second",
                self.request_min_bytes_per_second,
            ),
        ])?;
        STREAM_WINDOW_BYTES.check("server.stream_window_bytes", self.stream_window_bytes)
    }
}
