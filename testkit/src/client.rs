//! Plain HTTP clients on one connection: HTTP/1.1 (requests may use absolute-form URIs, as an
//! `http_proxy` client does) or prior-knowledge HTTP/2.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::BoxError;

/// A WebSocket over HTTP/2 (RFC 8441): a prior-knowledge HTTP/2 connection to `addr`, an
/// extended CONNECT for `uri` (`http://authority/path`) with `headers`; the `200` response's
/// head, and the WebSocket on the stream.
pub async fn websocket_h2(
    addr: SocketAddr,
    uri: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        http::response::Parts,
        tokio_tungstenite::WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    ),
    BoxError,
> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = http2::handshake::<_, _, http_body_util::Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(conn);
    let mut req = Request::connect(uri)
        .version(http::Version::HTTP_2)
        .header("sec-websocket-version", "13");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut req = req.body(http_body_util::Empty::new())?;
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    sender.ready().await?;
    let mut resp = sender.send_request(req).await?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("extended CONNECT answered {}", resp.status()).into());
    }
    let upgraded = hyper::upgrade::on(&mut resp).await?;
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    Ok((resp.into_parts().0, ws))
}

/// A response read to the end.
#[derive(Debug)]
pub struct Reply {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: Option<http::HeaderMap>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Debug)]
enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// One client connection.
#[derive(Debug)]
pub struct Client {
    sender: Sender,
}

impl Client {
    pub async fn h1(addr: SocketAddr) -> Result<Self, BoxError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Self {
            sender: Sender::H1(sender),
        })
    }

    pub async fn h2(addr: SocketAddr) -> Result<Self, BoxError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Self {
            sender: Sender::H2(sender),
        })
    }

    /// Sends and reads the whole response.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Reply, BoxError> {
        let resp = self.send_streaming(req).await?;
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        })
    }

    /// Sends and returns the response with its body unread.
    pub async fn send_streaming(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<hyper::body::Incoming>, BoxError> {
        Ok(match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        })
    }

    /// GET `path` with `Host: host`.
    pub async fn get(&mut self, host: &str, path: &str) -> Result<Reply, BoxError> {
        self.send(get(host, path)).await
    }
}

/// A GET request for `host` and `path`, in the form the connection's version needs.
pub fn get(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", host)
        .body(Full::default())
        .unwrap()
}

/// A GET for HTTP/2 (authority in the URI).
pub fn get_h2(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{host}{path}"))
        .version(http::Version::HTTP_2)
        .body(Full::default())
        .unwrap()
}
