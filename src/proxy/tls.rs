//! TLS on both legs of a proxied session, with rustls and the `ring` provider.
//!
//! Toward clients: a [`ClientTls`] holds the server configuration behind an [`ArcSwap`], so a
//! SIGHUP can replace the certificate without touching the sessions in progress (each session
//! keeps the configuration its handshake started with). A reload whose files fail to load
//! keeps the configuration in force.
//!
//! Toward PostgreSQL: [`UpstreamTls`] turns an `sslmode` and an optional CA file into a
//! client configuration (built in [`crate::tls`], shared with the service connections);
//! [`UpstreamTls::negotiate`] sends PostgreSQL's SSLRequest on a fresh upstream socket and, on
//! `S`, runs the handshake before the client's StartupMessage is forwarded.
//!
//! Never logs certificate contents or key material; errors name the file only.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use crate::tls::TlsFiles;
use crate::tls::{client_config, read_certs, SslMode, TlsError};

/// PostgreSQL's SSLRequest: length 8, code 1234.5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Validation of the client-facing certificate and key, as the listener loads them.
pub trait ValidateTlsFiles {
    /// Load the files exactly as the listener does (and as a SIGHUP reload does): the chain
    /// and the key must parse and the key must belong to the leaf certificate. For
    /// `pgenvelope check`; the configuration built is dropped.
    fn validate(&self) -> Result<(), TlsError>;
}

impl ValidateTlsFiles for TlsFiles {
    fn validate(&self) -> Result<(), TlsError> {
        server_config(self).map(|_| ())
    }
}

/// The client-facing TLS configuration, reloadable.
#[derive(Debug)]
pub(crate) struct ClientTls {
    files: TlsFiles,
    /// Invariant: always a configuration built from `files` that loaded successfully.
    config: ArcSwap<ServerConfig>,
}

impl ClientTls {
    /// Load the certificate and key.
    pub(crate) fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = server_config(&files)?;
        Ok(Self {
            files,
            config: ArcSwap::from(config),
        })
    }

    /// The configuration for a new handshake.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    /// Re-read the files; on failure the configuration in force is kept.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        self.config.store(config);
        Ok(())
    }
}

/// TLS toward the upstream server.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamTls {
    mode: SslMode,
    /// `None` exactly when `mode` is `Disable`.
    config: Option<Arc<ClientConfig>>,
}

impl UpstreamTls {
    /// Build the client configuration for `mode`. `verify-ca` and `verify-full` need `ca`.
    pub(crate) fn new(mode: SslMode, ca: Option<&Path>) -> Result<Self, TlsError> {
        Ok(Self {
            mode,
            config: client_config(mode, ca)?,
        })
    }

    /// The configured mode.
    pub(crate) fn mode(&self) -> SslMode {
        self.mode
    }

    /// Negotiate TLS on a freshly connected upstream socket: `Ok(None)` means stay in
    /// plaintext (`disable`, or `prefer` and the server said `N`).
    pub(crate) async fn negotiate(
        &self,
        mut stream: TcpStream,
        host: &str,
    ) -> Result<Negotiated, TlsError> {
        let Some(config) = &self.config else {
            return Ok(Negotiated::Plain(stream));
        };
        stream.write_all(&SSL_REQUEST).await.map_err(TlsError::Io)?;
        let answer = stream.read_u8().await.map_err(TlsError::Io)?;
        match answer {
            b'S' => {}
            b'N' if self.mode == SslMode::Prefer => return Ok(Negotiated::Plain(stream)),
            b'N' => return Err(TlsError::Refused(self.mode)),
            other => return Err(TlsError::UnexpectedAnswer(other)),
        }
        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
            .map_err(|_| TlsError::ServerName(host.to_owned()))?
            .to_owned();
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
            .connect(name, stream)
            .await
            .map_err(TlsError::Io)?;
        Ok(Negotiated::Tls(Box::new(tls)))
    }
}

/// The upstream socket after [`UpstreamTls::negotiate`].
pub(crate) enum Negotiated {
    /// No TLS.
    Plain(TcpStream),
    /// TLS established.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::File {
        path: files.key.clone(),
        message: format!("no usable private key: {e}"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|source| TlsError::Rustls {
            context: format!(
                "certificate {} with key {}",
                files.cert.display(),
                files.key.display()
            ),
            source,
        })?;
    Ok(Arc::new(config))
}
