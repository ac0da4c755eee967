//! Connecting to a sidecar, over TCP or a unix socket. Used by the CLI and by
//! the tests.

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::{
    api::pb::{admin_client::AdminClient, crypto_client::CryptoClient},
    config::ListenAddr,
};

/// Largest response a client accepts: a full batch of the largest items.
pub const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// Connects to `addr` (`host:port` or `unix:/path`).
pub async fn connect(addr: &str) -> Result<Channel, String> {
    let parsed: ListenAddr = addr.parse()?;
    let failed =
        |e: tonic::transport::Error| format!("cannot connect to {addr}: {}", source_chain(&e));
    match parsed {
        ListenAddr::Tcp(tcp) => Endpoint::from_shared(format!("http://{tcp}"))
            .map_err(failed)?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(failed),
        ListenAddr::Unix(path) => {
            // The URI is required by the API but unused: the connector decides.
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(failed)
        }
    }
}

pub fn crypto(channel: Channel) -> CryptoClient<Channel> {
    CryptoClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES)
}

pub fn admin(channel: Channel) -> AdminClient<Channel> {
    AdminClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES)
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
