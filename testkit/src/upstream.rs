//! Upstream servers for tests, each on its own 127.0.0.1:0 socket.
//!
//! [`TestServer`] answers HTTP/1.1 and h2c with its name in the body and the `x-server` header.
//! Requests steer it: `x-status: CODE` sets the status, `x-delay-ms: N` waits first, path
//! `/echo` echoes the body, `/stream?chunks=N&gap_ms=M` sends N chunks M ms apart. The `Host`,
//! path and `x-forwarded-client-cert` it saw come back as `x-seen-host`, `x-seen-path` and
//! `x-seen-client-cert`; `x-echo-headers: a,b` brings back every value of each named request
//! header as `x-seen-a` (values joined with `, `; absent when the request had none), and
//! `x-respond-header: NAME=VALUE` adds that header to the response.
//! Every server counts the requests it received.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

#[derive(Debug)]
struct State {
    name: String,
    requests: AtomicUsize,
    connections: AtomicUsize,
    /// When non-zero, every request gets this status.
    fail_with: AtomicU16,
    /// Every request waits this long first.
    delay_ms: AtomicU64,
    /// Requests by path.
    paths: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

#[derive(Debug)]
pub struct TestServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

impl TestServer {
    pub async fn start(name: &str) -> Self {
        Self::start_at(name, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
    }

    /// A server on `addr` (another loopback address, a port shared with other servers).
    pub async fn start_at(name: &str, addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            name: name.into(),
            requests: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            fail_with: AtomicU16::new(0),
            delay_ms: AtomicU64::new(0),
            paths: Default::default(),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Waits (polling, 10 s at most) until the server has received at least `n` requests.
    pub async fn wait_requests(&self, n: usize) {
        crate::eventually(
            std::time::Duration::from_secs(10),
            "requests reached the server",
            || async {
                let got = self.requests();
                if got >= n {
                    Ok(())
                } else {
                    Err(format!("{} has {got} of {n}", self.name()))
                }
            },
        )
        .await;
    }

    /// Requests received for `path` (health check probes apart from traffic).
    pub fn requests_to(&self, path: &str) -> usize {
        let paths = self.state.paths.lock().unwrap();
        paths.get(path).copied().unwrap_or(0)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Make every request wait `ms` before the answer.
    pub fn delay(&self, ms: u64) {
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Answer every request with `status` (0: behave normally again).
    pub fn fail_with(&self, status: u16) {
        self.state.fail_with.store(status, Ordering::SeqCst);
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    *state
        .paths
        .lock()
        .unwrap()
        .entry(req.uri().path().to_owned())
        .or_default() += 1;
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(ms) = header("x-delay-ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut status = header("x-status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let forced = state.fail_with.load(Ordering::SeqCst);
    if forced != 0 {
        status = StatusCode::from_u16(forced).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let path = req.uri().path().to_owned();
    let seen_path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let host = header("host").or_else(|| req.uri().authority().map(|a| a.to_string()));
    let client_cert = header("x-forwarded-client-cert");
    let echoed: Vec<(String, String)> = header("x-echo-headers")
        .map(|names| {
            names
                .split(',')
                .map(str::trim)
                .filter_map(|n| {
                    let values: Vec<&str> = req
                        .headers()
                        .get_all(n)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect();
                    (!values.is_empty()).then(|| (format!("x-seen-{n}"), values.join(", ")))
                })
                .collect()
        })
        .unwrap_or_default();
    let respond_header = header("x-respond-header");
    let body = if path == "/echo" {
        match req.into_body().collect().await {
            Ok(b) => full(b.to_bytes()),
            Err(_) => full("body error"),
        }
    } else if path == "/stream" {
        let param = |k: &str| {
            query
                .split('&')
                .find_map(|p| p.strip_prefix(&format!("{k}=")))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (chunks, gap) = (param("chunks"), param("gap_ms"));
        let stream = futures_util::stream::unfold(0u64, move |i| async move {
            if i >= chunks {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(gap)).await;
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(format!("chunk{i}\n")))),
                i + 1,
            ))
        });
        BodyExt::boxed(StreamBody::new(stream))
    } else {
        full(state.name.clone())
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("x-server", state.name.parse().unwrap());
    if let Some(h) = host.and_then(|h| h.parse().ok()) {
        resp.headers_mut().insert("x-seen-host", h);
    }
    if let Ok(p) = seen_path.parse() {
        resp.headers_mut().insert("x-seen-path", p);
    }
    if let Some(c) = client_cert.and_then(|c| c.parse().ok()) {
        resp.headers_mut().insert("x-seen-client-cert", c);
    }
    for (name, value) in echoed {
        if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(name.as_bytes()), value.parse()) {
            resp.headers_mut().insert(n, v);
        }
    }
    if let Some((n, v)) = respond_header.as_deref().and_then(|h| h.split_once('='))
        && let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(n.as_bytes()), v.parse())
    {
        resp.headers_mut().append(n, v);
    }
    Ok(resp)
}

/// Echoes every WebSocket message back, prefixed with the server name.
#[derive(Debug)]
pub struct WsEchoServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for WsEchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Echoes each message of one WebSocket back, prefixed with `name`, until it closes.
async fn echo<S>(mut ws: tokio_tungstenite::WebSocketStream<S>, name: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio_tungstenite::tungstenite::Message;
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(t) => Message::text(format!("{name}:{t}")),
            Message::Binary(b) => Message::Binary(b),
            Message::Close(_) => break,
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}

impl WsEchoServer {
    /// Over HTTP/2 only (prior knowledge): WebSockets by extended CONNECT (RFC 8441), which its
    /// SETTINGS announce; the request's `sec-websocket-protocol` comes back on the `200`.
    pub async fn start_h2(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let name: Arc<str> = name.into();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                        let name = name.clone();
                        async move {
                            let websocket = req.method() == http::Method::CONNECT
                                && req
                                    .extensions()
                                    .get::<hyper::ext::Protocol>()
                                    .is_some_and(|p| p.as_str() == "websocket");
                            let mut resp = Response::new(full(Bytes::new()));
                            if !websocket {
                                *resp.status_mut() = StatusCode::BAD_REQUEST;
                                return Ok::<_, Infallible>(resp);
                            }
                            if let Some(p) = req.headers().get("sec-websocket-protocol").cloned() {
                                resp.headers_mut().insert("sec-websocket-protocol", p);
                            }
                            let upgrade = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let Ok(io) = upgrade.await else { return };
                                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                                    TokioIo::new(io),
                                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                                    None,
                                )
                                .await;
                                echo(ws, &name).await;
                            });
                            Ok(resp)
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .enable_connect_protocol()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, task }
    }

    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let name = name.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    echo(ws, &name).await;
                });
            }
        });
        Self { addr, task }
    }
}

/// Echoes raw TCP bytes, after a greeting line with the server name.
#[derive(Debug)]
pub struct TcpEchoServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpEchoServer {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let greeting = format!("{name}\n");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    if stream.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Self { addr, task }
    }
}
