//! The client side's HTTP/1.1 server (`downstream`), byte for byte over raw sockets: pipelining,
//! HTTP/1.0, `100-continue`, request and response framing, bodies the proxy leaves unread.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use trellis_testkit::{
    TestServer,
    raw::{exchange, read_response},
};

use crate::{cluster, host_to, inprocess::InProcessProxy, proxy_with};

async fn proxy_to(app: &TestServer) -> InProcessProxy {
    proxy_with(
        "v1",
        &host_to("svc.test", "svc", ""),
        &cluster("svc", "HTTP1", &[app.addr]),
        &[],
    )
    .await
}

/// Everything until the proxy closes the connection (panics after 10 s).
async fn read_all(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the proxy closes the connection")
        .expect("a clean close");
    String::from_utf8_lossy(&got).into_owned()
}

/// Where `needle` is in `hay`, panicking with both when it is not.
fn at(hay: &str, needle: &str) -> usize {
    hay.find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in {hay:?}"))
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let app = TestServer::start("app").await;
    let proxy = proxy_to(&app).await;
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    // Three requests in one write, the last closing the connection.
    s.write_all(
        b"GET /one HTTP/1.1\r\nHost: svc.test\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 11\r\n\r\nsecond body\
          GET /three HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let all = read_all(&mut s).await;
    assert_eq!(all.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{all}");
    let (one, two, three) = (
        at(&all, "x-seen-path: /one"),
        at(&all, "second body"),
        at(&all, "x-seen-path: /three"),
    );
    assert!(one < two && two < three, "out of order: {all}");
    assert_eq!(app.requests(), 3);
    // The last response says the connection closes.
    assert!(all[three..].contains("connection: close"), "{all}");
}

#[tokio::test]
async fn http_1_0_clients_keep_their_connection_only_when_they_ask() {
    let app = TestServer::start("app").await;
    let proxy = proxy_to(&app).await;

    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: svc.test\r\n\r\n")
        .await
        .unwrap();
    let all = read_all(&mut s).await;
    assert!(all.starts_with("HTTP/1.1 200 OK\r\n"), "{all}");
    assert!(all.contains("connection: close\r\n"), "{all}");
    assert!(all.ends_with("\r\n\r\napp"), "{all}");

    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.0\r\nHost: svc.test\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let r = read_response(&mut s).await.expect("a response");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("keep-alive"));
        assert_eq!(r.text(), "app");
    }
    assert_eq!(app.requests(), 3);
}

#[tokio::test]
async fn expect_100_continue_is_answered_when_the_body_is_wanted() {
    let app = TestServer::start("app").await;
    let proxy = proxy_to(&app).await;
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(
        b"PUT /echo HTTP/1.1\r\nHost: svc.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await
    .unwrap();
    // The body is sent only after the interim answer.
    let mut interim = vec![0u8; b"HTTP/1.1 100 Continue\r\n\r\n".len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut interim))
        .await
        .expect("100 Continue in time")
        .unwrap();
    assert_eq!(&interim[..], b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").await.unwrap();
    let r = read_response(&mut s).await.expect("a response");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello");
}

#[tokio::test]
async fn transfer_codings_other_than_chunked_are_refused() {
    let app = TestServer::start("app").await;
    let proxy = proxy_to(&app).await;
    for (raw, want) in [
        (
            &b"POST /echo HTTP/1.1\r\nHost: svc.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"[..],
            501,
        ),
        (
            b"POST /echo HTTP/1.1\r\nHost: svc.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            b"POST /echo HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            400,
        ),
    ] {
        let r = exchange(proxy.egress, raw).await.expect("a response");
        assert_eq!(r.status, want, "{}", String::from_utf8_lossy(raw));
        assert_eq!(r.header("connection"), Some("close"));
    }
    assert_eq!(app.requests(), 0, "nothing ambiguous reaches the upstream");
}

#[tokio::test]
async fn chunked_bodies_both_ways() {
    let app = TestServer::start("app").await;
    let proxy = proxy_to(&app).await;
    let r = exchange(
        proxy.egress,
        b"POST /echo HTTP/1.1\r\nHost: svc.test\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
    )
    .await
    .expect("a response");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello world");

    // A response of unknown length is chunked to an HTTP/1.1 client...
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(b"GET /stream?chunks=3 HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let all = read_all(&mut s).await;
    assert!(all.contains("transfer-encoding: chunked\r\n"), "{all}");
    let body = &all[at(&all, "\r\n\r\n") + 4..];
    assert_eq!(
        body, "7\r\nchunk0\n\r\n7\r\nchunk1\n\r\n7\r\nchunk2\n\r\n0\r\n\r\n",
        "{all}"
    );
    // ...and delimited by the close to an HTTP/1.0 one.
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(
        b"GET /stream?chunks=2 HTTP/1.0\r\nHost: svc.test\r\nConnection: keep-alive\r\n\r\n",
    )
    .await
    .unwrap();
    let all = read_all(&mut s).await;
    assert!(!all.contains("transfer-encoding"), "{all}");
    assert!(all.contains("connection: close\r\n"), "{all}");
    assert!(all.ends_with("\r\n\r\nchunk0\nchunk1\n"), "{all}");
}

#[tokio::test]
async fn head_answers_keep_their_length_and_carry_no_body() {
    let app = TestServer::start("app").await;
    let proxy = proxy_to(&app).await;
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(b"HEAD / HTTP/1.1\r\nHost: svc.test\r\n\r\nGET /after HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let all = read_all(&mut s).await;
    let second = all
        .rfind("HTTP/1.1 200 OK\r\n")
        .filter(|&i| i > 0)
        .unwrap_or_else(|| panic!("two answers: {all}"));
    let (head, get) = all.split_at(second);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{all}");
    assert!(head.contains("content-length: 3\r\n"), "{all}");
    assert!(
        head.ends_with("\r\n\r\n"),
        "no body after a HEAD answer: {all}"
    );
    assert!(
        get.contains("x-seen-path: /after") && get.ends_with("app"),
        "{all}"
    );
}

/// A body the proxy answers without reading (no route) is passed over when it has arrived
/// whole, and the connection goes on; one still arriving closes the connection after the answer.
#[tokio::test]
async fn unread_request_bodies_are_passed_over_or_close_the_connection() {
    let app = TestServer::start("app").await;
    let proxy = proxy_to(&app).await;
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: nowhere.test\r\nContent-Length: 5\r\n\r\nhello\
          GET /next HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let all = read_all(&mut s).await;
    assert!(all.starts_with("HTTP/1.1 404"), "{all}");
    assert!(
        all.contains("x-seen-path: /next"),
        "the next request is served: {all}"
    );
    assert_eq!(app.requests(), 1);

    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: nowhere.test\r\nContent-Length: 100\r\n\r\npart")
        .await
        .unwrap();
    let all = read_all(&mut s).await;
    assert!(all.starts_with("HTTP/1.1 404"), "{all}");
    assert_eq!(all.matches("HTTP/1.1").count(), 1, "{all}");
}

/// A request answered without its body (no route) gets its answer, never `100 Continue`, and
/// the connection closes after it: the body the client then holds back is never read.
#[tokio::test]
async fn expect_100_continue_is_not_sent_when_the_body_is_not_wanted() {
    let app = TestServer::start("app").await;
    let proxy = proxy_to(&app).await;
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(
        b"PUT /up HTTP/1.1\r\nHost: nowhere.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await
    .unwrap();
    let all = read_all(&mut s).await;
    assert!(all.starts_with("HTTP/1.1 404"), "{all}");
    assert!(!all.contains("100 Continue"), "{all}");
}
