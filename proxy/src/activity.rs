//! What a client connection is doing: the listener's per-connection state (for its idle timeout
//! and half-close) and the guards the request path holds on it while a request, or its body, is
//! in flight.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use futures_util::task::AtomicWaker;
use tokio::time::Instant;

/// What a client connection has been doing, for its idle timeout and its half-close.
#[derive(Debug)]
pub(crate) struct ConnActivity {
    /// When the connection was accepted.
    pub(crate) opened: Instant,
    /// The connection's span (debug level): its requests' spans name it as parent, also those
    /// of HTTP/2 streams, which run as tasks of their own.
    span: tracing::Span,
    /// When the last request ended, in nanoseconds since `opened` (0: none has).
    last_end: AtomicU64,
    /// Requests not finished yet (their response bodies included).
    pub(crate) active: AtomicUsize,
    /// Request bodies still being read from the client.
    pub(crate) bodies: AtomicUsize,
    /// The client's end of stream is held back until the requests in flight are over.
    pub(crate) held_eof: AtomicBool,
    /// The connection is a tunnel now (CONNECT, WebSocket): its end of stream passes through.
    pub(crate) upgraded: AtomicBool,
    /// Wakes the connection's reader when the last request in flight ends.
    pub(crate) reader: AtomicWaker,
    /// The client's address and the one it connected to, for the access log.
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    /// The SPIFFE ID of the client's verified certificate (mTLS).
    pub(crate) identity: Option<Arc<str>>,
    /// Where the client meant to connect, when traffic capture redirected it to the proxy.
    original_dst: Option<SocketAddr>,
}

impl ConnActivity {
    pub(crate) fn new(
        span: tracing::Span,
        peer: Option<SocketAddr>,
        local: Option<SocketAddr>,
        identity: Option<Arc<str>>,
    ) -> Self {
        Self {
            peer,
            local,
            identity,
            original_dst: None,
            opened: Instant::now(),
            span,
            last_end: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            bodies: AtomicUsize::new(0),
            held_eof: AtomicBool::new(false),
            upgraded: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        }
    }

    /// A captured connection: `original` is where the client meant to connect (the access log's
    /// local address, as with Envoy's original destination filter).
    pub(crate) fn captured(mut self, original: Option<SocketAddr>) -> Self {
        if original.is_some() {
            self.local = original;
        }
        self.original_dst = original;
        self
    }

    /// Since when the connection has had nothing to do, if it has nothing now: the end of its
    /// last request, or its opening.
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        if self.active.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let nanos = self.last_end.load(Ordering::Acquire);
        Some(self.opened + std::time::Duration::from_nanos(nanos))
    }

    /// Whether the client's end of stream goes through: no request in flight, or a tunnel.
    pub(crate) fn releases_eof(&self) -> bool {
        self.active.load(Ordering::SeqCst) == 0 || self.upgraded.load(Ordering::SeqCst)
    }
}

/// Held by a request from its start until it is over (the end of its response body).
#[derive(Debug)]
pub struct ActiveRequest(Arc<ConnActivity>);

impl ActiveRequest {
    pub(crate) fn begin(activity: &Arc<ConnActivity>) -> Self {
        activity.active.fetch_add(1, Ordering::Relaxed);
        Self(activity.clone())
    }

    /// The client's address and the one it connected to.
    pub(crate) fn addresses(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        (self.0.peer, self.0.local)
    }

    /// Where the client meant to connect, when its connection was captured.
    pub(crate) fn original_dst(&self) -> Option<SocketAddr> {
        self.0.original_dst
    }

    /// The SPIFFE ID of the client's verified certificate (mTLS).
    pub(crate) fn identity(&self) -> Option<&Arc<str>> {
        self.0.identity.as_ref()
    }

    /// The span of the request's connection.
    pub(crate) fn conn_span(&self) -> &tracing::Span {
        &self.0.span
    }

    /// Notes when the request ended (its caller has read the clock already), for the
    /// connection's idle timeout.
    pub(crate) fn ended_at(&self, at: Instant) {
        let since = at.saturating_duration_since(self.0.opened).as_nanos();
        // A store, not a maximum: the request that ends last sets it (requests of one
        // connection ending at the same moment on two threads differ by that moment at most).
        self.0
            .last_end
            .store(u64::try_from(since).unwrap_or(u64::MAX), Ordering::Release);
    }
}

impl ActiveRequest {
    /// The connection has become a tunnel (CONNECT, WebSocket) spliced to the upstream: the
    /// client's end of stream is the tunnel's and must reach the upstream, even though the
    /// request stays active until the tunnel ends. An end of stream already held is let go.
    pub(crate) fn upgraded(&self) {
        self.0.upgraded.store(true, Ordering::SeqCst);
        self.0.reader.wake();
    }

    /// Marks a request body as being read from the client until the guard is dropped.
    pub(crate) fn body_open(&self) -> BodyOpen {
        self.0.bodies.fetch_add(1, Ordering::SeqCst);
        BodyOpen(self.0.clone())
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1
            && self.0.held_eof.load(Ordering::SeqCst)
        {
            // The client half-closed: its end of stream can be seen now.
            self.0.reader.wake();
        }
    }
}

/// Held while a request body is being read from the client: an end of stream then is the
/// client leaving, not a half-close.
#[derive(Debug)]
pub struct BodyOpen(Arc<ConnActivity>);

impl Drop for BodyOpen {
    fn drop(&mut self) {
        self.0.bodies.fetch_sub(1, Ordering::SeqCst);
    }
}
