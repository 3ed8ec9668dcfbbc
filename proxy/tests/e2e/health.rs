//! Active health checks, on a paused clock: the proxy's checkers, its request path and the test
//! servers share the test's runtime, so probes every five seconds take no real time. Waits are
//! for what the proxy counted (a probe's count is taken after its verdict), never for a time.

use std::time::Duration;

use trellis_testkit::{
    TestServer,
    client::Client,
    eventually,
    grpc::{self, EchoRequest, GrpcServer},
};

use crate::{cluster, host_to, inprocess::InProcessProxy, proxy_with};

const PROBES: &str = "trellis_proxy_health_checks_total";
const UNHEALTHY: &str = "trellis_proxy_health_check_unhealthy";

async fn admin_clusters(proxy: &InProcessProxy) -> serde_json::Value {
    let mut admin = Client::h1(proxy.admin).await.unwrap();
    let r = admin.get("admin", "/clusters").await.unwrap();
    serde_json::from_slice(&r.body).unwrap()
}

/// The active health of every endpoint of the first cluster, in order.
async fn health(proxy: &InProcessProxy) -> Vec<String> {
    let v = admin_clusters(proxy).await;
    v["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["healthCheck"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until the proxy has counted `n` probes of `result` for `cluster`.
async fn probes(proxy: &InProcessProxy, cluster: &str, result: &str, n: u64) {
    eventually(Duration::from_secs(120), "probes counted", || async {
        let got = proxy
            .metric(PROBES, &[("cluster", cluster), ("result", result)])
            .await;
        if got >= n as f64 {
            Ok(())
        } else {
            Err(format!("{got} {result} probes of {n}"))
        }
    })
    .await;
}

async fn statuses(c: &mut Client, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(c.get("svc.test", "/").await.unwrap().status.as_u16());
    }
    out
}

fn with_health_check(name: &str, protocol: &str, servers: &[&TestServer], hc: &str) -> String {
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    format!("{}    healthCheck: {hc}\n", cluster(name, protocol, &addrs))
}

/// An endpoint failing its health check gets no request from the proxy's first verdict on (no
/// client error at all), comes back after healthyThreshold successes in a row, and after
/// unhealthyThreshold failures in a row it is out again: state in `/clusters` and metrics.
#[tokio::test(start_paused = true)]
async fn failing_endpoint_gets_no_traffic_and_returns_after_healthy_threshold() {
    let bad = TestServer::start("bad").await;
    let good = TestServer::start("good").await;
    bad.fail_with(503);
    let hc = "{ protocol: HTTP, path: /health, interval: 5s, timeout: 2s, healthyThreshold: 2, unhealthyThreshold: 3 }";
    let clusters = with_health_check("svc", "HTTP1", &[&bad, &good], hc);
    let proxy = proxy_with("v1", &host_to("svc.test", "svc", ""), &clusters, &[]).await;
    let labels = [("cluster", "svc")];

    // The first probe runs at once and its failure decides.
    probes(&proxy, "svc", "failure", 1).await;
    assert_eq!(health(&proxy).await, ["unhealthy", "healthy"]);
    assert_eq!(proxy.metric(UNHEALTHY, &labels).await, 1.0);
    let mut c = Client::h1(proxy.egress).await.unwrap();
    assert_eq!(statuses(&mut c, 10).await, [200; 10]);
    assert_eq!(bad.requests_to("/"), 0, "no request reached it");
    assert_eq!(good.requests_to("/"), 10);

    // Healthy again: one success is not enough, two are.
    bad.fail_with(0);
    let probed = bad.requests_to("/health");
    eventually(Duration::from_secs(60), "back to healthy", || async {
        let h = health(&proxy).await;
        if h == ["healthy", "healthy"] {
            Ok(())
        } else {
            Err(format!("{h:?}"))
        }
    })
    .await;
    assert!(
        bad.requests_to("/health") >= probed + 2,
        "healthy after two successes in a row, not one"
    );
    assert_eq!(proxy.metric(UNHEALTHY, &labels).await, 0.0);
    statuses(&mut c, 10).await;
    assert_eq!(bad.requests_to("/"), 5, "it gets its share again");

    // Failing again: still healthy after two failed probes, out after the third.
    let failures = proxy
        .metric(PROBES, &[("cluster", "svc"), ("result", "failure")])
        .await as u64;
    bad.fail_with(503);
    probes(&proxy, "svc", "failure", failures + 2).await;
    assert_eq!(health(&proxy).await, ["healthy", "healthy"]);
    probes(&proxy, "svc", "failure", failures + 3).await;
    assert_eq!(health(&proxy).await, ["unhealthy", "healthy"]);
    assert_eq!(proxy.metric(UNHEALTHY, &labels).await, 1.0);
    let reached = bad.requests_to("/");
    assert_eq!(statuses(&mut c, 10).await, [200; 10]);
    assert_eq!(bad.requests_to("/"), reached);

    // A config push that keeps the health check keeps its checker (and verdict); one without
    // it stops the probes and the endpoint takes requests again.
    proxy.apply(&crate::snapshot(
        "v2",
        &host_to("svc.test", "svc", ""),
        &clusters,
    ));
    assert_eq!(health(&proxy).await, ["unhealthy", "healthy"]);
    let addrs = [bad.addr, good.addr];
    proxy.apply(&crate::snapshot(
        "v3",
        &host_to("svc.test", "svc", ""),
        &cluster("svc", "HTTP1", &addrs),
    ));
    assert_eq!(proxy.metric(UNHEALTHY, &labels).await, 0.0);
    let probed = bad.requests_to("/health");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(bad.requests_to("/health"), probed, "no probes after v3");
    bad.fail_with(0);
    statuses(&mut c, 10).await;
    assert_eq!(bad.requests_to("/"), reached + 5);
}

/// TCP probes: an endpoint whose port is closed is out at once (no client sees its connect
/// error); with every endpoint out, the answer is 503 no_healthy_endpoint. The probed port can
/// be another than the endpoint's.
#[tokio::test(start_paused = true)]
async fn tcp_probes_and_a_probed_port_of_its_own() {
    let good = TestServer::start("good").await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let hc =
        "{ protocol: TCP, interval: 5s, timeout: 2s, healthyThreshold: 2, unhealthyThreshold: 2 }";
    let clusters = format!(
        "{}    healthCheck: {hc}\n",
        cluster("svc", "HTTP1", &[closed, good.addr])
    );
    let proxy = proxy_with("v1", &host_to("svc.test", "svc", ""), &clusters, &[]).await;
    probes(&proxy, "svc", "failure", 1).await;
    probes(&proxy, "svc", "success", 1).await;
    assert_eq!(health(&proxy).await, ["unhealthy", "healthy"]);
    let mut c = Client::h1(proxy.egress).await.unwrap();
    assert_eq!(statuses(&mut c, 6).await, [200; 6]);

    // The endpoint serves, but the probed port is closed: out, and nothing is left.
    let hc = format!(
        "{{ protocol: TCP, port: {}, interval: 5s, timeout: 2s, healthyThreshold: 2, unhealthyThreshold: 2 }}",
        closed.port()
    );
    let clusters = with_health_check("svc", "HTTP1", &[&good], &hc);
    let failures = proxy
        .metric(PROBES, &[("cluster", "svc"), ("result", "failure")])
        .await as u64;
    proxy.apply(&crate::snapshot(
        "v2",
        &host_to("svc.test", "svc", ""),
        &clusters,
    ));
    probes(&proxy, "svc", "failure", failures + 1).await;
    assert_eq!(health(&proxy).await, ["unhealthy"]);
    let r = c.get("svc.test", "/").await.unwrap();
    assert_eq!(r.status.as_u16(), 503);
    assert_eq!(
        r.headers
            .get("x-trellis-error")
            .and_then(|v| v.to_str().ok()),
        Some("no_healthy_endpoint")
    );
}

/// gRPC probes (grpc.health.v1.Health/Check): a server answering NOT_SERVING gets no calls.
#[tokio::test(start_paused = true)]
async fn grpc_probes_skip_a_server_that_is_not_serving() {
    let serving = GrpcServer::start("serving").await;
    let down = GrpcServer::start("down").await;
    down.set_serving(false);
    let hc =
        "{ protocol: GRPC, interval: 5s, timeout: 2s, healthyThreshold: 2, unhealthyThreshold: 2 }";
    let clusters = format!(
        "{}    healthCheck: {hc}\n",
        cluster("svc", "GRPC", &[down.addr, serving.addr])
    );
    let proxy = proxy_with("v1", &host_to("svc.test", "svc", ""), &clusters, &[]).await;
    probes(&proxy, "svc", "failure", 1).await;
    probes(&proxy, "svc", "success", 1).await;
    assert_eq!(health(&proxy).await, ["unhealthy", "healthy"]);
    assert!(down.health_checks() >= 1);
    let mut client = grpc::client_via(proxy.egress, "svc.test").await.unwrap();
    for i in 0..6 {
        let reply = client
            .unary(EchoRequest {
                message: format!("m{i}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.server, "serving");
    }
    assert_eq!(down.calls(), 0);
}

/// An endpoint that closes a kept probe connection as the next probe is sent (a server closing
/// idle keep-alive connections) is probed again on a new connection: no failure is counted.
#[tokio::test(start_paused = true)]
async fn a_kept_probe_connection_closed_by_the_endpoint_is_not_a_failure() {
    use trellis_testkit::{RawHttpServer, RawReply};
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    // The first probe is answered and its connection kept; the second is read and its
    // connection closed unanswered; the rest are answered.
    let server = RawHttpServer::start(vec![
        RawReply::keep(OK),
        RawReply::close(""),
        RawReply::keep(OK),
    ])
    .await;
    let hc = "{ protocol: HTTP, path: /health, interval: 5s, timeout: 2s, healthyThreshold: 1, unhealthyThreshold: 1 }";
    let clusters = format!(
        "{}    healthCheck: {hc}\n",
        cluster("svc", "HTTP1", &[server.addr])
    );
    let proxy = proxy_with("v1", &host_to("svc.test", "svc", ""), &clusters, &[]).await;
    probes(&proxy, "svc", "success", 3).await;
    assert_eq!(
        proxy
            .metric(PROBES, &[("cluster", "svc"), ("result", "failure")])
            .await,
        0.0
    );
    assert_eq!(health(&proxy).await, ["healthy"]);
    assert!(
        server.requests().len() >= 4,
        "the unanswered probe was sent"
    );
    assert_eq!(
        server.connections(),
        2,
        "one new connection, after the close"
    );
}
