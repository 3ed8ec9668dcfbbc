//! Retries, the retry budget, body replay limits and timeouts.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use trellis_testkit::{TestServer, client::Client};

use crate::{cluster, host_to, proxy_with};

fn retry_policy(extra: &str) -> String {
    format!(
        "            retryPolicy:\n              maxRetries: 2\n              httpRetryEvents: [server-error, gateway-error, connect-failure]\n{extra}"
    )
}

#[tokio::test(start_paused = true)]
async fn one_failing_endpoint_of_three_is_invisible_with_retries() {
    let good = [TestServer::start("a").await, TestServer::start("b").await];
    let bad = TestServer::start("bad").await;
    bad.fail_with(503);
    let hosts = host_to("svc.test", "svc", &retry_policy(""));
    let clusters = cluster("svc", "HTTP1", &[good[0].addr, bad.addr, good[1].addr]);
    let proxy = proxy_with("v1", &hosts, &clusters, &[]).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    for i in 0..300 {
        let r = c.get("svc.test", "/").await.unwrap();
        assert_eq!(
            r.status,
            200,
            "request {i}: {:?}",
            r.header("x-trellis-error")
        );
    }
    assert!(
        bad.requests() >= 50,
        "the failing endpoint kept getting first tries"
    );
}

#[tokio::test(start_paused = true)]
async fn two_failing_endpoints_of_four_are_invisible_with_retries() {
    let a = TestServer::start("a").await;
    let b = TestServer::start("b").await;
    let bad = TestServer::start("bad").await;
    bad.fail_with(503);
    // A port with nothing listening: connects are refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let hosts = host_to("svc.test", "svc", &retry_policy(""));
    let clusters = cluster("svc", "HTTP1", &[a.addr, b.addr, bad.addr, dead]);
    let proxy = proxy_with("v1", &hosts, &clusters, &[]).await;

    let mut c = Client::h1(proxy.egress).await.unwrap();
    for i in 0..300 {
        let r = c.get("svc.test", "/").await.unwrap();
        assert_eq!(
            r.status,
            200,
            "request {i}: {:?} {:?}",
            r.header("x-trellis-error"),
            r.text()
        );
    }
    assert!(bad.requests() > 0, "the failing endpoint was tried");
    let retries = proxy
        .metric("trellis_proxy_retries_total", &[("cluster", "svc")])
        .await;
    assert!(
        retries >= bad.requests() as f64,
        "every failure was retried ({retries})"
    );
    let connect_errors = proxy
        .metric(
            "trellis_proxy_upstream_connect_errors_total",
            &[("cluster", "svc")],
        )
        .await;
    assert!(connect_errors > 0.0);
}

#[tokio::test]
async fn retry_budget_caps_retries_when_everything_fails() {
    let servers = [
        TestServer::start("x").await,
        TestServer::start("y").await,
        TestServer::start("z").await,
    ];
    for s in &servers {
        s.fail_with(503);
    }
    let policy = "            retryPolicy:\n              maxRetries: 5\n              httpRetryEvents: [gateway-error]\n              backoff: { baseInterval: 0.001s, maxInterval: 0.002s }\n              budget: { retryRatio: 0.2, minRetriesPerSecond: 1 }\n";
    let hosts = host_to("svc.test", "svc", policy);
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let proxy = proxy_with("v1", &hosts, &cluster("svc", "HTTP1", &addrs), &[]).await;

    const REQUESTS: usize = 200;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    for _ in 0..REQUESTS {
        let r = c.get("svc.test", "/").await.unwrap();
        assert_eq!(r.status, 503);
    }
    let sent: usize = servers.iter().map(TestServer::requests).sum();
    let retries = sent - REQUESTS;
    // Without a budget: 5 retries each = 1000. With it: 20% of requests plus 1/s over the 10 s
    // window (the test takes well under 10 s, but allow the floor for all of them).
    assert!(retries > 0, "retries happened");
    assert!(
        retries <= REQUESTS / 5 + 10,
        "budget exceeded: {retries} retries for {REQUESTS} requests"
    );
    let counted = proxy
        .metric("trellis_proxy_retries_total", &[("cluster", "svc")])
        .await;
    assert_eq!(
        counted as usize, retries,
        "the retry counter agrees with the upstreams"
    );
}

#[tokio::test(start_paused = true)]
async fn per_request_timeout_gives_504() {
    let slow = TestServer::start("slow").await;
    let hosts = host_to(
        "svc.test",
        "svc",
        "            timeout: { perRequest: 0.2s }\n",
    );
    let proxy = proxy_with("v1", &hosts, &cluster("svc", "HTTP1", &[slow.addr]), &[]).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    let req = Request::get("/")
        .header("host", "svc.test")
        .header("x-delay-ms", "3000");
    let r = c.send(req.body(Full::default()).unwrap()).await.unwrap();
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-trellis-error"), Some("request_timeout"));
    // A fast request on the same route is fine.
    let mut c = Client::h1(proxy.egress).await.unwrap();
    assert_eq!(c.get("svc.test", "/").await.unwrap().status, 200);
    let timeouts = proxy
        .metric("trellis_proxy_timeouts_total", &[("kind", "request")])
        .await;
    assert_eq!(timeouts, 1.0);
}

#[tokio::test(start_paused = true)]
async fn per_try_timeout_retries_on_another_endpoint() {
    let slow = TestServer::start("slow").await;
    slow.delay(5_000);
    let fast = TestServer::start("fast").await;
    let policy = retry_policy("              perTryTimeout: 0.5s\n");
    let hosts = host_to("svc.test", "svc", &policy);
    let proxy = proxy_with(
        "v1",
        &hosts,
        &cluster("svc", "HTTP1", &[slow.addr, fast.addr]),
        &[],
    )
    .await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    for _ in 0..6 {
        let r = c.get("svc.test", "/").await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "fast");
    }
    assert!(
        slow.requests() > 0,
        "round robin sent some first tries to the slow endpoint"
    );
    let per_try = proxy
        .metric("trellis_proxy_timeouts_total", &[("kind", "per_try")])
        .await;
    assert_eq!(per_try, slow.requests() as f64);
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_cuts_a_stalled_stream_but_not_a_live_one() {
    let app = TestServer::start("app").await;
    let hosts = host_to("svc.test", "svc", "            timeout: { idle: 0.3s }\n");
    let proxy = proxy_with("v1", &hosts, &cluster("svc", "HTTP1", &[app.addr]), &[]).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();

    let live = Request::get("/stream?chunks=5&gap_ms=50").header("host", "svc.test");
    let r = c.send(live.body(Full::default()).unwrap()).await.unwrap();
    assert_eq!(r.text().lines().count(), 5);

    let stalled = Request::get("/stream?chunks=3&gap_ms=2000").header("host", "svc.test");
    let mut c = Client::h1(proxy.egress).await.unwrap();
    let resp = c
        .send_streaming(stalled.body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "headers arrive before the body stalls");
    let body = resp.into_body().collect().await;
    assert!(body.is_err(), "the stalled body is cut");
    let idle = proxy
        .metric("trellis_proxy_timeouts_total", &[("kind", "idle")])
        .await;
    assert_eq!(idle, 1.0);
}

#[tokio::test]
async fn bodies_over_the_buffer_limit_are_sent_once() {
    let a = TestServer::start("a").await;
    let policy = retry_policy("              bufferLimitBytes: 1024\n");
    let hosts = host_to("svc.test", "svc", &policy);
    let proxy = proxy_with("v1", &hosts, &cluster("svc", "HTTP1", &[a.addr]), &[]).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    let post = |size: usize| {
        Request::post("/echo")
            .header("host", "svc.test")
            .header("x-status", "503")
            .body(Full::new(Bytes::from(vec![b'b'; size])))
            .unwrap()
    };
    let r = c.send(post(100)).await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.body.len(), 100, "the replayed body arrived whole");
    assert_eq!(a.requests(), 3, "small body: first try plus two retries");

    let r = c.send(post(100_000)).await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.body.len(), 100_000);
    assert_eq!(a.requests(), 4, "large body: sent once, not retried");
}

#[tokio::test]
async fn no_healthy_endpoint_is_503() {
    let app = TestServer::start("app").await;
    let clusters = format!(
        "  - name: svc\n    endpoints: [{{ address: \"{}\", health: DRAINING }}]\n",
        app.addr
    );
    let proxy = proxy_with("v1", &host_to("svc.test", "svc", ""), &clusters, &[]).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    let r = c.get("svc.test", "/").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-trellis-error"), Some("no_healthy_endpoint"));
    assert_eq!(app.requests(), 0, "draining endpoints get no new requests");
}

/// Hedging: with both endpoints answering in 300 ms and a per-try timeout of 200 ms, a GET is
/// answered (its first attempt goes on while the hedge starts beside it on the other endpoint),
/// where plain retries cancel each attempt at 200 ms and fail; a POST with a body is not hedged.
#[tokio::test(start_paused = true)]
async fn hedging_keeps_the_first_attempt_past_the_per_try_timeout() {
    let servers = [TestServer::start("a").await, TestServer::start("b").await];
    for s in &servers {
        s.delay(300);
    }
    let policy = |hedge: bool| {
        format!(
            "            retryPolicy:\n              maxRetries: 1\n              perTryTimeout: 0.2s\n              \
             httpRetryEvents: [gateway-error]\n              hedgeOnPerTryTimeout: {hedge}\n            \
             timeout: {{ perRequest: 2s }}\n"
        )
    };
    let hosts =
        host_to("hedge.test", "svc", &policy(true)) + &host_to("plain.test", "svc", &policy(false));
    let addrs = [servers[0].addr, servers[1].addr];
    let proxy = proxy_with("v1", &hosts, &cluster("svc", "HTTP1", &addrs), &[]).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();

    let r = c.get("hedge.test", "/").await.unwrap();
    assert_eq!(r.status, 200);
    let first = r.text();
    trellis_testkit::eventually(
        std::time::Duration::from_secs(5),
        "the hedge sent",
        || async {
            let got = [servers[0].requests(), servers[1].requests()];
            if got == [1, 1] {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .await;
    let retries = proxy
        .metric("trellis_proxy_retries_total", &[("cluster", "svc")])
        .await;
    assert_eq!(retries, 1.0, "the hedge counts as a retry");
    assert!(["a", "b"].contains(&first.as_str()));

    // Without hedging, each attempt is cut at 200 ms.
    let mut c = Client::h1(proxy.egress).await.unwrap();
    let r = c.get("plain.test", "/").await.unwrap();
    assert_eq!(r.status, 504, "{}", r.text());

    // A request with a body is retried as without hedging.
    let req = Request::post("/")
        .header("host", "hedge.test")
        .body(Full::new(Bytes::from_static(b"once")))
        .unwrap();
    let mut c = Client::h1(proxy.egress).await.unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 504);
}

/// A hedged request whose every attempt hangs ends when the last attempt's per-try timeout
/// does, also without a request timeout (nothing else would end it).
#[tokio::test(start_paused = true)]
async fn hedged_attempts_that_all_hang_end_at_the_last_per_try_timeout() {
    let servers = [TestServer::start("a").await, TestServer::start("b").await];
    for s in &servers {
        s.delay(600_000);
    }
    let policy = "            retryPolicy:\n              maxRetries: 1\n              perTryTimeout: 0.2s\n              \
                  httpRetryEvents: [gateway-error]\n              hedgeOnPerTryTimeout: true\n";
    let hosts = host_to("hedge.test", "svc", policy);
    let addrs = [servers[0].addr, servers[1].addr];
    let proxy = proxy_with("v1", &hosts, &cluster("svc", "HTTP1", &addrs), &[]).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    let start = tokio::time::Instant::now();
    let r = c.get("hedge.test", "/").await.unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    let took = start.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(400) && took < std::time::Duration::from_secs(60),
        "ended at the second attempt's per-try timeout: {took:?}"
    );
}
