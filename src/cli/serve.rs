//! `pgenvelope serve`: install logging, build the proxy ([`crate::app::build`]: rules, keys,
//! listener), then serve until a signal; reloads on SIGHUP and serves the admin endpoint.

use std::sync::Arc;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

use crate::app::{self, App, Parts};
use crate::config::{Config, LogFormat};
use crate::proxy::{Encryption, ServerHandle};
use crate::rules::load_path;

/// Install logging, bind the listener and serve until SIGINT/SIGTERM.
pub(crate) fn run(config: Config) -> anyhow::Result<i32> {
    init_tracing(&config)?;
    // The main runtime runs start-up, signals and background key work; connections are
    // served by `workers` threads with one single-threaded runtime each.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let workers = config.ops.workers;
    runtime.block_on(async move {
        let App { server, encryption } = app::build(&config, Parts::default()).await?;
        let addr = server.local_addr().context("reading the bound address")?;
        tracing::info!(
            listen = %addr,
            upstream = %format_args!("{}:{}", config.upstream.host, config.upstream.port),
            "listening on {addr}"
        );
        let handle = server.handle();
        spawn_reload(
            encryption.clone(),
            config.encryption.rules.clone(),
            handle.clone(),
        );
        if let Some(admin) = config.ops.admin {
            let listener = tokio::net::TcpListener::bind(admin)
                .await
                .with_context(|| format!("binding the admin address {admin}"))?;
            tracing::info!(admin = %admin, "admin endpoint: /metrics /healthz /readyz");
            tokio::spawn(crate::admin::serve(
                listener,
                handle.clone(),
                std::future::pending(),
            ));
        }
        let (kind_tx, kind_rx) = tokio::sync::oneshot::channel();
        server
            .run_threads(workers, async move {
                let _ = kind_tx.send(shutdown_signal().await);
            })
            .await
            .context("starting the worker threads")?;
        match kind_rx.await.unwrap_or(Stop::Fast) {
            Stop::Graceful => {
                tracing::info!(
                    sessions = handle.active_connections(),
                    grace = ?config.ops.shutdown_grace,
                    "draining: sessions close at their next idle point"
                );
                handle.drain();
                let drained = tokio::select! {
                    done = handle.wait_idle(config.ops.shutdown_grace) => done,
                    _ = tokio::signal::ctrl_c() => false,
                };
                if !drained {
                    tracing::info!(
                        sessions = handle.active_connections(),
                        "closing the remaining sessions"
                    );
                }
            }
            Stop::Fast => {}
        }
        handle.close_all();
        handle.wait_idle(std::time::Duration::from_secs(2)).await;
        if let Some(encryption) = encryption {
            if let Err(e) = encryption.keys().flush_counters().await {
                tracing::warn!(error = %e, "could not save encryption counters");
            }
        }
        Ok(0)
    })
}

/// Log directives that always apply (see `init_tracing`).
const QUIET_LIBRARIES: &[&str] = &[
    "sqlparser=off",
    "tokio_postgres=warn",
    "postgres_protocol=warn",
    "aws_smithy_runtime=warn",
    "aws_smithy_runtime_api=warn",
    "aws_smithy_http_client=warn",
    "aws_config=warn",
    "aws_sdk_kms=warn",
    "aws_sdk_sts=warn",
    "hyper=warn",
    "hyper_util=warn",
    "h2=warn",
    "rustls=warn",
    "cryptoki=warn",
];

fn init_tracing(config: &Config) -> anyhow::Result<()> {
    let mut filter = match &config.ops.log {
        Some(f) => EnvFilter::try_new(f).with_context(|| format!("invalid log filter `{f}`"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    // Libraries that log SQL text, bind parameters or request bodies at debug/trace level are
    // capped whatever the filter says: the proxy's logs must never hold values or keys.
    for directive in QUIET_LIBRARIES {
        filter = filter.add_directive(
            directive
                .parse()
                .with_context(|| format!("built-in log directive `{directive}`"))?,
        );
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.ops.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("installing the logger: {e}"))
}

/// Reload the rules (when encrypting) and the client TLS certificate (when configured) on
/// SIGHUP. A rule set that fails to load (or is empty), or certificate files that fail to
/// load, are logged and what is in force is kept.
fn spawn_reload(engine: Option<Arc<Encryption>>, path: std::path::PathBuf, handle: ServerHandle) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: rules cannot be reloaded");
                return;
            }
        };
        while hup.recv().await.is_some() {
            match handle.reload_tls() {
                Ok(true) => tracing::info!("TLS certificate reloaded"),
                Ok(false) => {}
                Err(e) => tracing::error!(
                    error = %e,
                    "TLS certificate not reloaded; keeping the certificate in force"
                ),
            }
            let Some(engine) = &engine else {
                continue;
            };
            let p = path.clone();
            match tokio::task::spawn_blocking(move || load_path(&p)).await {
                Ok(Ok(rules)) if rules.is_empty() => tracing::error!(
                    rules = %path.display(),
                    "reloaded rules are empty; keeping the rules in force"
                ),
                Ok(Ok(rules)) => {
                    let tables = rules.len();
                    engine.reload(rules);
                    tracing::info!(tables, "rules reloaded");
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "rules not reloaded; keeping the rules in force")
                }
                Err(e) => tracing::error!(error = %e, "rules not reloaded"),
            }
        }
    });
}

/// How to stop: SIGTERM drains sessions within the grace period, SIGINT closes them at once.
enum Stop {
    Graceful,
    Fast,
}

async fn shutdown_signal() -> Stop {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return Stop::Fast;
                }
            };
        tokio::select! {
            _ = ctrl_c => {
                tracing::info!("SIGINT received: closing every session now");
                Stop::Fast
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM received: draining");
                Stop::Graceful
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
        Stop::Fast
    }
}
