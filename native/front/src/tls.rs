//! The TLS server configuration: rustls on aws-lc-rs, TLS 1.3 and TLS 1.2 with ECDHE and
//! AEAD suites only (rustls implements no other kind), ALPN h2 and http/1.1 (h2 alone on the
//! gRPC port).

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::TlsFiles;
use crate::server::FrontError;

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, FrontError> {
    let unreadable = |why: String| FrontError::Config(format!("{what} {}: {why}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(e.to_string()))?;
    if certs.is_empty() {
        return Err(unreadable("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// `grpc`: the gRPC port's configuration, which offers HTTP/2 alone.
pub(crate) fn server_config(files: &TlsFiles, grpc: bool) -> Result<Arc<ServerConfig>, FrontError> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let chain = certificates(&files.cert_file, "gateway.cert_file")?;
    // The key's bytes never reach an error message: only the file's name does.
    let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|_| {
        FrontError::Config(format!(
            "gateway.key_file {}: not a readable PEM private key",
            files.key_file.display()
        ))
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| FrontError::Config(format!("TLS: {e}")))?;
    let builder = match &files.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca_file, "gateway.client_ca_file")? {
                roots.add(cert).map_err(|e| {
                    FrontError::Config(format!("gateway.client_ca_file {}: {e}", ca_file.display()))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| FrontError::Config(format!("gateway.client_ca_file: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        FrontError::Config(format!(
            "gateway.cert_file and gateway.key_file do not make a usable pair: {e}"
        ))
    })?;
    config.alpn_protocols = if grpc {
        vec![b"h2".to_vec()]
    } else {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    };
    config.ticketer =
        aws_lc_rs::Ticketer::new().map_err(|e| FrontError::Config(format!("TLS: {e}")))?;
    Ok(Arc::new(config))
}
