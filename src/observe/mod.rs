//! What operators watch: readiness ([`ready`]).

pub mod ready;
