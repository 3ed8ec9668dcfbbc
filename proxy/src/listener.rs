//! The listener stage: accepts connections on a socket (ingress, egress or a listener's own),
//! serves each one (bytes forwarded for TCP listeners; hyper for HTTP, each request handed to
//! `proxy::serve`), closes idle connections, and runs the graceful drain.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
    time::Duration,
};

use futures_util::task::AtomicWaker;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use crate::{
    access_log::LogRecord,
    activity::{ActiveRequest, ConnActivity},
    proxy::Services,
    snapshot::{ListenerKind, Slot},
    streams::{ConnExecutor, Streams},
    tls::Stream,
};

/// Accepts and serves the connections of every socket, with one hyper server configuration and
/// one drain for all of them.
#[derive(Debug)]
pub(crate) struct Listeners {
    services: Arc<Services>,
    drain: Drain,
}

/// hyper's server for one client connection, whose HTTP/2 streams run in the connection's task
/// (`crate::streams`).
fn server(executor: ConnExecutor) -> auto::Builder<ConnExecutor> {
    let mut server = auto::Builder::new(executor);
    // No per-request header timer (a timer armed and dropped for every request): the
    // connection's idle check below bounds slow heads as well. Responses are written from
    // one buffer (one `write`, not a `writev` of head and body): fewer instructions and less
    // kernel time per small response, measured side by side; large bodies cost one copy.
    server
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .writev(false);
    // WebSockets over HTTP/2: extended CONNECT (RFC 8441) is announced to clients.
    server
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();
    server
}

impl Listeners {
    pub(crate) fn new(services: Arc<Services>) -> Arc<Self> {
        Arc::new(Self {
            drain: Drain::new(services.draining.clone()),
            services,
        })
    }

    /// Serves a socket until the drain starts, or until `stop` changes or its sender is dropped.
    pub(crate) fn serve(
        self: &Arc<Self>,
        listener: TcpListener,
        slot: Slot,
        stop: Option<watch::Receiver<()>>,
    ) {
        log_listening(slot.name(), &listener);
        tokio::spawn(self.clone().accept_loop(listener, slot, stop));
    }

    /// The token the drain cancels, for tasks that stop with it.
    pub(crate) fn draining(&self) -> CancellationToken {
        self.drain.token()
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        slot: Slot,
        mut stop: Option<watch::Receiver<()>>,
    ) {
        let draining = self.drain.token();
        loop {
            let accepted = tokio::select! {
                () = draining.cancelled() => break,
                _ = async { match &mut stop { Some(s) => s.changed().await, None => std::future::pending().await } } => break,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = slot.name(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            if draining.is_cancelled() {
                break;
            }
            let span = tracing::debug_span!("conn", listener = slot.name(), %peer);
            self.drain.tasks.spawn(
                self.clone()
                    .connection(stream, peer, slot.clone())
                    .instrument(span),
            );
        }
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, slot: Slot) {
        let runtime = self.services.store.load();
        let Some(listener) = runtime.listener(&slot) else {
            // No listener configured for this socket: refuse by closing.
            return;
        };
        let gauge = self.services.metrics.active_connections(&listener.name);
        gauge.inc();
        // Captured by `trellis-proxy init`'s rules: HTTP is served below, other bytes go by
        // where the client meant to connect.
        let original = match slot {
            Slot::Egress if listener.tls.is_none() => crate::transparent::original_dst(&stream),
            _ => None,
        };
        if let Some(original) = original
            && crate::transparent::detect(&stream).await == crate::transparent::Detected::Opaque
        {
            let services = &self.services;
            crate::transparent::forward_opaque(services, &runtime, stream, peer, original).await;
            gauge.dec();
            return;
        }
        let stream = match &listener.tls {
            None => Stream::Plain(stream),
            Some(side) => {
                let credentials = self.services.store.credentials();
                let timeout = self.services.idle_timeout;
                match crate::tls::accept(credentials, side, stream, timeout).await {
                    Ok(s) => s,
                    Err(e) => {
                        // Plaintext under STRICT, an unknown or expired certificate, none.
                        tracing::debug!(error = %e, "TLS handshake refused");
                        self.services.metrics.tls_refused(&listener.name);
                        gauge.dec();
                        return;
                    }
                }
            }
        };
        // A caller's identity is a mesh identity only when its certificate was verified against
        // the mesh's trust bundle (not a listener's own roots, which may name anything).
        let identity: Option<Arc<str>> = listener
            .tls
            .as_ref()
            .filter(|t| t.mesh_trust)
            .and_then(|_| stream.peer_identity())
            .map(Into::into);
        match &listener.kind {
            ListenerKind::Tcp(route) => {
                if !listener.admits(identity.as_deref()) {
                    // TCP has no way to say why: the connection is closed.
                    tracing::debug!(caller = ?identity, "caller not authorized");
                    self.services
                        .metrics
                        .unauthorized(&listener.name, identity.as_deref());
                    gauge.dec();
                    return;
                }
                let log = self
                    .services
                    .access_log
                    .sink(runtime.access_log.as_ref())
                    .map(|sink| {
                        let mut log = LogRecord::tcp(sink.clone(), slot.name());
                        (log.peer, log.local) = (Some(peer), stream.tcp().local_addr().ok());
                        log
                    });
                let start = tokio::time::Instant::now();
                let outcome = crate::tcp::forward(route, stream).await;
                outcome.log(&self.services.access_log, log, start.elapsed());
            }
            ListenerKind::Http(_) => {
                drop(runtime);
                self.serve_http(stream, peer, identity, original, slot)
                    .await;
            }
        }
        gauge.dec();
    }

    async fn serve_http(
        self: &Arc<Self>,
        stream: Stream,
        peer: SocketAddr,
        identity: Option<Arc<str>>,
        original: Option<SocketAddr>,
        slot: Slot,
    ) {
        let activity = Arc::new(
            ConnActivity::new(
                tracing::Span::current(),
                Some(peer),
                stream.tcp().local_addr().ok(),
                identity,
            )
            .captured(original),
        );
        let services = self.services.clone();
        let requests = activity.clone();
        let service = hyper::service::service_fn(move |req| {
            let active = ActiveRequest::begin(&requests);
            let services = services.clone();
            let slot = slot.clone();
            async move { Ok::<_, Infallible>(crate::proxy::serve(services, &slot, req, active).await) }
        });
        let io = ClientIo {
            stream,
            activity: activity.clone(),
            kind: IoKind::Unknown,
            held: false,
        };
        let mut streams = Streams::default();
        let server = server(streams.executor());
        let conn = server.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        // The drain signal and the idle timer are polled only when they fire, not on every wake
        // of the connection; one timer per connection, re-armed once per idle period.
        let watch = || {
            WokenOnly::new(watch_connection(
                activity.clone(),
                self.services.idle_timeout,
                self.drain.token(),
            ))
        };
        let mut stop = watch();
        let mut closing = false;
        let result = loop {
            tokio::select! {
                biased;
                r = std::future::poll_fn(|cx| streams.poll_with(conn.as_mut(), cx)) => break r,
                s = &mut stop => match s {
                    Stop::Drain => {
                        // Connection: close on HTTP/1.1, GOAWAY on HTTP/2; in-flight requests
                        // finish.
                        conn.as_mut().graceful_shutdown();
                        break std::future::poll_fn(|cx| streams.poll_with(conn.as_mut(), cx)).await;
                    }
                    Stop::Idle if closing => {
                        // Still open a whole period after the graceful close: a client that
                        // never finishes its request head.
                        tracing::debug!("closing a client connection that stayed idle");
                        break Ok(());
                    }
                    Stop::Idle => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                        stop = watch();
                    }
                },
            }
        };
        // Streams still answering (or piping an upgrade) after the connection ended.
        streams.finish().await;
        if let Err(e) = result {
            // Requests hyper answered itself (400, 414, 431) never reached the service: counted
            // here, from the error the connection ends with, at no cost to other requests.
            if let Some(kind) = refused_by_parser(&*e) {
                self.services.metrics.error(kind);
            }
            tracing::debug!(error = %e, "downstream connection ended with an error");
        }
    }

    /// Stops accepting, lets open connections finish (up to `timeout`); true when all did.
    pub(crate) async fn drain(&self, timeout: Duration) -> bool {
        self.drain.start(timeout).await
    }
}

/// The error kind of a request head hyper refused (and answered) itself.
fn refused_by_parser(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let e = e.downcast_ref::<hyper::Error>()?;
    if e.is_parse_too_large() {
        Some("request_head_too_large")
    } else if e.is_parse() {
        Some("bad_request")
    } else {
        None
    }
}

/// Why a client connection is to be closed.
#[derive(Debug)]
enum Stop {
    Drain,
    Idle,
}

/// Resolves when the drain starts, or when the connection has had no request in flight for a
/// whole idle period (counted from the end of its last request, or from its opening). One timer,
/// re-armed when it fires: for the rest of the period after a request, or for a whole one while
/// a request is in flight.
async fn watch_connection(
    activity: Arc<ConnActivity>,
    idle: Duration,
    draining: CancellationToken,
) -> Stop {
    let mut wake = activity.opened + idle;
    loop {
        tokio::select! {
            () = draining.cancelled() => return Stop::Drain,
            () = tokio::time::sleep_until(wake) => {
                let now = tokio::time::Instant::now();
                wake = match activity.idle_since() {
                    Some(since) if now >= since + idle => return Stop::Idle,
                    Some(since) => since + idle,
                    None => now + idle,
                };
            }
        }
    }
}

/// A future polled only when its own waker fired (and on the first poll), however often the task
/// that owns it is woken for other reasons.
struct WokenOnly<F> {
    future: Pin<Box<F>>,
    flag: Arc<WokenFlag>,
}

#[derive(Debug, Default)]
struct WokenFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WokenFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> WokenOnly<F> {
    fn new(future: F) -> Self {
        let flag = Arc::new(WokenFlag::default());
        flag.woken.store(true, Ordering::Relaxed);
        Self {
            future: Box::pin(future),
            flag,
        }
    }
}

impl<F: Future> Future for WokenOnly<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(this.flag.clone());
        this.future.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

/// The client's socket as hyper reads it, with half-closes handled here rather than by hyper's
/// `half_close` option, which stops reading while a response is pending (a client that resets
/// its connection while it waits would go unnoticed). An HTTP/1.x end of stream (FIN) that
/// arrives with requests in flight and no request body left to read is held back until those
/// requests are over: a client that shuts down its sending side after its request still gets
/// the response (RFC 9112 §9.6). A reset still ends the connection at once, an end of stream in
/// the middle of a request body is still the client leaving, and HTTP/2 connections see every
/// end of stream as it comes. Once the connection is a tunnel (CONNECT, WebSocket), its end of
/// stream passes through to the upstream, one held before included. Per read, this costs a
/// length check.
#[derive(Debug)]
struct ClientIo {
    stream: Stream,
    activity: Arc<ConnActivity>,
    kind: IoKind,
    held: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoKind {
    /// Nothing read yet.
    Unknown,
    Http1,
    Http2,
}

impl ClientIo {
    /// The end of stream, once no request is in flight or the connection is a tunnel.
    fn poll_held(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let activity = &self.activity;
        if activity.releases_eof() {
            return Poll::Ready(Ok(()));
        }
        activity.reader.register(cx.waker());
        if activity.releases_eof() {
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

impl tokio::io::AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.held {
            return this.poll_held(cx);
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        if this.kind == IoKind::Unknown && !read.is_empty() {
            // The HTTP/2 connection preface starts with a method HTTP/1.x does not have.
            this.kind = if read.starts_with(b"PRI") {
                IoKind::Http2
            } else {
                IoKind::Http1
            };
        }
        if read.is_empty()
            && buf.remaining() > 0
            && this.kind == IoKind::Http1
            && this.activity.bodies.load(Ordering::SeqCst) == 0
            && !this.activity.releases_eof()
        {
            tracing::debug!("client half-closed its connection; responses in flight go on");
            this.held = true;
            this.activity.held_eof.store(true, Ordering::SeqCst);
            return this.poll_held(cx);
        }
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

fn log_listening(name: &str, listener: &TcpListener) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listener = %name, addr = %addr, "listening");
    }
}

/// The graceful drain: a token that accept loops, connections and the file watch stop on, and
/// the tracker of open connections SIGTERM waits for.
#[derive(Debug, Default)]
struct Drain {
    token: CancellationToken,
    tasks: TaskTracker,
}

impl Drain {
    /// A drain that cancels `token` when it starts.
    fn new(token: CancellationToken) -> Self {
        Self {
            token,
            tasks: TaskTracker::new(),
        }
    }

    fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Signals the drain and waits for the open connections, up to `timeout`; true when all
    /// finished.
    async fn start(&self, timeout: Duration) -> bool {
        self.token.cancel();
        self.tasks.close();
        tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_ok()
    }
}
