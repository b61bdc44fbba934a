//! TLS client settings toward PostgreSQL, shared by the proxied sessions' upstream leg and
//! the proxy's own service connections (key store, catalog look-ups).
//!
//! [`client_config`] builds a rustls client configuration (ring provider) for an `sslmode`;
//! [`ServiceTls`] plugs the same configuration into tokio-postgres. Never logs certificate
//! contents; errors name the file only.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// TLS toward the upstream server, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never ask for TLS.
    Disable,
    /// Ask for TLS, fall back to plaintext if the server refuses; the certificate is not
    /// verified.
    Prefer,
    /// TLS or fail (08006); the certificate is not verified.
    Require,
    /// TLS or fail; the certificate chain must lead to the CA (host name not checked).
    VerifyCa,
    /// TLS or fail; chain and host name are checked.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(format!(
                    "`{other}` is not disable, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        })
    }
}

/// Certificate and key files of the client-facing TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why TLS could not be set up or negotiated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate or key file could not be read or holds no usable PEM item.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the certificate, key or CA set.
    #[error("{context}: {source}")]
    Rustls {
        /// Which files or setting were being used.
        context: String,
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// The upstream host cannot be used as a TLS server name.
    #[error("upstream host `{0}` is not a valid TLS server name")]
    ServerName(String),
    /// The upstream server refused TLS while `sslmode` requires it.
    #[error("the upstream server does not support TLS (sslmode={0})")]
    Refused(SslMode),
    /// The upstream server answered the SSLRequest with something other than `S` or `N`.
    #[error("unexpected answer {0:#04x} to the SSLRequest")]
    UnexpectedAnswer(u8),
    /// The TLS handshake or the negotiation failed.
    #[error("TLS handshake: {0}")]
    Io(#[source] std::io::Error),
}

/// The rustls client configuration for `mode`; `None` for `disable`. `verify-ca` and
/// `verify-full` need `ca`.
pub fn client_config(
    mode: SslMode,
    ca: Option<&Path>,
) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            context: "TLS protocol versions".to_owned(),
            source,
        })?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer | SslMode::Require => {
            Arc::new(DangerAcceptAnyServerCert(Arc::clone(&provider)))
        }
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let Some(ca) = ca else {
                return Err(TlsError::Rustls {
                    context: format!("sslmode={mode}"),
                    source: rustls::Error::General(
                        "a CA file (--upstream-ca) is required".to_owned(),
                    ),
                });
            };
            let webpki = web_pki_verifier(ca, &provider)?;
            if mode == SslMode::VerifyCa {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

/// Read a CA file and build the certificate verifier from it, as `verify-ca` and
/// `verify-full` do; returns the number of CA certificates. For `pgenvelope check`, which
/// also checks a CA file that the configured `sslmode` does not use.
pub fn validate_ca(ca: &Path) -> Result<usize, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let count = read_certs(ca)?.len();
    web_pki_verifier(ca, &provider)?;
    Ok(count)
}

/// TLS for tokio-postgres connections, with the same `sslmode` semantics as the upstream leg.
///
/// The default value never asks for TLS, like tokio-postgres's `NoTls`: `sslmode=prefer` in
/// the connection settings stays plaintext and `require` fails.
#[derive(Debug, Clone, Default)]
pub struct ServiceTls {
    /// `None`: behave as `NoTls`.
    mode: Option<SslMode>,
    /// `None` when `mode` is `None` or `Disable`.
    config: Option<Arc<ClientConfig>>,
}

impl ServiceTls {
    /// Build from an `sslmode` and an optional CA file.
    pub fn new(mode: SslMode, ca: Option<&Path>) -> Result<Self, TlsError> {
        Ok(Self {
            mode: Some(mode),
            config: client_config(mode, ca)?,
        })
    }

    /// Set tokio-postgres's own `sslmode` (which decides whether to ask for TLS and whether
    /// to fall back) to match.
    pub fn apply(&self, config: &mut tokio_postgres::Config) {
        use tokio_postgres::config::SslMode as PgMode;
        let mode = match self.mode {
            None if config.get_ssl_mode() == PgMode::Prefer => PgMode::Disable,
            None => return,
            Some(SslMode::Disable) => PgMode::Disable,
            Some(SslMode::Prefer) => PgMode::Prefer,
            Some(SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull) => PgMode::Require,
        };
        config.ssl_mode(mode);
    }
}

impl tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> for ServiceTls {
    type Stream = ServiceTlsStream;
    type TlsConnect = ServiceTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<ServiceTlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "invalid TLS server name"))?;
        Ok(ServiceTlsConnect {
            config: self.config.clone(),
            name,
        })
    }
}

/// One pending TLS connection of a [`ServiceTls`].
#[derive(Debug)]
pub struct ServiceTlsConnect {
    config: Option<Arc<ClientConfig>>,
    name: ServerName<'static>,
}

impl tokio_postgres::tls::TlsConnect<tokio_postgres::Socket> for ServiceTlsConnect {
    type Stream = ServiceTlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<ServiceTlsStream>> + Send>>;

    fn connect(self, stream: tokio_postgres::Socket) -> Self::Future {
        Box::pin(async move {
            let Some(config) = self.config else {
                return Err(io::Error::other("TLS is disabled (sslmode=disable)"));
            };
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(self.name, stream)
                .await?;
            Ok(ServiceTlsStream(Box::new(tls)))
        })
    }
}

/// A TLS-wrapped service connection.
#[derive(Debug)]
pub struct ServiceTlsStream(Box<tokio_rustls::client::TlsStream<tokio_postgres::Socket>>);

impl tokio_postgres::tls::TlsStream for ServiceTlsStream {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}

impl AsyncRead for ServiceTlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServiceTlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |message: String| TlsError::File {
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err("no PEM certificate found".to_owned()));
    }
    Ok(certs)
}

fn web_pki_verifier(
    ca: &Path,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots.add(cert).map_err(|source| TlsError::Rustls {
            context: format!("CA file {}", ca.display()),
            source,
        })?;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|e| TlsError::Rustls {
            context: format!("CA file {}", ca.display()),
            source: rustls::Error::General(e.to_string()),
        })
}

/// `sslmode=verify-ca`: the chain must lead to the CA; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            // The name check comes after the chain check in webpki, so a name error means
            // the chain itself was valid.
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `sslmode=prefer|require`: encryption without authentication of the server, as libpq does
/// without a root certificate. Handshake signatures are still checked.
#[derive(Debug)]
struct DangerAcceptAnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for DangerAcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
