//! Flags shared by the commands that work on the key store (`keys …`, `reencrypt`), and the
//! key store / KEK handles they open.

use std::sync::Arc;

use anyhow::Context;

use crate::config::{Config, RawConfig};
use crate::keys::{KekProvider, KeyStore};

/// Where the key store is and which KEKs may be used.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct StoreArgs {
    /// Upstream URL whose database holds the key store (the proxy's --upstream)
    /// [default: postgres://postgres@127.0.0.1:5432/postgres]
    #[arg(long, env = "PGENVELOPE_UPSTREAM", value_name = "URL")]
    pub(crate) upstream: Option<String>,

    /// Schema of the key store [default: pgenvelope]
    #[arg(long, env = "PGENVELOPE_KEY_SCHEMA", value_name = "NAME")]
    pub(crate) key_schema: Option<String>,

    /// Key-encryption key provider: wraps new data keys and unwraps the ones it wrapped
    /// (the proxy's --kms) [default: local:.pgenvelope/kek]
    #[arg(long, env = "PGENVELOPE_KMS", value_name = "URI")]
    pub(crate) kms: Option<String>,

    /// Further KEK providers used only to unwrap data keys they wrapped earlier; repeatable
    #[arg(
        long,
        env = "PGENVELOPE_KMS_ALSO",
        value_name = "URI",
        value_delimiter = ','
    )]
    pub(crate) kms_also: Vec<String>,

    /// Why: recorded with every key event this command writes (key_events.reason)
    #[arg(long, value_name = "TEXT")]
    pub(crate) reason: Option<String>,
}

impl StoreArgs {
    /// The settings these flags give (the rest come from the file and the defaults).
    pub(crate) fn overlay(&self) -> RawConfig {
        RawConfig {
            upstream: self.upstream.clone(),
            key_schema: self.key_schema.clone(),
            kms: self.kms.clone(),
            kms_also: self.kms_also.clone(),
            ..RawConfig::default()
        }
    }
}

/// A current-thread runtime for one command.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The key store named by the configuration, with its schema ensured, recording `actor` in
/// the events it writes.
pub(crate) async fn open_store(config: &Config) -> anyhow::Result<Arc<KeyStore>> {
    let tls = crate::tls::ServiceTls::new(
        config.proxy.upstream_sslmode,
        config.proxy.upstream_ca.as_deref(),
    )
    .context("TLS settings for the key store connection")?;
    let store = KeyStore::new(config.upstream.service.clone(), &config.keys.key_schema)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_tls(tls)
        .with_actor(actor());
    tokio::time::timeout(config.proxy.connect_timeout, store.ensure_schema())
        .await
        .map_err(|_| anyhow::anyhow!("the key store did not answer in time"))?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Arc::new(store))
}

/// A connection to the upstream database with the proxy's service credentials, TLS settings
/// and connect timeout (for `check --against-db` and `guard`).
pub(crate) async fn connect_upstream(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    let tls = crate::tls::ServiceTls::new(
        config.proxy.upstream_sslmode,
        config.proxy.upstream_ca.as_deref(),
    )
    .context("TLS settings for the upstream")?;
    let mut service = config.upstream.service.clone();
    tls.apply(&mut service);
    let (client, conn) = tokio::time::timeout(config.proxy.connect_timeout, service.connect(tls))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to the upstream timed out"))?
        .context("connecting to the upstream")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The primary KEK and the unwrap-only ones.
pub(crate) async fn open_keks(
    config: &Config,
) -> anyhow::Result<(Arc<dyn KekProvider>, Vec<Arc<dyn KekProvider>>)> {
    let kek = config
        .keys
        .kms
        .open()
        .await
        .with_context(|| format!("opening the KEK provider {}", config.keys.kms))?;
    let mut also = Vec::with_capacity(config.keys.kms_also.len());
    for uri in &config.keys.kms_also {
        also.push(
            uri.open()
                .await
                .with_context(|| format!("opening the unwrap-only KEK provider {uri}"))?,
        );
    }
    Ok((kek, also))
}

/// Who runs this command, for `key_events.actor`: `cli:USER@HOST`.
pub(crate) fn actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("cli:{user}@{host}")
}
