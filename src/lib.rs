//! keywarden: per-tenant envelope encryption with crypto-shredding, as a
//! sidecar. Its components: `envelope` (the format, docs/FORMAT.md), `keys`
//! (the hierarchy and its cache), `kms` (the root key), `store` (wrapped keys
//! and tombstones), `api` (gRPC), `time` (Unix milliseconds, below them all),
//! plus `config` and `server` to run it, and `client` to call it. The
//! `keywarden` binary's command line is src/cli/. docs/ARCHITECTURE.md maps
//! the folders and which way imports go; docs/SECURITY.md is the threat
//! model.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod auth;
pub mod client;
pub mod config;
pub mod envelope;
pub mod error;
/// Entry points for the fuzz targets and the property tests.
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod keys;
pub mod kms;
pub mod observe;
pub mod rate;
pub mod receipt;
pub mod reload;
pub mod secret;
pub mod server;
pub mod store;
pub mod time;
