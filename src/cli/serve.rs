//! `pgenvelope serve`: load and validate everything, then bind, then run until a signal.

use anyhow::Context;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};
use crate::proxy::Server;

/// Install logging, bind the listener and serve until SIGINT/SIGTERM.
pub(crate) fn run(config: Config) -> anyhow::Result<i32> {
    init_tracing(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("pgenvelope")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let server = Server::bind(config.proxy())
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = server.local_addr().context("reading the bound address")?;
        tracing::info!(
            listen = %addr,
            upstream = %format_args!("{}:{}", config.upstream.host, config.upstream.port),
            "listening on {addr}"
        );
        server.run(shutdown_signal()).await;
        Ok(0)
    })
}

fn init_tracing(config: &Config) -> anyhow::Result<()> {
    let filter = match &config.log {
        Some(f) => EnvFilter::try_new(f).with_context(|| format!("invalid log filter `{f}`"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("installing the logger: {e}"))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
