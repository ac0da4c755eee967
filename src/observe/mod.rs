//! What an operator sees of a running sidecar: the admin listener
//! ([`http`]: `/live`, `/ready`, `/metrics`), every metric ([`metrics`], and
//! [`grpc`] for the `grpc_server_*` layer), its log
//! ([`log`]) and traces ([`trace`]).

pub mod grpc;
pub mod http;
pub mod log;
pub mod metrics;
pub mod trace;
