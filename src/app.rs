//! Assembly: the one function that builds a running proxy from a [`Config`], used by
//! `pgenvelope serve` and by the end-to-end tests.
//!
//! [`build`] loads the rules, opens the KEK providers, starts the encrypting layer and binds
//! the listener, in that order: a bad rule file or an unreachable KEK fails before any port is
//! bound. A caller may hand in some of these parts instead ([`Parts`]); everything else comes
//! from the configuration. Installs no logger and handles no signals (that is `cli::serve`);
//! never logs values or key material.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::Config;
use crate::keys::{KekError, KekProvider, KeyError, KmsUri};
use crate::proxy::{Encryption, EncryptionSettings, Server};
use crate::rules::{load_path, RuleSet, RulesError};
use crate::tls::{ServiceTls, TlsError};

/// What a caller may give [`build`] instead of what the configuration names. `None` (the
/// default): built from the configuration.
#[derive(Default)]
pub struct Parts {
    /// The rules, instead of loading `config.encryption.rules` (which is then only named in
    /// logs).
    pub rules: Option<RuleSet>,
    /// The KEK provider, instead of opening `config.keys.kms`.
    pub kek: Option<Arc<dyn KekProvider>>,
    /// The unwrap-only KEK providers, instead of opening `config.keys.kms_also`.
    pub kek_also: Option<Vec<Arc<dyn KekProvider>>>,
}

/// A built proxy: bound, not yet serving.
pub struct App {
    /// The bound listener; serve with [`Server::run`] or [`Server::run_threads`].
    pub server: Server,
    /// The encrypting layer; `None` when the rules name no encrypted column (the proxy then
    /// only relays).
    pub encryption: Option<Arc<Encryption>>,
}

/// Why the proxy could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The rule files could not be read or are invalid. Shown as the rules error alone: its
    /// message already names the file, the key and the cause.
    #[error("{0}")]
    Rules(RulesError),
    /// The KEK provider (`kms`) could not be opened.
    #[error("opening the KEK provider {uri}")]
    Kek {
        /// The provider's URI (a PKCS#11 PIN is redacted when shown).
        uri: KmsUri,
        /// Why.
        #[source]
        source: KekError,
    },
    /// An unwrap-only KEK provider (`kms_also`) could not be opened.
    #[error("opening the unwrap-only KEK provider {uri}")]
    KekAlso {
        /// The provider's URI.
        uri: KmsUri,
        /// Why.
        #[source]
        source: KekError,
    },
    /// The TLS settings of the service connections (key store, catalog) are invalid, e.g. an
    /// unreadable `upstream_ca`.
    #[error("TLS settings for the service connections")]
    ServiceTls(#[source] TlsError),
    /// The key store could not be set up (e.g. an invalid schema or service connection).
    #[error("starting the key manager")]
    KeyStore(#[source] KeyError),
    /// The listener could not be bound, or the client TLS files or the upstream CA could not be
    /// loaded (an `InvalidInput` error naming the file).
    #[error("binding {addr}")]
    Bind {
        /// The configured listen address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Build the proxy `config` describes, with the `parts` the caller gives instead.
///
/// Without encrypted columns in the rules no KEK is opened and no key store is touched: the
/// proxy only relays.
pub async fn build(config: &Config, parts: Parts) -> Result<App, BuildError> {
    let encryption = start_encryption(config, parts).await?;
    let server = Server::bind_with(config.proxy.clone(), encryption.clone())
        .await
        .map_err(|source| BuildError::Bind {
            addr: config.proxy.listen,
            source,
        })?;
    Ok(App { server, encryption })
}

/// Load rules and keys and start the encrypting layer; `None` when there are no rules.
async fn start_encryption(
    config: &Config,
    parts: Parts,
) -> Result<Option<Arc<Encryption>>, BuildError> {
    let rules = match parts.rules {
        Some(rules) => rules,
        None => load_path(&config.encryption.rules).map_err(BuildError::Rules)?,
    };
    if rules.is_empty() {
        tracing::warn!(rules = %config.encryption.rules.display(), "no encrypted columns configured: relaying only");
        return Ok(None);
    }
    let columns: usize = rules.tables().map(|t| t.columns().len()).sum();
    tracing::info!(tables = rules.len(), columns, "rules loaded");

    let kek = match parts.kek {
        Some(kek) => kek,
        None => {
            let uri = &config.keys.kms;
            if let KmsUri::Local { path } = uri {
                tracing::warn!(
                    path = %path.display(),
                    "using a LOCAL key-encryption key file: for development only, use a KMS or HSM in production"
                );
            }
            uri.open().await.map_err(|source| BuildError::Kek {
                uri: uri.clone(),
                source,
            })?
        }
    };
    let kek_also = match parts.kek_also {
        Some(also) => also,
        None => {
            let mut also = Vec::with_capacity(config.keys.kms_also.len());
            for uri in &config.keys.kms_also {
                also.push(uri.open().await.map_err(|source| BuildError::KekAlso {
                    uri: uri.clone(),
                    source,
                })?);
            }
            also
        }
    };
    for also in &kek_also {
        tracing::info!(kek = %also.kek_id(), "unwrap-only KEK loaded");
    }

    let service_tls = ServiceTls::new(
        config.proxy.upstream_sslmode,
        config.proxy.upstream_ca.as_deref(),
    )
    .map_err(BuildError::ServiceTls)?;
    let encryption = Encryption::start(EncryptionSettings {
        rules,
        kek,
        kek_also,
        keys: config.keys.clone(),
        encryption: config.encryption.clone(),
        service: config.upstream.service.clone(),
        connect_timeout: config.proxy.connect_timeout,
        service_tls,
    })
    .await
    .map_err(BuildError::KeyStore)?;
    Ok(Some(encryption))
}
