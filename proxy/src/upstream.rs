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
        atomic::{AtomicU8, AtomicUsize, Ordering},
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

use crate::{
    BoxError,
    dial::IpFamily,
    error::{AttemptError, ProxyError, UpstreamFailure},
    h1,
    health_check::{Checker, EndpointHealth, HealthCheck},
    limit::{ClusterLimits, ConnPermit, PoolLimits, RequestPermit},
    metrics::{ClusterMetrics, HealthCheckMetrics},
    outbound::{Outbound, RequestBody},
    outlier::{EndpointOutlier, OutlierDetection},
    tls::{Stream, UpstreamTls},
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
    /// Power of two random choices on peak-EWMA latency × (in-flight requests + 1).
    PeakEwma,
    /// Consistent hashing on the cluster's key: a ring, or Maglev's table (random without a
    /// key).
    RingHash,
    Maglev,
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
    /// Outlier detection, if configured.
    pub outlier: Option<OutlierDetection>,
    /// Connection pool limits (circuit breaking), if configured; shared across snapshots.
    pub limits: Option<Arc<ClusterLimits>>,
    /// Active health checking, if configured (the probes run in `Upstreams`' checkers).
    pub health_check: Option<Arc<HealthCheck>>,
    /// The port requests to it carry in their authority, if set (a target node's listener,
    /// chosen at its sidecar's ingress by it).
    pub authority_port: Option<u16>,
    /// New endpoints' share ramped up over a window, if configured, and until when one of
    /// its endpoints is in its window (after, picks are as without).
    pub slow_start: Option<SlowStart>,
    pub ramping_until: Option<std::time::Instant>,
    /// RING_HASH and MAGLEV: the request's key and the table it is placed by.
    pub hashing: Option<Box<crate::hash_lb::Hashing>>,
    /// Zone-aware: the healthy endpoints in the proxy's zone, taken while enough are in.
    pub local_zone: Option<Box<LocalZone>>,
}

/// A zone-aware cluster's endpoints in the proxy's zone.
#[derive(Debug)]
pub struct LocalZone {
    pub endpoints: Vec<Arc<EndpointState>>,
    /// In service at least, for them to be taken alone.
    pub min: usize,
}

/// Slow start: an endpoint that appeared less than `window` ago takes a share of the traffic
/// that grows with its age — its weight `(age / window)^(1 / aggression)`, at least
/// `min_weight` — as Envoy's `slow_start_config`. Only endpoints added to a cluster that had
/// endpoints ramp (a proxy's or a cluster's first ones are established at once).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    pub window: std::time::Duration,
    pub aggression: f64,
    /// 0 < min_weight <= 1.
    pub min_weight: f64,
}

/// Long-lived state of one endpoint of one cluster: in-flight requests and pooled connections.
#[derive(Debug)]
pub struct EndpointState {
    pub addr: Arc<str>,
    in_flight: AtomicUsize,
    pool: Pool,
    /// Consecutive server errors and ejections (used only with outlier detection).
    pub outlier: EndpointOutlier,
    /// What active health checks decided (used only with a health check).
    pub health: Arc<EndpointHealth>,
    /// An [`IpFamily`]: which addresses of its name it may be dialled at (part of the
    /// endpoint's key: fixed for its life).
    family: AtomicU8,
    /// mTLS toward it, if its cluster asks for it (the identities expected are part of the
    /// endpoint's key: fixed for its life).
    pub(crate) tls: Option<UpstreamTls>,
    /// Its response latency's peak EWMA (kept only for PEAK_EWMA clusters).
    pub(crate) latency: crate::latency::Ewma,
    /// When it appeared in a cluster that had endpoints already (a snapshot that keeps it
    /// keeps this): where slow start counts from. None: established (a cluster's first
    /// endpoints, or its cluster has no slow start).
    pub(crate) added: Option<std::time::Instant>,
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

/// Counts a request against an endpoint (and a cluster with a request limit) until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>, Option<RequestPermit>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl h1::Release for EndpointState {
    fn release(&self, conn: Box<h1::Conn>, idle_timeout: Duration) {
        if let Pool::Http1(idle) = &self.pool {
            let limits = conn.permit().map(|p| p.limits().clone());
            {
                let mut idle = idle.lock();
                if idle.len() < MAX_IDLE_PER_ENDPOINT {
                    idle.push(Idle {
                        conn,
                        expires: Instant::now() + idle_timeout,
                    });
                }
            }
            // Requests waiting for a connection of a limited cluster look again.
            if let Some(limits) = limits {
                limits.released.notify_waiters();
            }
        }
    }
}

impl EndpointState {
    pub(crate) fn new(addr: &str, protocol: Protocol) -> Self {
        let pool = match protocol {
            Protocol::Http1 => Pool::Http1(Mutex::default()),
            Protocol::Http2 => Pool::Http2(Mutex::default()),
            Protocol::Tcp => Pool::Tcp,
        };
        Self {
            addr: addr.into(),
            in_flight: AtomicUsize::new(0),
            latency: crate::latency::Ewma::default(),
            pool,
            outlier: EndpointOutlier::default(),
            health: Arc::default(),
            family: AtomicU8::new(0),
            tls: None,
            added: None,
        }
    }

    fn protocol(&self) -> Protocol {
        match self.pool {
            Pool::Http1(_) => Protocol::Http1,
            Pool::Http2(_) => Protocol::Http2,
            Pool::Tcp => Protocol::Tcp,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Records the latency of an attempt sent at `sent` (PEAK_EWMA clusters).
    pub fn observe_latency(&self, sent: tokio::time::Instant) {
        let now = tokio::time::Instant::now();
        self.latency.sample(now - sent, now.into_std());
    }

    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone(), None)
    }

    /// Pooled connections: idle HTTP/1.1 connections, or 1 for a live HTTP/2 connection.
    pub fn pooled(&self) -> usize {
        match &self.pool {
            Pool::Http1(idle) => idle.lock().len(),
            Pool::Http2(conn) => usize::from(conn.lock().as_ref().is_some_and(|c| !c.is_closed())),
            Pool::Tcp => 0,
        }
    }

    /// The addresses of its name it may be dialled at.
    pub fn family(&self) -> IpFamily {
        IpFamily::from_u8(self.family.load(Ordering::Relaxed))
    }

    /// Opens a connection to the endpoint (with its TLS handshake, under mTLS) within
    /// `timeout`.
    pub async fn connect(&self, timeout: Duration) -> Result<Stream, AttemptError> {
        let connect = async {
            let stream = crate::dial::connect(&self.addr, self.family())
                .await
                .map_err(|e| AttemptError::new(UpstreamFailure::Connect, e))?;
            // Small writes (headers, gRPC messages) must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            match self.tls.as_ref().and_then(|t| Some((t, t.client()?))) {
                None => Ok(Stream::Plain(stream)),
                Some((tls, config)) => crate::tls::connect(
                    tls.credentials(),
                    tls.mesh_trust,
                    config,
                    &self.addr,
                    stream,
                )
                .await
                .map_err(|e| AttemptError::new(UpstreamFailure::Tls, e)),
            }
        };
        match tokio::time::timeout(timeout, connect).await {
            Err(_) => Err(AttemptError::new(
                UpstreamFailure::ConnectTimeout,
                format!("no connection within {timeout:?}"),
            )),
            Ok(result) => result,
        }
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
        if let Some(port) = cluster.authority_port {
            out.set_authority_port(port);
        }
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
                // Boxed: connecting is rare, and inline its state would make every request's
                // future several times larger.
                None => match &cluster.limits {
                    None => {
                        let stream = Box::pin(self.connect(cluster.connect_timeout)).await?;
                        (Box::new(h1::Conn::new(stream)), false)
                    }
                    Some(limits) => Box::pin(self.connect_limited(cluster, limits)).await?,
                },
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

    /// A new HTTP/1.1 connection within the cluster's connection limit. At the limit the request
    /// waits (counted as pending, at most `max_pending_requests`, else it overflows at once) for
    /// an idle connection of its endpoint or a free slot; an idle connection of another
    /// endpoint of the cluster is closed to free one. Returns the connection and whether it
    /// was pooled.
    async fn connect_limited(
        self: &Arc<Self>,
        cluster: &Cluster,
        limits: &Arc<ClusterLimits>,
    ) -> Result<(Box<h1::Conn>, bool), AttemptError> {
        let permit = match limits.try_connection() {
            Ok(permit) => permit,
            Err(_) => match self.wait_for_connection(cluster, limits).await? {
                Either::Left(conn) => return Ok((conn, true)),
                Either::Right(permit) => permit,
            },
        };
        let stream = self.connect(cluster.connect_timeout).await?;
        Ok((Box::new(h1::Conn::new(stream).with_permit(permit)), false))
    }

    async fn wait_for_connection(
        self: &Arc<Self>,
        cluster: &Cluster,
        limits: &Arc<ClusterLimits>,
    ) -> Result<Either<Box<h1::Conn>, Option<ConnPermit>>, AttemptError> {
        let overflow = || AttemptError::new(UpstreamFailure::Overflow, "connection pool is full");
        let _pending = limits.begin_pending().map_err(|_| overflow())?;
        loop {
            let released = limits.released.notified();
            let mut released = std::pin::pin!(released);
            // Registered before looking, so a release in between is not missed.
            released.as_mut().enable();
            if let Some(conn) = self.checkout_http1() {
                return Ok(Either::Left(conn));
            }
            if let Ok(permit) = limits.try_connection() {
                return Ok(Either::Right(permit));
            }
            if cluster.close_idle_elsewhere(self) {
                continue;
            }
            tokio::select! {
                permit = limits.connection() => {
                    return permit.map(Either::Right).map_err(|_| overflow());
                }
                () = released => {}
            }
        }
    }

    /// Sends an HTTP/1.1 upgrade request (WebSocket) on a connection of its own.
    pub async fn send_upgrade(
        &self,
        cluster: &Cluster,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, AttemptError> {
        let mut req = req;
        if let Some(port) = cluster.authority_port {
            // An upgrade's head is HTTP/1.1: its authority is its `Host`.
            let host = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok());
            if let Some(v) =
                host.and_then(|h| http::HeaderValue::from_str(&format!("{}:{port}", h.host())).ok())
            {
                req.headers_mut().insert(http::header::HOST, v);
            }
        }
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
            let mut conn = conn;
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

impl Cluster {
    /// Starts a request to `endpoint`: counted on the endpoint, and against the cluster's
    /// request limit if it has one (over it: overflow).
    pub fn begin_request(&self, endpoint: &Arc<EndpointState>) -> Result<InFlight, ProxyError> {
        let mut in_flight = endpoint.begin_request();
        if let Some(limits) = &self.limits {
            match limits.try_request() {
                Ok(permit) => in_flight.1 = permit,
                Err(_) => {
                    self.metrics.overflows.inc();
                    return Err(ProxyError::Overflow(self.name.clone()));
                }
            }
        }
        Ok(in_flight)
    }

    /// Whether its endpoints' response latencies are kept (for PEAK_EWMA).
    pub fn times_responses(&self) -> bool {
        self.lb == LbPolicy::PeakEwma
    }

    /// Records an attempt's outcome for outlier detection: `server_error` for a 5xx response
    /// or an attempt with no response. Nothing without outlier detection.
    pub fn observe(&self, endpoint: &Arc<EndpointState>, server_error: bool) {
        if let Some(od) = &self.outlier
            && endpoint.outlier.record(server_error, od.max_server_errors)
        {
            self.eject(endpoint, od);
        }
    }

    #[cold]
    fn eject(&self, endpoint: &Arc<EndpointState>, od: &OutlierDetection) {
        let ejected = self
            .endpoints
            .iter()
            .filter(|(e, _)| e.outlier.is_ejected())
            .count();
        if !od.may_eject(ejected, self.endpoints.len()) {
            tracing::debug!(cluster = %self.name, endpoint = %endpoint.addr, ejected, "not ejected: max ejection percent reached");
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let now = tokio::time::Instant::now();
        let Some(duration) = endpoint.outlier.eject(od, now) else {
            return;
        };
        tracing::info!(cluster = %self.name, endpoint = %endpoint.addr, ?duration, "endpoint ejected");
        self.metrics.ejections.inc();
        self.metrics.ejected.inc();
        let gauge = self.metrics.ejected.clone();
        let endpoint = endpoint.clone();
        let cluster = self.name.clone();
        runtime.spawn(async move {
            tokio::time::sleep_until(now + duration).await;
            endpoint.outlier.uneject(tokio::time::Instant::now());
            gauge.dec();
            tracing::info!(%cluster, endpoint = %endpoint.addr, "endpoint un-ejected");
        });
    }

    /// Closes one idle HTTP/1.1 connection of another endpoint than `keep`, freeing its slot
    /// of the connection limit; false if there is none.
    fn close_idle_elsewhere(&self, keep: &Arc<EndpointState>) -> bool {
        for (endpoint, _) in &self.endpoints {
            if Arc::ptr_eq(endpoint, keep) {
                continue;
            }
            if let Pool::Http1(idle) = &endpoint.pool {
                // The oldest one; closed outside the pool's lock.
                let oldest = {
                    let mut idle = idle.lock();
                    (!idle.is_empty()).then(|| idle.remove(0))
                };
                if oldest.is_some() {
                    return true;
                }
            }
        }
        false
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
    /// The proxy's workload certificate, for the mTLS clusters' client side.
    pub(crate) credentials: Arc<crate::tls::Credentials>,
    /// Compiling to check a snapshot elsewhere (the control plane): certificate and trust
    /// files, which are the proxy's machine's, are not read.
    pub(crate) offline: bool,
    live: Mutex<EndpointMap>,
    limits: Mutex<LimitMap>,
    rate_limiters: Mutex<RateLimiterMap>,
    /// The running health checkers, one per endpoint of a cluster with a health check.
    checkers: Mutex<HashMap<EndpointKey, Checker>>,
    /// Where checkers run: set by the binary (a thread of their own), else the runtime that
    /// applies the snapshot (in-process tests, on their paused clock).
    checker_runtime: std::sync::OnceLock<tokio::runtime::Handle>,
    /// The proxy's zone (`--zone`), set once at start: zone-aware clusters prefer endpoints in
    /// it.
    zone: std::sync::OnceLock<Box<str>>,
    /// What the routes' mirrors share across snapshots: copies in flight, bytes held.
    mirrors: Arc<crate::limit::MirrorBudget>,
    /// The span queues of live tracers, by (collector, service): a snapshot's tracer takes the
    /// one its predecessor used, so a push keeps the exporter and its connection.
    span_queues: Mutex<HashMap<(String, String), std::sync::Weak<crate::span_export::SpanQueue>>>,
}

/// An endpoint of a cluster: (cluster, protocol, address, the IP family it is dialled in, the
/// identities it must prove under mTLS).
pub(crate) type EndpointKey = (Arc<str>, Protocol, Arc<str>, IpFamily, Option<Arc<str>>);
pub(crate) type EndpointMap = HashMap<EndpointKey, Arc<EndpointState>>;
/// Connection pool limit state, keyed by (cluster, protocol).
pub(crate) type LimitMap = HashMap<(Arc<str>, Protocol), Arc<ClusterLimits>>;
/// Rate limiters by (listener, bucket), kept across snapshots while their settings hold.
pub(crate) type RateLimiterMap = HashMap<(Arc<str>, Arc<str>), Arc<crate::rate_limit::RateLimiter>>;

impl Upstreams {
    /// For checking snapshots elsewhere: files are not read.
    pub(crate) fn offline() -> Self {
        Self {
            offline: true,
            ..Self::default()
        }
    }

    /// Starts a new generation: endpoints looked up in it reuse live state where it exists.
    pub(crate) fn generation(&self) -> Generation<'_> {
        Generation {
            upstreams: self,
            next: EndpointMap::new(),
            next_limits: LimitMap::new(),
            next_rate_limiters: RateLimiterMap::new(),
            next_checks: Vec::new(),
        }
    }

    /// Sets the proxy's zone (once; later calls change nothing). An empty one is none.
    pub(crate) fn set_zone(&self, zone: &str) {
        if !zone.is_empty() {
            let _ = self.zone.set(zone.into());
        }
    }

    /// Runs health checkers on `runtime` from now on (once; later calls change nothing).
    pub(crate) fn run_checkers_on(&self, runtime: tokio::runtime::Handle) {
        let _ = self.checker_runtime.set(runtime);
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
                        .map(|mut i| {
                            let open = i.expires > now && i.conn.is_reusable();
                            (open, i)
                        })
                        .partition::<Vec<_>, _>(|(open, _)| *open);
                    let keep = keep.into_iter().map(|(_, i)| i).collect();
                    let closing: Vec<Idle> = closing.into_iter().map(|(_, i)| i).collect();
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
    next_limits: LimitMap,
    next_rate_limiters: RateLimiterMap,
    next_checks: Vec<(
        EndpointKey,
        Arc<EndpointState>,
        Arc<HealthCheck>,
        HealthCheckMetrics,
    )>,
}

impl Generation<'_> {
    pub(crate) fn endpoint(
        &mut self,
        cluster: &Arc<str>,
        protocol: Protocol,
        addr: &str,
        family: IpFamily,
        tls: Option<&UpstreamTls>,
        ramps: bool,
    ) -> Arc<EndpointState> {
        let key = (
            cluster.clone(),
            protocol,
            Arc::<str>::from(addr),
            family,
            tls.map(|t| t.key.clone()),
        );
        if let Some(ep) = self.next.get(&key) {
            return ep.clone();
        }
        let ep = self
            .upstreams
            .live
            .lock()
            .get(&key)
            .cloned()
            .unwrap_or_else(|| {
                let mut ep = EndpointState::new(addr, protocol);
                ep.family.store(family as u8, Ordering::Relaxed);
                ep.tls = tls.cloned();
                ep.added = ramps.then(std::time::Instant::now);
                Arc::new(ep)
            });
        self.next.insert(key, ep.clone());
        ep
    }

    /// Whether the live snapshot's `cluster` has endpoints: new ones then slow-start (a
    /// cluster's first ones do not — they would all ramp alike).
    pub(crate) fn had_endpoints(&self, cluster: &str) -> bool {
        self.upstreams
            .live
            .lock()
            .keys()
            .any(|(name, ..)| &**name == cluster)
    }

    /// The client side of mTLS toward servers proving one of `identities`, for `protocol`.
    /// The workload certificate in use.
    pub(crate) fn credentials(&self) -> &Arc<crate::tls::Credentials> {
        &self.upstreams.credentials
    }

    /// The proxy's zone, if it was given one.
    pub(crate) fn zone(&self) -> Option<&str> {
        self.upstreams.zone.get().map(|z| &**z)
    }

    /// What the routes' mirrors share.
    pub(crate) fn mirror_budget(&self) -> Arc<crate::limit::MirrorBudget> {
        self.upstreams.mirrors.clone()
    }

    /// The span queue for `collector` and `service`: a live tracer's, else a new one.
    pub(crate) fn span_queue(
        &self,
        collector: &str,
        service: &str,
    ) -> Arc<crate::span_export::SpanQueue> {
        let mut queues = self.upstreams.span_queues.lock();
        queues.retain(|_, q| q.strong_count() > 0);
        let key = (collector.to_string(), service.to_string());
        if let Some(live) = queues.get(&key).and_then(std::sync::Weak::upgrade) {
            return live;
        }
        let queue = Arc::new(crate::span_export::SpanQueue::new(
            collector.to_string(),
            service.to_string(),
        ));
        queues.insert(key, Arc::downgrade(&queue));
        queue
    }

    /// Whether certificate and trust files are read (not when checking a snapshot elsewhere).
    pub(crate) fn reads_files(&self) -> bool {
        !self.upstreams.offline
    }

    pub(crate) fn upstream_tls(
        &self,
        spec: &trellis_proto::v1::UpstreamTls,
        protocol: Protocol,
    ) -> Result<UpstreamTls, String> {
        use crate::tls::{ClientCert, Roots};
        use std::hash::{Hash as _, Hasher as _};
        let alpn = match protocol {
            Protocol::Http1 => crate::tls::ALPN_HTTP1,
            Protocol::Http2 => crate::tls::ALPN_H2,
            Protocol::Tcp => crate::tls::ALPN_NONE,
        };
        // The files' contents are part of the key: new contents, new connections.
        let mut contents = std::collections::hash_map::DefaultHasher::new();
        let cert = match (&spec.certificate, spec.no_certificate) {
            (Some(_), true) => return Err("certificate and noCertificate both set".into()),
            (Some(_), false) if self.upstreams.offline => ClientCert::None,
            (Some(files), false) => {
                for f in [&files.certificate_chain, &files.private_key] {
                    std::fs::read(f)
                        .map_err(|e| format!("{f}: {e}"))?
                        .hash(&mut contents);
                }
                ClientCert::Fixed(crate::tls::load_certified_key(
                    &files.certificate_chain,
                    &files.private_key,
                )?)
            }
            (None, true) => ClientCert::None,
            (None, false) => ClientCert::Workload,
        };
        let mesh_trust = spec.trust_files.is_empty();
        let roots = if mesh_trust || self.upstreams.offline {
            Roots::Bundle
        } else {
            let roots = crate::tls::load_roots(&spec.trust_files)?;
            for r in roots.iter() {
                r.as_ref().hash(&mut contents);
            }
            Roots::Fixed(roots)
        };
        let credentials = &self.upstreams.credentials;
        let config = credentials
            .client_config_for(roots, spec.identities.clone(), cert, alpn)
            .map_err(|e| e.to_string())?;
        let key = format!(
            "{:?};{}",
            (
                &spec.identities,
                spec.plaintext_without_identity,
                &spec.certificate,
                spec.no_certificate,
                &spec.trust_files,
            ),
            contents.finish()
        );
        Ok(UpstreamTls::new(
            key,
            config,
            credentials.clone(),
            spec.plaintext_without_identity,
            mesh_trust,
        ))
    }

    /// A cluster's connection pool limit state: the live one when its limits are unchanged
    /// (counts carry over), else a new one (connections opened under the old limits stay
    /// counted there until they close).
    pub(crate) fn limits(
        &mut self,
        cluster: &Arc<str>,
        protocol: Protocol,
        config: PoolLimits,
    ) -> Arc<ClusterLimits> {
        let key = (cluster.clone(), protocol);
        let live = self.upstreams.limits.lock().get(&key).cloned();
        let limits = live
            .filter(|l| l.config == config)
            .unwrap_or_else(|| Arc::new(ClusterLimits::new(config)));
        self.next_limits.insert(key, limits.clone());
        limits
    }

    /// The live rate limiters (a compile reuses those whose settings are unchanged).
    pub(crate) fn live_rate_limiters(&self) -> RateLimiterMap {
        self.upstreams.rate_limiters.lock().clone()
    }

    /// The rate limiters this generation's snapshot uses.
    pub(crate) fn set_rate_limiters(&mut self, limiters: RateLimiterMap) {
        self.next_rate_limiters = limiters;
    }

    /// Asks for `endpoint` of `cluster` to be health checked with `config` once this
    /// generation is committed.
    pub(crate) fn health_check(
        &mut self,
        cluster: &Arc<str>,
        endpoint: &Arc<EndpointState>,
        config: &Arc<HealthCheck>,
        metrics: &HealthCheckMetrics,
    ) {
        let key = (
            cluster.clone(),
            endpoint.protocol(),
            endpoint.addr.clone(),
            endpoint.family(),
            endpoint.tls.as_ref().map(|t| t.key.clone()),
        );
        self.next_checks
            .push((key, endpoint.clone(), config.clone(), metrics.clone()));
    }

    /// Replaces the live endpoints: state no snapshot uses any more is dropped once in-flight
    /// requests release it. Health checkers of endpoints whose health check is unchanged keep
    /// running; the others stop, and new ones start (outside a runtime, as in a unit test that
    /// only compiles, none do).
    pub(crate) fn commit(self) {
        *self.upstreams.live.lock() = self.next;
        *self.upstreams.limits.lock() = self.next_limits;
        *self.upstreams.rate_limiters.lock() = self.next_rate_limiters;
        let mut checkers = self.upstreams.checkers.lock();
        let mut old = std::mem::take(&mut *checkers);
        let runtime = self
            .upstreams
            .checker_runtime
            .get()
            .cloned()
            .or_else(|| tokio::runtime::Handle::try_current().ok());
        for (key, endpoint, config, metrics) in self.next_checks {
            match old.remove(&key) {
                Some(running) if running.config == config => {
                    checkers.insert(key, running);
                }
                other => {
                    // A changed health check: the old checker stops before the new one starts.
                    drop(other);
                    if let Some(runtime) = &runtime {
                        let checker = Checker::start(
                            runtime,
                            &key.0,
                            (&endpoint.addr, key.3, endpoint.tls.clone()),
                            config,
                            endpoint.health.clone(),
                            metrics,
                        );
                        checkers.insert(key, checker);
                    }
                }
            }
        }
        // Endpoints, or health checks, that left the snapshot.
        drop(old);
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
        outlier: None,
        limits: None,
        health_check: None,
        authority_port: None,
        slow_start: None,
        ramping_until: None,
        hashing: None,
        local_zone: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot's tracer takes the span queue (and its exporter) of the one before while
    /// they export alike; another collector or service gets its own.
    #[test]
    fn span_queues_are_shared_while_alive() {
        let ups = Upstreams::default();
        let first = ups
            .generation()
            .span_queue("127.0.0.1:4317", "default/front");
        let next = ups
            .generation()
            .span_queue("127.0.0.1:4317", "default/front");
        assert!(Arc::ptr_eq(&first, &next));
        let other = ups
            .generation()
            .span_queue("127.0.0.1:4318", "default/front");
        assert!(!Arc::ptr_eq(&first, &other));
        let weak = Arc::downgrade(&first);
        drop((first, next));
        assert!(weak.upgrade().is_none(), "gone with its last tracer");
        let fresh = ups
            .generation()
            .span_queue("127.0.0.1:4317", "default/front");
        assert_eq!(Arc::strong_count(&fresh), 1);
    }

    #[test]
    fn generations_reuse_live_endpoint_state() {
        let ups = Upstreams::default();
        let c: Arc<str> = "c".into();
        let mut g = ups.generation();
        let a = g.endpoint(
            &c,
            Protocol::Http1,
            "127.0.0.1:1",
            IpFamily::Any,
            None,
            false,
        );
        assert!(Arc::ptr_eq(
            &a,
            &g.endpoint(
                &c,
                Protocol::Http1,
                "127.0.0.1:1",
                IpFamily::Any,
                None,
                false
            )
        ));
        let _busy = a.begin_request();
        g.commit();

        let mut g = ups.generation();
        let again = g.endpoint(
            &c,
            Protocol::Http1,
            "127.0.0.1:1",
            IpFamily::Any,
            None,
            false,
        );
        assert!(Arc::ptr_eq(&a, &again), "state survives a new snapshot");
        assert_eq!(again.in_flight(), 1);
        let h2 = g.endpoint(
            &c,
            Protocol::Http2,
            "127.0.0.1:1",
            IpFamily::Any,
            None,
            false,
        );
        assert!(!Arc::ptr_eq(&a, &h2), "a protocol change gets a new pool");
        drop(g); // not committed: live state unchanged

        let g = ups.generation();
        g.commit();
        let mut g = ups.generation();
        let fresh = g.endpoint(
            &c,
            Protocol::Http1,
            "127.0.0.1:1",
            IpFamily::Any,
            None,
            false,
        );
        assert!(!Arc::ptr_eq(&a, &fresh), "removed endpoints are forgotten");
    }
}
