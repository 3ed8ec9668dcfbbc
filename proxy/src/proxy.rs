//! The HTTP request path: load the snapshot once → virtual host by authority → route → weighted
//! target → endpoint → pooled dispatch with deadline and retries → response. Errors become
//! responses in `error.rs`; every request ends in [`Completion::finish`] (metrics, access log).

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::{
    access_log::{AccessLog, LogRecord},
    activity::{ActiveRequest, BodyOpen},
    balance::Target,
    body::{self, BodyState, BodyTracking, ClientBody, ClientBodyError, Finish, UpstreamBody},
    downstream::Incoming,
    error::{AttemptError, CLIENT_CLOSED, ProxyError, UpstreamFailure},
    metrics::{ProxyMetrics, RequestMetrics},
    mirror::{Tee, TeeSink},
    outbound::{AuthorityIn, Outbound, RequestBody as OutboundBody},
    retry::{Replay, RetryPolicy},
    route::{DirectKind, DirectResponse, MatchInput, Route, authority_port},
    snapshot::{ListenerKind, Runtime, Slot, SnapshotStore, Unmatched},
    upstream::{Cluster, EndpointState, InFlight, Protocol, UpstreamIncoming},
    websocket,
};

/// The shared services the request path uses, passed in by the listener (not the whole
/// application): the snapshot in use, metrics, the access log and the client idle timeout.
pub struct Services {
    pub store: SnapshotStore,
    pub metrics: ProxyMetrics,
    pub access_log: AccessLog,
    /// Metrics for requests that matched no route.
    pub(crate) no_route_metrics: RequestMetrics,
    /// How long a client connection, or a (non-gRPC) request body before its response, may stay
    /// idle.
    pub(crate) idle_timeout: std::time::Duration,
    /// Cancelled when the drain starts (the listener stage's drain uses this token).
    pub(crate) draining: tokio_util::sync::CancellationToken,
}

impl Services {
    pub(crate) fn new(
        metrics: ProxyMetrics,
        access_log: AccessLog,
        idle_timeout: std::time::Duration,
    ) -> Self {
        Self {
            store: SnapshotStore::new(metrics.clone()),
            no_route_metrics: metrics.requests("", ""),
            metrics,
            access_log,
            idle_timeout,
            draining: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Ready to serve: a config is in use and the drain has not started (what a health check
    /// answered by the proxy reports).
    pub(crate) fn serving(&self) -> bool {
        self.store.is_ready() && !self.draining.is_cancelled()
    }
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// The body of every response the proxy serves (admin's too).
pub type ResponseBody = body::ResponseBody<UpstreamBody<UpstreamIncoming, ExchangeEnd>>;

/// What ends an exchange when its response body is over: the endpoint's in-flight count drops,
/// then the request is recorded.
#[derive(Debug)]
pub struct ExchangeEnd {
    in_flight: InFlight,
    completion: Completion,
}

impl Finish for ExchangeEnd {
    fn finish(self, error: Option<&'static str>, bytes_sent: u64) {
        let Self {
            in_flight,
            mut completion,
        } = self;
        drop(in_flight);
        if let Some(log) = &mut completion.log {
            log.bytes_sent = bytes_sent;
        }
        completion.finish(error);
    }
}

/// What is left to do when a request is over: count it and log it.
#[derive(Debug)]
pub struct Completion {
    services: Arc<Services>,
    start: Instant,
    status: StatusCode,
    error: Option<&'static str>,
    retries: u32,
    metrics: Option<Arc<RequestMetrics>>,
    log: Option<Box<LogRecord>>,
    /// The request body's state, when it has a body and is logged (for the bytes received).
    body: Option<Arc<BodyState>>,
    recorded: bool,
    /// Keeps the client connection from counting as idle.
    active: ActiveRequest,
    /// The request's span, when its trace is sampled.
    trace: Option<Box<crate::trace::ActiveSpan>>,
}

impl Completion {
    /// Records the request; `body_error` is set when the response body failed midway.
    pub fn finish(mut self, body_error: Option<&'static str>) {
        self.record(body_error);
    }

    /// A tunnel (CONNECT, WebSocket) to `endpoint` is over, after `counts` bytes from the client
    /// and to it.
    fn tunnelled(&mut self, endpoint: Arc<str>, counts: (u64, u64)) {
        if let Some(log) = &mut self.log {
            log.endpoint = Some(endpoint);
            (log.bytes_received, log.bytes_sent) = counts;
        }
    }

    fn record(&mut self, body_error: Option<&'static str>) {
        self.recorded = true;
        let end = Instant::now();
        let elapsed = end.saturating_duration_since(self.start);
        self.active.ended_at(end);
        match &self.metrics {
            Some(m) => m.observe(self.status, elapsed),
            None => self.services.no_route_metrics.observe(self.status, elapsed),
        }
        if let Some(kind) = body_error {
            self.services.metrics.error(kind);
            if kind == "idle_timeout" {
                self.services.metrics.timeout("idle");
            }
        }
        if let Some(span) = self.trace.take() {
            span.end(self.status, body_error.or(self.error));
        }
        if let Some(mut log) = self.log.take() {
            log.status = self.status.as_u16();
            log.duration = elapsed;
            log.retries = self.retries;
            log.error = body_error.or(self.error);
            if let Some(body) = &self.body {
                log.bytes_received = body.received();
            }
            self.services.access_log.write(log);
        }
    }
}

impl Drop for Completion {
    /// A request dropped before it finished: the client went away while it was in flight.
    fn drop(&mut self) {
        if !self.recorded {
            self.status = CLIENT_CLOSED;
            self.record(Some("downstream_reset"));
        }
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Serves one request that arrived on `slot`.
pub(crate) async fn serve(
    services: Arc<Services>,
    slot: &Slot,
    mut req: Request<Incoming>,
    active: ActiveRequest,
) -> Response<ResponseBody> {
    let start = Instant::now();
    if matches!(slot, Slot::Ingress) {
        client_cert_header(&services, &mut req, active.identity());
    }
    let runtime = services.store.load();
    let log = services
        .access_log
        .sink(runtime.access_log.as_ref())
        .map(|sink| {
            let mut log = Box::new(LogRecord::new(sink.clone(), slot.name(), &req));
            (log.peer, log.local) = active.addresses();
            log
        });
    let mut completion = Some(Completion {
        services: services.clone(),
        start,
        status: StatusCode::OK,
        error: None,
        retries: 0,
        metrics: None,
        log,
        body: None,
        recorded: false,
        active,
        trace: None,
    });
    // Routing is synchronous; only the chosen path's future is awaited here, so the request
    // future holds it directly (each async layer would store the request again).
    let mut passthrough = None;
    let routed = match route_request(&runtime, slot, &req, &mut completion, &mut passthrough) {
        Ok(Routing::Direct(direct)) => return direct_response(&services, direct, completion),
        Ok(Routing::Forward(routed)) => Ok(routed),
        Err(e) => Err(e),
    };
    // The request joins its trace, or starts one (after routing: its span is named by its
    // route), before anything is forwarded.
    if let (Some(tracer), Ok(r)) = (&runtime.tracer, &routed) {
        let route: &Route = r.route;
        let method = req.method().clone();
        let span = tracer.start(
            req.headers_mut(),
            format!("{method} {}", route.name),
            matches!(slot, Slot::Ingress),
            &[
                ("http.request.method", method.as_str()),
                ("trellis.route", &route.name),
                ("trellis.cluster", &r.target.cluster.name),
            ],
        );
        if let Some(c) = completion.as_mut() {
            c.trace = span;
        }
    }
    // Debug level: a routed request's span, under its connection's.
    let span = match (&routed, &completion) {
        (Ok(r), Some(c)) => tracing::debug_span!(
            parent: c.active.conn_span(),
            "request",
            method = %req.method(),
            path = req.uri().path(),
            version = &*runtime.version,
            route = &*r.route.name,
            cluster = &*r.target.cluster.name,
        ),
        _ => tracing::Span::none(),
    };
    // The matched route's response rules apply to the proxy's own answers too (a rate limit's,
    // a fault's, an error's).
    let steps = routed.as_ref().ok().map(|r| {
        let route: &Route = r.route;
        &route.steps
    });
    // The route's rate limit, then its faults, before anything is forwarded (a delay's timer
    // boxed: rare).
    let routed = match routed {
        Ok(r) => match r.route.rate_limit.as_deref() {
            Some(limit) => limit
                .admit(req.headers(), completion.as_ref().map(|c| &c.active))
                .map(|()| r)
                .map_err(ProxyError::RateLimited),
            None => Ok(r),
        },
        failed => failed,
    };
    let routed = match routed {
        Ok(r) => match r.route.fault.as_deref() {
            Some(fault) => {
                let drawn = fault.draw(req.headers(), &services.metrics);
                if let Some(delay) = drawn.delay {
                    Box::pin(tokio::time::sleep(delay)).await;
                }
                drawn.abort.map_or(Ok(r), Err)
            }
            None => Ok(r),
        },
        failed => failed,
    };
    // A failure comes with whether the request is gRPC (its error response is then gRPC's),
    // found only when there is a failure.
    let result = match routed {
        Err(e) => Err((e, is_grpc(req.headers()))),
        // Rare paths are boxed: inline, their states would grow every request's future.
        Ok(Routed {
            route,
            target,
            dispatch: Dispatch::Tunnel,
            ..
        }) => {
            let grpc = is_grpc(req.headers());
            let idle = route.timeouts.idle;
            let tunnel = tunnel(target, idle, req, &mut completion).instrument(span);
            Box::pin(tunnel).await.map_err(|e| (e, grpc))
        }
        Ok(
            routed @ Routed {
                dispatch: Dispatch::Upgrade,
                ..
            },
        ) => {
            let grpc = is_grpc(req.headers());
            let upgrade = upgrade(routed, req, &mut completion).instrument(span);
            Box::pin(upgrade).await.map_err(|e| (e, grpc))
        }
        Ok(routed) => {
            // Pinned where it is built and instrumented through the pin: the request's future
            // is never moved into the wrapper.
            // The head split and built here, not in `forward`, which uses it in place.
            let (parts, body) = req.into_parts();
            let key = hash_key(&routed.target.cluster, &parts.headers, &completion);
            let out = Outbound::new(parts, routed.authority);
            let forward = std::pin::pin!(forward(routed, out, body, key, &mut completion));
            forward.instrument(span).await
        }
    };
    match result {
        Ok(response) => response,
        Err((err, grpc)) => {
            let mut response = err.to_response(grpc);
            if let Some(steps) = steps {
                steps.response_rules(
                    response.headers_mut(),
                    completion.as_ref().map(|c| &c.active),
                );
            }
            services.metrics.error(err.kind());
            if let ProxyError::ClientBody(ClientBodyError::Timeout(_)) = err {
                services.metrics.timeout("request_body");
            }
            if let Some(mut c) = completion {
                c.status = response.status();
                c.error = Some(err.kind());
                if let Some(log) = &mut c.log {
                    log.response_headers(response.headers());
                    log.bytes_sent = response.body().size_hint().exact().unwrap_or(0);
                }
                c.finish(None);
            }
            response
        }
    }
}

/// How a routed request goes on.
#[derive(Debug, Clone, Copy)]
enum Dispatch {
    Forward,
    Upgrade,
    Tunnel,
}

/// A request's route and target, how it goes on, and where it carries its authority.
struct Routed<'r> {
    route: &'r Route,
    target: &'r Target,
    dispatch: Dispatch,
    authority: AuthorityIn,
}

/// Where a request goes: forwarded, or answered by the proxy.
enum Routing<'r> {
    Forward(Routed<'r>),
    Direct(&'r DirectResponse),
}

/// At a sidecar's ingress: `x-forwarded-client-cert` names the caller's verified identity (as
/// Envoy's does: `By=<this proxy>;URI=<caller>`), and only then — a client cannot set it.
fn client_cert_header(services: &Services, req: &mut Request<Incoming>, caller: Option<&Arc<str>>) {
    const XFCC: header::HeaderName = header::HeaderName::from_static("x-forwarded-client-cert");
    // And its `_` spelling, which CGI-style servers read as the same header.
    const XFCC_LOOKALIKE: header::HeaderName =
        header::HeaderName::from_static("x_forwarded_client_cert");
    req.headers_mut().remove(XFCC);
    req.headers_mut().remove(XFCC_LOOKALIKE);
    let Some(caller) = caller else { return };
    let by = services.store.credentials().spiffe_id().unwrap_or_default();
    if let Ok(v) = HeaderValue::from_str(&format!("By={by};URI={caller}")) {
        req.headers_mut().insert(XFCC, v);
    }
}

/// Finds the request's route and target; records them on the completion.
/// A passthrough route (made per destination, not the snapshot's) is held in `passthrough`.
fn route_request<'r>(
    runtime: &'r Runtime,
    slot: &Slot,
    req: &Request<Incoming>,
    completion: &mut Option<Completion>,
    passthrough: &'r mut Option<Arc<Route>>,
) -> Result<Routing<'r>, ProxyError> {
    if !completion
        .as_ref()
        .is_some_and(|c| c.services.store.is_ready())
    {
        return Err(ProxyError::NotReady);
    }
    let Some(listener) = runtime.listener(slot) else {
        return Err(ProxyError::NoRoute);
    };
    if listener.authorized.is_some() {
        let c = completion.as_ref();
        let identity = c.and_then(|c| c.active.identity()).map(|i| &**i);
        if !listener.admits(identity) {
            if let Some(c) = c {
                c.services.metrics.unauthorized(&listener.name, identity);
            }
            return Err(ProxyError::Unauthorized);
        }
    }
    let ListenerKind::Http(table) = &listener.kind else {
        return Err(ProxyError::NoRoute);
    };
    let (authority, authority_in) = request_authority(req)?;
    let original = completion.as_ref().and_then(|c| c.active.original_dst());
    let host = match original {
        None => table.host(authority),
        Some(original) => table.host_captured(authority, original),
    };
    let route = match host {
        Some(host) => {
            let input = MatchInput {
                method: req.method(),
                path: req.uri().path(),
                query: req.uri().query(),
                headers: req.headers(),
                // A captured request naming no port was sent to the original one.
                port: authority_port(authority).or(original.map(|o| o.port())),
                scheme: req.uri().scheme(),
            };
            host.route(&input).ok_or(ProxyError::NoRoute)?
        }
        None => match &listener.unmatched {
            Unmatched::NotFound => return Err(ProxyError::NoRoute),
            Unmatched::Deny => return Err(ProxyError::EgressDenied),
            // A captured connection goes where the client connected, whatever it names.
            Unmatched::Passthrough(p) => match original {
                None => &**passthrough.insert(p.route(authority)?),
                Some(original) => &**passthrough.insert(p.route(&original.to_string())?),
            },
        },
    };
    if let Some(direct) = &route.direct {
        if let Some(c) = completion.as_mut() {
            c.metrics = Some(direct.metrics.clone());
            if let Some(log) = &mut c.log {
                log.route = Some(route.name.clone());
            }
        }
        return Ok(Routing::Direct(direct));
    }
    let target = route.targets.pick().ok_or(ProxyError::NoRoute)?;
    if let Some(c) = completion.as_mut() {
        c.metrics = Some(target.metrics.clone());
        if let Some(log) = &mut c.log {
            log.route = Some(route.name.clone());
            log.cluster = Some(target.cluster.name.clone());
        }
    }
    let dispatch = if req.method() == Method::CONNECT {
        // HTTP/2's extended CONNECT (RFC 8441) names the protocol the stream carries.
        match req.extensions().get::<hyper::ext::Protocol>() {
            None => Dispatch::Tunnel,
            Some(p) if p.as_str().eq_ignore_ascii_case("websocket") => Dispatch::Upgrade,
            Some(_) => {
                return Err(ProxyError::BadRequest(
                    "extended CONNECT for another protocol than websocket",
                ));
            }
        }
    } else if is_websocket_upgrade(req) {
        Dispatch::Upgrade
    } else {
        Dispatch::Forward
    };
    Ok(Routing::Forward(Routed {
        route,
        target,
        dispatch,
        authority: authority_in,
    }))
}

/// The response to a request whose route the proxy answers itself; records the request.
fn direct_response(
    services: &Services,
    direct: &DirectResponse,
    completion: Option<Completion>,
) -> Response<ResponseBody> {
    let text = |status: StatusCode, body: bytes::Bytes| {
        let mut response = Response::new(ResponseBody::full(body));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    let response = match &direct.kind {
        DirectKind::Static { status, body } => text(*status, body.clone()),
        DirectKind::Readiness { body } if services.serving() => text(StatusCode::OK, body.clone()),
        DirectKind::Readiness { .. } => ProxyError::NotReady.to_response(false),
        DirectKind::GrpcHealth => grpc_health(services.serving()),
    };
    if let Some(mut c) = completion {
        c.status = response.status();
        if let Some(log) = &mut c.log {
            log.response_headers(response.headers());
            log.bytes_sent = response.body().size_hint().exact().unwrap_or(0);
        }
        c.finish(None);
    }
    response
}

/// A grpc.health.v1.Health/Check response: one length-prefixed HealthCheckResponse message
/// (field 1, `status`: SERVING = 1, NOT_SERVING = 2), then the trailer `grpc-status: 0`.
fn grpc_health(serving: bool) -> Response<ResponseBody> {
    let status = if serving { 1 } else { 2 };
    let message = bytes::Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let mut response = Response::new(ResponseBody::with_trailers(message, trailers));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// The authority a request is routed by and forwarded with: the request-target's (absolute form,
/// authority form, HTTP/2 `:authority`), else its one `Host` header (RFC 9112 §3.2.2). Refuses
/// what is ambiguous or missing: two `Host` headers, an HTTP/2 `host` that differs from
/// `:authority` (RFC 9113 §8.3.1), HTTP/1.1 without `Host`, CONNECT without an authority, and
/// HTTP/2 field values with leading or trailing whitespace (§8.2.1), which hyper lets through.
/// One lookup for `Host`; HTTP/2 requests take one more pass over their fields.
fn request_authority(req: &Request<Incoming>) -> Result<(&str, AuthorityIn), ProxyError> {
    let headers = req.headers();
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    let version = req.version();
    if version == Version::HTTP_2 && headers.values().any(padded) {
        return Err(ProxyError::BadRequest(
            "field value with leading or trailing whitespace",
        ));
    }
    match req.uri().authority() {
        Some(authority) => {
            let authority = authority.as_str();
            if version == Version::HTTP_2
                && host.is_some_and(|h| !h.as_bytes().eq_ignore_ascii_case(authority.as_bytes()))
            {
                return Err(ProxyError::BadRequest("host differs from :authority"));
            }
            Ok((authority, AuthorityIn::Target))
        }
        None if req.method() == Method::CONNECT => {
            Err(ProxyError::BadRequest("CONNECT without an authority"))
        }
        None => match host {
            Some(h) => h
                .to_str()
                .map(|h| (h, AuthorityIn::Host))
                .map_err(|_| ProxyError::BadRequest("invalid Host header")),
            None if version == Version::HTTP_11 => {
                Err(ProxyError::BadRequest("HTTP/1.1 request without Host"))
            }
            None => Ok(("", AuthorityIn::Missing)),
        },
    }
}

fn padded(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    matches!(b.first(), Some(b' ' | b'\t')) || matches!(b.last(), Some(b' ' | b'\t'))
}

/// An HTTP/1.1 upgrade to WebSocket, the only protocol the proxy switches to: other upgrades
/// (`h2c`, unknown ones) go on as plain requests without their `Upgrade`.
fn is_websocket_upgrade(req: &Request<Incoming>) -> bool {
    // hyper marks an HTTP/1.1 request with an `Upgrade` header with its upgrade handle: most
    // requests have none, and need no header lookup.
    req.version() == Version::HTTP_11
        && crate::downstream::wants_upgrade(req)
        && req.headers().get(header::UPGRADE).is_some_and(is_websocket)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn is_websocket(v: &HeaderValue) -> bool {
    v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket")
}

struct Exchange {
    response: Response<UpstreamIncoming>,
    in_flight: InFlight,
    endpoint: Arc<EndpointState>,
}

/// Fails with whether the request is gRPC. Not an `async fn`: one keeps room for its arguments
/// beside the locals they are moved into for its whole life (rust-lang/rust#62958); the block
/// below uses the request head in place.
#[allow(clippy::manual_async_fn)]
fn forward<'a>(
    routed: Routed<'a>,
    mut out: Outbound,
    body: Incoming,
    key: Option<u64>,
    completion: &'a mut Option<Completion>,
) -> impl Future<Output = Result<Response<ResponseBody>, (ProxyError, bool)>> + Send + 'a {
    async move {
        let Routed { route, target, .. } = routed;
        let cluster = &target.cluster;
        route
            .steps
            .on_request(&mut out, completion.as_ref().map(|c| &c.active));
        let metrics = completion.as_ref().map(|c| c.services.metrics.clone());
        // Whether the request is gRPC is found when it is needed: for a request body's idle timeout;
        // before the attempts for an HTTP/2 upstream (its last attempt takes the request head);
        // else only if the attempts fail.
        let mut grpc = None;
        // Until the response head arrives, a request body may pause for the route's idle timeout,
        // else the connection's; a gRPC one (a client stream may be quiet for minutes) only for the
        // route's. Its failures are recorded for the attempts to tell them from the upstream's.
        let tracking = match completion.as_mut() {
            Some(c) if !body.is_end_stream() => {
                let is_grpc = *grpc.insert(is_grpc(&out.parts().headers));
                let state = Arc::<BodyState>::default();
                if c.log.is_some() {
                    c.body = Some(state.clone());
                }
                Some(BodyTracking {
                    idle: route
                        .timeouts
                        .idle
                        .or_else(|| (!is_grpc).then(|| c.services.idle_timeout)),
                    open: c.active.body_open(),
                    state,
                })
            }
            _ => None,
        };
        if grpc.is_none() && cluster.protocol != Protocol::Http1 {
            grpc = Some(is_grpc(&out.parts().headers));
        }
        // A copy for the route's mirror, drawn here: with its rewrites and header rules.
        let tee = match (route.mirror.as_deref(), &metrics) {
            (Some(mirror), Some(m)) => mirror.start(&out, !body.is_end_stream(), m),
            _ => None,
        };
        let body = RequestBody {
            body,
            tracking,
            tee,
        };

        // One deadline for the whole request, retries and backoff included.
        let deadline = route.timeouts.per_request.map(|d| (Instant::now() + d, d));
        let exchange = match route.retry.as_deref().filter(|p| p.max_retries > 0) {
            None => attempt_once(cluster, &mut out, body, key, completion, deadline).await,
            // Boxed: rare, and its state would grow every request's future.
            Some(policy) if policy.hedge && body.is_end_stream() && idempotent(&out) => {
                Box::pin(hedging(cluster, policy, &out, key, completion, deadline)).await
            }
            Some(policy) => {
                retrying(cluster, policy, &mut out, body, key, completion, deadline).await
            }
        };
        if let (Err(ProxyError::RequestTimeout(_)), Some(m)) = (&exchange, &metrics) {
            m.timeout("request");
        }
        let exchange =
            exchange.map_err(|e| (e, grpc.unwrap_or_else(|| is_grpc(&out.parts().headers))))?;

        let Exchange {
            response,
            in_flight,
            endpoint,
        } = exchange;
        let (mut parts, body) = response.into_parts();
        route
            .steps
            .on_response(&mut parts, completion.as_ref().map(|c| &c.active));
        let Some(mut done) = completion.take() else {
            return Err((ProxyError::NotReady, false));
        };
        done.status = parts.status;
        if let Some(log) = &mut done.log {
            log.endpoint = Some(endpoint.addr.clone());
            log.response_headers(&parts.headers);
        }
        let done = ExchangeEnd {
            in_flight,
            completion: done,
        };
        let body = UpstreamBody::new(body, route.timeouts.idle, done);
        Ok(Response::from_parts(parts, ResponseBody::Upstream(body)))
    }
}

/// The request's key hash on a RING_HASH or MAGLEV cluster (by the client's request as it
/// arrived): none on other clusters, or when the request lacks the key.
fn hash_key(
    cluster: &Cluster,
    headers: &HeaderMap,
    completion: &Option<Completion>,
) -> Option<u64> {
    let hashing = cluster.hashing.as_deref()?;
    let peer = completion.as_ref().and_then(|c| c.active.addresses().0);
    hashing.key.hash(headers, peer)
}

/// The client's request body, and for one that has a body, what tracks it.
struct RequestBody {
    body: Incoming,
    tracking: Option<BodyTracking<BodyOpen>>,
    /// Where a mirror's copy takes the body as it is read.
    tee: Option<Box<TeeSink>>,
}

impl RequestBody {
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    /// What the body will record of its failure (none for a request without a body).
    fn state(&self) -> Option<Arc<BodyState>> {
        self.tracking.as_ref().map(|t| t.state.clone())
    }

    fn boxed(self) -> OutboundBody {
        let body = ClientBody::new(self.body, self.tracking);
        match self.tee {
            None => body.boxed(),
            Some(sink) => Tee::new(body, sink).boxed(),
        }
    }
}

/// An attempt that failed because the client's body did: the client's error, not the cluster's.
fn client_fault(state: Option<&BodyState>) -> Option<ProxyError> {
    state?.failure().map(ProxyError::ClientBody)
}

/// Sends the request once (no retry policy), within `deadline` (instant, configured timeout).
async fn attempt_once(
    cluster: &Cluster,
    out: &mut Outbound,
    body: RequestBody,
    key: Option<u64>,
    completion: &mut Option<Completion>,
    deadline: Option<(Instant, std::time::Duration)>,
) -> Result<Exchange, ProxyError> {
    let timed_out = |limit| ProxyError::RequestTimeout(limit);
    // No retries: the request goes out as it is, once.
    let state = body.state();
    let endpoint = cluster
        .pick(&[], key)
        .ok_or_else(|| ProxyError::NoHealthyEndpoint(cluster.name.clone()))?;
    let in_flight = cluster.begin_request(&endpoint)?;
    let body = (!body.is_end_stream()).then(|| body.boxed());
    let started = cluster.times_responses().then(Instant::now);
    let sent = within(
        deadline.map(|(at, _)| at),
        endpoint.send(cluster, out, body, true),
    )
    .await;
    if let (Some(t), Some(Ok(_))) = (started, &sent) {
        endpoint.observe_latency(t);
    }
    let Some(sent) = sent else {
        return Err(timed_out(
            deadline.map_or_else(Default::default, |(_, l)| l),
        ));
    };
    match sent {
        Ok(response) => {
            cluster.observe(&endpoint, response.status().is_server_error());
            if let Some(state) = &state {
                state.responded();
            }
            Ok(Exchange {
                response,
                in_flight,
                endpoint,
            })
        }
        Err(e) => {
            if let Some(fault) = client_fault(state.as_deref()) {
                tracing::debug!(cluster = %cluster.name, error = %e.source, "request body failed");
                return Err(fault);
            }
            note_failure(cluster, completion, e.failure);
            // A pool overflow is the proxy's own answer, not the endpoint's.
            if e.failure != UpstreamFailure::Overflow {
                cluster.observe(&endpoint, true);
            }
            tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.addr, error = %e.source, "upstream request failed");
            Err(attempt_error(cluster, &endpoint, e.failure))
        }
    }
}

/// Sends the request, retrying as the policy allows, within `deadline` (instant, configured
/// timeout). Each await arms one timer: the earlier of the per-try limit and the deadline.
/// (Two functions, not one: the request future's size is the larger of the two, not their sum.)
async fn retrying(
    cluster: &Cluster,
    policy: &RetryPolicy,
    out: &mut Outbound,
    body: RequestBody,
    key: Option<u64>,
    completion: &mut Option<Completion>,
    deadline: Option<(Instant, std::time::Duration)>,
) -> Result<Exchange, ProxyError> {
    let timed_out = |limit| ProxyError::RequestTimeout(limit);
    policy.deposit();
    let state = body.state();
    let replay = (!body.is_end_stream()).then(|| Replay::new(body.boxed(), policy.buffer_limit));
    let mut tried: Vec<Arc<EndpointState>> = Vec::new();
    let mut retries = 0u32;
    loop {
        let endpoint = cluster
            .pick(&tried, key)
            .ok_or_else(|| ProxyError::NoHealthyEndpoint(cluster.name.clone()))?;
        let in_flight = cluster.begin_request(&endpoint)?;
        let body = replay.as_ref().map(|r| r.attempt().boxed());
        let per_try = policy.per_try_timeout.map(|d| Instant::now() + d);
        let limit_at = match (per_try, deadline) {
            (Some(a), Some((b, _))) => Some(a.min(b)),
            (a, b) => a.or(b.map(|(at, _)| at)),
        };
        // The head is borrowed: a retry sends the same one; the last attempt may take it.
        let last = retries >= policy.max_retries;
        let started = cluster.times_responses().then(Instant::now);
        let sent = within(limit_at, endpoint.send(cluster, out, body, last)).await;
        // A response's latency, or an attempt that ran out of time (it took at least that).
        if let (Some(t), Some(Ok(_)) | None) = (started, &sent) {
            endpoint.observe_latency(t);
        }
        let sent = match sent {
            Some(sent) => sent,
            None => match deadline {
                Some((d, limit)) if Instant::now() >= d => return Err(timed_out(limit)),
                _ => Err(AttemptError::new(
                    UpstreamFailure::PerTryTimeout,
                    "no response within the per-try timeout",
                )),
            },
        };
        let may_retry =
            retries < policy.max_retries && replay.as_ref().is_none_or(Replay::can_replay);
        match sent {
            Ok(response) => {
                cluster.observe(&endpoint, response.status().is_server_error());
                let retry = may_retry
                    && policy.retry_response(response.status(), response.headers())
                    && policy.withdraw();
                if !retry {
                    if let Some(c) = completion.as_mut() {
                        c.retries = retries;
                    }
                    if let Some(state) = &state {
                        state.responded();
                    }
                    return Ok(Exchange {
                        response,
                        in_flight,
                        endpoint,
                    });
                }
                tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.addr, status = %response.status(), "retrying response");
            }
            Err(e) => {
                if let Some(fault) = client_fault(state.as_deref()) {
                    tracing::debug!(cluster = %cluster.name, error = %e.source, "request body failed");
                    return Err(fault);
                }
                note_failure(cluster, completion, e.failure);
                if e.failure != UpstreamFailure::Overflow {
                    cluster.observe(&endpoint, true);
                }
                let retry = may_retry && policy.retry_failure(&e.failure) && policy.withdraw();
                if e.failure == UpstreamFailure::Overflow {
                    return Err(attempt_error(cluster, &endpoint, e.failure));
                }
                tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.addr, error = %e.source, retry, "upstream attempt failed");
                if !retry {
                    if let Some(c) = completion.as_mut() {
                        c.retries = retries;
                    }
                    return Err(attempt_error(cluster, &endpoint, e.failure));
                }
            }
        }
        retries += 1;
        cluster.metrics.retries.inc();
        tried.push(endpoint);
        let wake = Instant::now() + policy.backoff(retries);
        match deadline {
            Some((d, limit)) if wake >= d => {
                tokio::time::sleep_until(d).await;
                return Err(timed_out(limit));
            }
            _ => tokio::time::sleep_until(wake).await,
        }
    }
}

/// RFC 9110 §9.2.2's idempotent methods: what hedging may send twice.
fn idempotent(out: &Outbound) -> bool {
    matches!(
        out.parts().method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// An attempt of a hedged request: where it went, its in-flight count, when it started, what
/// it got.
type Hedged = (Arc<EndpointState>, InFlight, Instant, crate::upstream::Sent);

/// Hedging (a retry policy's `hedge`, for an idempotent request without a body): an attempt
/// that reaches the per-try timeout is not cancelled; the next one starts beside it, on another
/// endpoint, and the first usable response wins (the attempts still in flight are dropped,
/// which cancels them). A failure or a retriable response is retried after the backoff as by
/// `retrying`, the other attempts kept; a retriable response is the answer only when no attempt
/// is left to wait for. Each attempt sends a copy of `out`. Within `deadline` as `retrying`.
async fn hedging(
    cluster: &Cluster,
    policy: &RetryPolicy,
    out: &Outbound,
    key: Option<u64>,
    completion: &mut Option<Completion>,
    deadline: Option<(Instant, std::time::Duration)>,
) -> Result<Exchange, ProxyError> {
    use futures_util::stream::{FuturesUnordered, StreamExt as _};
    policy.deposit();
    let per_try = policy.per_try_timeout.unwrap_or(std::time::Duration::MAX);
    let mut tried: Vec<Arc<EndpointState>> = Vec::new();
    let mut attempts = FuturesUnordered::new();
    let mut retries = 0u32;
    // When the next attempt starts: now, then at the per-try timeout or after a backoff.
    let mut next_at = Some(Instant::now());
    // A retriable response or a failure, kept in case nothing better comes.
    let mut fallback: Option<Result<Exchange, ProxyError>> = None;
    // The latest attempt's per-try limit: once no other may start, the attempts in flight get
    // until then (without a request timeout, nothing else would end the wait).
    let mut last_limit = Instant::now() + per_try;
    loop {
        let now = Instant::now();
        if let Some((d, limit)) = deadline
            && now >= d
        {
            return Err(ProxyError::RequestTimeout(limit));
        }
        if next_at.is_none() && now >= last_limit {
            if let Some(c) = completion.as_mut() {
                c.retries = retries;
            }
            return fallback.unwrap_or_else(|| {
                note_failure(cluster, completion, UpstreamFailure::PerTryTimeout);
                Err(ProxyError::Upstream {
                    endpoint: tried
                        .last()
                        .map_or_else(|| cluster.name.clone(), |e| e.addr.clone()),
                    failure: UpstreamFailure::PerTryTimeout,
                })
            });
        }
        if next_at.is_some_and(|at| at <= now) {
            next_at = None;
            let first = tried.is_empty();
            if first || (retries < policy.max_retries && policy.withdraw()) {
                if !first {
                    retries += 1;
                    cluster.metrics.retries.inc();
                }
                // A new attempt that cannot start leaves those in flight running.
                let started = cluster
                    .pick(&tried, key)
                    .ok_or_else(|| ProxyError::NoHealthyEndpoint(cluster.name.clone()))
                    .and_then(|e| cluster.begin_request(&e).map(|f| (e, f)));
                let (endpoint, in_flight) = match started {
                    Ok(started) => started,
                    Err(e) if attempts.is_empty() => return fallback.unwrap_or(Err(e)),
                    Err(e) => {
                        fallback.get_or_insert(Err(e));
                        continue;
                    }
                };
                last_limit = Instant::now() + per_try;
                tried.push(endpoint.clone());
                let copy = out.duplicate();
                attempts.push(Box::pin(async move {
                    let mut copy = copy;
                    let started = Instant::now();
                    let sent = endpoint.send(cluster, &mut copy, None, true).await;
                    (endpoint, in_flight, started, sent)
                }));
                if retries < policy.max_retries {
                    next_at = Some(Instant::now() + per_try);
                }
            }
        }
        if attempts.is_empty() && next_at.is_none() {
            if let Some(c) = completion.as_mut() {
                c.retries = retries;
            }
            return fallback
                .unwrap_or_else(|| Err(ProxyError::NoHealthyEndpoint(cluster.name.clone())));
        }
        // The next start, else the latest attempt's limit; the request's deadline if sooner.
        let at = next_at.unwrap_or(last_limit);
        let at = deadline.map_or(at, |(d, _)| at.min(d));
        let done: Option<Hedged> = tokio::select! {
            done = attempts.next(), if !attempts.is_empty() => done,
            () = tokio::time::sleep_until(at) => None,
        };
        let Some((endpoint, in_flight, started, sent)) = done else {
            continue;
        };
        let may_retry = retries < policy.max_retries;
        match sent {
            Ok(response) => {
                if cluster.times_responses() {
                    endpoint.observe_latency(started);
                }
                cluster.observe(&endpoint, response.status().is_server_error());
                let retriable = policy.retry_response(response.status(), response.headers());
                let exchange = Exchange {
                    response,
                    in_flight,
                    endpoint,
                };
                if !retriable {
                    if let Some(c) = completion.as_mut() {
                        c.retries = retries;
                    }
                    return Ok(exchange);
                }
                tracing::debug!(cluster = %cluster.name, status = %exchange.response.status(), "hedged attempt answered a retriable status");
                fallback = Some(Ok(exchange));
            }
            Err(e) => {
                note_failure(cluster, completion, e.failure);
                if e.failure == UpstreamFailure::Overflow {
                    // The proxy's own limit: no retry, but those in flight may still answer.
                    fallback = Some(Err(attempt_error(cluster, &endpoint, e.failure)));
                    next_at = None;
                    continue;
                }
                cluster.observe(&endpoint, true);
                tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.addr, error = %e.source, "hedged attempt failed");
                let retry = may_retry && policy.retry_failure(&e.failure);
                fallback = Some(Err(attempt_error(cluster, &endpoint, e.failure)));
                if !retry {
                    continue;
                }
            }
        }
        // A retry after the backoff, unless one is due sooner.
        if may_retry {
            let after = Instant::now() + policy.backoff(retries + 1);
            next_at = Some(next_at.map_or(after, |at| at.min(after)));
        }
    }
}

/// Runs `f` until `at`; `None` when the time ran out first. One timer, and none without a limit.
/// A plain struct, not an `async fn`: the future it wraps is stored once, not both as an
/// argument and inside the timeout (the request future is moved whole on every spawn).
fn within<F: std::future::Future>(at: Option<Instant>, f: F) -> Within<F> {
    match at {
        None => Within::Plain { f },
        Some(at) => Within::Timed {
            f: tokio::time::timeout_at(at, f),
        },
    }
}

pin_project_lite::pin_project! {
    #[project = WithinProj]
    enum Within<F> {
        Plain { #[pin] f: F },
        Timed { #[pin] f: tokio::time::Timeout<F> },
    }
}

impl<F: std::future::Future> std::future::Future for Within<F> {
    type Output = Option<F::Output>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.project() {
            WithinProj::Plain { f } => f.poll(cx).map(Some),
            WithinProj::Timed { f } => f.poll(cx).map(Result::ok),
        }
    }
}

/// The error a failed attempt ends the request with.
fn attempt_error(
    cluster: &Cluster,
    endpoint: &EndpointState,
    failure: UpstreamFailure,
) -> ProxyError {
    match failure {
        UpstreamFailure::Overflow => ProxyError::Overflow(cluster.name.clone()),
        failure => ProxyError::Upstream {
            endpoint: endpoint.addr.clone(),
            failure,
        },
    }
}

/// Counts a failed attempt in metrics.
fn note_failure(cluster: &Cluster, completion: &Option<Completion>, failure: UpstreamFailure) {
    match failure {
        UpstreamFailure::Overflow => cluster.metrics.overflows.inc(),
        UpstreamFailure::Connect | UpstreamFailure::ConnectTimeout | UpstreamFailure::Tls => {
            cluster.metrics.connect_errors.inc()
        }
        UpstreamFailure::PerTryTimeout => {
            if let Some(c) = completion {
                c.services.metrics.timeout("per_try");
            }
        }
        _ => {}
    }
}

/// A WebSocket: an HTTP/1.1 upgrade or an HTTP/2 extended CONNECT (RFC 8441) from the client,
/// sent as its cluster speaks — an HTTP/1.1 upgrade on a connection of its own, or an extended
/// CONNECT stream on the pooled HTTP/2 connection — the handshake translated between the two
/// (`websocket`); once the endpoint accepts (`101`, or `200` over HTTP/2), both sides are
/// spliced together.
async fn upgrade(
    routed: Routed<'_>,
    mut req: Request<Incoming>,
    completion: &mut Option<Completion>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let Routed {
        route,
        target,
        authority,
        ..
    } = routed;
    let cluster = &target.cluster;
    if cluster.protocol == Protocol::Tcp {
        return Err(ProxyError::Upstream {
            endpoint: cluster.name.clone(),
            failure: UpstreamFailure::Protocol,
        });
    }
    // Over HTTP/2 on either side: extended CONNECT.
    let h2_client = req.method() == Method::CONNECT;
    let h2_upstream = cluster.protocol == Protocol::Http2;
    let key = hash_key(cluster, req.headers(), completion);
    let endpoint = cluster
        .pick(&[], key)
        .ok_or_else(|| ProxyError::NoHealthyEndpoint(cluster.name.clone()))?;
    let downstream = crate::downstream::on_upgrade(&mut req);
    let (parts, body) = req.into_parts();
    // An HTTP/1.1 client's key, answered by the proxy when its endpoint speaks HTTP/2.
    let client_key = parts.headers.get(websocket::SEC_WEBSOCKET_KEY).cloned();
    let mut out = Outbound::new(parts, authority);
    // The upgrade's own hop-by-hop headers go on; the route's steps apply as to any request.
    let upgrade = out.headers_mut().remove(header::UPGRADE);
    route
        .steps
        .on_request(&mut out, completion.as_ref().map(|c| &c.active));
    let in_flight = endpoint.begin_request();
    let failed = |e: AttemptError, completion: &mut Option<Completion>| {
        note_failure(cluster, completion, e.failure);
        ProxyError::Upstream {
            endpoint: endpoint.addr.clone(),
            failure: e.failure,
        }
    };
    // The key the proxy sent, when it made an HTTP/1.1 handshake of an HTTP/2 one.
    let mut sent_key = None;
    let mut response = if h2_upstream {
        websocket::request_to_h2(out.headers_mut());
        out.set_method(Method::CONNECT);
        out.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        endpoint
            .send(cluster, &mut out, None, true)
            .await
            .map_err(|e| failed(e, completion))?
    } else {
        if h2_client {
            out.set_method(Method::GET);
            sent_key = Some(websocket::request_to_h1(out.headers_mut()));
        } else if let Some(up) = upgrade {
            let headers = out.headers_mut();
            headers.insert(header::UPGRADE, up);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let parts = out.into_http1_parts(&endpoint.addr);
        let upstream_req = Request::from_parts(parts, body.map_err(Into::into).boxed());
        endpoint
            .send_upgrade(cluster, upstream_req)
            .await
            .map_err(|e| failed(e, completion))?
            .map(UpstreamIncoming::Hyper)
    };
    // hyper opens an HTTP/2 stream's tunnel on exactly 200.
    let accepted = if h2_upstream {
        response.status() == StatusCode::OK
    } else {
        response.status() == StatusCode::SWITCHING_PROTOCOLS
    };
    if !accepted {
        let (mut parts, body) = response.into_parts();
        route
            .steps
            .on_response(&mut parts, completion.as_ref().map(|c| &c.active));
        let Some(mut done) = completion.take() else {
            return Err(ProxyError::NotReady);
        };
        done.status = parts.status;
        let done = ExchangeEnd {
            in_flight,
            completion: done,
        };
        let body = UpstreamBody::new(body, route.timeouts.idle, done);
        return Ok(Response::from_parts(parts, ResponseBody::Upstream(body)));
    }
    // A switch to another protocol than the one asked for, or an answer to another key than
    // the one the proxy sent, opens no tunnel.
    let switched = h2_upstream
        || (response
            .headers()
            .get(header::UPGRADE)
            .is_some_and(is_websocket)
            && sent_key.as_ref().is_none_or(|k| {
                response.headers().get(websocket::SEC_WEBSOCKET_ACCEPT)
                    == Some(&websocket::accept(k.as_bytes()))
            }));
    if !switched {
        return Err(ProxyError::Upstream {
            endpoint: endpoint.addr.clone(),
            failure: UpstreamFailure::Protocol,
        });
    }
    let upstream = hyper::upgrade::on(&mut response);
    let upstream = async move { upstream.await.map_err(crate::BoxError::from) };
    // The switch's own headers stay (the client needs them, in its version's terms); the
    // route's rules apply.
    match (h2_client, h2_upstream) {
        (false, true) => {
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            websocket::response_to_h1(response.headers_mut(), client_key.as_ref());
        }
        (true, false) => {
            *response.status_mut() = StatusCode::OK;
            websocket::response_to_h2(response.headers_mut());
        }
        _ => {}
    }
    route.steps.response_rules(
        response.headers_mut(),
        completion.as_ref().map(|c| &c.active),
    );
    let idle = route.timeouts.idle;
    let cluster_name = cluster.name.clone();
    let endpoint_addr = endpoint.addr.clone();
    let status = response.status();
    let done = completion.take();
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let mut counts = (0, 0);
        match tokio::try_join!(downstream, upstream) {
            Ok((down, up)) => {
                if let Some(done) = &done {
                    done.active.upgraded();
                }
                let result = crate::tcp::splice(down, TokioIo::new(up), idle, &mut counts).await;
                if let Err(e) = result {
                    tracing::debug!(cluster = %cluster_name, error = %e, "upgraded connection ended");
                }
            }
            Err(e) => tracing::debug!(cluster = %cluster_name, error = %e, "upgrade failed"),
        }
        if let Some(mut done) = done {
            done.status = status;
            done.tunnelled(endpoint_addr, counts);
            done.finish(None);
        }
    });
    let (parts, _) = response.into_parts();
    Ok(Response::from_parts(parts, ResponseBody::empty()))
}

/// CONNECT: a TCP connection to an endpoint of the route's cluster, spliced to the client after
/// `200 OK`; `idle` (the route's idle timeout) ends it after that long without a byte either way.
async fn tunnel(
    target: &Target,
    idle: Option<std::time::Duration>,
    mut req: Request<Incoming>,
    completion: &mut Option<Completion>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let cluster = target.cluster.clone();
    let client = crate::downstream::on_upgrade(&mut req);
    let key = hash_key(&cluster, req.headers(), completion);
    let connected = crate::tcp::connect_any(&cluster, key).await;
    let (endpoint, stream, permit) = connected.inspect_err(|e| {
        if let ProxyError::Upstream { failure, .. } = e {
            note_failure(&cluster, completion, *failure);
        }
    })?;
    let in_flight = endpoint.begin_request();
    let done = completion.take();
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let _permit = permit;
        let mut counts = (0, 0);
        match client.await {
            Ok(client) => {
                if let Some(done) = &done {
                    done.active.upgraded();
                }
                if let Err(e) = crate::tcp::splice(client, stream, idle, &mut counts).await {
                    tracing::debug!(cluster = %cluster.name, error = %e, "tunnel ended");
                }
            }
            Err(e) => {
                tracing::debug!(cluster = %cluster.name, error = %e, "CONNECT upgrade failed")
            }
        }
        if let Some(mut done) = done {
            done.tunnelled(endpoint.addr.clone(), counts);
            done.finish(None);
        }
    });
    Ok(Response::new(ResponseBody::empty()))
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;
    use crate::access_log::AccessLogTarget;

    fn services() -> Services {
        let metrics = ProxyMetrics::new(&prometheus::Registry::new()).unwrap();
        let (access_log, _writer) = AccessLog::new(&AccessLogTarget::Off, metrics.clone());
        Services::new(metrics, access_log, std::time::Duration::from_secs(60))
    }

    fn direct(kind: DirectKind) -> DirectResponse {
        let metrics = ProxyMetrics::new(&prometheus::Registry::new()).unwrap();
        DirectResponse {
            kind,
            metrics: Arc::new(metrics.requests("health", "")),
        }
    }

    /// Body bytes and trailers of a local response.
    async fn collect(r: Response<ResponseBody>) -> (StatusCode, Vec<u8>, Option<HeaderMap>) {
        let status = r.status();
        let collected = r.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (status, collected.to_bytes().to_vec(), trailers)
    }

    /// Health checks answered by the proxy report whether it serves: without a config, or once
    /// the drain has started, readiness is 503 and gRPC health NOT_SERVING (still gRPC status 0).
    #[tokio::test]
    async fn direct_health_answers_follow_readiness_and_the_drain() {
        let services = services();
        let readiness = direct(DirectKind::Readiness {
            body: bytes::Bytes::from_static(b"ok"),
        });
        let grpc = direct(DirectKind::GrpcHealth);
        let not_serving = [0, 0, 0, 0, 2, 0x08, 2];
        let serving = [0, 0, 0, 0, 2, 0x08, 1];

        let (status, _, _) = collect(direct_response(&services, &readiness, None)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "no config yet");
        let (status, body, trailers) = collect(direct_response(&services, &grpc, None)).await;
        assert_eq!(
            (status, body.as_slice()),
            (StatusCode::OK, &not_serving[..])
        );
        assert_eq!(trailers.unwrap().get("grpc-status").unwrap(), "0");

        let snapshot = crate::snapshot::parse_file(
            "version: v1\nlisteners:\n  - name: egress\n    role: EGRESS\n",
        )
        .unwrap();
        services.store.apply(&snapshot, |_| Ok(())).unwrap();
        let (status, body, _) = collect(direct_response(&services, &readiness, None)).await;
        assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"ok"[..]));
        let (_, body, _) = collect(direct_response(&services, &grpc, None)).await;
        assert_eq!(body, serving);

        services.draining.cancel();
        let (status, _, _) = collect(direct_response(&services, &readiness, None)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "draining");
        let (_, body, _) = collect(direct_response(&services, &grpc, None)).await;
        assert_eq!(body, not_serving);
    }
}
