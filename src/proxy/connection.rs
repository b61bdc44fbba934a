//! Per-client task: the startup phase (SSL/GSS negotiation and the TLS handshake, cancel
//! routing, StartupMessage), the upstream connection and its TLS negotiation, then the two
//! message pumps until either side closes.
//!
//! The relay is generic over both streams ([`Split`]): plaintext TCP splits into owned halves
//! without locking, TLS streams go through `tokio::io::split`.
//!
//! Both directions run concurrently inside the one task (so neither can block the other), and
//! whichever side closes first ends the connection: a client that vanishes closes its server
//! connection, and a server that ends the session (FATAL error, `pg_terminate_backend`,
//! restart) has its last messages flushed to the client before the client is closed. A client
//! that vanishes while a statement runs also has that statement cancelled (a CancelRequest for
//! its backend): a backend busy in a long query would otherwise notice the closed socket only
//! when it next writes.
//!
//! Connecting is bounded by the connect timeout up to the server's first answer to the
//! StartupMessage, so an upstream that accepts TCP but never answers (overloaded, stopped)
//! gives the client `08006` instead of a hang.
//!
//! A panic inside a session (a bug) is caught at the session's task: that client gets a FATAL
//! `XX000` (when its connection is still in a state to receive it) and is closed; the worker
//! thread and every other session go on.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::crypto::OrgId;
use crate::proxy::auth::{self, Legs};
use crate::proxy::cancel::{CancelGuard, CancelRegistry};
use crate::proxy::client_side::ClientSide;
use crate::proxy::drain::{session_must_end, Activity};
use crate::proxy::engine::Cipher;
use crate::proxy::error::ConnError;
use crate::proxy::fault;
use crate::proxy::pump::{self, Handler, PumpError};
use crate::proxy::server_side::ServerSide;
use crate::proxy::session::Session;
use crate::proxy::tls::{ClientTls, Negotiated};
use crate::proxy::Shared;
use crate::sql::TENANT_SETTING;
use crate::wire::backend::{self, TransactionStatus};
use crate::wire::header::scan_startup;
use crate::wire::startup::{StartupPacket, StartupParams};
use crate::wire::{Frame, WireError};

/// How long a client may take to send its startup packet (PostgreSQL's
/// `authentication_timeout` default).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// What the proxy knows about a session, shared by its two pumps.
#[derive(Debug, Default)]
pub struct SessionState {
    /// The session's `client_encoding` as last reported by the server.
    pub client_encoding: Option<String>,
    /// Transaction status from the last ReadyForQuery.
    pub transaction: Option<TransactionStatus>,
    /// The server's process id from BackendKeyData.
    pub backend_pid: Option<i32>,
}

/// Serve one accepted client connection to completion.
pub(crate) async fn serve(client: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!(
        "conn",
        conn.id = id,
        client.addr = %peer,
        db.user = tracing::field::Empty,
        db.name = tracing::field::Empty,
    );
    async move {
        tracing::trace!("accepted");
        match catch_panic(Box::pin(serve_inner(client, &shared))).await {
            Ok(()) => tracing::debug!("closed"),
            Err(e @ (ConnError::ClientIo(_) | ConnError::ServerIo(_))) => {
                tracing::debug!(error = %e, "closed")
            }
            Err(e @ ConnError::Internal) => tracing::error!(error = %e, "connection closed"),
            Err(e) => tracing::info!(error = %e, "connection ended with an error"),
        }
    }
    .instrument(span)
    .await
}

/// A client or server stream that can be split into two owned halves, one per pump.
pub(crate) trait Split: AsyncRead + AsyncWrite + Unpin + Send {
    /// The read half.
    type Read: AsyncRead + Unpin + Send;
    /// The write half.
    type Write: AsyncWrite + Unpin + Send;
    /// Split the stream.
    fn into_halves(self) -> (Self::Read, Self::Write);
}

impl Split for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;

    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl Split for tokio_rustls::server::TlsStream<TcpStream> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;

    fn into_halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

impl Split for Box<tokio_rustls::client::TlsStream<TcpStream>> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;

    fn into_halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// Where the startup phase on one stream ended.
enum Startup {
    /// Nothing more to do (clean EOF, or a CancelRequest that was handled).
    Done,
    /// The client asked for TLS and it is configured; `S` is not sent yet.
    Tls(tokio_rustls::TlsAcceptor),
    /// A StartupMessage.
    Packet(Bytes),
}

/// What the relay needs from the StartupMessage.
struct Start {
    packet: Bytes,
    replication: bool,
    db: String,
    tenant: Option<OrgId>,
}

async fn serve_inner(mut client: TcpStream, shared: &Arc<Shared>) -> Result<(), ConnError> {
    let _ = client.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(1024);
    match startup(
        &mut client,
        &mut buf,
        shared,
        shared.client_tls.as_ref(),
        false,
    )
    .await?
    {
        Startup::Done => Ok(()),
        Startup::Packet(packet) => {
            if shared.config.require_client_tls {
                return fail(&mut client, ConnError::ClientTlsRequired).await;
            }
            session(client, false, packet, buf, shared).await
        }
        Startup::Tls(acceptor) => {
            client.write_all(b"S").await.map_err(ConnError::ClientIo)?;
            let mut tls = match tokio::time::timeout(STARTUP_TIMEOUT, acceptor.accept(client)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return Err(ConnError::ClientTls(e)),
                Err(_) => return Err(ConnError::StartupTimeout),
            };
            match startup(&mut tls, &mut buf, shared, None, true).await? {
                Startup::Packet(packet) => session(tls, true, packet, buf, shared).await,
                Startup::Done | Startup::Tls(_) => Ok(()),
            }
        }
    }
}

/// Read startup-phase packets until a StartupMessage, answering SSLRequest/GSSENCRequest
/// with `N` (or handing back to the caller when `tls` is given and the client asks for it)
/// and routing CancelRequests.
async fn startup<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    buf: &mut BytesMut,
    shared: &Arc<Shared>,
    tls: Option<&ClientTls>,
    tls_done: bool,
) -> Result<Startup, ConnError> {
    // At most one SSLRequest and one GSSENCRequest, and none once TLS is up, as in PostgreSQL.
    let (mut ssl_asked, mut gss_asked) = (tls_done, tls_done);
    loop {
        let len = match tokio::time::timeout(STARTUP_TIMEOUT, read_startup(client, buf)).await {
            Ok(Ok(Some(len))) => len,
            Ok(Ok(None)) => return Ok(Startup::Done),
            Ok(Err(e)) => return fail(client, e).await,
            Err(_) => return Err(ConnError::StartupTimeout),
        };
        let packet = buf.split_to(len).freeze();
        let parsed = match StartupPacket::parse(&packet) {
            Ok(p) => p,
            Err(e) => return fail(client, ConnError::ClientProtocol(e)).await,
        };
        match parsed {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                // Bytes sent before the answer would otherwise be read as if they had come
                // through the encrypted channel.
                if !buf.is_empty() {
                    return fail(client, ConnError::BufferedBeforeNegotiation).await;
                }
                let asked = match parsed {
                    StartupPacket::SslRequest => &mut ssl_asked,
                    _ => &mut gss_asked,
                };
                if std::mem::replace(asked, true) {
                    return fail(client, ConnError::RepeatedNegotiation).await;
                }
                if let (StartupPacket::SslRequest, Some(tls)) = (&parsed, tls) {
                    return Ok(Startup::Tls(tls.acceptor()));
                }
                client.write_all(b"N").await.map_err(ConnError::ClientIo)?;
            }
            StartupPacket::CancelRequest { key } => {
                shared
                    .cancels
                    .forward(key, shared.config.connect_timeout)
                    .await;
                return Ok(Startup::Done);
            }
            StartupPacket::Startup(_) => return Ok(Startup::Packet(packet)),
        }
    }
}

/// Check the StartupMessage, connect and negotiate the upstream, then relay. `client_tls`:
/// the client's leg is TLS.
async fn session<C: Split>(
    mut client: C,
    client_tls: bool,
    packet: Bytes,
    buf: BytesMut,
    shared: &Arc<Shared>,
) -> Result<(), ConnError> {
    let StartupPacket::Startup(params) =
        StartupPacket::parse(&packet).map_err(ConnError::ClientProtocol)?
    else {
        return Ok(());
    };
    record_params(&params);
    if shared.engine.is_some() {
        if let Some(bad) = invalid_startup_tenant(&params) {
            return fail(&mut client, bad).await;
        }
    }
    let start = Start {
        replication: params.is_replication(),
        db: params
            .get_str("database")
            .or(params.get_str("user"))
            .unwrap_or_default()
            .to_owned(),
        tenant: startup_tenant(&params),
        packet: packet.clone(),
    };

    let Ok(_permit) = Arc::clone(&shared.permits).try_acquire_owned() else {
        return fail(&mut client, ConnError::TooManyConnections).await;
    };

    shared.sessions_total.fetch_add(1, Ordering::Relaxed);
    let upstream_addr = shared.config.upstream_addr();
    let timeout = shared.config.connect_timeout;
    let server = match connect_upstream(&upstream_addr, timeout).await {
        Ok(s) => s,
        Err(e) => {
            shared
                .upstream_connect_errors
                .fetch_add(1, Ordering::Relaxed);
            return fail(&mut client, e).await;
        }
    };
    let server_addr = server.peer_addr().map_err(ConnError::ServerIo)?;
    let negotiate = shared
        .upstream_tls
        .negotiate(server, &shared.config.upstream_host);
    let negotiated = match tokio::time::timeout(timeout, negotiate).await {
        Ok(Ok(n)) => n,
        Ok(Err(source)) => {
            tracing::warn!(error = %source, sslmode = %shared.upstream_tls.mode(), "upstream TLS failed");
            shared
                .upstream_connect_errors
                .fetch_add(1, Ordering::Relaxed);
            let e = ConnError::UpstreamTls {
                addr: upstream_addr,
                source,
            };
            return fail(&mut client, e).await;
        }
        Err(_) => {
            shared
                .upstream_connect_errors
                .fetch_add(1, Ordering::Relaxed);
            let e = ConnError::UpstreamConnect {
                addr: upstream_addr,
                source: std::io::ErrorKind::TimedOut.into(),
            };
            return fail(&mut client, e).await;
        }
    };
    match negotiated {
        Negotiated::Plain(server) => {
            let legs = Legs {
                client_tls,
                upstream_tls: false,
            };
            relay(client, server, server_addr, start, legs, buf, shared).await
        }
        Negotiated::Tls(server) => {
            let legs = Legs {
                client_tls,
                upstream_tls: true,
            };
            relay(client, server, server_addr, start, legs, buf, shared).await
        }
    }
}

/// Forward the StartupMessage, relay the authentication exchange, then run the two pumps
/// until either side closes.
async fn relay<C: Split, U: Split>(
    mut client: C,
    mut server: U,
    server_addr: SocketAddr,
    start: Start,
    legs: Legs,
    buf: BytesMut,
    shared: &Arc<Shared>,
) -> Result<(), ConnError> {
    server
        .write_all(&start.packet)
        .await
        .map_err(ConnError::ServerIo)?;
    let server_buf = match first_answer(&mut server, shared).await {
        Ok(b) => b,
        Err(e) => {
            shared
                .upstream_connect_errors
                .fetch_add(1, Ordering::Relaxed);
            return fail(&mut client, e).await;
        }
    };
    let limit = shared.config.max_message_size;
    let authenticated = auth::relay(&mut client, &mut server, buf, server_buf, legs, limit).await;
    let (buf, server_buf) = match authenticated {
        Ok(Some(bufs)) => bufs,
        // A side closed: a failed login (its error relayed) or a client that gave up.
        Ok(None) => {
            let _ = client.shutdown().await;
            return Ok(());
        }
        Err(e) => return fail(&mut client, e).await,
    };

    if start.replication {
        // Replication sessions (physical or logical, CopyBoth streams included) are relayed
        // as raw bytes: values stay exactly as stored.
        tracing::debug!("replication connection: raw relay");
        client
            .write_all(&server_buf)
            .await
            .map_err(ConnError::ClientIo)?;
        server.write_all(&buf).await.map_err(ConnError::ServerIo)?;
        return tokio::io::copy_bidirectional(&mut client, &mut server)
            .await
            .map(|_| ())
            .map_err(ConnError::ClientIo);
    }

    let state = Arc::new(Mutex::new(SessionState::default()));
    let (mut client_r, mut client_w) = client.into_halves();
    let (mut server_r, mut server_w) = server.into_halves();
    let activity = Arc::new(Activity::new(Arc::clone(&shared.statements)));
    let tracker = Tracker {
        state: Arc::clone(&state),
        activity: Arc::clone(&activity),
        cancels: Arc::clone(&shared.cancels),
        server_addr,
        cancel_guard: None,
    };

    // Set when the client's direction ended first: the client closed or vanished.
    let mut client_gone = false;
    let result = match &shared.engine {
        None => {
            let mut to_server = ClientToServer {
                activity: Arc::clone(&activity),
            };
            let mut to_client = ServerToClient { tracker };
            // Boxed: the pump futures are large, and the panic guard below moves its future.
            let c2s = Box::pin(pump::run(
                &mut client_r,
                &mut server_w,
                &mut to_server,
                buf,
                limit,
            ));
            let s2c = Box::pin(pump::run(
                &mut server_r,
                &mut client_w,
                &mut to_client,
                server_buf,
                limit,
            ));
            let result = catch_panic(Box::pin(async {
                tokio::select! {
                    r = c2s => {
                        client_gone = true;
                        r.map_err(ConnError::from_client_pump)
                    }
                    r = s2c => r.map_err(ConnError::from_server_pump),
                    () = session_must_end(shared.drain.subscribe(), &activity) => Err(ConnError::Shutdown),
                }
            }))
            .await;
            if client_gone {
                cancel_if_busy(&to_client.tracker, shared).await;
            }
            result
        }
        Some(engine) => {
            let session = Arc::new(Mutex::new(Session::new(start.db, start.tenant)));
            let mut to_server = ClientSide {
                session: Arc::clone(&session),
                cipher: Cipher::new(Arc::clone(engine)),
                copy_in: None,
                copy_failed: false,
                max_row: limit,
                activity: Arc::clone(&activity),
            };
            let mut to_client = Encrypting {
                tracker,
                inner: ServerSide::new(session, Cipher::new(Arc::clone(engine)), limit),
            };
            // Boxed: the pump futures are large, and the panic guard below moves its future.
            let c2s = Box::pin(pump::run(
                &mut client_r,
                &mut server_w,
                &mut to_server,
                buf,
                limit,
            ));
            let s2c = Box::pin(pump::run(
                &mut server_r,
                &mut client_w,
                &mut to_client,
                server_buf,
                limit,
            ));
            let result = catch_panic(Box::pin(async {
                tokio::select! {
                    r = c2s => {
                        client_gone = true;
                        r.map_err(ConnError::from_client_pump)
                    }
                    r = s2c => r.map_err(ConnError::from_server_pump),
                    () = session_must_end(shared.drain.subscribe(), &activity) => Err(ConnError::Shutdown),
                }
            }))
            .await;
            if client_gone {
                cancel_if_busy(&to_client.tracker, shared).await;
            }
            result
        }
    };
    if let Err(e) = &result {
        let mut out = BytesMut::new();
        e.write_fatal(&mut out);
        if !out.is_empty() {
            let _ = client_w.write_all(&out).await;
        }
    }
    let _ = client_w.shutdown().await;
    result
}

/// Read until `buf` holds a whole startup-phase packet; `Ok(None)` on a clean EOF before any
/// byte.
async fn read_startup<S: AsyncRead + Unpin>(
    client: &mut S,
    buf: &mut BytesMut,
) -> Result<Option<usize>, ConnError> {
    loop {
        if let Some(len) = scan_startup(buf).map_err(|_| ConnError::BadStartupLength)? {
            return Ok(Some(len));
        }
        let n = client.read_buf(buf).await.map_err(ConnError::ClientIo)?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(ConnError::ClientIo(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
    }
}

/// Wait, at most the connect timeout, for the server's first answer to the StartupMessage; the
/// bytes read go to the server → client pump.
async fn first_answer<U: AsyncRead + Unpin>(
    server: &mut U,
    shared: &Shared,
) -> Result<BytesMut, ConnError> {
    let addr = shared.config.upstream_addr();
    let mut buf = BytesMut::with_capacity(1024);
    let failed = |source: std::io::Error| ConnError::UpstreamConnect {
        addr: addr.clone(),
        source,
    };
    match tokio::time::timeout(shared.config.connect_timeout, server.read_buf(&mut buf)).await {
        Ok(Ok(0)) => Err(failed(std::io::ErrorKind::UnexpectedEof.into())),
        Ok(Ok(_)) => Ok(buf),
        Ok(Err(e)) => Err(failed(e)),
        Err(_) => Err(failed(std::io::ErrorKind::TimedOut.into())),
    }
}

/// The client is gone: if a statement may still be running for it, ask the server to cancel
/// it, so the backend does not work on until it next writes to the closed socket.
async fn cancel_if_busy(tracker: &Tracker, shared: &Shared) {
    if tracker.activity.is_idle() {
        return;
    }
    if let Some(guard) = &tracker.cancel_guard {
        tracing::debug!("client vanished during a statement: cancelling it");
        shared
            .cancels
            .forward(guard.key(), shared.config.connect_timeout)
            .await;
    }
}

/// Run a session future, turning a panic inside it into [`ConnError::Internal`] so the caller
/// can still answer the client; the panic itself has been reported by the panic hook.
/// The future comes boxed: session futures are large, and taking one by value would keep a
/// second, unused copy of it in the caller's state (memory per idle connection, and the
/// worker thread's stack in debug builds).
async fn catch_panic<F: Future<Output = Result<(), ConnError>>>(
    mut fut: std::pin::Pin<Box<F>>,
) -> Result<(), ConnError> {
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(_) => Poll::Ready(Err(ConnError::Internal)),
        }
    })
    .await
}

async fn connect_upstream(addr: &str, timeout: Duration) -> Result<TcpStream, ConnError> {
    let connect = tokio::time::timeout(timeout, TcpStream::connect(addr)).await;
    let stream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            return Err(ConnError::UpstreamConnect {
                addr: addr.to_owned(),
                source,
            })
        }
        Err(_) => {
            return Err(ConnError::UpstreamConnect {
                addr: addr.to_owned(),
                source: std::io::ErrorKind::TimedOut.into(),
            })
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Send the client the FATAL response for `e` (if it has one) and return `e`.
async fn fail<S: AsyncWrite + Unpin, T>(client: &mut S, e: ConnError) -> Result<T, ConnError> {
    let mut out = BytesMut::new();
    e.write_fatal(&mut out);
    if !out.is_empty() {
        let _ = client.write_all(&out).await;
        let _ = client.shutdown().await;
    }
    Err(e)
}

fn record_params(params: &StartupParams<'_>) {
    let span = tracing::Span::current();
    if let Some(user) = params.get_str("user") {
        span.record("db.user", user);
    }
    if let Some(db) = params.get_str("database").or(params.get_str("user")) {
        span.record("db.name", db);
    }
}

/// Client → server: nothing needs decoding for pass-through.
struct ClientToServer {
    activity: Arc<Activity>,
}

impl Handler for ClientToServer {
    type Error = PumpError;

    fn inspects(&self, tag: u8) -> bool {
        fault::INSPECTS_QUERIES && tag == crate::wire::frontend::QUERY_TAG
    }

    fn on_tag(&mut self, tag: u8) {
        self.activity.client_message(tag);
    }

    async fn on_message(&mut self, frame: Frame, out: &mut BytesMut) -> Result<(), PumpError> {
        fault::check(&frame);
        out.extend_from_slice(frame.raw());
        Ok(())
    }
}

/// Observes the server's session-level messages: ParameterStatus, BackendKeyData (registers
/// the cancel key), ReadyForQuery.
pub(crate) struct Tracker {
    pub(crate) state: Arc<Mutex<SessionState>>,
    pub(crate) activity: Arc<Activity>,
    pub(crate) cancels: Arc<CancelRegistry>,
    pub(crate) server_addr: SocketAddr,
    pub(crate) cancel_guard: Option<CancelGuard>,
}

impl Tracker {
    /// Whether `tag` is one the tracker looks at.
    pub(crate) fn observes(tag: u8) -> bool {
        matches!(
            tag,
            backend::PARAMETER_STATUS_TAG
                | backend::BACKEND_KEY_DATA_TAG
                | backend::READY_FOR_QUERY_TAG
        )
    }

    /// Look at one server message.
    pub(crate) fn observe(&mut self, frame: &Frame) -> Result<(), WireError> {
        match frame.tag() {
            backend::PARAMETER_STATUS_TAG => {
                let (name, value) = backend::parse_parameter_status(frame.body())?;
                if name == b"client_encoding" {
                    let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                    state.client_encoding = Some(String::from_utf8_lossy(value).into_owned());
                }
            }
            backend::BACKEND_KEY_DATA_TAG => {
                let (pid, key) = backend::parse_backend_key_data(frame.body())?;
                self.cancel_guard = Some(self.cancels.register(key, self.server_addr));
                self.state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .backend_pid = Some(pid);
            }
            backend::READY_FOR_QUERY_TAG => {
                let status = backend::parse_ready_for_query(frame.body())?;
                self.activity
                    .ready_for_query(status != backend::TransactionStatus::Idle);
                self.state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .transaction = Some(status);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Server → client pass-through: every message is forwarded unchanged.
struct ServerToClient {
    tracker: Tracker,
}

impl Handler for ServerToClient {
    type Error = PumpError;

    fn inspects(&self, tag: u8) -> bool {
        Tracker::observes(tag)
    }

    async fn on_message(&mut self, frame: Frame, out: &mut BytesMut) -> Result<(), PumpError> {
        self.tracker.observe(&frame)?;
        out.extend_from_slice(frame.raw());
        Ok(())
    }
}

/// The encrypting server → client handler plus the session tracker.
struct Encrypting {
    tracker: Tracker,
    inner: ServerSide,
}

impl Handler for Encrypting {
    type Error = PumpError;

    fn inspects(&self, tag: u8) -> bool {
        Tracker::observes(tag) || self.inner.inspects(tag)
    }

    async fn on_message(&mut self, frame: Frame, out: &mut BytesMut) -> Result<(), PumpError> {
        self.tracker.observe(&frame)?;
        self.inner.on_message(frame, out).await
    }
}

/// The session tenant given at startup: `options=-c pgenvelope.tenant=acme` (or
/// `--pgenvelope.tenant=acme`), or a `pgenvelope.tenant` startup parameter. The setting name
/// matches in any ASCII case, as PostgreSQL matches it.
fn startup_tenant(params: &StartupParams<'_>) -> Option<OrgId> {
    startup_tenant_text(params).and_then(|t| OrgId::new(t).ok())
}

fn startup_tenant_text(params: &StartupParams<'_>) -> Option<String> {
    // Setting names are case-insensitive in PostgreSQL; the last one sent wins.
    let param = params
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(TENANT_SETTING.as_bytes()))
        .last()
        .and_then(|(_, v)| std::str::from_utf8(v).ok());
    if let Some(v) = param {
        return Some(v.to_owned());
    }
    let options = params.get_str("options")?;
    let mut found = None;
    let mut words = options.split_whitespace().peekable();
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words.next()
        } else if let Some(rest) = w.strip_prefix("-c") {
            Some(rest)
        } else {
            w.strip_prefix("--")
        };
        if let Some((name, v)) = setting.and_then(|s| s.split_once('=')) {
            if name.eq_ignore_ascii_case(TENANT_SETTING) {
                found = Some(v.to_owned());
            }
        }
    }
    found
}

/// A startup tenant that is not a valid organisation id is refused at once.
fn invalid_startup_tenant(params: &StartupParams<'_>) -> Option<ConnError> {
    let text = startup_tenant_text(params)?;
    OrgId::new(text)
        .err()
        .map(|_| ConnError::InvalidStartupTenant)
}
