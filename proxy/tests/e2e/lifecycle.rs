//! Reloads, rejected snapshots, graceful drain, admin endpoints and the access log.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use trellis_testkit::{ProxyProcess, TestServer, client::Client, eventually};

use crate::{BIN, cluster, host_to, process_with, snapshot};

fn two_way(version: &str, a: u32, b: u32, servers: &[&TestServer]) -> String {
    let hosts = format!(
        "      - name: svc\n        domains: ['svc.test']\n        routes:\n          - name: split\n            action: {{ weightedTargets: [{{ cluster: a, weight: {a} }}, {{ cluster: b, weight: {b} }}] }}\n"
    );
    let clusters =
        cluster("a", "HTTP1", &[servers[0].addr]) + &cluster("b", "HTTP1", &[servers[1].addr]);
    snapshot(version, &hosts, &clusters)
}

#[tokio::test]
async fn hundred_reloads_under_load_fail_no_request() {
    let a = TestServer::start("a").await;
    let b = TestServer::start("b").await;
    let proxy = ProxyProcess::start(BIN, &two_way("v0", 1, 0, &[&a, &b]), &[]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, egress) = (stop.clone(), ok.clone(), proxy.egress);
        load.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut c = Client::h1(egress).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                match c.get("svc.test", "/").await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        failures.push(format!("{} {:?}", r.status, r.header("x-trellis-error")))
                    }
                    Err(e) => {
                        failures.push(e.to_string());
                        c = Client::h1(egress).await.unwrap();
                    }
                }
            }
            failures
        }));
    }
    for i in 1..=100 {
        let (wa, wb) = if i % 2 == 0 { (1, 0) } else { (0, 1) };
        proxy.write_snapshot(&two_way(&format!("v{i}"), wa, wb, &[&a, &b]));
        proxy.signal("HUP");
        proxy.wait_version(&format!("v{i}")).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for t in load {
        failures.extend(t.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok.load(Ordering::Relaxed) > 100, "load ran throughout");
    assert!(
        a.requests() > 0 && b.requests() > 0,
        "both versions served traffic"
    );
    let applied = proxy
        .metric("trellis_proxy_snapshot_applied_total", &[])
        .await;
    assert!(applied >= 101.0, "applied {applied}");
}

#[tokio::test]
async fn a_request_finishes_on_the_snapshot_it_started_with() {
    let a = TestServer::start("a").await;
    let b = TestServer::start("b").await;
    a.delay(500);
    let proxy = ProxyProcess::start(BIN, &two_way("v-a", 1, 0, &[&a, &b]), &[]).await;
    let egress = proxy.egress;
    let slow = tokio::spawn(async move {
        let mut c = Client::h1(egress).await.unwrap();
        c.get("svc.test", "/").await.unwrap()
    });
    a.wait_requests(1).await;
    proxy.write_snapshot(&two_way("v-b", 0, 1, &[&a, &b]));
    proxy.signal("HUP");
    proxy.wait_version("v-b").await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    assert_eq!(
        c.get("svc.test", "/").await.unwrap().text(),
        "b",
        "new requests see v-b"
    );
    assert_eq!(
        slow.await.unwrap().text(),
        "a",
        "the request in flight finished on v-a"
    );
}

#[tokio::test]
async fn invalid_snapshot_is_rejected_and_the_old_one_keeps_serving() {
    let app = TestServer::start("app").await;
    let good = snapshot(
        "good",
        &host_to("svc.test", "svc", ""),
        &cluster("svc", "HTTP1", &[app.addr]),
    );
    let proxy = ProxyProcess::start(BIN, &good, &[]).await;

    let bad = snapshot(
        "bad",
        &host_to("svc.test", "missing", ""),
        &cluster("svc", "HTTP1", &[app.addr]),
    );
    proxy.write_snapshot(&bad);
    proxy.signal("HUP");
    eventually(Duration::from_secs(10), "rejection counted", || async {
        let n = proxy
            .metric("trellis_proxy_snapshot_rejected_total", &[])
            .await;
        if n >= 1.0 {
            Ok(())
        } else {
            Err(format!("rejected {n}"))
        }
    })
    .await;
    let (_, dump) = proxy.admin("/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["version"], "good");
    let why = dump["lastRejection"].as_str().unwrap();
    assert!(
        why.contains("listeners[0].virtualHosts[0].routes[0].action.weightedTargets[0].cluster: unknown cluster \"missing\""),
        "{why}"
    );
    // The log line is read from the process's stderr by another task: it may come in after the
    // counter moved.
    eventually(
        Duration::from_secs(10),
        "the log names the field",
        || async {
            if proxy.logs().contains("weightedTargets[0].cluster") {
                Ok(())
            } else {
                Err("not logged yet".to_string())
            }
        },
    )
    .await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    assert_eq!(c.get("svc.test", "/").await.unwrap().text(), "app");

    // A document that does not parse is rejected the same way.
    proxy.write_snapshot("version: [unclosed");
    proxy.signal("HUP");
    eventually(Duration::from_secs(10), "second rejection", || async {
        let n = proxy
            .metric("trellis_proxy_snapshot_rejected_total", &[])
            .await;
        if n >= 2.0 {
            Ok(())
        } else {
            Err(format!("rejected {n}"))
        }
    })
    .await;
    assert_eq!(proxy.version().await, "good");
    assert_eq!(c.get("svc.test", "/").await.unwrap().text(), "app");

    // Fixing the file is picked up without a signal.
    let fixed = snapshot(
        "fixed",
        &host_to("svc.test", "svc", ""),
        &cluster("svc", "HTTP1", &[app.addr]),
    );
    proxy.write_snapshot(&fixed);
    proxy.wait_version("fixed").await;
}

#[tokio::test]
async fn invalid_snapshot_at_start_exits_non_zero_naming_the_field() {
    let bad = snapshot(
        "bad",
        &host_to(
            "svc.test",
            "svc",
            "            retryPolicy: { maxRetries: 1000 }\n",
        ),
        &cluster("svc", "HTTP1", &[]),
    );
    let failed = ProxyProcess::try_start(BIN, &bad, &[]).await.unwrap_err();
    assert!(!failed.status.success());
    assert!(
        failed.stderr.contains(
            "listeners[0].virtualHosts[0].routes[0].retryPolicy.maxRetries: must be 0..=25"
        ),
        "{}",
        failed.stderr
    );
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish() {
    let app = TestServer::start("app").await;
    app.delay(700);
    let good = snapshot(
        "v1",
        &host_to("svc.test", "svc", ""),
        &cluster("svc", "HTTP1", &[app.addr]),
    );
    let mut proxy = ProxyProcess::start(BIN, &good, &[]).await;

    let egress = proxy.egress;
    let in_flight = tokio::spawn(async move {
        let mut c = Client::h1(egress).await.unwrap();
        c.get("svc.test", "/slow").await
    });
    app.wait_requests(1).await;
    proxy.signal("TERM");
    let reply = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "app");
    assert_eq!(
        reply.header("connection"),
        Some("close"),
        "keep-alive closed politely"
    );
    let status = proxy.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "clean exit after the drain: {status}");
    assert!(
        tokio::net::TcpStream::connect(egress).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn admin_endpoints_and_metrics_format() {
    let app = TestServer::start("app").await;
    let proxy = process_with(
        "v7",
        &host_to("svc.test", "svc", ""),
        &cluster("svc", "HTTP1", &[app.addr]),
        &[],
    )
    .await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    for _ in 0..3 {
        c.get("svc.test", "/some/path?id=1").await.unwrap();
    }
    c.get("nowhere.test", "/").await.unwrap();

    assert_eq!(proxy.admin("/ready").await.0, 200);
    assert_eq!(proxy.admin("/live").await.0, 200);
    assert_eq!(proxy.admin("/nope").await.0, 404);

    let (_, clusters) = proxy.admin("/clusters").await;
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    let ep = &clusters["clusters"][0]["endpoints"][0];
    assert_eq!(ep["address"], app.addr.to_string());
    assert_eq!(ep["inFlight"], 0);
    assert_eq!(ep["health"], "healthy");

    let (_, dump) = proxy.admin("/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["version"], "v7");
    assert_eq!(dump["snapshot"]["clusters"][0]["name"], "svc");

    let (_, metrics) = proxy.admin("/metrics").await;
    let ok = trellis_testkit::process::metric_value(
        &metrics,
        "trellis_proxy_requests_total",
        &[
            ("route", "svc.test-default"),
            ("cluster", "svc"),
            ("status_class", "2xx"),
        ],
    );
    assert_eq!(ok, 3.0);
    let no_route = trellis_testkit::process::metric_value(
        &metrics,
        "trellis_proxy_errors_total",
        &[("kind", "no_route")],
    );
    assert_eq!(no_route, 1.0);
    assert!(metrics.contains("trellis_proxy_snapshot_info{version=\"v7\"} 1"));
    assert!(!metrics.contains("/some/path"), "no raw paths in labels");

    // The exposition format passes promtool.
    trellis_testkit::process::promtool_check(&metrics);

    // Log level changes at runtime.
    let mut admin = Client::h1(proxy.admin).await.unwrap();
    let set = http::Request::post("/logging?level=debug")
        .header("host", "admin")
        .body(http_body_util::Full::default())
        .unwrap();
    assert_eq!(admin.send(set).await.unwrap().status, 200);
    assert_eq!(proxy.admin("/logging").await.1.trim(), "debug");
    let bad = http::Request::post("/logging?level=not%20a%20filter%3D%3D")
        .header("host", "admin")
        .body(http_body_util::Full::default())
        .unwrap();
    assert_eq!(admin.send(bad).await.unwrap().status, 400);
}

#[tokio::test]
async fn access_log_writes_one_json_line_per_request() {
    let app = TestServer::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let log_arg = log.to_str().unwrap().to_string();
    let proxy = process_with(
        "v1",
        &host_to("svc.test", "svc", ""),
        &cluster("svc", "HTTP1", &[app.addr]),
        &["--access-log", &log_arg],
    )
    .await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    c.get("svc.test", "/a?x=1").await.unwrap();
    c.get("nowhere.test", "/b").await.unwrap();
    let lines: Vec<serde_json::Value> =
        eventually(Duration::from_secs(10), "two log lines", || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if lines.len() == 2 {
                Ok(lines)
            } else {
                Err(format!("{} lines", lines.len()))
            }
        })
        .await;
    let first = &lines[0];
    assert_eq!(first["method"], "GET");
    assert_eq!(first["authority"], "svc.test");
    assert_eq!(first["path"], "/a?x=1");
    assert_eq!(first["status"], 200);
    assert_eq!(first["route"], "svc.test-default");
    assert_eq!(first["cluster"], "svc");
    assert_eq!(first["endpoint"], app.addr.to_string());
    assert_eq!(first["retries"], 0);
    assert!(first["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(lines[1]["status"], 404);
    assert_eq!(lines[1]["error"], "no_route");
}

#[tokio::test]
async fn a_client_leaving_mid_request_is_counted() {
    let app = TestServer::start("app").await;
    app.delay(5_000);
    let proxy = process_with(
        "v1",
        &host_to("svc.test", "svc", ""),
        &cluster("svc", "HTTP1", &[app.addr]),
        &[],
    )
    .await;
    // The client resets its connection while it waits. (One that only closes it cleanly looks
    // like a half-close, which still gets its response: see half_closed_clients_get_their_responses.)
    let mut s = tokio::net::TcpStream::connect(proxy.egress).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /slow HTTP/1.1\r\nHost: svc.test\r\n\r\n")
        .await
        .unwrap();
    app.wait_requests(1).await;
    s.set_zero_linger().unwrap();
    drop(s);
    eventually(
        Duration::from_secs(10),
        "the abandoned request is recorded",
        || async {
            let n = proxy
                .metric(
                    "trellis_proxy_errors_total",
                    &[("kind", "downstream_reset")],
                )
                .await;
            if n == 1.0 {
                Ok(())
            } else {
                Err(format!("{n}"))
            }
        },
    )
    .await;
    let client_closed = proxy
        .metric(
            "trellis_proxy_requests_total",
            &[("cluster", "svc"), ("status_class", "4xx")],
        )
        .await;
    assert_eq!(client_closed, 1.0);
}

/// `--idle-timeout`: a client connection that starts no request is closed, one that never
/// finishes its request head too, and a request slower than the timeout is not cut.
#[tokio::test]
async fn idle_client_connections_are_closed_but_slow_requests_finish() {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
    };
    let app = TestServer::start("app").await;
    let proxy = process_with(
        "v1",
        &host_to("svc.test", "app", ""),
        &cluster("app", "HTTP1", &[app.addr]),
        &["--idle-timeout", "200ms"],
    )
    .await;

    // Reads until the proxy closes the connection; panics if it stays open.
    async fn closed_by_proxy(mut s: TcpStream) {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the proxy kept an idle connection open");
    }

    let silent = TcpStream::connect(proxy.egress).await.unwrap();
    let mut half = TcpStream::connect(proxy.egress).await.unwrap();
    half.write_all(b"GET / HTTP/1.1\r\nHost: svc.test\r\n")
        .await
        .unwrap();

    let mut c = Client::h1(proxy.egress).await.unwrap();
    let slow = http::Request::get("/")
        .header("host", "svc.test")
        .header("x-delay-ms", "1000")
        .body(http_body_util::Full::default())
        .unwrap();
    let r = c.send(slow).await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "app"));

    closed_by_proxy(silent).await;
    closed_by_proxy(half).await;
}

/// At debug level every log line of a request carries its connection's and its own context:
/// listener and peer; method, path, snapshot version, route and cluster.
#[tokio::test]
async fn debug_logs_carry_connection_and_request_spans() {
    // Nothing listens there: the attempt fails and logs at debug level.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let hosts = host_to("svc.test", "svc", "");
    let proxy = process_with(
        "v7",
        &hosts,
        &cluster("svc", "HTTP1", &[dead]),
        &["--log", "trellis_proxy=debug"],
    )
    .await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    assert_eq!(c.get("svc.test", "/spanned").await.unwrap().status, 503);
    eventually(Duration::from_secs(10), "span fields in the log", || async {
        let logs = proxy.logs();
        let line = logs
            .lines()
            .find(|l| l.contains("upstream request failed"))
            .ok_or("no failure logged yet")?;
        for want in [
            "conn{listener=\"egress\" peer=127.0.0.1:",
            "request{method=GET path=\"/spanned\" version=\"v7\" route=\"svc.test-default\" cluster=\"svc\"}",
        ] {
            if !line.contains(want) {
                return Err(format!("{want:?} missing from {line:?}"));
            }
        }
        Ok(())
    })
    .await;
}

/// `trellis-proxy ready` (an ECS or Docker health check command) exits 0 for a proxy that
/// serves, and fails for one without a config yet or with nothing at the address.
#[tokio::test]
async fn the_ready_command_tells_a_serving_proxy() {
    let a = TestServer::start("a").await;
    let b = TestServer::start("b").await;
    let serving = ProxyProcess::start(BIN, &two_way("v0", 1, 0, &[&a, &b]), &[]).await;
    let ready = |admin: String| {
        std::process::Command::new(BIN)
            .args(["ready", "--admin-addr", &admin])
            .output()
            .unwrap()
    };
    let out = ready(serving.admin.to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let waiting = ProxyProcess::sidecar(BIN, "http://127.0.0.1:9", "default/app", dir.path()).await;
    let out = ready(waiting.admin.to_string());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not ready (503)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nothing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = nothing.local_addr().unwrap();
    drop(nothing);
    assert!(!ready(addr.to_string()).status.success());
}
