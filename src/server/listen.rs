//! Listeners and their accept loops.
//!
//! - **A cap on connections.** A loop takes a place under
//!   `server.max_connections` (shared by every listener) *before* it
//!   accepts; at the cap, new connections wait in the kernel's accept queue
//!   (and, when it is full, are refused by the kernel) until a connection
//!   closes. The place is held until the connection's socket is released.
//! - **Accept errors back off.** Out of file descriptors (EMFILE, ENFILE) or
//!   memory (ENOBUFS, ENOMEM), a loop sleeps, from 5 ms doubling to 1 s,
//!   instead of retrying at once (which spun a core while every caller was
//!   locked out: docs/SECURITY.md §12.3). Other errors (a peer that reset
//!   before the accept) are skipped.
//! - **Unix sockets are created with their mode**: bound in a private
//!   directory (mode 0700) beside the path, set to 0660, then renamed into
//!   place, so there is no moment at which the socket exists with a wider
//!   mode.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, UnixListener},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
};

use super::{StartError, conn::Io};
use crate::{
    auth::{Peer, Transport},
    config::ListenAddr,
};

/// The first and the longest pause after an accept error that says the
/// process is out of descriptors or memory.
const BACKOFF_START: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A bound listener.
pub enum Listener {
    Tcp(TcpListener),
    /// The socket and its path, removed at shutdown.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`. A unix socket path left over from a process that is gone
    /// is replaced; one that a live process answers on is refused.
    pub async fn bind(addr: &ListenAddr) -> Result<Self, StartError> {
        let failed = |source| StartError::Listen {
            addr: addr.to_string(),
            source,
        };
        match addr {
            ListenAddr::Tcp(tcp) => {
                Ok(Listener::Tcp(TcpListener::bind(tcp).await.map_err(failed)?))
            }
            ListenAddr::Unix(path) => {
                if path.exists() {
                    if tokio::net::UnixStream::connect(path).await.is_ok() {
                        return Err(failed(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another process is serving on this socket",
                        )));
                    }
                    fs::remove_file(path).map_err(failed)?;
                }
                let listener = bind_unix_with_mode(path).map_err(failed)?;
                Ok(Listener::Unix(listener, path.clone()))
            }
        }
    }

    /// The address actually bound (with the real port for `:0`).
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp:?".into()),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }

    async fn accept(&self) -> io::Result<(Box<dyn Io>, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, addr) = l.accept().await?;
                // Calls are small request-response exchanges: no Nagle delay.
                let _ = stream.set_nodelay(true);
                Ok((
                    Box::new(stream),
                    Peer {
                        transport: Transport::Loopback,
                        addr: Some(addr),
                        certs: None,
                    },
                ))
            }
            Listener::Unix(l, _) => {
                let (stream, _) = l.accept().await?;
                Ok((
                    Box::new(stream),
                    Peer {
                        transport: Transport::Unix,
                        addr: None,
                        certs: None,
                    },
                ))
            }
        }
    }

    /// Accepts connections until `stop` turns true, each after taking a
    /// place from `places`, and hands each to `serve` with its place.
    pub async fn accept_loop(
        self,
        places: Arc<Semaphore>,
        mut stop: watch::Receiver<bool>,
        serve: impl Fn(Box<dyn Io>, Peer, OwnedSemaphorePermit),
    ) {
        let mut backoff = Duration::ZERO;
        loop {
            let place = tokio::select! {
                place = places.clone().acquire_owned() => match place {
                    Ok(place) => place,
                    Err(_) => return,
                },
                _ = stop.wait_for(|stopped| *stopped) => return,
            };
            let accepted = tokio::select! {
                accepted = self.accept() => accepted,
                _ = stop.wait_for(|stopped| *stopped) => return,
            };
            match accepted {
                Ok((io, peer)) => {
                    backoff = Duration::ZERO;
                    serve(io, peer, place);
                }
                Err(e) if out_of_resources(&e) => {
                    drop(place);
                    if backoff.is_zero() {
                        tracing::warn!(addr = %self.local_addr(), error = %e, "cannot accept connections: out of file descriptors or memory; backing off");
                        backoff = BACKOFF_START;
                    } else {
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.wait_for(|stopped| *stopped) => return,
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "a connection failed before it was accepted");
                }
            }
        }
    }
}

/// Accept errors that retrying at once cannot cure.
fn out_of_resources(e: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 (Linux).
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Binds a unix socket at `path` that is never reachable with a mode wider
/// than 0660: bound inside a fresh directory only this process can enter,
/// its mode set there, then renamed into place.
fn bind_unix_with_mode(path: &Path) -> io::Result<UnixListener> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).map_err(io::Error::other)?;
    let private = parent.join(format!(".keywarden-bind-{}", hex::encode(suffix)));
    fs::DirBuilder::new().mode(0o700).create(&private)?;
    let bound = (|| {
        let staged = private.join(name);
        let listener = UnixListener::bind(&staged)?;
        // The app's container shares the socket through a volume; the group
        // may connect, others may not.
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o660))?;
        fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = fs::remove_dir_all(&private);
    bound
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileTypeExt;

    use super::*;

    #[tokio::test]
    async fn a_unix_socket_appears_with_mode_0660_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kw.sock");
        let listener = bind_unix_with_mode(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        // Connectable at its final path.
        let client = tokio::net::UnixStream::connect(&path);
        let (accepted, connected) = tokio::join!(listener.accept(), client);
        accepted.unwrap();
        connected.unwrap();
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("kw.sock")]);
    }

    #[test]
    fn resource_errors_are_told_from_the_others() {
        for errno in [24, 23, 105, 12] {
            assert!(out_of_resources(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [103, 104, 4, 1] {
            assert!(!out_of_resources(&io::Error::from_raw_os_error(errno)));
        }
    }
}
