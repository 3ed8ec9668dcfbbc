//! Deadlines, backoff, the retry budget and idle timeouts on a paused clock: the proxy runs in
//! the test's runtime, so its timers fire exactly when virtual time reaches them and a test of
//! a ten-second timeout takes no ten seconds. (Virtual time only moves when every task waits,
//! so these bounds are exact, not wall-clock guesses.)

use std::time::Duration;

use http::Request;
use http_body_util::Full;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use trellis_testkit::{TestServer, client::Client};

use crate::{cluster, host_to, proxy_with};

fn retry(extra: &str) -> String {
    format!("            retryPolicy:\n              maxRetries: 25\n{extra}")
}

async fn get(c: &mut Client) -> (u16, Option<String>, Duration) {
    let start = Instant::now();
    let r = c
        .send(
            Request::get("/")
                .header("host", "svc.test")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let kind = r.header("x-trellis-error").map(str::to_string);
    (r.status.as_u16(), kind, start.elapsed())
}

/// Within `slack` after `at` (the timer wheel rounds up to the millisecond).
fn at(elapsed: Duration, at: Duration) {
    let slack = Duration::from_millis(5);
    assert!(
        elapsed >= at && elapsed <= at + slack,
        "ended after {elapsed:?}, want {at:?}"
    );
}

/// The request deadline bounds everything: per-try timeouts, retries and backoff. Three tries
/// of one second fit in 2.5 s (backoff ≤ 0.1 s each); the request ends at 2.5 s, not at the
/// end of a try.
#[tokio::test(start_paused = true)]
async fn request_deadline_bounds_tries_and_backoff() {
    let slow = TestServer::start("slow").await;
    slow.delay(60_000);
    let policy = retry(
        "              perTryTimeout: 1s\n              backoff: { baseInterval: 0.1s, maxInterval: 0.1s }\n            timeout: { perRequest: 2.5s }\n",
    );
    let hosts = host_to("svc.test", "svc", &policy);
    let proxy = proxy_with("v1", &hosts, &cluster("svc", "HTTP1", &[slow.addr]), &[]).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    let (status, kind, elapsed) = get(&mut c).await;
    assert_eq!((status, kind.as_deref()), (504, Some("request_timeout")));
    at(elapsed, Duration::from_millis(2500));
    assert_eq!(slow.requests(), 3, "tries at 0 s, 1–1.1 s and 2–2.2 s");
    for (kind, want) in [("per_try", 2.0), ("request", 1.0)] {
        let got = proxy
            .metric("trellis_proxy_timeouts_total", &[("kind", kind)])
            .await;
        assert_eq!(got, want, "{kind} timeouts");
    }
}

/// Without a request deadline, each try gets its own per-try timeout and the last one's ends
/// the request: 3 tries of 1 s plus two backoffs of at most 0.1 s.
#[tokio::test(start_paused = true)]
async fn per_try_timeouts_end_the_request_after_the_last_try() {
    let slow = TestServer::start("slow").await;
    slow.delay(60_000);
    let policy = "            retryPolicy:\n              maxRetries: 2\n              perTryTimeout: 1s\n              backoff: { baseInterval: 0.1s, maxInterval: 0.1s }\n";
    let hosts = host_to("svc.test", "svc", policy);
    let proxy = proxy_with("v1", &hosts, &cluster("svc", "HTTP1", &[slow.addr]), &[]).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    let (status, kind, elapsed) = get(&mut c).await;
    assert_eq!((status, kind.as_deref()), (504, Some("per_try_timeout")));
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed <= Duration::from_millis(3205),
        "{elapsed:?}"
    );
    assert_eq!(slow.requests(), 3);
}

/// Backoff waits between tries, up to the exponential ceiling capped at `maxInterval`: with a
/// base of 1 s and a cap of 1.5 s, three retries wait at most 1 + 1.5 + 1.5 s (uncapped the
/// ceilings would be 1, 2 and 4 s), and with full jitter about half that on average.
#[tokio::test(start_paused = true)]
async fn backoff_is_jittered_under_a_capped_exponential_ceiling() {
    fastrand::seed(7);
    let bad = TestServer::start("bad").await;
    bad.fail_with(503);
    let policy = "            retryPolicy:\n              maxRetries: 3\n              httpRetryEvents: [server-error]\n              backoff: { baseInterval: 1s, maxInterval: 1.5s }\n";
    let hosts = host_to("svc.test", "svc", policy);
    let proxy = proxy_with("v1", &hosts, &cluster("svc", "HTTP1", &[bad.addr]), &[]).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    let mut total = Duration::ZERO;
    let rounds = 40;
    for _ in 0..rounds {
        let (status, _, elapsed) = get(&mut c).await;
        assert_eq!(status, 503);
        assert!(elapsed <= Duration::from_millis(4005), "{elapsed:?}");
        total += elapsed;
    }
    assert_eq!(bad.requests(), rounds * 4);
    let mean = total / rounds as u32;
    // Full jitter over ceilings summing to 4 s averages 2 s.
    assert!(
        mean >= Duration::from_millis(1200) && mean <= Duration::from_millis(2800),
        "mean {mean:?}"
    );
}

/// The retry budget: with no ratio and a floor of 1 retry per second over its 10 s window, 10
/// retries are allowed, then none until the window has moved on.
#[tokio::test(start_paused = true)]
async fn retry_budget_refills_as_its_window_moves() {
    let bad = TestServer::start("bad").await;
    bad.fail_with(503);
    let policy = "            retryPolicy:\n              maxRetries: 3\n              httpRetryEvents: [server-error]\n              backoff: { baseInterval: 0.001s, maxInterval: 0.001s }\n              budget: { retryRatio: 0, minRetriesPerSecond: 1 }\n";
    let hosts = host_to("svc.test", "svc", policy);
    let proxy = proxy_with("v1", &hosts, &cluster("svc", "HTTP1", &[bad.addr]), &[]).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    for _ in 0..10 {
        assert_eq!(get(&mut c).await.0, 503);
    }
    let first = bad.requests();
    assert_eq!(
        first,
        10 + 10,
        "10 first tries and the 10 retries the floor allows"
    );
    tokio::time::advance(Duration::from_secs(11)).await;
    for _ in 0..10 {
        assert_eq!(get(&mut c).await.0, 503);
    }
    assert_eq!(
        bad.requests() - first,
        20,
        "the budget is back once the window moved on"
    );
}

/// A client connection without a request in flight is closed at the idle timeout, counted
/// from its last exchange.
#[tokio::test(start_paused = true)]
async fn idle_client_connections_close_at_the_idle_timeout() {
    let app = TestServer::start("app").await;
    let hosts = host_to("svc.test", "svc", "");
    let proxy = proxy_with(
        "v1",
        &hosts,
        &cluster("svc", "HTTP1", &[app.addr]),
        &["--idle-timeout", "30s"],
    )
    .await;
    let start = Instant::now();
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    // A request at 20 s keeps the connection: it is idle again from then.
    tokio::time::sleep(Duration::from_secs(20)).await;
    s.write_all(b"GET / HTTP/1.1\r\nhost: svc.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Then nothing: closed at 20 + 30 s.
    let n = s.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "closed, nothing more sent");
    at(start.elapsed(), Duration::from_secs(50));
}

/// A CONNECT tunnel ends after its route's idle timeout without a byte either way, counted from
/// the last byte.
#[tokio::test(start_paused = true)]
async fn connect_tunnels_end_at_their_routes_idle_timeout() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let db = trellis_testkit::TcpEchoServer::start("db-1").await;
    let snapshot = format!(
        "version: v1\nlisteners:\n  - name: egress\n    role: EGRESS\n    virtualHosts:\n      - name: db\n        domains: ['db.test:5432']\n        routes:\n          - name: tunnel\n            action: {{ weightedTargets: [{{ cluster: db, weight: 1 }}] }}\n            timeout: {{ idle: 30s }}\nclusters:\n{}",
        cluster("db", "TCP_ONLY", &[db.addr])
    );
    let proxy = crate::inprocess::InProcessProxy::start(&snapshot, Duration::from_secs(3600)).await;
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(b"CONNECT db.test:5432 HTTP/1.1\r\nHost: db.test:5432\r\n\r\n")
        .await
        .unwrap();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    while line != "\r\n" {
        line.clear();
        reader.read_line(&mut line).await.unwrap();
    }
    line.clear();
    reader.read_line(&mut line).await.unwrap();
    assert_eq!(line, "db-1\n", "the greeting through the tunnel");
    // Bytes at 20 s keep it open; then nothing: it ends 30 s after them.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let start = Instant::now();
    reader.get_mut().write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    reader.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(600), reader.read_to_end(&mut rest))
        .await
        .expect("the tunnel ends")
        .unwrap();
    assert!(rest.is_empty());
    at(start.elapsed(), Duration::from_secs(30));
}
