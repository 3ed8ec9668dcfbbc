//! HTTP/1.1, h2c, gRPC, WebSocket, CONNECT and TCP pass through the proxy.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::Request;
use http_body_util::Full;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};
use trellis_testkit::{
    ProxyProcess, RawHttpServer, RawReply, TcpEchoServer, TestServer, WsEchoServer,
    client::{Client, get, get_h2},
    eventually,
    grpc::{self, EchoRequest, GrpcServer},
};

use crate::{BIN, cluster, host_to, inprocess::InProcessProxy, proxy_with};

#[tokio::test]
async fn http1_and_h2c_pass_through_both_ways() {
    let h1 = TestServer::start("h1-app").await;
    let h2 = TestServer::start("h2-app").await;
    let hosts = host_to("one.test:9080", "h1", "") + &host_to("two.test", "h2", "");
    let clusters = cluster("h1", "HTTP1", &[h1.addr]) + &cluster("h2", "HTTP2", &[h2.addr]);
    let proxy = proxy_with("v1", &hosts, &clusters, &[]).await;

    // HTTP/1.1 client, Host routing, HTTP/1.1 upstream; the Host header reaches the app.
    let mut c = Client::h1(proxy.egress).await.unwrap();
    let r = c.get("one.test:9080", "/hello").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "h1-app");
    assert_eq!(r.header("x-seen-host"), Some("one.test:9080"));
    // Keep-alive: the same client connection serves a second request, to an h2c upstream.
    let r = c.get("two.test", "/").await.unwrap();
    assert_eq!(r.text(), "h2-app");
    assert_eq!(r.header("x-seen-host"), Some("two.test"));

    // HTTP-proxy absolute form, as `http_proxy=http://127.0.0.1:15001` clients send it.
    let req = Request::get("http://one.test:9080/abs")
        .body(Full::default())
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.text(), "h1-app");

    // Prior-knowledge h2c client to both kinds of upstream.
    let mut c2 = Client::h2(proxy.egress).await.unwrap();
    for (host, want) in [("one.test:9080", "h1-app"), ("two.test", "h2-app")] {
        let r = c2.send(get_h2(host, "/")).await.unwrap();
        assert_eq!(r.status, 200, "{host}");
        assert_eq!(r.text(), want);
        assert_eq!(r.header("x-seen-host"), Some(host), "authority preserved");
    }

    // Request bodies go through intact.
    let body = Bytes::from(vec![b'x'; 300_000]);
    let req = Request::post("/echo")
        .header("host", "one.test:9080")
        .body(Full::new(body.clone()))
        .unwrap();
    assert_eq!(c.send(req).await.unwrap().body, body);

    // No virtual host for the authority: 404 with the error kind.
    let r = c.get("unknown.test", "/").await.unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-trellis-error"), Some("no_route"));
}

/// An egress that denies what it does not serve (a mesh's egressFilter DROP_ALL): 403
/// `egress_denied` for an undeclared authority, in gRPC's terms for a gRPC request; declared
/// hosts are served as ever.
#[tokio::test]
async fn an_egress_that_denies_unmatched_hosts_answers_403() {
    let app = TestServer::start("app").await;
    let hosts = host_to("svc.test", "app", "");
    let snapshot = crate::snapshot("v1", &hosts, &cluster("app", "HTTP1", &[app.addr])).replace(
        "    role: EGRESS\n",
        "    role: EGRESS\n    unmatched: DENY\n",
    );
    let proxy = InProcessProxy::start(&snapshot, std::time::Duration::from_secs(60)).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    assert_eq!(c.get("svc.test", "/").await.unwrap().text(), "app");
    let r = c.get("elsewhere.example", "/").await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-trellis-error"), Some("egress_denied"));
    let mut g = Client::h2(proxy.egress).await.unwrap();
    let req = Request::post("http://elsewhere.example/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .body(Full::default())
        .unwrap();
    let r = g.send(req).await.unwrap();
    assert_eq!(r.header("grpc-status"), Some("7"), "PERMISSION_DENIED");
}

/// A proxy whose `raw.test` host goes to an upstream answering with `replies`.
async fn scripted_upstream(replies: Vec<RawReply>) -> (RawHttpServer, InProcessProxy) {
    let raw = RawHttpServer::start(replies).await;
    let proxy = proxy_with(
        "v1",
        &host_to("raw.test", "raw", ""),
        &cluster("raw", "HTTP1", &[raw.addr]),
        &[],
    )
    .await;
    (raw, proxy)
}

/// The proxy's own HTTP/1.1 client against an upstream that answers with scripted bytes: every
/// response framing, interim responses, trailers, a pooled connection the upstream closed, a
/// malformed head, and request bodies of known and unknown length.
#[tokio::test]
async fn http1_upstream_framing_and_pooling() {
    let (raw, proxy) = scripted_upstream(vec![
        // Chunked, with a chunk extension and a trailer.
        RawReply::keep("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\n\r\n"),
        // An interim response first.
        RawReply::keep("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nanswer!"),
        // No length: the body runs until the upstream closes.
        RawReply::close("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"),
        // Keep-alive by its headers, but the upstream closes right after.
        RawReply::close("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        RawReply::keep("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"),
        RawReply::close("HTTP/1.1 abc\r\n\r\n"),
        RawReply::keep("HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"),
        RawReply::keep("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone"),
    ])
    .await;

    // h2c client, so the trailers can come back.
    let mut h2 = Client::h2(proxy.egress).await.unwrap();
    let r = h2.send(get_h2("raw.test", "/chunked")).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello world");
    let trailers = r.trailers.expect("trailers forwarded");
    assert_eq!(trailers.get("x-checksum").unwrap(), "abc");

    let mut c = Client::h1(proxy.egress).await.unwrap();
    let r = c.get("raw.test", "/interim").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "answer!"));
    let r = c.get("raw.test", "/until-close").await.unwrap();
    assert_eq!(r.text(), "until the end");
    assert_eq!(
        r.header("connection"),
        None,
        "hop-by-hop header not forwarded"
    );
    let r = c.get("raw.test", "/then-closed").await.unwrap();
    assert_eq!(r.text(), "ok");
    // The pooled connection is closed by now: this GET goes out on a new one, without error.
    let r = c.get("raw.test", "/fresh").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "fresh"));
    let r = c.get("raw.test", "/malformed").await.unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-trellis-error"), Some("upstream_protocol_error"));

    // A body of unknown length goes upstream chunked.
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: raw.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").await.unwrap();
    let mut reader = BufReader::new(s);
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 201"), "{status}");
    // A body of known length goes with its content-length.
    let req = Request::post("/known")
        .header("host", "raw.test")
        .body(Full::new(Bytes::from_static(b"abc")))
        .unwrap();
    assert_eq!(c.send(req).await.unwrap().text(), "done");

    let seen = raw.requests();
    assert_eq!(
        seen.len(),
        8,
        "every request reached the upstream once: {seen:?}"
    );
    assert!(
        seen[0].starts_with("GET /chunked HTTP/1.1\r\n"),
        "{}",
        seen[0]
    );
    assert!(seen[0].contains("host: raw.test\r\n"), "{}", seen[0]);
    let chunked = &seen[6];
    assert!(
        chunked.contains("transfer-encoding: chunked\r\n"),
        "{chunked}"
    );
    let body = &chunked[chunked.find("\r\n\r\n").unwrap() + 4..];
    let mut decoded = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 {
            assert_eq!(after, "\r\n");
            break;
        }
        decoded.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    assert_eq!(decoded, "hello world");
    assert!(seen[7].contains("content-length: 3\r\n"), "{}", seen[7]);
    assert!(seen[7].ends_with("\r\n\r\nabc"), "{}", seen[7]);
    // Connections: replies 1-3 on the first (closed after 3), 4 on the second, 5-6 on the third
    // (a malformed head closes it), 7-8 on the fourth.
    assert_eq!(raw.connections(), 4);
}

/// Responses without a body by their request or status (HEAD, 204, 304) end at their head, and
/// the connection serves the next request.
#[tokio::test]
async fn http1_upstream_bodiless_responses_keep_the_connection() {
    let (raw, proxy) = scripted_upstream(vec![
        RawReply::keep("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        RawReply::keep("HTTP/1.1 204 No Content\r\n\r\n"),
        RawReply::keep("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"),
        RawReply::keep("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ])
    .await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    let head = Request::head("/")
        .header("host", "raw.test")
        .body(Full::default())
        .unwrap();
    let r = c.send(head).await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.len()), (200, 0));
    assert_eq!(r.header("content-length"), Some("5"));
    for want in [204, 304] {
        let r = c.get("raw.test", "/").await.unwrap();
        assert_eq!((r.status.as_u16(), r.body.len()), (want, 0));
    }
    let r = c.get("raw.test", "/").await.unwrap();
    assert_eq!(r.text(), "ok");
    assert_eq!(raw.requests().len(), 4);
    assert!(raw.requests()[0].starts_with("HEAD / HTTP/1.1\r\n"));
    assert_eq!(
        raw.connections(),
        1,
        "one pooled connection served all four"
    );
}

#[tokio::test]
async fn ingress_forwards_to_the_local_app() {
    let app = TestServer::start("local-app").await;
    let snapshot = format!(
        "version: v1\nlisteners:\n  - name: ingress\n    role: INGRESS\n    virtualHosts:\n      - name: local\n        domains: ['*']\n        routes:\n          - name: app\n            action: {{ weightedTargets: [{{ cluster: local, weight: 1 }}] }}\nclusters:\n{}",
        cluster("local", "HTTP1", &[app.addr])
    );
    let proxy = InProcessProxy::start(&snapshot, std::time::Duration::from_secs(60)).await;
    let mut c = Client::h1(proxy.ingress).await.unwrap();
    let r = c.get("colorteller.default:9080", "/").await.unwrap();
    assert_eq!(r.text(), "local-app");
    // The egress socket has no listener in this snapshot: connections are closed.
    let mut raw = TcpStream::connect(proxy.egress).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = raw.read_to_end(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "egress without a listener answers nothing");
}

#[tokio::test]
async fn grpc_unary_and_bidi_streaming() {
    let server = GrpcServer::start("grpc-1").await;
    let hosts = host_to("echo.test:50051", "echo", "");
    let proxy = proxy_with("v1", &hosts, &cluster("echo", "GRPC", &[server.addr]), &[]).await;
    let mut client = grpc::client_via(proxy.egress, "echo.test:50051")
        .await
        .unwrap();

    let reply = client
        .unary(EchoRequest {
            message: "hi".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.message.as_str(), reply.server.as_str()),
        ("hi", "grpc-1")
    );

    // An application error travels back as grpc-status in the trailers.
    let status = client
        .unary(EchoRequest {
            message: "fail:9".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        trellis_testkit::tonic::Code::FailedPrecondition
    );

    // Bidi: each message is answered before the next is sent, so nothing may be buffered.
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut inbound = client.bidi(outbound).await.unwrap().into_inner();
    for i in 0..5 {
        tx.send(EchoRequest {
            message: format!("m{i}"),
        })
        .await
        .unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), inbound.next())
            .await
            .expect("bidi reply in time")
            .unwrap()
            .unwrap();
        assert_eq!(reply.message, format!("m{i}"));
    }
    drop(tx);
    assert!(
        inbound.next().await.is_none(),
        "stream ends cleanly after the client closes"
    );

    // No route: gRPC clients get a gRPC status, not an HTTP error page.
    let mut lost = grpc::client_via(proxy.egress, "nowhere.test")
        .await
        .unwrap();
    let status = lost
        .unary(EchoRequest {
            message: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), trellis_testkit::tonic::Code::Unimplemented);
}

#[tokio::test]
async fn grpc_unavailable_is_retried_on_another_endpoint() {
    let good = GrpcServer::start("good").await;
    let bad = GrpcServer::start_failing("bad", trellis_testkit::tonic::Code::Unavailable).await;
    let policy = "            retryPolicy: { maxRetries: 2, grpcRetryEvents: [unavailable] }\n";
    let hosts = host_to("echo.test", "echo", policy);
    let proxy = proxy_with(
        "v1",
        &hosts,
        &cluster("echo", "GRPC", &[bad.addr, good.addr]),
        &[],
    )
    .await;
    let mut client = grpc::client_via(proxy.egress, "echo.test").await.unwrap();
    for i in 0..10 {
        let reply = client
            .unary(EchoRequest {
                message: format!("r{i}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.server, "good");
    }
    assert!(
        bad.calls() >= 5,
        "round robin sent first tries to the failing server"
    );
    assert_eq!(good.calls(), 10);
}

#[tokio::test]
async fn websocket_upgrade_passes_through() {
    let ws = WsEchoServer::start("ws-1").await;
    let hosts = host_to("ws.test", "ws", "");
    let proxy = proxy_with("v1", &hosts, &cluster("ws", "HTTP1", &[ws.addr]), &[]).await;
    let stream = TcpStream::connect(proxy.egress).await.unwrap();
    let (mut socket, resp) = tokio_tungstenite::client_async("ws://ws.test/chat", stream)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    use tokio_tungstenite::tungstenite::Message;
    for i in 0..3 {
        socket
            .send(Message::text(format!("hello{i}")))
            .await
            .unwrap();
        let got = socket.next().await.unwrap().unwrap();
        assert_eq!(got, Message::text(format!("ws-1:hello{i}")));
    }
    socket.close(None).await.unwrap();
}

/// WebSockets over HTTP/2 (RFC 8441) on either side: an extended CONNECT from the client to an
/// HTTP/1.1 endpoint (made an upgrade with the proxy's own key, whose accept it checks), an
/// HTTP/1.1 upgrade to an HTTP/2 endpoint (made an extended CONNECT; the client's key answered
/// by the proxy, which the client's library checks), and HTTP/2 on both; the subprotocol asked
/// for comes back. An extended CONNECT for another protocol is refused.
#[tokio::test]
async fn websockets_cross_http_versions() {
    use tokio_tungstenite::tungstenite::Message;
    let h1 = WsEchoServer::start("ws-h1").await;
    let h2 = WsEchoServer::start_h2("ws-h2").await;
    let hosts = host_to("h1.test", "h1", "") + &host_to("h2.test", "h2", "");
    let clusters = cluster("h1", "HTTP1", &[h1.addr]) + &cluster("h2", "HTTP2", &[h2.addr]);
    let proxy = proxy_with("v1", &hosts, &clusters, &[]).await;

    async fn chat<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, server: &str)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        for i in 0..3 {
            ws.send(Message::text(format!("hello{i}"))).await.unwrap();
            let got = ws.next().await.unwrap().unwrap();
            assert_eq!(got, Message::text(format!("{server}:hello{i}")));
        }
        ws.close(None).await.unwrap();
    }

    for (host, server) in [("h1.test", "ws-h1"), ("h2.test", "ws-h2")] {
        // An HTTP/2 client.
        let (head, mut ws) = trellis_testkit::client::websocket_h2(
            proxy.egress,
            &format!("http://{host}/chat"),
            &[("sec-websocket-protocol", "chat")],
        )
        .await
        .unwrap();
        assert_eq!(head.status, 200, "{host}: {head:?}");
        assert!(
            !head.headers.contains_key("sec-websocket-accept"),
            "{head:?}"
        );
        if server == "ws-h2" {
            assert_eq!(head.headers["sec-websocket-protocol"], "chat");
        }
        chat(&mut ws, server).await;

        // An HTTP/1.1 client (its library checks Sec-WebSocket-Accept).
        let stream = TcpStream::connect(proxy.egress).await.unwrap();
        let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{host}/chat"), stream)
            .await
            .unwrap();
        assert_eq!(resp.status(), 101, "{host}");
        chat(&mut ws, server).await;
    }

    // Another protocol over extended CONNECT: refused.
    let stream = TcpStream::connect(proxy.egress).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::connect("http://h2.test/udp")
        .body(http_body_util::Empty::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("connect-udp"));
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
}

/// Reads the echo server's greeting, then checks bytes come back. `reader` may already hold
/// bytes read past an HTTP response head.
async fn greet_and_echo(mut reader: BufReader<TcpStream>, want_greeting: &str) {
    let mut line = String::new();
    reader.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim_end(), want_greeting);
    assert!(
        reader.buffer().is_empty(),
        "nothing but the greeting before we speak"
    );
    let mut stream = reader.into_inner();
    stream.write_all(b"ping-123").await.unwrap();
    let mut buf = [0u8; 8];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping-123");
}

#[tokio::test]
async fn tcp_listener_and_connect_tunnel_forward_bytes() {
    let db = TcpEchoServer::start("db-1").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let snapshot = format!(
        "version: v1\naccessLog: {{ path: {}, text: '%UPSTREAM_CLUSTER% %REQ(:METHOD)% %PROTOCOL% %BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_HOST%' }}\nlisteners:\n  - name: egress\n    role: EGRESS\n    virtualHosts:\n      - name: db\n        domains: ['db.test:5432']\n        routes:\n          - name: tunnel\n            action: {{ weightedTargets: [{{ cluster: db, weight: 1 }}] }}\n  - name: db-tcp\n    address: 127.0.0.1:0\n    protocol: TCP\n    tcp: {{ weightedTargets: [{{ cluster: db, weight: 1 }}] }}\nclusters:\n{}",
        log.display(),
        cluster("db", "TCP_ONLY", &[db.addr])
    );
    let proxy = ProxyProcess::start(BIN, &snapshot, &[]).await;

    // A TCP listener on its own port.
    let tcp_addr = proxy.listener_addr("db-tcp").await;
    greet_and_echo(
        BufReader::new(TcpStream::connect(tcp_addr).await.unwrap()),
        "db-1",
    )
    .await;

    // CONNECT through the egress.
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(b"CONNECT db.test:5432 HTTP/1.1\r\nHost: db.test:5432\r\n\r\n")
        .await
        .unwrap();
    let mut reader = BufReader::new(s);
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    loop {
        let mut l = String::new();
        reader.read_line(&mut l).await.unwrap();
        if l == "\r\n" {
            break;
        }
    }
    greet_and_echo(reader, "db-1").await;

    // Both are logged when they end, with the bytes each way (8 from the client; the greeting
    // and the echo back): the TCP connection without request fields.
    let text = eventually(Duration::from_secs(10), "two access log lines", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() == 2 {
            Ok(text)
        } else {
            Err(format!("{text:?}"))
        }
    })
    .await;
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        [
            format!("db - - 8 13 {}", db.addr),
            format!("db CONNECT HTTP/1.1 8 13 {}", db.addr)
        ]
    );
}

#[tokio::test]
async fn malformed_requests_get_400_and_the_proxy_keeps_serving() {
    let app = TestServer::start("app").await;
    let proxy = proxy_with(
        "v1",
        &host_to("svc.test", "app", ""),
        &cluster("app", "HTTP1", &[app.addr]),
        &[],
    )
    .await;
    let cases: [&[u8]; 3] = [
        b"NOT A REQUEST\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: svc.test\r\nContent-Length: nope\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n",
    ];
    for raw in cases {
        let mut s = TcpStream::connect(proxy.egress).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut buf = vec![0u8; 12];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(
            &buf,
            b"HTTP/1.1 400",
            "for {:?}",
            String::from_utf8_lossy(raw)
        );
    }
    let mut c = Client::h1(proxy.egress).await.unwrap();
    assert_eq!(c.send(get("svc.test", "/")).await.unwrap().text(), "app");
}
