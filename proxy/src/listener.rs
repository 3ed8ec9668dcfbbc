//! The listener stage: accepts connections on a socket (ingress, egress or a listener's own),
//! serves each one (bytes forwarded for TCP listeners; for HTTP, told apart by its first bytes,
//! HTTP/1.x by our server in `downstream` and HTTP/2 by hyper's, each request handed to
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

use bytes::BytesMut;
use futures_util::task::AtomicWaker;
use http::Request;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use crate::{
    access_log::LogRecord,
    activity::{ActiveRequest, ConnActivity},
    client_io::{ClientIo, IoKind},
    downstream::{Incoming, Rewound},
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

/// hyper's HTTP/2 server for one client connection, whose streams run in the connection's
/// task (`crate::streams`).
fn h2_server(executor: ConnExecutor) -> http2::Builder<ConnExecutor> {
    let mut server = http2::Builder::new(executor);
    // WebSockets over HTTP/2: extended CONNECT (RFC 8441) is announced to clients.
    server.timer(TokioTimer::new()).enable_connect_protocol();
    server
}

/// Reads the connection's first bytes until they tell its protocol: HTTP/2 when they are the
/// connection preface, HTTP/1.x as soon as they differ from it. A plaintext socket is waited
/// on before a buffer is taken.
fn poll_detect(
    io: &mut ClientIo,
    first: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<IoKind>> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    loop {
        if !first.is_empty() {
            let n = first.len().min(PREFACE.len());
            if first[..n] != PREFACE[..n] {
                return Poll::Ready(Ok(IoKind::Http1));
            }
            if n == PREFACE.len() {
                return Poll::Ready(Ok(IoKind::Http2));
            }
        }
        if first.capacity() == 0 {
            std::task::ready!(io.poll_readable(cx))?;
            first.reserve(4096);
        }
        if std::task::ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, first))? == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
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
        let _counted = Counted::new(self.services.metrics.active_connections(&listener.name));
        // Captured by `trellis-proxy init`'s rules: HTTP is served below, other bytes go by
        // where the client meant to connect.
        let original = match slot {
            Slot::Egress if listener.tls.is_none() => crate::transparent::original_dst(&stream),
            _ => None,
        };
        // The rarer paths are boxed: inline, their states would size every connection's task.
        if let Some(original) = original
            && Box::pin(crate::transparent::detect(&stream)).await
                == crate::transparent::Detected::Opaque
        {
            let services = &self.services;
            Box::pin(crate::transparent::forward_opaque(
                services, &runtime, stream, peer, original,
            ))
            .await;
            return;
        }
        let stream = match &listener.tls {
            None => Stream::Plain(stream),
            Some(side) => {
                let credentials = self.services.store.credentials();
                let timeout = self.services.idle_timeout;
                match Box::pin(crate::tls::accept(credentials, side, stream, timeout)).await {
                    Ok(s) => s,
                    Err(e) => {
                        // Plaintext under STRICT, an unknown or expired certificate, none.
                        tracing::debug!(error = %e, "TLS handshake refused");
                        self.services.metrics.tls_refused(&listener.name);
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
                let outcome = Box::pin(crate::tcp::forward(route, stream)).await;
                outcome.log(&self.services.access_log, log, start.elapsed());
            }
            ListenerKind::Http(_) => {
                drop(runtime);
                self.serve_http(stream, peer, identity, original, slot)
                    .await;
            }
        }
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
        let mut io = ClientIo::new(stream, activity.clone(), IoKind::Unknown);
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
        // The first bytes tell HTTP/2's connection preface from an HTTP/1.x request; a client
        // that sends none before the idle timeout or the drain is closed.
        let mut first = BytesMut::new();
        let kind = tokio::select! {
            biased;
            kind = std::future::poll_fn(|cx| poll_detect(&mut io, &mut first, cx)) => kind,
            _ = &mut stop => return,
        };
        let services = self.services.clone();
        let result = match kind {
            Ok(IoKind::Http2) => {
                let io = Rewound::new(first.freeze(), io);
                // Boxed: hyper's HTTP/2 connection is large, and inline it would size every
                // connection's task, HTTP/1.1 ones included.
                Box::pin(self.serve_h2(io, &activity, slot, stop, watch)).await
            }
            Ok(_) => {
                let closing = AtomicBool::new(false);
                // The request's future lives in the connection's (boxed once per connection, as
                // hyper boxed it): no allocation and no copy into one per request, and no room
                // for it in the tasks of HTTP/2 connections.
                let mut conn = Box::pin(crate::downstream::serve(io, first, &closing, |req| {
                    let active = ActiveRequest::begin(&activity);
                    let services = services.clone();
                    let slot = slot.clone();
                    async move { crate::proxy::serve(services, &slot, req, active).await }
                }));
                let mut closing_once = false;
                loop {
                    tokio::select! {
                        biased;
                        r = &mut conn => break r.map_err(Into::into),
                        s = &mut stop => match s {
                            Stop::Drain => {
                                // Connection: close on the response in progress, if any; a
                                // head still trickling in, or a refused client not leaving, is
                                // still bounded by the idle timeout.
                                closing.store(true, Ordering::Release);
                                let idle = WokenOnly::new(watch_connection(
                                    activity.clone(),
                                    self.services.idle_timeout,
                                    CancellationToken::new(),
                                ));
                                break tokio::select! {
                                    biased;
                                    r = &mut conn => r.map_err(Into::into),
                                    _ = idle => Ok(()),
                                };
                            }
                            Stop::Idle if closing_once => {
                                tracing::debug!("closing a client connection that stayed idle");
                                break Ok(());
                            }
                            Stop::Idle => {
                                closing.store(true, Ordering::Release);
                                closing_once = true;
                                stop = watch();
                            }
                        },
                    }
                }
            }
            // Closed, or failed, before a request.
            Err(_) => return,
        };
        if let Err(e) = result {
            // Requests refused before they reached the service (400, 414, 431): counted here,
            // from the error the connection ends with, at no cost to other requests.
            if let Some(kind) = refused_by_parser(&*e) {
                self.services.metrics.error(kind);
            }
            tracing::debug!(error = %e, "downstream connection ended with an error");
        }
    }

    /// Serves an HTTP/2 connection with hyper, its streams in the connection's task.
    async fn serve_h2<W, S>(
        &self,
        io: Rewound,
        activity: &Arc<ConnActivity>,
        slot: Slot,
        mut stop: S,
        watch: W,
    ) -> Result<(), crate::BoxError>
    where
        W: Fn() -> S,
        S: Future<Output = Stop> + Unpin,
    {
        let services = self.services.clone();
        let requests = activity.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let active = ActiveRequest::begin(&requests);
            let services = services.clone();
            let slot = slot.clone();
            let req = req.map(Incoming::Hyper);
            async move { Ok::<_, Infallible>(crate::proxy::serve(services, &slot, req, active).await) }
        });
        let mut streams = Streams::default();
        let conn = h2_server(streams.executor()).serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut closing = false;
        let result = loop {
            tokio::select! {
                biased;
                r = std::future::poll_fn(|cx| streams.poll_with(conn.as_mut(), cx)) => break r,
                s = &mut stop => match s {
                    Stop::Drain => {
                        // GOAWAY; streams in flight finish.
                        conn.as_mut().graceful_shutdown();
                        break std::future::poll_fn(|cx| streams.poll_with(conn.as_mut(), cx)).await;
                    }
                    Stop::Idle if closing => {
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
        result.map_err(Into::into)
    }

    /// Stops accepting, lets open connections finish (up to `timeout`); true when all did.
    pub(crate) async fn drain(&self, timeout: Duration) -> bool {
        self.drain.start(timeout).await
    }
}

/// The error kind of a request head refused (and answered) before it reached the service.
fn refused_by_parser(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    if let Some(crate::downstream::Error::Refused(refusal)) = e.downcast_ref() {
        return Some(refusal.kind());
    }
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

/// A listener's active-connections gauge, counted up for a connection and down however it ends
/// (its task finished, cancelled, or unwound by a panic).
struct Counted(prometheus::IntGauge);

impl Counted {
    fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}
