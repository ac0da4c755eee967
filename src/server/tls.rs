//! TLS for TCP listeners: a rustls server configuration from the files of
//! `[tls]`, with AWS-LC as its crypto provider, HTTP/2 by ALPN, and client
//! certificates verified against `tls.client_ca_file` when it is set
//! (required or optional, as `tls.client_auth` says).

use std::{fs, io, path::PathBuf, sync::Arc};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

use super::StartError;
use crate::config::{ClientAuth, TlsConfig};

/// The TLS settings of TCP listeners, from the configured files.
pub fn tls_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, StartError> {
    let read = |what: &'static str, path: &PathBuf| {
        fs::read(path).map_err(|source| StartError::File {
            what,
            path: path.clone(),
            source,
        })
    };
    let invalid = |what: &'static str, path: &PathBuf, reason: String| StartError::File {
        what,
        path: path.clone(),
        source: io::Error::new(io::ErrorKind::InvalidData, reason),
    };
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read("tls.cert_file", &tls.cert_file)?)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid("tls.cert_file", &tls.cert_file, e.to_string()))?;
    if certs.is_empty() {
        return Err(invalid(
            "tls.cert_file",
            &tls.cert_file,
            "no PEM certificate in it".into(),
        ));
    }
    // The key's bytes are secret: they are handed to rustls and dropped.
    let key_pem = zeroize::Zeroizing::new(read("tls.key_file", &tls.key_file)?);
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        // rustls's message could quote the file; name it only.
        invalid(
            "tls.key_file",
            &tls.key_file,
            "no PEM private key in it".into(),
        )
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("tls.cert_file", &tls.cert_file, e.to_string()))?;
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read("tls.client_ca_file", ca)?) {
                let cert = cert.map_err(|e| invalid("tls.client_ca_file", ca, e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| invalid("tls.client_ca_file", ca, e.to_string()))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            // Unset with a client CA means required (config::ClientAuth).
            let verifier = match tls.client_auth {
                ClientAuth::Required | ClientAuth::Unset => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            }
            .build()
            .map_err(|e| invalid("tls.client_ca_file", ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| invalid("tls.key_file", &tls.key_file, e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
