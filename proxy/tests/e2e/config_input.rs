//! Snapshot files that are empty, half-written, unreadable or hostile never stall or blank the
//! proxy: they are refused whole, counted, shown in `/config_dump`, and traffic goes on.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use std::time::Duration;

use trellis_testkit::{ProxyProcess, TestServer, client::Client, eventually};

use crate::{BIN, cluster, host_to, snapshot};

fn good(version: &str, app: &TestServer) -> String {
    snapshot(
        version,
        &host_to("svc.test", "svc", ""),
        &cluster("svc", "HTTP1", &[app.addr]),
    )
}

/// GETs through the egress until stopped; returns (successes, failures).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Load {
    fn start(proxy: &ProxyProcess) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let (s, o, egress) = (stop.clone(), ok.clone(), proxy.egress);
        let task = tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut c = Client::h1(egress).await.unwrap();
            while !s.load(Ordering::Relaxed) {
                match c.get("svc.test", "/").await {
                    Ok(r) if r.status == 200 => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        failures.push(format!("{} {:?}", r.status, r.header("x-trellis-error")))
                    }
                    Err(e) => {
                        failures.push(e.to_string());
                        c = Client::h1(egress).await.unwrap();
                    }
                }
                tokio::task::yield_now().await;
            }
            failures
        });
        Self { stop, ok, task }
    }

    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self.task.await.unwrap();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

async fn last_rejection(proxy: &ProxyProcess) -> String {
    let (_, dump) = proxy.admin("/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    dump["lastRejection"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits until the last rejection `/config_dump` shows contains `why`. A file written in place
/// is truncated before it is written: a reload may catch it empty first (one more rejection),
/// so what a test waits for is the reason its final content is refused with, not a count.
async fn wait_rejection(proxy: &ProxyProcess, why: &str) {
    eventually(Duration::from_secs(10), "snapshot rejected", || async {
        let last = last_rejection(proxy).await;
        if last.contains(why) {
            Ok(())
        } else {
            Err(format!("last rejection {last:?}, want {why:?}"))
        }
    })
    .await
}

#[tokio::test]
async fn a_snapshot_file_rewritten_in_place_never_drops_traffic() {
    let app = TestServer::start("app").await;
    let proxy = ProxyProcess::start(BIN, &good("v1", &app), &["--workers", "1"]).await;
    let load = Load::start(&proxy);

    // The writer truncates first: the proxy sees an empty file.
    proxy.write_snapshot_in_place(b"");
    wait_rejection(&proxy, "the file is empty").await;
    assert_eq!(proxy.admin("/ready").await.0, 200);
    assert_eq!(proxy.version().await, "v1");

    // Then half of the new file.
    let next = good("v2", &app);
    let cut = next.find("clusters:").unwrap() + 4;
    proxy.write_snapshot_in_place(&next.as_bytes()[..cut]);
    wait_rejection(&proxy, "simple key expected").await;
    assert_eq!(proxy.admin("/ready").await.0, 200);
    assert_eq!(proxy.version().await, "v1");

    // A snapshot cut before its listeners parses, but is refused: it would serve nothing.
    let cut = next.find("listeners:").unwrap();
    proxy.write_snapshot_in_place(&next.as_bytes()[..cut]);
    wait_rejection(&proxy, "listeners: missing: the file may be truncated").await;
    // Each refusal counted (a reload that caught a file empty counts once more).
    let rejected = proxy
        .metric("trellis_proxy_snapshot_rejected_total", &[])
        .await;
    assert!(rejected >= 3.0, "{rejected}");

    // The whole file, at last.
    proxy.write_snapshot_in_place(next.as_bytes());
    proxy.wait_version("v2").await;
    let (ok, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(ok > 0, "load ran");
}

#[tokio::test]
async fn unreadable_snapshot_files_are_counted_and_shown() {
    let app = TestServer::start("app").await;
    let proxy = ProxyProcess::start(BIN, &good("v1", &app), &[]).await;
    proxy.write_snapshot_in_place(&[0xff, 0xfe, 0x00, 0x01, b'\n', 0x80]);
    wait_rejection(&proxy, "not UTF-8 text").await;
    assert_eq!(proxy.version().await, "v1");
    let mut c = Client::h1(proxy.egress).await.unwrap();
    assert_eq!(c.get("svc.test", "/").await.unwrap().text(), "app");
}

#[tokio::test]
async fn deeply_nested_input_is_refused_before_parsing_and_traffic_goes_on() {
    let app = TestServer::start("app").await;
    // One worker: a parse on the serving thread would stop the data plane.
    let proxy = ProxyProcess::start(BIN, &good("v1", &app), &["--workers", "1"]).await;
    let load = Load::start(&proxy);
    proxy.write_snapshot_in_place("[".repeat(100_000).as_bytes());
    wait_rejection(&proxy, "(document): line 1: nested deeper than 64 levels").await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    assert_eq!(c.get("svc.test", "/").await.unwrap().text(), "app");
    let (ok, failures) = load.stop().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok > 0);
}

#[tokio::test]
async fn a_snapshot_without_listeners_is_refused_unless_explicit_and_never_ready() {
    let failed = ProxyProcess::try_start(BIN, "version: v1\nclusters: []\n", &[])
        .await
        .expect_err("a snapshot without listeners is refused at start");
    assert!(
        failed
            .stderr
            .contains("listeners: missing: the file may be truncated"),
        "{}",
        failed.stderr
    );
    let failed = ProxyProcess::try_start(BIN, "", &[])
        .await
        .expect_err("an empty file is refused at start");
    assert!(
        failed.stderr.contains("the file is empty"),
        "{}",
        failed.stderr
    );

    // Said on purpose: accepted, but the proxy is not ready while no listener serves.
    let proxy = ProxyProcess::start(BIN, "version: v1\nlisteners: []\n", &[]).await;
    proxy.wait_version("v1").await;
    assert_eq!(proxy.admin("/ready").await.0, 503);
}
