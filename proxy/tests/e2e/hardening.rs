//! Requests a careless or hostile client sends: confusing authorities, upgrades to protocols we do
//! not route, malformed HTTP/2, broken or trickling bodies, half-closed connections, heads the
//! servers refuse before the proxy sees them.

use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use trellis_testkit::{
    RawHttpServer, RawReply, TcpEchoServer, TestServer, WsEchoServer,
    grpc::{self, EchoRequest, GrpcServer},
    h2raw::{self, H2Raw, Outcome},
    raw::{exchange, read_response},
};

use crate::{cluster, host_to, inprocess::InProcessProxy, proxy_with};

/// Waits until a metric reaches `want`.
async fn metric_is(proxy: &InProcessProxy, name: &str, labels: &[(&str, &str)], want: f64) {
    trellis_testkit::eventually(Duration::from_secs(10), name, || async {
        let got = proxy.metric(name, labels).await;
        if got == want {
            Ok(())
        } else {
            Err(format!("{name}{labels:?} = {got}, want {want}"))
        }
    })
    .await
}

/// Hosts `a.test` and `b.test` and a catch-all, each to its own upstream.
async fn three_hosts() -> (TestServer, TestServer, TestServer, InProcessProxy) {
    let a = TestServer::start("a").await;
    let b = TestServer::start("b").await;
    let any = TestServer::start("any").await;
    let catch_all = host_to("any", "any", "").replace("[\"any\"]", "[\"*\"]");
    let hosts = host_to("a.test", "a", "") + &host_to("b.test", "b", "") + &catch_all;
    let clusters = cluster("a", "HTTP1", &[a.addr])
        + &cluster("b", "HTTP1", &[b.addr])
        + &cluster("any", "HTTP1", &[any.addr]);
    let proxy = proxy_with("v1", &hosts, &clusters, &[]).await;
    (a, b, any, proxy)
}

/// RFC 9112 §3.2.2: an absolute-form request-target's authority wins over `Host`, for routing
/// and for what the upstream receives.
#[tokio::test]
async fn absolute_form_authority_is_routed_and_forwarded_as_host() {
    let (_a, _b, _any, proxy) = three_hosts().await;
    let r = exchange(
        proxy.egress,
        b"GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "a"));
    assert_eq!(r.header("x-seen-host"), Some("a.test"));
    assert_eq!(r.header("x-seen-path"), Some("/x"), "origin form upstream");
}

/// Ambiguous or missing authorities are refused; `Connection: host` does not strip `Host`.
#[tokio::test]
async fn ambiguous_or_missing_hosts_are_400() {
    let (_a, _b, _any, proxy) = three_hosts().await;
    let refused: [&[u8]; 2] = [
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    ];
    for raw in refused {
        let r = exchange(proxy.egress, raw).await.unwrap();
        let what = String::from_utf8_lossy(raw);
        assert_eq!(r.status, 400, "{what}");
        assert_eq!(r.header("x-trellis-error"), Some("bad_request"), "{what}");
    }
    // HTTP/1.0 may omit Host: it goes to the catch-all host.
    let r = exchange(proxy.egress, b"GET / HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "any"));
    // Host is never hop-by-hop, whatever Connection lists.
    let r = exchange(
        proxy.egress,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: host, close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "a"));
    assert_eq!(r.header("x-seen-host"), Some("a.test"));

    // HTTP/2: a host header that contradicts :authority, or two of them.
    let mut h2 = H2Raw::connect(proxy.egress).await;
    let base = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "a.test"),
        (":path", "/"),
    ];
    let mut stream = 1;
    for extra in [
        &[("host", "b.test")][..],
        &[("host", "a.test"), ("host", "a.test")][..],
    ] {
        let fields: Vec<_> = base.iter().chain(extra).copied().collect();
        h2.headers(stream, &fields, true).await;
        assert_eq!(h2.outcome(stream).await, Outcome::Status(400), "{extra:?}");
        stream += 2;
    }
    // The same host as :authority is fine.
    let fields: Vec<_> = base.iter().chain(&[("host", "a.test")]).copied().collect();
    h2.headers(stream, &fields, true).await;
    assert_eq!(h2.outcome(stream).await, Outcome::Status(200));
}

/// Only WebSocket upgrades are tunnelled: other protocols (h2c, unknown ones) are forwarded as
/// plain requests without their Upgrade, and a 101 the upstream sends anyway, or a 101 to another
/// protocol than the one asked for, opens no tunnel.
#[tokio::test]
async fn only_websocket_upgrades_are_switched() {
    let (raw, proxy) = proxy_to_raw(RawReply::keep(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
    ))
    .await;
    let requests: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: raw.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: raw.test\r\nConnection: upgrade\r\nUpgrade: foo/1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: raw.test\r\nConnection: upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    ];
    for request in requests {
        let r = exchange(proxy.egress, request).await.unwrap();
        let what = String::from_utf8_lossy(request);
        assert_ne!(r.status, 101, "no tunnel for {what}");
        assert_eq!(r.status, 502, "{what}");
    }
    let seen = raw.requests();
    assert_eq!(seen.len(), 3);
    for s in &seen[..2] {
        let lower = s.to_ascii_lowercase();
        assert!(!lower.contains("upgrade"), "Upgrade forwarded: {s}");
        assert!(!lower.contains("http2-settings"), "{s}");
    }
    assert!(
        seen[2].to_ascii_lowercase().contains("upgrade: websocket"),
        "{}",
        seen[2]
    );
}

/// Malformed HTTP/2 requests hyper lets through are refused (RFC 9113 §8.1.1, §8.2.1, §8.3,
/// §8.5, §8.4); the connection keeps serving where the error is the stream's.
#[tokio::test]
async fn malformed_http2_requests_are_refused() {
    let (_a, _b, _any, proxy) = three_hosts().await;
    let get = |path: &'static str| {
        vec![
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "a.test"),
            (":path", path),
        ]
    };
    let mut h2 = H2Raw::connect(proxy.egress).await;
    // CONNECT without :authority.
    h2.headers(1, &[(":method", "CONNECT")], false).await;
    assert_eq!(h2.outcome(1).await, Outcome::Status(400));
    // Leading or trailing whitespace in a field value.
    for (i, value) in [" lead", "trail ", "tab\t"].into_iter().enumerate() {
        let stream = 3 + 2 * i as u32;
        let mut fields = get("/");
        fields.push(("x-test", value));
        h2.headers(stream, &fields, true).await;
        assert_eq!(h2.outcome(stream).await, Outcome::Status(400), "{value:?}");
    }
    // Still serving.
    h2.headers(9, &get("/"), true).await;
    assert_eq!(h2.outcome(9).await, Outcome::Status(200));

    // A client's PUSH_PROMISE is a connection error (h2 refuses it), on an open stream or not.
    let mut post = get("/echo");
    post[0] = (":method", "POST");
    h2.headers(11, &post, false).await;
    h2.push_promise(11, 2, &get("/pushed")).await;
    assert_eq!(h2.outcome(11).await, Outcome::GoAway(h2raw::PROTOCOL_ERROR));
    let mut fresh = H2Raw::connect(proxy.egress).await;
    fresh.push_promise(1, 2, &get("/pushed")).await;
    assert_eq!(
        fresh.outcome(1).await,
        Outcome::GoAway(h2raw::PROTOCOL_ERROR)
    );
}

/// Pseudo-header fields in HTTP/2 trailers are not refused (the h2 crate drops them before the
/// proxy sees the trailers; see the README), but they are never forwarded.
#[tokio::test]
async fn pseudo_headers_in_http2_trailers_are_never_forwarded() {
    let (raw, _proxy, outcome) =
        h2_post_with_trailers(&[(":path", "/smuggled"), ("x-trailer", "t")]).await;
    assert_eq!(outcome, Outcome::Status(200));
    let seen = raw.requests();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].starts_with("POST /upload HTTP/1.1\r\n"),
        "{}",
        seen[0]
    );
    assert!(!seen[0].contains("smuggled"), "{}", seen[0]);
    assert!(seen[0].contains("x-trailer: t\r\n"), "{}", seen[0]);
}

/// A client's request trailers lose what no header rule may name (framing, hop-by-hop, the
/// authority, `x-forwarded-client-cert`), over HTTP/2 and HTTP/1.1 alike: an upstream merging
/// trailers into the header section finds no forged identity; other trailers go on.
#[tokio::test]
async fn request_trailers_never_carry_what_the_proxy_controls() {
    let forged = [
        ("x-forwarded-client-cert", "URI=spiffe://evil/ns/x/vn/y"),
        ("x_forwarded_client_cert", "URI=spiffe://evil/ns/x/vn/y"),
        ("host", "elsewhere.test"),
        ("content-length", "99"),
        ("x-checksum", "abc"),
    ];
    let (raw, proxy, outcome) = h2_post_with_trailers(&forged).await;
    assert_eq!(outcome, Outcome::Status(200));

    let h1 = b"POST /upload HTTP/1.1\r\nhost: raw.test\r\ntransfer-encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\nx-forwarded-client-cert: URI=spiffe://evil/ns/x/vn/y\r\nx_forwarded_client_cert: URI=spiffe://evil/ns/x/vn/y\r\nhost: elsewhere.test\r\nx-checksum: abc\r\n\r\n";
    let r = exchange(proxy.egress, h1).await.unwrap();
    assert_eq!(r.status, 200);

    let seen = raw.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for request in &seen {
        let trailers = &request[request.find("\r\n0\r\n").expect("a chunked body")..];
        assert!(trailers.contains("x-checksum: abc\r\n"), "{request}");
        for name in [
            "x-forwarded-client-cert",
            "x_forwarded_client_cert",
            "host",
            "content-length",
        ] {
            assert!(!trailers.contains(name), "{name} in {request}");
        }
    }
}

/// A body the client breaks is the client's fault: 400 for a malformed one, 499
/// (`downstream_reset`) for one cut short; never a 502 charged to the cluster.
#[tokio::test]
async fn broken_request_bodies_are_client_errors() {
    let app = TestServer::start("app").await;
    let proxy = proxy_with(
        "v1",
        &host_to("svc.test", "svc", ""),
        &cluster("svc", "HTTP1", &[app.addr]),
        &[],
    )
    .await;
    let malformed: [&[u8]; 2] = [
        // A chunk size that is not hex.
        b"POST /echo HTTP/1.1\r\nHost: svc.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
        // A chunk shorter than its declared size.
        b"POST /echo HTTP/1.1\r\nHost: svc.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc\r\n0\r\n\r\n",
    ];
    for raw in malformed {
        let r = exchange(proxy.egress, raw).await;
        let what = String::from_utf8_lossy(raw);
        let r = r.unwrap_or_else(|| panic!("no response for {what}"));
        assert_eq!(r.status, 400, "{what}");
        assert_eq!(r.header("x-trellis-error"), Some("bad_request"), "{what}");
    }
    // A client that leaves in the middle of its body.
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 100\r\n\r\nabc")
        .await
        .unwrap();
    app.wait_requests(1).await;
    drop(s);
    metric_is(
        &proxy,
        "trellis_proxy_errors_total",
        &[("kind", "downstream_reset")],
        1.0,
    )
    .await;
    metric_is(
        &proxy,
        "trellis_proxy_errors_total",
        &[("kind", "bad_request")],
        2.0,
    )
    .await;
    assert_nothing_charged_to_the_upstream(&proxy).await;
}

/// A request body that stops arriving ends with 408 after the body idle timeout: the route's
/// `timeout.idle`, else `--idle-timeout`.
#[tokio::test]
async fn a_stalled_request_body_gets_408() {
    let app = TestServer::start("app").await;
    let hosts = host_to("default.test", "svc", "")
        + &host_to("route.test", "svc", "            timeout: { idle: 0.2s }\n");
    let clusters = cluster("svc", "HTTP1", &[app.addr]);
    // The route's idle timeout, with the connection's far away.
    let proxy = proxy_with("v1", &hosts, &clusters, &["--idle-timeout", "1h"]).await;
    // The connection's idle timeout as the default.
    let short = proxy_with("v1", &hosts, &clusters, &["--idle-timeout", "300ms"]).await;
    for (addr, host) in [(proxy.egress, "route.test"), (short.egress, "default.test")] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 10\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let r = read_response(&mut s).await.expect("a response");
        assert_eq!(r.status, 408, "{host}");
        assert_eq!(r.header("x-trellis-error"), Some("request_body_timeout"));
    }
    metric_is(
        &proxy,
        "trellis_proxy_errors_total",
        &[("kind", "request_body_timeout")],
        1.0,
    )
    .await;
}

/// A body that trickles in a byte at a time, each byte well within the idle timeout, is bounded
/// all the same: only real progress restarts the timeout.
#[tokio::test]
async fn a_trickling_request_body_gets_408() {
    let app = TestServer::start("app").await;
    let proxy = proxy_with(
        "v1",
        &host_to("route.test", "svc", "            timeout: { idle: 0.3s }\n"),
        &cluster("svc", "HTTP1", &[app.addr]),
        &[],
    )
    .await;
    let std = std::net::TcpStream::connect(proxy.egress).unwrap();
    let writer = std.try_clone().unwrap();
    for s in [&std, &writer] {
        s.set_nonblocking(true).unwrap();
    }
    let mut reader = TcpStream::from_std(std).unwrap();
    let mut writer = TcpStream::from_std(writer).unwrap();
    writer
        .write_all(b"POST /echo HTTP/1.1\r\nHost: route.test\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    // One byte every 20 ms: 100,000 bytes would take over half an hour.
    let trickle = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut sent = 0usize;
        while sent < 100_000 && writer.write_all(b"x").await.is_ok() {
            sent += 1;
            tick.tick().await;
        }
        sent
    });
    let r = read_response(&mut reader).await.expect("a response");
    assert_eq!(r.status, 408);
    assert_eq!(r.header("x-trellis-error"), Some("request_body_timeout"));
    trickle.abort();
}

/// A client that shuts down its sending side after its request still gets the response.
#[tokio::test]
async fn half_closed_clients_get_their_responses() {
    let app = TestServer::start("app").await;
    app.delay(50);
    let proxy = proxy_with(
        "v1",
        &host_to("svc.test", "svc", ""),
        &cluster("svc", "HTTP1", &[app.addr]),
        &[],
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let addr = proxy.egress;
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: svc.test\r\n\r\n")
                .await
                .unwrap();
            s.shutdown().await.unwrap();
            let mut got = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
            String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200")
        }));
    }
    let mut delivered = 0;
    for t in tasks {
        delivered += usize::from(t.await.unwrap());
    }
    assert_eq!(delivered, 20);
}

/// Requests the HTTP/1.1 server answers itself (unparsable, URI or head too large) are counted.
#[tokio::test]
async fn requests_refused_by_the_parser_are_counted() {
    let app = TestServer::start("app").await;
    let proxy = proxy_with(
        "v1",
        &host_to("svc.test", "svc", ""),
        &cluster("svc", "HTTP1", &[app.addr]),
        &[],
    )
    .await;
    let long_uri = format!(
        "GET /{} HTTP/1.1\r\nHost: svc.test\r\n\r\n",
        "a".repeat(70_000)
    );
    let huge_headers = format!(
        "GET / HTTP/1.1\r\nHost: svc.test\r\n{}\r\n",
        "x-filler: 0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(10_000)
    );
    let cases: [(&[u8], u16); 3] = [
        (b"NOT A REQUEST\r\n\r\n", 400),
        (long_uri.as_bytes(), 414),
        (huge_headers.as_bytes(), 431),
    ];
    for (raw, want) in cases {
        let mut s = TcpStream::connect(proxy.egress).await.unwrap();
        // The proxy may answer and close before it has read everything.
        let _ = s.write_all(raw).await;
        let r = read_response(&mut s).await.expect("a response");
        assert_eq!(r.status, want);
    }
    metric_is(
        &proxy,
        "trellis_proxy_errors_total",
        &[("kind", "bad_request")],
        1.0,
    )
    .await;
    metric_is(
        &proxy,
        "trellis_proxy_errors_total",
        &[("kind", "request_head_too_large")],
        2.0,
    )
    .await;
}

/// Reads everything until the end of stream, or panics after 10 s (a tunnel that never ends).
async fn read_to_eof(s: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what}: no end of stream; got {:?}",
                String::from_utf8_lossy(&got)
            )
        })
        .unwrap();
    got
}

/// A client that half-closes a CONNECT tunnel or an upgraded (WebSocket) connection: its end of
/// stream reaches the upstream, which closes, and the tunnel ends. Also when the end of stream
/// came with the CONNECT request itself, before the tunnel was open.
#[tokio::test]
async fn tunnels_pass_the_clients_half_close_upstream() {
    let db = TcpEchoServer::start("db-1").await;
    let ws = WsEchoServer::start("ws-1").await;
    let db_host = "      - name: db\n        domains: ['db.test:5432']\n        routes:\n          - name: tunnel\n            action: { weightedTargets: [{ cluster: db, weight: 1 }] }\n";
    let proxy = proxy_with(
        "v1",
        &(db_host.to_owned() + &host_to("ws.test", "ws", "")),
        &(cluster("db", "TCP_ONLY", &[db.addr]) + &cluster("ws", "HTTP1", &[ws.addr])),
        &[],
    )
    .await;
    let connect = "CONNECT db.test:5432 HTTP/1.1\r\nHost: db.test:5432\r\n\r\n";

    // Half-closed once the tunnel is open: the echo server sees the end of stream and closes.
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(connect.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("db-1\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("the tunnel opens")
            .unwrap();
        assert_ne!(n, 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&chunk[..n]);
    }
    assert!(seen.starts_with(b"HTTP/1.1 200"));
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    let rest = read_to_eof(&mut s, "CONNECT, half-closed in the tunnel").await;
    assert_eq!(rest, b"ping");

    // Half-closed right after the request, before the tunnel is open.
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(format!("{connect}ping").as_bytes())
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let got = read_to_eof(&mut s, "CONNECT, half-closed with the request").await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("\r\n\r\ndb-1\nping"), "{got}");

    // A WebSocket connection: the upstream sees the end of stream and closes.
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s).await.expect("a response");
    assert_eq!(r.status, 101);
    s.shutdown().await.unwrap();
    read_to_eof(&mut s, "WebSocket, half-closed").await;

    // All three are over: recorded, and no connection left open.
    metric_is(
        &proxy,
        "trellis_proxy_requests_total",
        &[("cluster", "db")],
        2.0,
    )
    .await;
    metric_is(
        &proxy,
        "trellis_proxy_requests_total",
        &[("cluster", "ws")],
        1.0,
    )
    .await;
    metric_is(&proxy, "trellis_proxy_active_connections", &[], 0.0).await;
}

/// The same client faults against an HTTP/2 (h2c) cluster, whose client (hyper's) only resets
/// the upstream stream when the request body fails: still 400, 499 and 408, never a 502, never
/// retried nor charged to the cluster. With and without a retry policy.
#[tokio::test]
async fn broken_request_bodies_are_client_errors_on_http2_clusters() {
    let app = TestServer::start("app").await;
    let retry = "            retryPolicy: { maxRetries: 2, httpRetryEvents: [server-error, gateway-error, reset] }\n            timeout: { idle: 0.2s }\n";
    let hosts = host_to("once.test", "svc", "            timeout: { idle: 0.2s }\n")
        + &host_to("retry.test", "svc", retry);
    let proxy = proxy_with("v1", &hosts, &cluster("svc", "HTTP2", &[app.addr]), &[]).await;
    for (round, host) in [(1.0, "once.test"), (2.0, "retry.test")] {
        let malformed = [
            format!(
                "POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"
            ),
            format!(
                "POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc\r\n0\r\n\r\n"
            ),
        ];
        for raw in &malformed {
            let r = exchange(proxy.egress, raw.as_bytes()).await;
            let r = r.unwrap_or_else(|| panic!("no response for {raw}"));
            assert_eq!(r.status, 400, "{raw}");
            assert_eq!(r.header("x-trellis-error"), Some("bad_request"), "{raw}");
        }
        // A body that stalls.
        let mut s = TcpStream::connect(proxy.egress).await.unwrap();
        let head = format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 10\r\n\r\nx");
        s.write_all(head.as_bytes()).await.unwrap();
        let r = read_response(&mut s).await.expect("a response");
        assert_eq!(r.status, 408, "{host}");
        assert_eq!(r.header("x-trellis-error"), Some("request_body_timeout"));
        // A client that leaves in the middle of its body, once the upstream has the request.
        let seen = app.requests();
        let mut s = TcpStream::connect(proxy.egress).await.unwrap();
        let head = format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100\r\n\r\nabc");
        s.write_all(head.as_bytes()).await.unwrap();
        app.wait_requests(seen + 1).await;
        drop(s);
        let errors = [
            ("bad_request", 2.0 * round),
            ("request_body_timeout", round),
            ("downstream_reset", round),
        ];
        for (kind, want) in errors {
            metric_is(
                &proxy,
                "trellis_proxy_errors_total",
                &[("kind", kind)],
                want,
            )
            .await;
        }
    }
    assert_nothing_charged_to_the_upstream(&proxy).await;
    let retries = proxy
        .metric("trellis_proxy_retries_total", &[("cluster", "svc")])
        .await;
    assert_eq!(retries, 0.0, "client faults are not retried");
}

/// A gRPC bidi stream whose response has begun is not cut by the request-body timeout, however
/// little and however rarely the client sends: past the response head only the route's stream
/// idle timeout governs it (here each message is answered, so the stream is never idle).
#[tokio::test]
async fn streams_with_a_response_outlive_the_request_body_timeout() {
    let server = GrpcServer::start("grpc-1").await;
    let proxy = proxy_with(
        "v1",
        &host_to("echo.test", "echo", "            timeout: { idle: 1s }\n"),
        &cluster("echo", "GRPC", &[server.addr]),
        &[],
    )
    .await;
    let mut client = grpc::client_via(proxy.egress, "echo.test").await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut inbound = client.bidi(outbound).await.unwrap().into_inner();
    // A small message every 100 ms for 2.5 s: two and a half times the route's idle timeout
    // (each gap well inside it, even on a loaded machine), and far from the 1 KiB that would
    // count as request-body progress.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for i in 0..25 {
        tick.tick().await;
        tx.send(EchoRequest {
            message: format!("m{i}"),
        })
        .await
        .unwrap_or_else(|_| panic!("stream cut before message {i}"));
        let reply = tokio::time::timeout(Duration::from_secs(10), inbound.next())
            .await
            .expect("a reply in time")
            .unwrap_or_else(|| panic!("stream ended at message {i}"))
            .unwrap_or_else(|e| panic!("stream cut at message {i}: {e}"));
        assert_eq!(reply.message, format!("m{i}"));
    }
    drop(tx);
    assert!(inbound.next().await.is_none(), "the stream ends cleanly");
    let cut = proxy
        .metric(
            "trellis_proxy_errors_total",
            &[("kind", "request_body_timeout")],
        )
        .await;
    assert_eq!(cut, 0.0);
}

/// A gRPC request body is not bounded by the `--idle-timeout` default (a client stream may be
/// quiet for minutes before the server answers); only a route's explicit `timeout.idle` bounds
/// it. An ordinary body on the same proxy still gets 408.
#[tokio::test]
async fn grpc_request_bodies_are_not_bounded_by_the_default_idle_timeout() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;

    let app = TestServer::start("app").await;
    let proxy = proxy_with(
        "v1",
        &host_to("svc.test", "svc", ""),
        &cluster("svc", "HTTP2", &[app.addr]),
        &["--idle-timeout", "300ms"],
    )
    .await;
    let stream = TcpStream::connect(proxy.egress).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut sent = Vec::new();
    for content_type in ["application/grpc", "application/octet-stream"] {
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
        let body = StreamBody::new(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move {
                let b = rx.recv().await?;
                Some((Ok::<_, std::convert::Infallible>(Frame::data(b)), rx))
            },
        )));
        let req = http::Request::post("http://svc.test/echo")
            .header("content-type", content_type)
            .body(body)
            .unwrap();
        sender.ready().await.unwrap();
        let response = tokio::spawn(sender.send_request(req));
        // A byte every 100 ms for 1.2 s: four times --idle-timeout. (The upstream answers
        // only once it has the whole body.)
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut body = Vec::new();
        for _ in 0..12 {
            tick.tick().await;
            if tx.send(bytes::Bytes::from_static(b"x")).await.is_err() {
                break;
            }
            body.push(b'x');
        }
        drop(tx);
        let response = response.await.unwrap().unwrap();
        let status = response.status();
        let error = response.headers().get("x-trellis-error").cloned();
        let got = response.into_body().collect().await.unwrap().to_bytes();
        sent.push((content_type, status.as_u16(), error, got.len(), body.len()));
    }
    let grpc = &sent[0];
    assert_eq!((grpc.1, &grpc.2), (200, &None), "{grpc:?}");
    assert_eq!(grpc.3, 12, "the whole body echoed: {grpc:?}");
    let plain = &sent[1];
    assert_eq!(plain.1, 408, "{plain:?}");
    assert_eq!(
        plain.2.as_ref().map(|v| v.to_str().unwrap()),
        Some("request_body_timeout")
    );
}

/// No upstream error and no 5xx was counted: the client's faults stayed the client's.
async fn assert_nothing_charged_to_the_upstream(proxy: &InProcessProxy) {
    for kind in ["upstream_protocol_error", "upstream_reset"] {
        let n = proxy
            .metric("trellis_proxy_errors_total", &[("kind", kind)])
            .await;
        assert_eq!(n, 0.0, "{kind}");
    }
    let fives = proxy
        .metric("trellis_proxy_requests_total", &[("status_class", "5xx")])
        .await;
    assert_eq!(fives, 0.0, "nothing charged to the cluster as a 5xx");
}

/// A proxy whose route for `raw.test` goes to a scripted upstream answering `reply`.
/// A proxy to a raw upstream answering 200, and an HTTP/2 `POST /upload` through it with the
/// body `body` and `trailers`: the proxy, its upstream and the request's outcome.
async fn h2_post_with_trailers(
    trailers: &[(&str, &str)],
) -> (RawHttpServer, InProcessProxy, Outcome) {
    let (raw, proxy) = proxy_to_raw(RawReply::keep(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ))
    .await;
    let mut h2 = H2Raw::connect(proxy.egress).await;
    let post = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "raw.test"),
        (":path", "/upload"),
    ];
    h2.headers(1, &post, false).await;
    h2.data(1, b"body", false).await;
    h2.headers(1, trailers, true).await;
    let outcome = h2.outcome(1).await;
    (raw, proxy, outcome)
}

async fn proxy_to_raw(reply: RawReply) -> (RawHttpServer, InProcessProxy) {
    let raw = RawHttpServer::start(vec![reply]).await;
    let proxy = proxy_with(
        "v1",
        &host_to("raw.test", "raw", ""),
        &cluster("raw", "HTTP1", &[raw.addr]),
        &[],
    )
    .await;
    (raw, proxy)
}
