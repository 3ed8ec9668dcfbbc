//! Request mirroring: a route's share of requests copied to another cluster, fire and forget.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use trellis_testkit::{
    TestServer,
    client::Client,
    raw::{RawHttpServer, RawReply, exchange},
};

use crate::{cluster, host_to, proxy_with};

/// The route to `blue` with a mirror to the cluster `shadow` (YAML fields of the mirror).
fn mirrored(mirror: &str) -> String {
    host_to(
        "blue",
        "blue",
        &format!("            mirror: {{ cluster: shadow, {mirror} }}\n"),
    )
}

/// A mirror of 10% copies 10% ± 3 points of 2,000 requests; a copy's target that holds every
/// request 2 s never holds a primary request (each is answered long before), and every
/// primary request is answered by the primary.
#[tokio::test]
async fn a_mirror_copies_its_share_and_never_holds_the_primary() {
    let blue = TestServer::start("blue").await;
    let shadow = TestServer::start("shadow").await;
    const HOLD: Duration = Duration::from_secs(2);
    shadow.delay(HOLD.as_millis() as u64);
    let clusters =
        cluster("blue", "HTTP1", &[blue.addr]) + &cluster("shadow", "HTTP1", &[shadow.addr]);
    let proxy = proxy_with("v1", &mirrored("percentage: 10"), &clusters, &[]).await;

    const TOTAL: usize = 2000;
    const TASKS: usize = 4;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let egress = proxy.egress;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::h1(egress).await.unwrap();
            let mut slowest = Duration::ZERO;
            for _ in 0..TOTAL / TASKS {
                let start = Instant::now();
                let r = c.get("blue", "/").await.unwrap();
                slowest = slowest.max(start.elapsed());
                assert_eq!((r.status.as_u16(), r.text()), (200, "blue".to_string()));
            }
            slowest
        }));
    }
    let mut slowest = Duration::ZERO;
    for t in tasks {
        slowest = slowest.max(t.await.unwrap());
    }
    assert!(
        slowest < HOLD,
        "a primary request waited for its copy: {slowest:?}"
    );
    assert_eq!(blue.requests(), TOTAL);
    // Every copy answered (after the hold): as many as the shadow received.
    let sent = trellis_testkit::eventually(Duration::from_secs(10), "copies answered", || async {
        let sent = proxy
            .metric(
                "trellis_proxy_mirrored_requests_total",
                &[("outcome", "sent")],
            )
            .await as usize;
        if sent > 0 && sent == shadow.requests() {
            Ok(sent)
        } else {
            Err(format!("{sent} answered, {} received", shadow.requests()))
        }
    })
    .await;
    assert!(
        (140..=260).contains(&sent),
        "10% ± 3 of {TOTAL}: {sent} copied"
    );
}

/// A copy carries the request's body, whole, and its host with `-shadow`; a body over the
/// bound (declared by its length, or found while it streams) is not copied and its request is
/// served whole; a copy whose target refuses connections fails alone.
#[tokio::test]
async fn copies_carry_bodies_within_the_bound_and_fail_alone() {
    let blue = TestServer::start("blue").await;
    let shadow = RawHttpServer::start(vec![RawReply::keep(
        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    )])
    .await;
    // The primary over HTTP/2: hyper's client stops reading a body that says it is over.
    let clusters =
        cluster("blue", "HTTP2", &[blue.addr]) + &cluster("shadow", "HTTP1", &[shadow.addr]);
    let proxy = proxy_with(
        "v1",
        &mirrored("percentage: 100, maxBodyBytes: 1000"),
        &clusters,
        &[],
    )
    .await;
    let outcome = |o: &'static str| {
        let proxy = &proxy;
        async move {
            proxy
                .metric("trellis_proxy_mirrored_requests_total", &[("outcome", o)])
                .await
        }
    };
    let post = |body: Bytes| {
        Request::post("/echo")
            .header("host", "blue:8080")
            .body(Full::new(body))
            .unwrap()
    };
    let mut c = Client::h1(proxy.egress).await.unwrap();

    let r = c
        .send(post(Bytes::from_static(b"hello mirror")))
        .await
        .unwrap();
    assert_eq!(r.text(), "hello mirror");
    let copied = trellis_testkit::eventually(Duration::from_secs(10), "one copy", || async {
        match shadow.requests().as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!("{} copies", other.len())),
        }
    })
    .await;
    assert!(copied.starts_with("POST /echo HTTP/1.1\r\n"), "{copied}");
    assert!(
        copied
            .to_ascii_lowercase()
            .contains("\r\nhost: blue-shadow:8080\r\n"),
        "{copied}"
    );
    assert!(copied.ends_with("\r\n\r\nhello mirror"), "{copied}");

    // Declared too large: served, not copied.
    let big = Bytes::from(vec![b'x'; 2000]);
    let r = c.send(post(big.clone())).await.unwrap();
    assert_eq!(r.body, big);
    assert_eq!(outcome("body_too_large").await, 1.0);

    // Streamed (chunked, no length): copied when whole within the bound, else not.
    let chunked = |chunks: &[&[u8]]| {
        let mut req =
            b"POST /echo HTTP/1.1\r\nhost: blue\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for chunk in chunks {
            req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            req.extend_from_slice(chunk);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        req
    };
    let r = exchange(proxy.egress, &chunked(&[b"first-part ", b"second-part"]))
        .await
        .unwrap();
    assert_eq!(r.text(), "first-part second-part");
    let copied = trellis_testkit::eventually(Duration::from_secs(10), "two copies", || async {
        match shadow.requests().as_slice() {
            [_, two] => Ok(two.clone()),
            other => Err(format!("{} copies", other.len())),
        }
    })
    .await;
    assert!(
        copied.contains("first-part ") && copied.contains("second-part"),
        "{copied}"
    );
    let r = exchange(proxy.egress, &chunked(&[&[b'y'; 600], &[b'z'; 600]]))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text().len(), 1200);
    assert_eq!(outcome("body_too_large").await, 2.0);
    assert_eq!(shadow.requests().len(), 2);
    assert_eq!(outcome("sent").await, 2.0);

    // A target refusing connections: every request still served, the copies counted failed.
    let closed = trellis_testkit::free_port();
    let clusters = cluster("blue", "HTTP1", &[blue.addr])
        + &cluster(
            "shadow",
            "HTTP1",
            &[format!("127.0.0.1:{closed}").parse().unwrap()],
        );
    proxy.apply(&crate::snapshot(
        "v2",
        &mirrored("percentage: 100"),
        &clusters,
    ));
    for _ in 0..20 {
        let r = c.get("blue", "/").await.unwrap();
        assert_eq!((r.status.as_u16(), r.text()), (200, "blue".to_string()));
    }
    trellis_testkit::eventually(Duration::from_secs(10), "copies failed", || async {
        let failed = outcome("failed").await;
        if failed == 20.0 {
            Ok(())
        } else {
            Err(format!("{failed} failed"))
        }
    })
    .await;
}

/// A body of many tiny chunks, far within the byte bound (64 KiB by default), is not kept for a
/// copy past 1,152 frames (each kept frame costs a hundred times its byte): served, not copied;
/// a body of fewer frames is.
#[tokio::test]
async fn a_body_of_too_many_tiny_chunks_is_not_copied() {
    let blue = TestServer::start("blue").await;
    let shadow = RawHttpServer::start(vec![RawReply::keep(
        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    )])
    .await;
    let clusters =
        cluster("blue", "HTTP1", &[blue.addr]) + &cluster("shadow", "HTTP1", &[shadow.addr]);
    let proxy = proxy_with("v1", &mirrored("percentage: 100"), &clusters, &[]).await;
    let chunked = |n: usize| {
        let mut req =
            b"POST /echo HTTP/1.1\r\nhost: blue\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..n {
            req.extend_from_slice(b"1\r\nx\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        req
    };
    let r = exchange(proxy.egress, &chunked(2000)).await.unwrap();
    assert_eq!((r.status, r.text().len()), (200, 2000));
    let too_large = proxy
        .metric(
            "trellis_proxy_mirrored_requests_total",
            &[("outcome", "body_too_large")],
        )
        .await;
    assert_eq!(too_large, 1.0);

    let r = exchange(proxy.egress, &chunked(100)).await.unwrap();
    assert_eq!((r.status, r.text().len()), (200, 100));
    trellis_testkit::eventually(Duration::from_secs(10), "one copy", || async {
        match shadow.requests().as_slice() {
            [one] if one.ends_with(&"x".repeat(100)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}
