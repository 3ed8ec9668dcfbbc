//! Clusters, endpoints and their connection pools.
//!
//! A [`Cluster`] belongs to one compiled snapshot. Its endpoints' [`EndpointState`] (in-flight
//! count, pooled connections) belongs to [`Upstreams`], which hands the same state to the next
//! snapshot that keeps the endpoint, so a config push never drops connections.

use std::{
    collections::HashMap,
    error::Error as _,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures_util::future::{BoxFuture, Either};
use parking_lot::Mutex;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::{
    BoxError,
    error::{AttemptError, UpstreamFailure},
    h1,
    metrics::ClusterMetrics,
    outbound::{Outbound, RequestBody},
};

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    /// Prior-knowledge h2c; gRPC clusters use it too.
    Http2,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Draining,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Draining => "draining",
            Self::Unhealthy => "unhealthy",
        }
    }
}

/// A response body from an upstream: HTTP/1.1 from our own client, HTTP/2 from hyper's.
// Bodies are placed once (in hyper's dispatcher) and polled in place: size over a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum UpstreamIncoming {
    H1(h1::IncomingBody),
    Hyper(Incoming),
}

impl Body for UpstreamIncoming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::H1(b) => Pin::new(b).poll_frame(cx),
            Self::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::H1(b) => b.is_end_stream(),
            Self::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::H1(b) => b.size_hint(),
            Self::Hyper(b) => b.size_hint(),
        }
    }
}

/// How a cluster picks among its healthy endpoints (the pick itself is in `balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    /// Power of two random choices on in-flight requests.
    LeastRequest,
    Random,
}

/// One cluster of one snapshot.
#[derive(Debug)]
pub struct Cluster {
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub lb: LbPolicy,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    /// Every endpoint, with its health, in snapshot order.
    pub endpoints: Vec<(Arc<EndpointState>, Health)>,
    /// The endpoints that take new requests.
    pub healthy: Vec<Arc<EndpointState>>,
    pub(crate) cursor: AtomicUsize,
    pub metrics: ClusterMetrics,
}

/// Long-lived state of one endpoint of one cluster: in-flight requests and pooled connections.
#[derive(Debug)]
pub struct EndpointState {
    pub addr: Arc<str>,
    in_flight: AtomicUsize,
    pool: Pool,
}

#[derive(Debug)]
enum Pool {
    Http1(Mutex<Vec<Idle>>),
    Http2(Mutex<Option<http2::SendRequest<RequestBody>>>),
    Tcp,
}

/// A pooled HTTP/1.1 connection waiting for its next exchange.
#[derive(Debug)]
struct Idle {
    conn: Box<h1::Conn>,
    expires: Instant,
}

/// Counts a request against an endpoint until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl h1::Release for EndpointState {
    fn release(&self, conn: Box<h1::Conn>, idle_timeout: Duration) {
        if let Pool::Http1(idle) = &self.pool {
            let mut idle = idle.lock();
            if idle.len() < MAX_IDLE_PER_ENDPOINT {
                idle.push(Idle {
                    conn,
                    expires: Instant::now() + idle_timeout,
                });
            }
        }
    }
}

impl EndpointState {
    fn new(addr: &str, protocol: Protocol) -> Self {
        let pool = match protocol {
            Protocol::Http1 => Pool::Http1(Mutex::default()),
            Protocol::Http2 => Pool::Http2(Mutex::default()),
            Protocol::Tcp => Pool::Tcp,
        };
        Self {
            addr: addr.into(),
            in_flight: AtomicUsize::new(0),
            pool,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Pooled connections: idle HTTP/1.1 connections, or 1 for a live HTTP/2 connection.
    pub fn pooled(&self) -> usize {
        match &self.pool {
            Pool::Http1(idle) => idle.lock().len(),
            Pool::Http2(conn) => usize::from(conn.lock().as_ref().is_some_and(|c| !c.is_closed())),
            Pool::Tcp => 0,
        }
    }

    /// Opens a TCP connection to the endpoint.
    pub async fn connect(&self, timeout: Duration) -> Result<TcpStream, AttemptError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(&*self.addr)).await {
            Err(_) => {
                return Err(AttemptError::new(
                    UpstreamFailure::ConnectTimeout,
                    format!("no connection within {timeout:?}"),
                ));
            }
            Ok(Err(e)) => return Err(AttemptError::new(UpstreamFailure::Connect, e)),
            Ok(Ok(s)) => s,
        };
        // Small writes (headers, gRPC messages) must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Sends a request over a pooled connection of the endpoint's protocol (a new one when none
    /// is idle), writing its head for that protocol. HTTP/1.1 borrows the head, so a retry needs
    /// no copy; HTTP/2 takes a copy, or the head itself when `last` (no attempt follows). `body`
    /// is `None` for a request without one. HTTP/1.1 connections go back to the pool when the
    /// response body ends.
    pub fn send<'a>(
        self: &'a Arc<Self>,
        cluster: &'a Cluster,
        out: &'a mut Outbound,
        body: Option<RequestBody>,
        last: bool,
    ) -> Either<impl Future<Output = Sent> + Send + 'a, BoxFuture<'a, Sent>> {
        // A plain function choosing a future, not an `async fn` awaiting one: the HTTP/1.1
        // exchange's future is then built where the caller keeps it, not moved once more.
        match &self.pool {
            Pool::Http1(_) => Either::Left(self.send_h1(cluster, out, body)),
            Pool::Http2(slot) => {
                let parts = out.http2_parts(&self.addr, last);
                let body = body.unwrap_or_else(|| {
                    let empty = http_body_util::Empty::<Bytes>::new();
                    http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(empty, |e| {
                        match e {}
                    }))
                });
                // Boxed: inline, the h2 client's state would grow every request's future.
                Either::Right(Box::pin(self.send_h2(
                    slot,
                    cluster,
                    Request::from_parts(parts, body),
                )))
            }
            Pool::Tcp => Either::Right(Box::pin(std::future::ready(Err(AttemptError::new(
                UpstreamFailure::Protocol,
                format!("cluster {:?} is TCP only", cluster.name),
            ))))),
        }
    }

    /// HTTP/2: one shared connection; a request the pooled connection could not take (it was
    /// closing) goes out once more on a new one.
    async fn send_h2(
        &self,
        slot: &Mutex<Option<http2::SendRequest<RequestBody>>>,
        cluster: &Cluster,
        mut req: Request<RequestBody>,
    ) -> Result<Response<UpstreamIncoming>, AttemptError> {
        let mut fresh = false;
        loop {
            let cached = slot.lock().clone().filter(|s| !s.is_closed());
            let mut sender = match cached {
                Some(s) => s,
                None => {
                    fresh = true;
                    let s = self.connect_http2(cluster).await?;
                    *slot.lock() = Some(s.clone());
                    s
                }
            };
            if let Err(e) = sender.ready().await {
                if fresh {
                    return Err(classify(e));
                }
                *slot.lock() = None;
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(UpstreamIncoming::Hyper)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => {
                        fresh = true;
                        *slot.lock() = None;
                        req = unsent;
                    }
                    _ => return Err(classify(e.into_error())),
                },
            }
        }
    }

    /// HTTP/1.1: our client, one exchange per pooled connection. A request that is safe to
    /// repeat goes out again when a pooled connection turns out to have been closed.
    async fn send_h1(
        self: &Arc<Self>,
        cluster: &Cluster,
        out: &Outbound,
        mut body: Option<RequestBody>,
    ) -> Result<Response<UpstreamIncoming>, AttemptError> {
        let out = h1::Outgoing::new(out, body.as_ref(), &self.addr);
        loop {
            let (conn, reused) = match self.checkout_http1() {
                Some(conn) => (conn, true),
                None => {
                    // Boxed: connecting is rare, and inline its state would make every
                    // request's future several times larger.
                    let stream = Box::pin(self.connect(cluster.connect_timeout)).await?;
                    (Box::new(h1::Conn::new(stream)), false)
                }
            };
            let pool: Arc<dyn h1::Release> = self.clone();
            match conn
                .send(out, body.take(), pool, cluster.pool_idle_timeout)
                .await
            {
                Ok(response) => return Ok(response.map(UpstreamIncoming::H1)),
                // The upstream closed the pooled connection while it was idle: a request without
                // a body that is safe to repeat goes out on another.
                Err(e) if reused && e.stale && out.replayable() && out.idempotent() => {
                    tracing::debug!(endpoint = %self.addr, error = %e.source, "pooled connection was closed; sending again");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends an HTTP/1.1 upgrade request (WebSocket) on a connection of its own.
    pub async fn send_upgrade(
        &self,
        cluster: &Cluster,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, AttemptError> {
        let mut sender = self.connect_upgrade(cluster).await?;
        sender.send_request(req).await.map_err(classify)
    }

    /// An idle pooled connection the upstream has not closed, newest first.
    fn checkout_http1(&self) -> Option<Box<h1::Conn>> {
        let Pool::Http1(idle) = &self.pool else {
            return None;
        };
        let now = Instant::now();
        loop {
            let Idle { conn, expires } = idle.lock().pop()?;
            if expires > now && conn.is_reusable() {
                return Some(conn);
            }
        }
    }

    /// A hyper HTTP/1.1 connection of its own, for an upgrade.
    async fn connect_upgrade(
        &self,
        cluster: &Cluster,
    ) -> Result<http1::SendRequest<RequestBody>, AttemptError> {
        let stream = self.connect(cluster.connect_timeout).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| AttemptError::new(UpstreamFailure::Connect, e))?;
        let addr = self.addr.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(endpoint = %addr, error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    async fn connect_http2(
        &self,
        cluster: &Cluster,
    ) -> Result<http2::SendRequest<RequestBody>, AttemptError> {
        let stream = self.connect(cluster.connect_timeout).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| AttemptError::new(UpstreamFailure::Connect, e))?;
        let addr = self.addr.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %addr, error = %e, "upstream h2 connection ended");
            }
        });
        Ok(sender)
    }
}

/// Sorts a hyper client error into a retry/response class.
fn classify(e: hyper::Error) -> AttemptError {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            let failure = if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                UpstreamFailure::RefusedStream
            } else {
                UpstreamFailure::Reset
            };
            return AttemptError::new(failure, e);
        }
        source = s.source();
    }
    let failure = if e.is_parse() || e.is_user() {
        UpstreamFailure::Protocol
    } else {
        UpstreamFailure::Reset
    };
    AttemptError::new(failure, e)
}

/// What one attempt at an endpoint gives.
pub type Sent = Result<Response<UpstreamIncoming>, AttemptError>;

/// Endpoint state that outlives snapshots, keyed by (cluster, protocol, address).
#[derive(Debug, Default)]
pub struct Upstreams {
    live: Mutex<EndpointMap>,
}

pub(crate) type EndpointMap = HashMap<(Arc<str>, Protocol, Arc<str>), Arc<EndpointState>>;

impl Upstreams {
    /// Starts a new generation: endpoints looked up in it reuse live state where it exists.
    pub(crate) fn generation(&self) -> Generation<'_> {
        Generation {
            upstreams: self,
            next: EndpointMap::new(),
        }
    }

    /// Closes pooled HTTP/1.1 connections past their idle timeout or closed by the upstream.
    pub(crate) fn sweep_idle(&self) {
        let live: Vec<Arc<EndpointState>> = self.live.lock().values().cloned().collect();
        let now = Instant::now();
        for endpoint in live {
            if let Pool::Http1(idle) = &endpoint.pool {
                let closing: Vec<Idle> = {
                    let mut idle = idle.lock();
                    let (keep, closing) = std::mem::take(&mut *idle)
                        .into_iter()
                        .partition(|i| i.expires > now && i.conn.is_reusable());
                    *idle = keep;
                    closing
                };
                // Closed outside the pool's lock.
                drop(closing);
            }
        }
    }
}

/// Endpoint state gathered while compiling one snapshot; [`Generation::commit`] makes it live.
#[derive(Debug)]
pub(crate) struct Generation<'a> {
    upstreams: &'a Upstreams,
    next: EndpointMap,
}

impl Generation<'_> {
    pub(crate) fn endpoint(
        &mut self,
        cluster: &Arc<str>,
        protocol: Protocol,
        addr: &str,
    ) -> Arc<EndpointState> {
        let key = (cluster.clone(), protocol, Arc::<str>::from(addr));
        if let Some(ep) = self.next.get(&key) {
            return ep.clone();
        }
        let ep = self
            .upstreams
            .live
            .lock()
            .get(&key)
            .cloned()
            .unwrap_or_else(|| Arc::new(EndpointState::new(addr, protocol)));
        self.next.insert(key, ep.clone());
        ep
    }

    /// Replaces the live endpoints: state no snapshot uses any more is dropped once in-flight
    /// requests release it.
    pub(crate) fn commit(self) {
        *self.upstreams.live.lock() = self.next;
    }
}

#[cfg(test)]
pub(crate) fn test_cluster(name: &str, addrs: &[&str]) -> Arc<Cluster> {
    let registry = prometheus::Registry::new();
    let metrics = crate::metrics::ProxyMetrics::new(&registry).unwrap();
    let eps: Vec<Arc<EndpointState>> = addrs
        .iter()
        .map(|a| Arc::new(EndpointState::new(a, Protocol::Http1)))
        .collect();
    Arc::new(Cluster {
        name: name.into(),
        protocol: Protocol::Http1,
        lb: LbPolicy::RoundRobin,
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
        endpoints: eps.iter().map(|e| (e.clone(), Health::Healthy)).collect(),
        healthy: eps,
        cursor: AtomicUsize::new(0),
        metrics: metrics.cluster(name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_reuse_live_endpoint_state() {
        let ups = Upstreams::default();
        let c: Arc<str> = "c".into();
        let mut g = ups.generation();
        let a = g.endpoint(&c, Protocol::Http1, "127.0.0.1:1");
        assert!(Arc::ptr_eq(
            &a,
            &g.endpoint(&c, Protocol::Http1, "127.0.0.1:1")
        ));
        let _busy = a.begin_request();
        g.commit();

        let mut g = ups.generation();
        let again = g.endpoint(&c, Protocol::Http1, "127.0.0.1:1");
        assert!(Arc::ptr_eq(&a, &again), "state survives a new snapshot");
        assert_eq!(again.in_flight(), 1);
        let h2 = g.endpoint(&c, Protocol::Http2, "127.0.0.1:1");
        assert!(!Arc::ptr_eq(&a, &h2), "a protocol change gets a new pool");
        drop(g); // not committed: live state unchanged

        let g = ups.generation();
        g.commit();
        let mut g = ups.generation();
        let fresh = g.endpoint(&c, Protocol::Http1, "127.0.0.1:1");
        assert!(!Arc::ptr_eq(&a, &fresh), "removed endpoints are forgotten");
    }
}
