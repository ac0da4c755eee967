//! What operators watch: the admin listener (`/live`, `/ready`,
//! `/metrics`) and every metric.
//!
//! - `metrics.rs`: the metric names, the Prometheus recorder and the
//!   helpers every part records through (imports nothing of the crate).
//! - `grpc.rs`: the `grpc_server_*` metrics, a tower layer around the
//!   gRPC routes.
//! - `http.rs`: the admin listener.

pub mod grpc;
pub mod http;
pub mod metrics;
