//! What an operator sees of a running sidecar: its log and traces.

pub mod log;
pub mod trace;
