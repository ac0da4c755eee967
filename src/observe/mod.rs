//! What an operator sees of a running sidecar: readiness ([`ready`]), its
//! log ([`log`]) and traces ([`trace`]).

pub mod log;
pub mod ready;
pub mod trace;
