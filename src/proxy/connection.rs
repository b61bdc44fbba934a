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
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::crypto::OrgId;
use crate::proxy::auth::{self, Legs};
use crate::proxy::cancel::CancelGuard;
use crate::proxy::drain::DrainState;
use crate::proxy::error::ConnError;
use crate::proxy::pump::{Dir, Halt, Inbound, FLUSH_AT, SHRINK_ABOVE};
use crate::proxy::tls::{ClientTls, Negotiated};
use crate::proxy::transform::{Need, Out, Transform};
use crate::proxy::Shared;
use crate::sql::TENANT_SETTING;
use crate::wire::header::scan_startup;
use crate::wire::startup::{StartupPacket, StartupParams};

/// How long a client may take to send its startup packet (PostgreSQL's
/// `authentication_timeout` default).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

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
            Err(e @ (ConnError::ClientIo(_) | ConnError::ServerIo(_) | ConnError::ClientGone)) => {
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
    if shared.encryption.is_some() {
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

    shared.connections.sessions.fetch_add(1, Ordering::Relaxed);
    let upstream_addr = shared.config.upstream_addr();
    let timeout = shared.config.connect_timeout;
    let server = match connect_upstream(&upstream_addr, timeout).await {
        Ok(s) => s,
        Err(e) => {
            shared
                .connections
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
                .connections
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
                .connections
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
                .connections
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

    let (mut client_r, mut client_w) = client.into_halves();
    let (mut server_r, mut server_w) = server.into_halves();
    let mut transform = Transform::new(
        start.db,
        start.tenant,
        shared.encryption.clone(),
        limit,
        Arc::clone(&shared.statements),
    );
    let mut io = Io {
        client_r: &mut client_r,
        client_w: &mut client_w,
        server_r: &mut server_r,
        server_w: &mut server_w,
    };
    let mut session = Relay {
        client_in: Inbound::new(Dir::FromClient, buf, limit),
        server_in: Inbound::new(Dir::FromServer, server_buf, limit),
        out: Out::default(),
        cancel_guard: None,
        server_addr,
    };
    let drain = shared.drain.subscribe();
    // Boxed: the relay future is large, and the panic guard moves its future.
    let result = catch_panic(Box::pin(session.run(
        &mut io,
        &mut transform,
        shared,
        drain,
    )))
    .await;
    let result = match result {
        Err(ConnError::ClientGone) => {
            // The client closed or vanished: a statement may still run for it.
            if !transform.is_idle() {
                if let Some(guard) = &session.cancel_guard {
                    tracing::debug!("client vanished during a statement: cancelling it");
                    shared
                        .cancels
                        .forward(guard.key(), shared.config.connect_timeout)
                        .await;
                }
            }
            Ok(())
        }
        other => other,
    };
    if let Err(e) = &result {
        let mut out = BytesMut::new();
        e.write_fatal(&mut out);
        if !out.is_empty() {
            let _ = io.client_w.write_all(&out).await;
        }
    }
    let _ = io.client_w.shutdown().await;
    result
}

/// The four halves of a session's two connections.
struct Io<'a, CR, CW, SR, SW> {
    client_r: &'a mut CR,
    client_w: &'a mut CW,
    server_r: &'a mut SR,
    server_w: &'a mut SW,
}

/// One session's relay: both directions in one loop, so the protocol core is owned here and
/// never shared. Neither direction blocks the other: reads and writes of both sides are
/// awaited together, and a side's input is no longer read only while the output it produced
/// for the other side waits to be written (past [`FLUSH_AT`]).
struct Relay {
    client_in: Inbound,
    server_in: Inbound,
    out: Out,
    /// Registered once the server sent its BackendKeyData.
    cancel_guard: Option<CancelGuard>,
    server_addr: SocketAddr,
}

/// How many times one message may ask for something before it is refused instead (keys that
/// go stale as fast as they are fetched).
const MAX_NEED_ROUNDS: u32 = 16;

impl Relay {
    async fn run<CR, CW, SR, SW>(
        &mut self,
        io: &mut Io<'_, CR, CW, SR, SW>,
        transform: &mut Transform,
        shared: &Shared,
        mut drain: tokio::sync::watch::Receiver<DrainState>,
    ) -> Result<(), ConnError>
    where
        CR: AsyncRead + Unpin,
        CW: AsyncWrite + Unpin,
        SR: AsyncRead + Unpin,
        SW: AsyncWrite + Unpin,
    {
        let mut draining = false;
        let (mut client_dirty, mut server_dirty) = (false, false);
        // One future waits for the next drain state change across all turns of the loop (a
        // fresh `changed()` per turn registered and dropped a waiter for every message).
        let mut state = *drain.borrow_and_update();
        let mut changed = Box::pin(next_change(drain));
        loop {
            self.process(transform, shared).await?;
            match state {
                DrainState::Running => {}
                DrainState::Draining => draining = true,
                DrainState::Closing => return self.finish(io, ConnError::Shutdown).await,
            }
            if draining && transform.is_idle() {
                return self.finish(io, ConnError::Shutdown).await;
            }
            // Write what is ready at once: a socket with room takes it without a turn of the
            // select below; only what it cannot take yet waits there.
            if !self.out.to_server.is_empty() || server_dirty {
                let w = write_out(io.server_w, &mut self.out.to_server, &mut server_dirty);
                if let Some(r) = poll_once(w) {
                    r.map_err(ConnError::ServerIo)?;
                }
            }
            if !self.out.to_client.is_empty() || client_dirty {
                let w = write_out(io.client_w, &mut self.out.to_client, &mut client_dirty);
                if let Some(r) = poll_once(w) {
                    r.map_err(ConnError::ClientIo)?;
                }
            }
            let read_client = self.out.to_server.len() < FLUSH_AT && !self.client_in.is_parked();
            let read_server = self.out.to_client.len() < FLUSH_AT && !self.server_in.is_parked();
            if read_client {
                self.client_in.ready_to_read();
            }
            if read_server {
                self.server_in.ready_to_read();
            }
            let (to_server, to_client) = (&mut self.out.to_server, &mut self.out.to_client);
            let write_server = !to_server.is_empty() || server_dirty;
            let write_client = !to_client.is_empty() || client_dirty;
            tokio::select! {
                biased;
                n = io.client_r.read_buf(&mut self.client_in.buf), if read_client => {
                    if n.map_err(ConnError::ClientIo)? == 0 {
                        // What the client sent before it left still goes to the server.
                        write_all(io.server_w, &mut self.out.to_server).await.map_err(ConnError::ServerIo)?;
                        return Err(ConnError::ClientGone);
                    }
                }
                n = io.server_r.read_buf(&mut self.server_in.buf), if read_server => {
                    if n.map_err(ConnError::ServerIo)? == 0 {
                        // The server ended the session (FATAL, terminate, restart): its last
                        // messages still reach the client.
                        write_all(io.client_w, &mut self.out.to_client).await.map_err(ConnError::ClientIo)?;
                        return Ok(());
                    }
                }
                r = write_out(io.server_w, to_server, &mut server_dirty), if write_server => {
                    r.map_err(ConnError::ServerIo)?;
                }
                r = write_out(io.client_w, to_client, &mut client_dirty), if write_client => {
                    r.map_err(ConnError::ClientIo)?;
                }
                // Last: polled only when no transfer is ready (a turn with pending reads comes
                // at least once per statement), which saves a poll per message.
                rx = &mut changed => {
                    state = *rx.borrow();
                    changed = Box::pin(next_change(rx));
                }
            }
        }
    }

    /// Handle what was read, each direction until its input runs out (fetching what the
    /// core asks for on the way).
    async fn process(
        &mut self,
        transform: &mut Transform,
        shared: &Shared,
    ) -> Result<(), ConnError> {
        loop {
            // Set when a client message waits for the answer to a look-up the core sent.
            let mut waits_for_server = false;
            let mut rounds = 0;
            loop {
                match self.client_in.process(transform, &mut self.out) {
                    Ok(()) => break,
                    Err(Halt::Malformed(e)) => return Err(ConnError::ClientProtocol(e)),
                    Err(Halt::Need(Need::ServerAnswer)) => {
                        waits_for_server = true;
                        break;
                    }
                    Err(Halt::Need(need)) => {
                        rounds += 1;
                        fulfil(transform, need, rounds).await;
                    }
                }
            }
            let mut rounds = 0;
            loop {
                match self.server_in.process(transform, &mut self.out) {
                    Ok(()) => break,
                    Err(Halt::Malformed(e)) => return Err(ConnError::ServerProtocol(e)),
                    Err(Halt::Need(need)) => {
                        rounds += 1;
                        fulfil(transform, need, rounds).await;
                    }
                }
            }
            if let Some(key) = transform.take_backend_key() {
                self.cancel_guard = Some(shared.cancels.register(&key, self.server_addr));
            }
            // The answer came in with what was just read: hand the waiting message in again.
            if !(waits_for_server && transform.lookup_answered()) {
                return Ok(());
            }
        }
    }

    /// End the session with `e`, after the output already produced for the client.
    async fn finish<CR, CW, SR, SW>(
        &mut self,
        io: &mut Io<'_, CR, CW, SR, SW>,
        e: ConnError,
    ) -> Result<(), ConnError>
    where
        CW: AsyncWrite + Unpin,
    {
        let _ = write_all(io.client_w, &mut self.out.to_client).await;
        Err(e)
    }
}

/// Fetch what the core asked for; a failure is handed to the core, which refuses the message
/// with it when it is handled again. After [`MAX_NEED_ROUNDS`] for one message, the core gives
/// up on it.
async fn fulfil(transform: &mut Transform, need: Need, rounds: u32) {
    if rounds > MAX_NEED_ROUNDS {
        transform.give_up();
        return;
    }
    match need {
        // Comes from the server's messages, which the relay keeps reading.
        Need::ServerAnswer => {}
        Need::Keys(keys) => {
            if let Some(cipher) = transform.cipher_mut() {
                for key in &keys {
                    cipher.fetch(key).await;
                }
            }
        }
        Need::Table(oid) => {
            let Some(enc) = transform.encryption().cloned() else {
                return;
            };
            let rules = enc.rules.snapshot();
            // Boxed: the catalog look-up's future is large and rarely needed.
            let found = Box::pin(enc.catalog.table(transform.db(), oid, &rules.rules)).await;
            if let Err(e) = found {
                tracing::warn!(error = %e, "catalog unavailable");
                transform.table_failed(oid);
            }
        }
        Need::Columns { schema, table } => {
            let Some(enc) = transform.encryption().cloned() else {
                return;
            };
            let found = Box::pin(enc.catalog.columns(transform.db(), &schema, &table)).await;
            let columns = found.map_err(|e| {
                tracing::warn!(error = %e, "catalog unavailable");
            });
            transform.provide_columns(schema, table, columns);
        }
    }
}

/// Write out `buf`: one write while it holds bytes, then, once it is empty, the flush (a
/// no-op on plain TCP; TLS sends its records), in the same turn of the loop. `dirty` says a
/// flush is due; it is kept across calls so that the future may be dropped unfinished in a
/// `select!` (at either await) without losing anything.
async fn write_out<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut BytesMut,
    dirty: &mut bool,
) -> std::io::Result<()> {
    if !buf.is_empty() {
        w.write_buf(buf).await?;
        *dirty = true;
        shrink(buf);
    }
    if buf.is_empty() && *dirty {
        w.flush().await?;
        *dirty = false;
    }
    Ok(())
}

/// Waits for the next change of the drain state and gives the receiver back; never completes
/// once the sender is gone (nothing will ever ask the session to end).
async fn next_change(
    mut rx: tokio::sync::watch::Receiver<DrainState>,
) -> tokio::sync::watch::Receiver<DrainState> {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    rx
}

/// Poll `f` once: its output if it is ready at once, else `None` (and `f` is dropped; the
/// writes here leave their state consistent when dropped, see [`write_out`]).
fn poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(f).poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Write and clear `buf`, then flush.
async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut BytesMut) -> std::io::Result<()> {
    if !buf.is_empty() {
        w.write_all(buf).await?;
        buf.clear();
    }
    w.flush().await
}

/// Release an output buffer that grew large once it is written out.
fn shrink(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > SHRINK_ABOVE {
        *buf = BytesMut::new();
    }
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
