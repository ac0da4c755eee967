//! Lingering close: when the server is done with a connection, it shuts down
//! its write side and keeps reading (and discarding) until the client closes,
//! for at most [`LINGER_TIMEOUT`], before it releases the socket.
//!
//! Why: after a graceful shutdown the server writes a call's last frames and
//! closes. A client may still be sending (HTTP/2 WINDOW_UPDATE frames for the
//! response it is reading). Closing a socket that still receives data makes
//! the kernel answer with a reset, and a client that sees the reset can lose
//! the response it had not read yet: the call in flight fails after all.
//! Reading until the client's own close avoids the reset (the same remedy as
//! Apache's and nginx's "lingering close").

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    sync::OwnedSemaphorePermit,
};
use tokio_util::task::TaskTracker;

/// The longest a closed connection is drained before its socket is released.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

/// A server-side connection that lingers when dropped.
pub struct Lingering<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    /// `Some` until dropped; `Drop` hands it to the lingering task.
    io: Option<T>,
    tracker: TaskTracker,
    /// The connection's place under `server.max_connections`: held until
    /// the lingering close is over and the socket released.
    permit: Option<OwnedSemaphorePermit>,
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Lingering<T> {
    /// Wraps `io`; its lingering task is spawned on `tracker`, so shutdown can
    /// wait for it.
    pub fn new(io: T, tracker: TaskTracker, permit: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            io: Some(io),
            tracker,
            permit,
        }
    }

    fn io(&mut self) -> Pin<&mut T> {
        Pin::new(
            self.io
                .as_mut()
                .expect("the connection is present until drop"),
        )
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Drop for Lingering<T> {
    fn drop(&mut self) {
        let Some(mut io) = self.io.take() else { return };
        if tokio::runtime::Handle::try_current().is_err() {
            return; // No runtime left to linger on: the process is exiting.
        }
        let permit = self.permit.take();
        self.tracker.spawn(async move {
            let _permit = permit;
            let _ = io.shutdown().await;
            let mut discard = [0u8; 4096];
            let _ = tokio::time::timeout(LINGER_TIMEOUT, async {
                while let Ok(1..) = io.read(&mut discard).await {}
            })
            .await;
        });
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for Lingering<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Lingering<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(T::is_write_vectored)
    }
}
