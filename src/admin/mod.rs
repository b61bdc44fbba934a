//! Admin HTTP endpoint (`--admin`): `/metrics` (Prometheus text format), `/healthz`,
//! `/readyz`.
//!
//! A deliberately small HTTP/1.1 server: GET or HEAD of three fixed paths, one request per
//! connection, requests over 8 KiB refused. It serves operators and probes on a loopback or
//! pod-local address, never application traffic. Metric labels come from small fixed sets;
//! nothing here ever carries SQL, values or keys.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::proxy::{DrainState, ServerHandle};

/// Largest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time each readiness check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Serve the admin endpoint until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    proxy: ServerHandle,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let proxy = Arc::new(proxy);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let proxy = Arc::clone(&proxy);
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, &proxy).await {
                            tracing::debug!(error = %e, "admin request failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn handle(mut stream: TcpStream, proxy: &ServerHandle) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let head = tokio::time::timeout(REQUEST_TIMEOUT, async {
        loop {
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > MAX_REQUEST {
                return Ok::<_, std::io::Error>(());
            }
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    if !matches!(head, Ok(Ok(()))) || buf.len() > MAX_REQUEST {
        return respond(&mut stream, 400, "text/plain", "bad request\n", false).await;
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(
            &mut stream,
            405,
            "text/plain",
            "method not allowed\n",
            false,
        )
        .await;
    }
    let path = path.split('?').next().unwrap_or("");
    match path {
        "/metrics" => {
            let body = metrics(proxy);
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
                head_only,
            )
            .await
        }
        "/healthz" | "/livez" => respond(&mut stream, 200, "text/plain", "ok\n", head_only).await,
        "/readyz" => {
            let (ready, why) = readiness(proxy).await;
            let status = if ready { 200 } else { 503 };
            respond(
                &mut stream,
                status,
                "text/plain",
                &format!("{why}\n"),
                head_only,
            )
            .await
        }
        _ => respond(&mut stream, 404, "text/plain", "not found\n", head_only).await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nCache-Control: no-store\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

/// Ready when the proxy is not draining, the upstream accepts TCP connections and, with rules
/// configured, the key store answers.
pub async fn readiness(proxy: &ServerHandle) -> (bool, String) {
    if proxy.state() != DrainState::Running {
        return (false, "shutting down".to_owned());
    }
    let upstream = proxy.upstream_addr();
    match tokio::time::timeout(CHECK_TIMEOUT, TcpStream::connect(&upstream)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return (false, format!("upstream {upstream} unreachable: {e}")),
        Err(_) => return (false, format!("upstream {upstream} did not answer in time")),
    }
    if let Some(engine) = proxy.encryption() {
        match tokio::time::timeout(CHECK_TIMEOUT, engine.keys().store().ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return (false, format!("key store not ready: {e}")),
            Err(_) => return (false, "key store did not answer in time".to_owned()),
        }
        return (
            true,
            "ready (rules loaded, upstream and key store answer)".to_owned(),
        );
    }
    (true, "ready (no rules: relaying only)".to_owned())
}

/// The Prometheus text exposition of everything the proxy counts.
pub fn metrics(proxy: &ServerHandle) -> String {
    let mut registry = Registry::with_prefix("pgenvelope");
    proxy.register_metrics(&mut registry);
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
        let _ = writeln!(out, "# metrics could not be encoded");
    }
    out
}
