//! The admin server, on its own small runtime: `/metrics`, `/ready`, `/live`, `/config_dump`,
//! `/clusters`, `/logging`.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::Encoder as _;
use serde_json::json;
use tokio::net::TcpListener;

use crate::{app::App, health_check::Probe, proxy::ResponseBody, upstream::Health};

/// Serves admin requests on `listener` until the process exits.
pub async fn serve(app: Arc<App>, listener: TcpListener) {
    let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let app = app.clone();
        let server = server.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(&app, &req)) }
            });
            let _ = server.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::full(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<ResponseBody> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    reply(status, "application/json", body)
}

const TEXT: &str = "text/plain; charset=utf-8";

fn handle<B>(app: &App, req: &Request<B>) -> Response<ResponseBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => metrics(app),
        (&Method::GET, "/live") => reply(StatusCode::OK, TEXT, "live\n"),
        (&Method::GET, "/ready") => ready(app),
        (&Method::GET, "/config_dump") => config_dump(app),
        (&Method::GET, "/clusters") => clusters(app),
        (&Method::GET, "/logging") => {
            let current = app.log_filter.lock().clone();
            reply(StatusCode::OK, TEXT, format!("{current}\n"))
        }
        (&Method::POST | &Method::PUT, "/logging") => set_logging(app, req.uri().query()),
        (_, "/metrics" | "/live" | "/ready" | "/config_dump" | "/clusters" | "/logging") => {
            reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n")
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "admin: /metrics /ready /live /config_dump /clusters /logging\n",
        ),
    }
}

fn metrics(app: &App) -> Response<ResponseBody> {
    let mut out = Vec::new();
    match prometheus::TextEncoder::new().encode(&app.registry.gather(), &mut out) {
        Ok(()) => reply(StatusCode::OK, "text/plain; version=0.0.4", out),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, e.to_string()),
    }
}

fn ready(app: &App) -> Response<ResponseBody> {
    if app.services.store.is_ready() {
        reply(StatusCode::OK, TEXT, "ready\n")
    } else {
        reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "no snapshot yet\n")
    }
}

/// The snapshot in use, as the control plane sent it, and why the last one was rejected.
fn config_dump(app: &App) -> Response<ResponseBody> {
    let rt = app.services.store.load();
    let rejection = app.last_rejection.lock().clone();
    json(
        StatusCode::OK,
        &json!({
            "version": &*rt.version,
            "snapshot": serde_json::to_value(&*rt.source).unwrap_or_default(),
            "lastRejection": rejection,
            // The SPIFFE ID of the workload certificate in use (its TLS credentials).
            "identity": app.credentials.spiffe_id(),
        }),
    )
}

/// Every cluster's endpoints with their health, in-flight requests and pooled connections.
fn clusters(app: &App) -> Response<ResponseBody> {
    let rt = app.services.store.load();
    let clusters: Vec<_> = rt
        .clusters
        .iter()
        .map(|c| {
            let endpoints: Vec<_> = c
                .endpoints
                .iter()
                .map(|(e, health)| {
                    let mut ep = json!({
                        "address": &*e.addr,
                        "health": health.as_str(),
                        "inFlight": e.in_flight(),
                        "pooledConnections": e.pooled(),
                    });
                    if c.health_check.is_some() && *health == Health::Healthy {
                        ep["healthCheck"] = e.health.as_str().into();
                    }
                    if c.outlier.is_some() {
                        ep["ejected"] = e.outlier.is_ejected().into();
                        ep["timesEjected"] = e.outlier.times_ejected().into();
                    }
                    ep
                })
                .collect();
            let mut cluster = json!({
                "name": &*c.name,
                "protocol": format!("{:?}", c.protocol),
                "lbPolicy": format!("{:?}", c.lb),
                "endpoints": endpoints,
            });
            if let Some(o) = &c.outlier {
                cluster["outlierDetection"] = json!({
                    "maxServerErrors": o.max_server_errors,
                    "interval": format!("{:?}", o.interval),
                    "baseEjectionDuration": format!("{:?}", o.base_ejection),
                    "maxEjectionPercent": o.max_ejection_percent,
                    "ejected": c.endpoints.iter().filter(|(e, _)| e.outlier.is_ejected()).count(),
                });
            }
            if let Some(h) = &c.health_check {
                let (protocol, path) = match &h.probe {
                    Probe::Http { path } => ("http", Some(&**path)),
                    Probe::Http2 { path } => ("http2", Some(&**path)),
                    Probe::Grpc => ("grpc", None),
                    Probe::Tcp => ("tcp", None),
                };
                cluster["healthCheck"] = json!({
                    "protocol": protocol,
                    "path": path,
                    "port": h.port,
                    "interval": format!("{:?}", h.interval),
                    "timeout": format!("{:?}", h.timeout),
                    "healthyThreshold": h.healthy_threshold,
                    "unhealthyThreshold": h.unhealthy_threshold,
                    "unhealthy": c.endpoints.iter().filter(|(e, _)| e.health.is_unhealthy()).count(),
                });
            }
            if let Some(l) = &c.limits {
                cluster["connectionPool"] = json!({
                    "maxConnections": l.config.max_connections,
                    "maxPendingRequests": l.config.max_pending_requests,
                    "maxRequests": l.config.max_requests,
                    "openConnections": l.open_connections(),
                    "pendingRequests": l.pending(),
                    "activeRequests": l.requests(),
                });
            }
            cluster
        })
        .collect();
    json(
        StatusCode::OK,
        &json!({ "version": &*rt.version, "clusters": clusters }),
    )
}

/// `?level=FILTER` replaces the log filter.
fn set_logging(app: &App, query: Option<&str>) -> Response<ResponseBody> {
    let level = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "level")
            .map(|(_, v)| v.into_owned())
    });
    let Some(level) = level else {
        return reply(
            StatusCode::BAD_REQUEST,
            TEXT,
            "give ?level=FILTER (e.g. debug, trellis_proxy=debug,h2=info)\n",
        );
    };
    match (app.log_control)(&level) {
        Ok(()) => {
            app.log_filter.lock().clone_from(&level);
            tracing::info!(filter = %level, "log filter changed");
            reply(StatusCode::OK, TEXT, format!("{level}\n"))
        }
        Err(e) => reply(
            StatusCode::BAD_REQUEST,
            TEXT,
            format!("invalid filter: {e}\n"),
        ),
    }
}

/// `trellis-proxy ready [--admin-addr ADDR]` (default 127.0.0.1:9901): whether the proxy at that
/// admin address answers `GET /ready` with 200, within two seconds.
pub fn probe_ready(mut args: impl Iterator<Item = String>) -> Result<(), String> {
    use std::io::{Read as _, Write as _};
    let mut addr = String::from("127.0.0.1:9901");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--admin-addr" => addr = args.next().ok_or("--admin-addr needs an address")?,
            other => match other.strip_prefix("--admin-addr=") {
                Some(a) => addr = a.to_string(),
                None => return Err(format!("unknown argument {other:?}")),
            },
        }
    }
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an ip:port address"))?;
    let timeout = std::time::Duration::from_secs(2);
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)
        .map_err(|e| format!("{addr}: {e}"))?;
    match &head[9..12] {
        b"200" => Ok(()),
        status => Err(format!("not ready ({})", String::from_utf8_lossy(status))),
    }
}
