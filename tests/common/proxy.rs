//! A fault-injecting TCP proxy for the KMS tests: it forwards loopback
//! connections to an upstream (moto) until it is set down, and then behaves
//! like a KMS that became unreachable: every open connection is closed at
//! once, and new ones are accepted and dropped. Set up again, it forwards new
//! connections. It stops when dropped.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
};

/// What the accept loop and `set_down` share. `down` is only changed with
/// `connections` locked, and a connection is only spawned with it locked and
/// `down` false: so no connection slips past a `set_down(true)`.
struct State {
    down: AtomicBool,
    connections: Mutex<JoinSet<()>>,
}

pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1 with a free port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            down: AtomicBool::new(false),
            connections: Mutex::new(JoinSet::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, upstream, state.clone()));
        Proxy {
            addr,
            state,
            accept,
        }
    }

    /// The URL to give a KMS client instead of the upstream's.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Down: closes every open connection now and drops new ones as they
    /// arrive. Up: forwards new connections again.
    pub fn set_down(&self, down: bool) {
        let mut connections = self.state.connections.lock().unwrap();
        self.state.down.store(down, Ordering::SeqCst);
        if down {
            // Aborting a connection's task drops both of its sockets.
            connections.abort_all();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(mut connections) = self.state.connections.lock() {
            connections.abort_all();
        }
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, state: Arc<State>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        let mut connections = state.connections.lock().unwrap();
        // Reap the tasks of connections that have ended.
        while connections.try_join_next().is_some() {}
        if state.down.load(Ordering::SeqCst) {
            // Accepted and dropped: the client sees its connection closed.
            drop(inbound);
            continue;
        }
        connections.spawn(forward(inbound, upstream));
    }
}

async fn forward(mut inbound: TcpStream, upstream: SocketAddr) {
    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = copy_bidirectional(&mut inbound, &mut outbound).await;
}
