//! Flags shared by the commands that work on the key store (`keys …`, `reencrypt`) or on the
//! application's tables (`reencrypt`, `check --against-db`, `guard`), and the key store, KEK
//! and database handles they open.

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

/// Where the application's tables are, when not in the key store's database.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DataArgs {
    /// Database holding the application's tables, on the --upstream server with the same user,
    /// password and TLS settings; the key store stays in the --upstream URL's database, where
    /// the proxies keep it [default: the --upstream URL's database]
    #[arg(long, env = "PGENVELOPE_DATA_DATABASE", value_name = "NAME")]
    pub(crate) data_database: Option<String>,
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
    let store = store_handle(config)?;
    tokio::time::timeout(config.proxy.connect_timeout, store.ensure_schema())
        .await
        .map_err(|_| anyhow::anyhow!("the key store did not answer in time"))?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(store)
}

/// The key store named by the configuration (the proxies': schema `key_schema` in the
/// upstream URL's database), recording `actor` in the events it writes. Does not connect, and
/// creates nothing.
pub(crate) fn store_handle(config: &Config) -> anyhow::Result<Arc<KeyStore>> {
    let tls = crate::tls::ServiceTls::new(
        config.proxy.upstream_sslmode,
        config.proxy.upstream_ca.as_deref(),
    )
    .context("TLS settings for the key store connection")?;
    let store = KeyStore::new(config.upstream.service.clone(), &config.keys.key_schema)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_tls(tls)
        .with_actor(actor());
    Ok(Arc::new(store))
}

/// A connection to the database of the application's tables (`--data-database`, else the
/// upstream URL's) with the proxy's service credentials, TLS settings and connect timeout (for
/// `check --against-db` and `guard`).
pub(crate) async fn connect_data(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    let tls = crate::tls::ServiceTls::new(
        config.proxy.upstream_sslmode,
        config.proxy.upstream_ca.as_deref(),
    )
    .context("TLS settings for the upstream")?;
    let mut service = config.upstream.data_service();
    tls.apply(&mut service);
    let what = data_database_label(config);
    let (client, conn) = tokio::time::timeout(config.proxy.connect_timeout, service.connect(tls))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {what} timed out"))?
        .with_context(|| format!("connecting to {what}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The database of the application's tables for messages: `database NAME`, and which setting
/// named it.
pub(crate) fn data_database_label(config: &Config) -> String {
    let name = config.upstream.data_database_name();
    match config.upstream.data_database {
        Some(_) => format!("database {name} (--data-database)"),
        None => format!("database {name} (of --upstream)"),
    }
}

/// "does not exist in database D" for a table of the rules, and when D is the upstream URL's,
/// how to name another.
pub(crate) fn not_in_data_database(config: &Config) -> String {
    let label = data_database_label(config);
    match config.upstream.data_database {
        Some(_) => format!("does not exist in {label}"),
        None => format!(
            "does not exist in {label}; if the application's tables are in another database \
             than the key store, name it with --data-database"
        ),
    }
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
