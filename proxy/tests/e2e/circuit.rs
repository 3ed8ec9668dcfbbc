//! Outlier detection and connection pool limits (circuit breaking), on a paused clock: the
//! proxy, its timers and the test servers share the test's runtime, so an ejection of ten
//! seconds ends exactly when virtual time reaches it.

use std::time::Duration;

use tokio::time::Instant;
use trellis_testkit::{TestServer, client::Client};

use crate::{cluster, host_to, inprocess::InProcessProxy, proxy_with};

/// A cluster entry with `extra` cluster fields (indented 4).
fn cluster_with(name: &str, protocol: &str, servers: &[&TestServer], extra: &str) -> String {
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    format!("{}{extra}", cluster(name, protocol, &addrs))
}

async fn statuses(c: &mut Client, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(c.get("svc.test", "/").await.unwrap().status.as_u16());
    }
    out
}

async fn admin_clusters(proxy: &InProcessProxy) -> serde_json::Value {
    let mut admin = Client::h1(proxy.admin).await.unwrap();
    let r = admin.get("admin", "/clusters").await.unwrap();
    serde_json::from_slice(&r.body).unwrap()
}

/// The `ejected` flag of every endpoint of the first cluster, in order.
async fn ejected(proxy: &InProcessProxy) -> Vec<bool> {
    let v = admin_clusters(proxy).await;
    v["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ejected"].as_bool().unwrap())
        .collect()
}

/// An endpoint answering 500 is ejected after maxServerErrors in a row, gets no requests while
/// ejected, and gets them again when the ejection ends; a second ejection lasts twice as long.
#[tokio::test(start_paused = true)]
async fn failing_endpoint_is_ejected_and_returns_after_the_ejection_time() {
    let bad = TestServer::start("bad").await;
    let good = TestServer::start("good").await;
    bad.fail_with(500);
    let od = "    outlierDetection: { maxServerErrors: 3, interval: 1s, baseEjectionDuration: 10s, maxEjectionPercent: 50 }\n";
    let clusters = cluster_with("svc", "HTTP1", &[&bad, &good], od);
    let proxy = proxy_with("v1", &host_to("svc.test", "svc", ""), &clusters, &[]).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();

    // Round robin: the bad endpoint gets every other request until its third 500 ejects it.
    assert_eq!(statuses(&mut c, 5).await, [500, 200, 500, 200, 500]);
    assert_eq!(bad.requests(), 3);
    assert_eq!(ejected(&proxy).await, [true, false]);
    let labels = [("cluster", "svc")];
    assert_eq!(
        proxy
            .metric("trellis_proxy_outlier_ejections_total", &labels)
            .await,
        1.0
    );
    assert_eq!(
        proxy.metric("trellis_proxy_outlier_ejected", &labels).await,
        1.0
    );
    let ejected_at = Instant::now();

    // Ejected: every request goes to the good endpoint, up to just before the ten seconds.
    assert_eq!(statuses(&mut c, 6).await, [200; 6]);
    tokio::time::sleep_until(ejected_at + Duration::from_millis(9_990)).await;
    assert_eq!(statuses(&mut c, 4).await, [200; 4]);
    assert_eq!(bad.requests(), 3, "no request reached the ejected endpoint");

    // Ten seconds on it is back (and has recovered).
    bad.fail_with(0);
    tokio::time::sleep_until(ejected_at + Duration::from_millis(10_001)).await;
    assert_eq!(ejected(&proxy).await, [false, false]);
    assert_eq!(
        proxy.metric("trellis_proxy_outlier_ejected", &labels).await,
        0.0
    );
    statuses(&mut c, 4).await;
    assert_eq!(bad.requests(), 5, "it gets its share again");

    // Failing again at once: the second ejection lasts 2 × 10 s.
    bad.fail_with(500);
    while !ejected(&proxy).await[0] {
        c.get("svc.test", "/").await.unwrap();
    }
    let again = Instant::now();
    let before = bad.requests();
    tokio::time::sleep_until(again + Duration::from_millis(19_990)).await;
    statuses(&mut c, 4).await;
    assert_eq!(bad.requests(), before, "still ejected after 19.99 s");
    tokio::time::sleep_until(again + Duration::from_millis(20_001)).await;
    statuses(&mut c, 4).await;
    assert_eq!(bad.requests(), before + 2, "back after 20 s");
    assert_eq!(
        proxy
            .metric("trellis_proxy_outlier_ejections_total", &labels)
            .await,
        2.0
    );
}

/// With every endpoint failing, no more than maxEjectionPercent of them are ejected: of two at
/// 50 %, one; the other keeps serving (its 500s reach the client, never a 503 for want of an
/// endpoint).
#[tokio::test(start_paused = true)]
async fn ejections_never_exceed_max_ejection_percent() {
    let a = TestServer::start("a").await;
    let b = TestServer::start("b").await;
    a.fail_with(500);
    b.fail_with(500);
    let od = "    outlierDetection: { maxServerErrors: 2, interval: 1s, baseEjectionDuration: 30s, maxEjectionPercent: 50 }\n";
    let clusters = cluster_with("svc", "HTTP1", &[&a, &b], od);
    let proxy = proxy_with("v1", &host_to("svc.test", "svc", ""), &clusters, &[]).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    assert_eq!(statuses(&mut c, 20).await, [500; 20]);
    let flags = ejected(&proxy).await;
    assert_eq!(flags.iter().filter(|e| **e).count(), 1, "{flags:?}");
    assert_eq!(a.requests() + b.requests(), 20);
    let labels = [("cluster", "svc")];
    assert_eq!(
        proxy
            .metric("trellis_proxy_outlier_ejections_total", &labels)
            .await,
        1.0
    );
    assert_eq!(
        proxy.metric("trellis_proxy_outlier_ejected", &labels).await,
        1.0
    );
}

/// Sends `n` requests at once, each on its own client connection; returns (status, error kind,
/// when it ended).
async fn concurrent(proxy: &InProcessProxy, n: usize) -> Vec<(u16, Option<String>, Duration)> {
    let start = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(Client::h1(proxy.egress).await.unwrap());
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let r = c.get("svc.test", "/").await.unwrap();
                let kind = r.header("x-trellis-error").map(str::to_string);
                (r.status.as_u16(), kind, start.elapsed())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// maxConnections 2 and maxPendingRequests 1 with a slow upstream and 10 requests at once: two
/// take the connections, one waits for a connection and is served when one is free (after the
/// first two, at 2 s), the other seven are refused at once with 503 overflow. The upstream never
/// sees a third connection.
#[tokio::test(start_paused = true)]
async fn pool_limits_overflow_at_once_and_bound_connections() {
    let slow = TestServer::start("slow").await;
    slow.delay(1000);
    let pool = "    connectionPool: { maxConnections: 2, maxPendingRequests: 1 }\n";
    let clusters = cluster_with("svc", "HTTP1", &[&slow], pool);
    let proxy = proxy_with("v1", &host_to("svc.test", "svc", ""), &clusters, &[]).await;
    let results = concurrent(&proxy, 10).await;

    let ok: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    let overflow: Vec<_> = results
        .iter()
        .filter(|r| r.0 == 503 && r.1.as_deref() == Some("overflow"))
        .collect();
    assert_eq!((ok.len(), overflow.len()), (3, 7), "{results:?}");
    for r in &overflow {
        assert_eq!(
            r.2,
            Duration::ZERO,
            "overflow is answered at once: {results:?}"
        );
    }
    let mut served: Vec<_> = ok.iter().map(|r| r.2.as_millis()).collect();
    served.sort_unstable();
    assert!(
        served[..2].iter().all(|ms| (1000..1010).contains(ms)) && (2000..2020).contains(&served[2]),
        "two at 1 s, the waiting one at 2 s: {served:?}"
    );
    assert_eq!(slow.requests(), 3);
    assert_eq!(slow.connections(), 2, "never more than maxConnections");
    let labels = [("cluster", "svc")];
    assert_eq!(
        proxy
            .metric("trellis_proxy_upstream_overflow_total", &labels)
            .await,
        7.0
    );
    assert_eq!(
        proxy
            .metric("trellis_proxy_errors_total", &[("kind", "overflow")])
            .await,
        7.0
    );

    // Once the burst is over, the pooled connections serve new requests without new ones.
    let again = concurrent(&proxy, 2).await;
    assert!(again.iter().all(|r| r.0 == 200), "{again:?}");
    assert_eq!(slow.connections(), 2);
}

/// An HTTP/2 cluster's maxRequests bounds the requests in flight: the excess is refused at once.
#[tokio::test(start_paused = true)]
async fn http2_max_requests_overflow_at_once() {
    let slow = TestServer::start("slow").await;
    slow.delay(1000);
    let pool = "    connectionPool: { maxRequests: 2 }\n";
    let clusters = cluster_with("svc", "HTTP2", &[&slow], pool);
    let proxy = proxy_with("v1", &host_to("svc.test", "svc", ""), &clusters, &[]).await;
    let results = concurrent(&proxy, 5).await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let overflow: Vec<_> = results
        .iter()
        .filter(|r| r.0 == 503 && r.1.as_deref() == Some("overflow"))
        .collect();
    assert_eq!((ok, overflow.len()), (2, 3), "{results:?}");
    assert!(
        overflow.iter().all(|r| r.2 == Duration::ZERO),
        "{results:?}"
    );
    assert_eq!(slow.requests(), 2);
}
