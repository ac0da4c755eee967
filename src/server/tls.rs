//! TLS for TCP listeners at start: the files of `[tls]` read and checked
//! ([`crate::reload::tls`] holds the checks and the live configuration that
//! reloads replace).

use std::{fs, io, path::Path};

use super::StartError;
use crate::{
    config::TlsConfig,
    reload::tls::{LiveTls, TlsFileError, certified_key, client_verifier},
};

/// The TLS settings of TCP listeners, from the configured files. A file that
/// cannot be used stops the start.
pub fn tls_config(tls: &TlsConfig) -> Result<LiveTls, StartError> {
    let read = |what: &'static str, path: &Path| {
        fs::read(path).map_err(|source| StartError::File {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let invalid = |e: TlsFileError| {
        let path = match e.setting {
            "tls.key_file" => &tls.key_file,
            "tls.client_ca_file" => tls.client_ca_file.as_ref().unwrap_or(&tls.cert_file),
            _ => &tls.cert_file,
        };
        StartError::File {
            what: e.setting,
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e.reason),
        }
    };
    let cert = read("tls.cert_file", &tls.cert_file)?;
    // The key's bytes are secret: they are handed to rustls and dropped.
    let key = zeroize::Zeroizing::new(read("tls.key_file", &tls.key_file)?);
    let key = certified_key(&cert, &key).map_err(invalid)?;
    let verifier = match &tls.client_ca_file {
        None => None,
        Some(ca) => Some(
            client_verifier(&read("tls.client_ca_file", ca)?, tls.client_auth).map_err(invalid)?,
        ),
    };
    Ok(LiveTls::new(key, verifier))
}
