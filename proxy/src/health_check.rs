//! Active health checking (App Mesh's listener `healthCheck`, with Envoy's semantics): every
//! proxy that uses a cluster with a health check probes each of its endpoints on a task of its
//! own, and the balancer skips endpoints whose probes fail.
//!
//! - The first probe of an endpoint runs as soon as the endpoint (or its health check) appears.
//!   Until it answers, the endpoint is *pending* and takes requests (a fresh proxy or a new
//!   endpoint never answers 503 for want of a probe); its first answer decides at once, as
//!   Envoy's first check does (one success: healthy; one failure: unhealthy).
//! - Then an endpoint turns unhealthy after `unhealthy_threshold` failures in a row, and healthy
//!   again after `healthy_threshold` successes in a row. A probe not answered within `timeout`
//!   fails.
//! - Not in lockstep: the second probe runs at a random point within the interval, the later
//!   ones every interval ±5 % (measured from the end of the previous probe, as Envoy).
//!
//! A [`Checker`] is the running task; dropping it stops the probes. `upstream` keeps one per
//! endpoint whose cluster has a health check and hands it to the next snapshot while the
//! endpoint and its health check are unchanged, so a config push neither restarts nor doubles
//! the probes. The state probes decide ([`EndpointHealth`]) belongs to the endpoint.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::{Buf, Bytes};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::{task::AbortHandle, time::Instant};

use crate::{
    dial::IpFamily,
    metrics::HealthCheckMetrics,
    tls::{Stream, UpstreamTls},
};

/// Largest probe response body read (a longer one fails the probe).
const MAX_BODY: usize = 64 * 1024;
/// The per-interval jitter: ± this share of the interval.
const JITTER: f64 = 0.05;
/// Probes are due on a grid of this step (common to all checkers), so that the probes of many
/// endpoints share the wake-ups of the checkers' thread: 1,000 endpoints every 5 s wake it ~10
/// times a second, not 200, still spread over the interval's 50 slots.
const TICK: Duration = Duration::from_millis(100);
const USER_AGENT: &str = "trellis-health-check";

/// A cluster's health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    /// The port probed on the endpoint's host; `None`: the endpoint's port.
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

/// What one probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// GET `path` over HTTP/1.1; healthy iff 200.
    Http { path: Arc<str> },
    /// GET `path` over prior-knowledge h2c; healthy iff 200.
    Http2 { path: Arc<str> },
    /// `grpc.health.v1.Health/Check` with an empty service name; healthy iff SERVING.
    Grpc,
    /// Healthy iff a connection opens.
    Tcp,
}

const PENDING: u8 = 0;
const HEALTHY: u8 = 1;
const UNHEALTHY: u8 = 2;

/// One endpoint's active health: pending (no answer yet), healthy or unhealthy. The request
/// path reads one atomic; checkers change it under a lock that says which checker owns it.
#[derive(Debug, Default)]
pub struct EndpointHealth {
    state: AtomicU8,
    /// The id of the checker whose results count (0: none), so a stopped checker's last probe
    /// never overwrites what its successor decided.
    owner: Mutex<u64>,
}

impl EndpointHealth {
    pub fn is_unhealthy(&self) -> bool {
        self.state.load(Ordering::Acquire) == UNHEALTHY
    }

    /// `pending`, `healthy` or `unhealthy`, for `/clusters`.
    pub fn as_str(&self) -> &'static str {
        match self.state.load(Ordering::Acquire) {
            HEALTHY => "healthy",
            UNHEALTHY => "unhealthy",
            _ => "pending",
        }
    }

    /// Records checker `id`'s verdict (nothing if another checker owns the endpoint now).
    fn set(&self, id: u64, healthy: bool, metrics: &HealthCheckMetrics) {
        let owner = self.owner.lock();
        if *owner != id {
            return;
        }
        let old = self.state.load(Ordering::Acquire);
        let new = if healthy { HEALTHY } else { UNHEALTHY };
        if old == new {
            return;
        }
        self.state.store(new, Ordering::Release);
        if new == UNHEALTHY {
            metrics.unhealthy(1);
        } else if old == UNHEALTHY {
            metrics.unhealthy(-1);
        }
    }

    fn claim(&self, id: u64) {
        *self.owner.lock() = id;
        self.state.store(PENDING, Ordering::Release);
    }

    fn release(&self, id: u64, metrics: &HealthCheckMetrics) {
        let mut owner = self.owner.lock();
        if *owner != id {
            return;
        }
        *owner = 0;
        if self.state.swap(PENDING, Ordering::AcqRel) == UNHEALTHY {
            metrics.unhealthy(-1);
        }
    }
}

/// The probes of one endpoint, running until dropped.
#[derive(Debug)]
pub struct Checker {
    pub config: Arc<HealthCheck>,
    id: u64,
    health: Arc<EndpointHealth>,
    metrics: HealthCheckMetrics,
    task: AbortHandle,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
        // The endpoint is pending again (a later checker starts from scratch) and no longer
        // counted as unhealthy.
        self.health.release(self.id, &self.metrics);
    }
}

impl Checker {
    /// Starts probing an endpoint on `runtime` (`dial`: its HOST:PORT, the IP family it is
    /// dialled in, its mTLS); the first probe runs at once.
    pub fn start(
        runtime: &tokio::runtime::Handle,
        cluster: &Arc<str>,
        (addr, family, tls): (&str, IpFamily, Option<UpstreamTls>),
        config: Arc<HealthCheck>,
        health: Arc<EndpointHealth>,
        metrics: HealthCheckMetrics,
    ) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        health.claim(id);
        let target = Target::new(addr, config.port, family, tls);
        let task = runtime.spawn(run(
            cluster.clone(),
            target,
            config.clone(),
            id,
            health.clone(),
            metrics.clone(),
        ));
        Self {
            config,
            id,
            health,
            metrics,
            task: task.abort_handle(),
        }
    }
}

/// Where probes go: the endpoint's host and the probed port.
#[derive(Debug)]
struct Target {
    /// HOST:PORT to connect to, and the authority of HTTP probes.
    addr: Arc<str>,
    family: IpFamily,
    /// mTLS, as the cluster's requests use it.
    tls: Option<UpstreamTls>,
}

impl Target {
    fn new(addr: &str, port: Option<u16>, family: IpFamily, tls: Option<UpstreamTls>) -> Self {
        let addr = match (port, addr.rsplit_once(':')) {
            (Some(port), Some((host, _))) => format!("{host}:{port}"),
            _ => addr.to_owned(),
        };
        Self {
            addr: addr.into(),
            family,
            tls,
        }
    }
}

/// A probe connection kept between probes (Envoy reuses its health check connections too).
enum Conn {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

async fn run(
    cluster: Arc<str>,
    target: Target,
    config: Arc<HealthCheck>,
    id: u64,
    health: Arc<EndpointHealth>,
    metrics: HealthCheckMetrics,
) {
    let mut conn = None;
    let (mut successes, mut failures) = (0u32, 0u32);
    let mut first = true;
    loop {
        let outcome =
            tokio::time::timeout(config.timeout, probe(&config.probe, &target, &mut conn))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {:?}", config.timeout)));
        let ok = outcome.is_ok();
        match outcome {
            Ok(()) => {
                successes = successes.saturating_add(1);
                failures = 0;
            }
            Err(reason) => {
                // The connection's state is unknown: the next probe opens a new one.
                conn = None;
                failures = failures.saturating_add(1);
                successes = 0;
                tracing::debug!(%cluster, endpoint = %target.addr, %reason, "health check failed");
            }
        }
        let before = health.as_str();
        let verdict = match health.state.load(Ordering::Acquire) {
            PENDING => Some(successes > 0),
            HEALTHY if failures >= config.unhealthy_threshold => Some(false),
            UNHEALTHY if successes >= config.healthy_threshold => Some(true),
            _ => None,
        };
        if let Some(healthy) = verdict {
            health.set(id, healthy, &metrics);
            if health.as_str() != before {
                tracing::info!(%cluster, endpoint = %target.addr, health = health.as_str(), "active health check");
            }
        }
        // Counted once its verdict is in, so whoever sees the count sees the verdict.
        metrics.probe(ok);
        let wait = next_wait(config.interval, first);
        first = false;
        tokio::time::sleep_until(on_tick(Instant::now() + wait)).await;
    }
}

/// How long after a probe the next one runs: after the first, a random point within the
/// interval; after later ones, the interval ±5 %.
fn next_wait(interval: Duration, first: bool) -> Duration {
    if first {
        interval.mul_f64(fastrand::f64())
    } else {
        interval.mul_f64(1.0 + JITTER * (2.0 * fastrand::f64() - 1.0))
    }
}

/// The first point of the probe grid at or after `at` (`at` itself if it is before the grid
/// starts, as with another runtime's paused clock in tests).
fn on_tick(at: Instant) -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    match at.checked_duration_since(epoch) {
        Some(since) => {
            let nanos = since.as_nanos().div_ceil(TICK.as_nanos()) * TICK.as_nanos();
            u64::try_from(nanos)
                .ok()
                .and_then(|n| epoch.checked_add(Duration::from_nanos(n)))
                .unwrap_or(at)
        }
        None => at,
    }
}

/// One probe: `Ok` when the endpoint is healthy, else why not. A request that fails on a kept
/// connection before any answer (the endpoint closed it as the probe was sent, as a server
/// closes idle keep-alive connections) is sent again on a new one: only that answer counts.
async fn probe(probe: &Probe, target: &Target, conn: &mut Option<Conn>) -> Result<(), String> {
    let kept = match conn {
        Some(Conn::H1(s)) => !s.is_closed(),
        Some(Conn::H2(s)) => !s.is_closed(),
        None => false,
    };
    match probe_once(probe, target, conn).await {
        Err(Failure::Unanswered(e)) if kept => {
            tracing::debug!(endpoint = %target.addr, error = %e, "kept probe connection failed; probing on a new one");
            *conn = None;
            probe_once(probe, target, conn)
                .await
                .map_err(Failure::into_reason)
        }
        r => r.map_err(Failure::into_reason),
    }
}

/// Why a probe failed: no answer came (the request or its connection failed), or one did.
enum Failure {
    Unanswered(String),
    Answered(String),
}

impl Failure {
    fn into_reason(self) -> String {
        match self {
            Self::Unanswered(r) | Self::Answered(r) => r,
        }
    }
}

fn unanswered(e: impl ToString) -> Failure {
    Failure::Unanswered(e.to_string())
}

async fn probe_once(
    probe: &Probe,
    target: &Target,
    conn: &mut Option<Conn>,
) -> Result<(), Failure> {
    let addr = &*target.addr;
    match probe {
        Probe::Tcp => connect(target).await.map(drop).map_err(Failure::Unanswered),
        Probe::Http { path } => {
            if !matches!(conn, Some(Conn::H1(s)) if !s.is_closed()) {
                *conn = Some(Conn::H1(
                    connect_h1(target).await.map_err(Failure::Unanswered)?,
                ));
            }
            let Some(Conn::H1(sender)) = conn else {
                return Err(unanswered("no HTTP/1.1 connection"));
            };
            sender.ready().await.map_err(unanswered)?;
            let req = Request::get(&**path)
                .header(header::HOST, addr)
                .header(header::USER_AGENT, USER_AGENT)
                .body(Full::default())
                .map_err(|e| Failure::Answered(e.to_string()))?;
            let resp = sender.send_request(req).await.map_err(unanswered)?;
            let status = resp.status();
            read_body(resp.into_body())
                .await
                .map_err(Failure::Answered)?;
            expect_ok(status).map_err(Failure::Answered)
        }
        Probe::Http2 { path } => {
            let sender = h2_sender(target, conn).await.map_err(Failure::Unanswered)?;
            let req = Request::get(format!("http://{addr}{path}"))
                .header(header::USER_AGENT, USER_AGENT)
                .body(Full::default())
                .map_err(|e| Failure::Answered(e.to_string()))?;
            let resp = sender.send_request(req).await.map_err(unanswered)?;
            let status = resp.status();
            read_body(resp.into_body())
                .await
                .map_err(Failure::Answered)?;
            expect_ok(status).map_err(Failure::Answered)
        }
        Probe::Grpc => {
            let sender = h2_sender(target, conn).await.map_err(Failure::Unanswered)?;
            // A HealthCheckRequest with the empty service name is the empty message: a gRPC
            // frame of no compression and length 0.
            let req = Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
                .header(header::CONTENT_TYPE, "application/grpc")
                .header(header::TE, "trailers")
                .header(header::USER_AGENT, USER_AGENT)
                .body(Full::new(Bytes::from_static(&[0; 5])))
                .map_err(|e| Failure::Answered(e.to_string()))?;
            let resp = sender.send_request(req).await.map_err(unanswered)?;
            expect_ok(resp.status()).map_err(Failure::Answered)?;
            let (head, body) = resp.into_parts();
            let collected = collect(body).await.map_err(Failure::Answered)?;
            // grpc-status in the trailers, or in the headers of a trailers-only answer.
            let status = collected
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .or_else(|| head.headers.get("grpc-status"))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("(none)")
                .to_owned();
            if status != "0" {
                return Err(Failure::Answered(format!("grpc-status {status}")));
            }
            match serving_status(collected.to_bytes()) {
                Some(1) => Ok(()),
                Some(s) => Err(Failure::Answered(format!(
                    "health status {s} (not SERVING)"
                ))),
                None => Err(Failure::Answered("malformed HealthCheckResponse".into())),
            }
        }
    }
}

async fn h2_sender<'a>(
    target: &Target,
    conn: &'a mut Option<Conn>,
) -> Result<&'a mut http2::SendRequest<Full<Bytes>>, String> {
    if !matches!(conn, Some(Conn::H2(s)) if !s.is_closed()) {
        *conn = Some(Conn::H2(connect_h2(target).await?));
    }
    let Some(Conn::H2(sender)) = conn else {
        return Err("no HTTP/2 connection".into());
    };
    sender.ready().await.map_err(|e| e.to_string())?;
    Ok(sender)
}

fn expect_ok(status: StatusCode) -> Result<(), String> {
    if status == StatusCode::OK {
        Ok(())
    } else {
        Err(format!("status {}", status.as_u16()))
    }
}

/// A probe connection (with its TLS handshake under mTLS: a TCP probe then also checks that).
async fn connect(target: &Target) -> Result<Stream, String> {
    let stream = crate::dial::connect(&target.addr, target.family)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    match target.tls.as_ref().and_then(|t| Some((t, t.client()?))) {
        None => Ok(Stream::Plain(stream)),
        Some((tls, config)) => crate::tls::connect(
            tls.credentials(),
            tls.mesh_trust,
            config,
            &target.addr,
            stream,
        )
        .await
        .map_err(|e| format!("TLS: {e}")),
    }
}

async fn connect_h1(target: &Target) -> Result<http1::SendRequest<Full<Bytes>>, String> {
    let stream = connect(target).await?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    // Ends when the sender is dropped (the checker stopped, or the connection is replaced).
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn connect_h2(target: &Target) -> Result<http2::SendRequest<Full<Bytes>>, String> {
    let stream = connect(target).await?;
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Reads a probe's response body to its end (so the connection can be reused), at most
/// [`MAX_BODY`] bytes.
async fn read_body(body: hyper::body::Incoming) -> Result<(), String> {
    collect(body).await.map(drop)
}

async fn collect(body: hyper::body::Incoming) -> Result<http_body_util::Collected<Bytes>, String> {
    http_body_util::Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| e.to_string())
}

/// The `status` field of a gRPC-framed `grpc.health.v1.HealthCheckResponse` (0, UNKNOWN, when
/// absent, as proto3 reads it); `None` when the bytes are not one such frame.
fn serving_status(mut frame: Bytes) -> Option<u64> {
    if frame.len() < 5 || frame.get_u8() != 0 {
        return None;
    }
    let len = usize::try_from(frame.get_u32()).ok()?;
    if frame.len() != len {
        return None;
    }
    let mut status = 0;
    while frame.has_remaining() {
        let key = varint(&mut frame)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = varint(&mut frame)?,
            // Other fields, skipped by wire type: varint, 64-bit, length-delimited, 32-bit.
            (_, 0) => drop(varint(&mut frame)?),
            (_, 1) if frame.remaining() >= 8 => frame.advance(8),
            (_, 2) => {
                let n = usize::try_from(varint(&mut frame)?).ok()?;
                if frame.remaining() < n {
                    return None;
                }
                frame.advance(n);
            }
            (_, 5) if frame.remaining() >= 4 => frame.advance(4),
            _ => return None,
        }
    }
    Some(status)
}

fn varint(buf: &mut Bytes) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        if !buf.has_remaining() {
            return None;
        }
        let byte = buf.get_u8();
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_check_responses_are_decoded() {
        let frame = |msg: &[u8]| {
            let mut f = vec![0];
            f.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_be_bytes());
            f.extend_from_slice(msg);
            Bytes::from(f)
        };
        assert_eq!(serving_status(frame(&[0x08, 0x01])), Some(1));
        assert_eq!(serving_status(frame(&[0x08, 0x02])), Some(2));
        assert_eq!(serving_status(frame(&[])), Some(0), "absent is UNKNOWN");
        // An unknown length-delimited field before the status is skipped.
        assert_eq!(
            serving_status(frame(&[0x12, 0x02, b'h', b'i', 0x08, 0x01])),
            Some(1)
        );
        assert_eq!(serving_status(Bytes::from_static(&[0, 0, 0, 0])), None);
        assert_eq!(
            serving_status(Bytes::from_static(&[0, 0, 0, 0, 3, 0x08])),
            None
        );
        assert_eq!(serving_status(frame(&[0x08])), None);
        assert_eq!(serving_status(frame(&[0x08, 0xff])), None);
    }

    /// 1,000 endpoints appearing at once: their second probes spread over the interval's
    /// slots, and later probes drift apart by the jitter; all on the grid.
    #[test]
    fn probes_of_many_endpoints_are_spread_over_the_interval() {
        let interval = Duration::from_secs(5);
        let slots: std::collections::HashSet<u128> = (0..1000)
            .map(|_| next_wait(interval, true).as_millis() / TICK.as_millis())
            .collect();
        // 50 slots of 100 ms: 1,000 uniform draws use them all.
        assert!(slots.len() >= 49, "{} slots used", slots.len());
        let later: Vec<Duration> = (0..1000).map(|_| next_wait(interval, false)).collect();
        assert!(
            later
                .iter()
                .all(|w| *w >= interval.mul_f64(0.95) && *w <= interval.mul_f64(1.05))
        );
        assert!(later.iter().any(|w| *w < interval) && later.iter().any(|w| *w > interval));
        let start = Instant::now();
        for w in later.iter().take(50) {
            let due = on_tick(start + *w);
            assert!(due >= start + *w && due < start + *w + TICK + TICK);
        }
    }

    #[test]
    fn the_probed_port_replaces_the_endpoints() {
        assert_eq!(
            &*Target::new("10.0.0.1:80", Some(9), IpFamily::Any, None).addr,
            "10.0.0.1:9"
        );
        assert_eq!(
            &*Target::new("[::1]:80", Some(9), IpFamily::Any, None).addr,
            "[::1]:9"
        );
        assert_eq!(
            &*Target::new("a.example:80", None, IpFamily::Any, None).addr,
            "a.example:80"
        );
    }

    #[test]
    fn a_stopped_checker_never_overrides_its_successor() {
        let registry = prometheus::Registry::new();
        let metrics = crate::metrics::ProxyMetrics::new(&registry)
            .unwrap()
            .health_check(&"c".into());
        let h = EndpointHealth::default();
        let gauge = || {
            let text = prometheus::TextEncoder::new()
                .encode_to_string(&registry.gather())
                .unwrap();
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("trellis_proxy_health_check_unhealthy{cluster=\"c\"} ")
                })
                .map_or(0, |v| v.parse::<i64>().unwrap())
        };
        h.claim(1);
        h.set(1, false, &metrics);
        assert!(h.is_unhealthy());
        assert_eq!(gauge(), 1);
        h.release(1, &metrics);
        assert_eq!(gauge(), 0, "a stopped checker's endpoint is not counted");
        h.claim(2);
        assert_eq!(h.as_str(), "pending");
        h.set(1, false, &metrics);
        assert_eq!(h.as_str(), "pending", "checker 1 no longer owns it");
        h.release(1, &metrics);
        h.set(2, true, &metrics);
        assert_eq!(h.as_str(), "healthy");
        h.release(2, &metrics);
        assert_eq!(h.as_str(), "pending");
    }
}
