//! TLS on both legs, with rustls and the `ring` provider.
//!
//! Toward clients: a [`ClientTls`] holds the server configuration behind an [`ArcSwap`], so a
//! SIGHUP can replace the certificate without touching the sessions in progress (each session
//! keeps the configuration its handshake started with). A reload whose files fail to load
//! keeps the configuration in force.
//!
//! Toward PostgreSQL: [`UpstreamTls`] turns an `sslmode` and an optional CA file into a
//! client configuration; [`UpstreamTls::negotiate`] sends PostgreSQL's SSLRequest on a fresh
//! upstream socket and, on `S`, runs the handshake before the client's StartupMessage is
//! forwarded.
//!
//! Never logs certificate contents or key material; errors name the file only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::SslMode;

/// PostgreSQL's SSLRequest: length 8, code 1234.5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

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

/// Certificate and key files of the client-facing TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
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
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls {
                context: "TLS protocol versions".to_owned(),
                source,
            })?;
        let verifier: Arc<dyn ServerCertVerifier> = match mode {
            SslMode::Disable => return Ok(Self { mode, config: None }),
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
        Ok(Self {
            mode,
            config: Some(Arc::new(config)),
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

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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
