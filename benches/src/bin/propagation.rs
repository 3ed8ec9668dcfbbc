//! Config propagation benchmark: a real trellis-control, N lightweight proxies speaking the real
//! config-stream protocol (hello, ACK every push), and the time from `apply` to every proxy
//! having received and ACKed the new snapshot. Also the control plane's memory per proxy.
//!
//! cargo build --release -p trellis-control -p trellis-benches
//! target/release/propagation 100 1000
//! target/release/propagation --etcd 1000 10000   # 3 replicas on a 3-member etcd

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::{
    io::AsyncBufReadExt as _,
    sync::{Notify, mpsc},
};
use trellis_proto::v1::{
    Ack, Hello, ProxyMessage, config_stream_client::ConfigStreamClient, proxy_message::Kind as Msg,
};

// The CLI's own API client and demo manifests, shared by path (they are not in the library).
#[path = "../../../control-plane/src/bin/trellis/client.rs"]
#[allow(dead_code)]
mod client;
#[path = "../../../control-plane/src/bin/trellis/manifests.rs"]
mod manifests;

use client::ApiClient;
use manifests::{MESH, router_manifest};
const ROUNDS: usize = 7;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn proxy(
    url: String,
    fleet: (Arc<AtomicUsize>, Arc<Notify>),
    i: usize,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await?;
    let mut client = ConfigStreamClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(ProxyMessage {
        kind: Some(Msg::Hello(Hello {
            node: "default/front".into(),
            kind: 0,
            proxy_version: "bench".into(),
            applied_version: String::new(),
            instance: format!("bench-{i}"),
            ..Default::default()
        })),
    })
    .await?;
    let out =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut inbound = client.stream(out).await?.into_inner();
    while let Some(push) = inbound.message().await? {
        let version = push.snapshot.map(|s| s.version).unwrap_or_default();
        tx.send(ProxyMessage {
            kind: Some(Msg::Ack(Ack {
                nonce: push.nonce,
                version,
            })),
        })
        .await?;
        fleet.0.fetch_add(1, Ordering::SeqCst);
        fleet.1.notify_one();
    }
    Ok(())
}

/// A running trellis-control: its pid and URL.
struct Replica {
    child: tokio::process::Child,
    pid: u32,
    url: String,
}

async fn start_control(
    control_bin: &PathBuf,
    data: &std::path::Path,
    store: &[String],
) -> anyhow::Result<Replica> {
    let mut child = tokio::process::Command::new(control_bin)
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--log",
            "warn,trellis_control=info",
        ])
        .args(store)
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("no pid")?;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().context("no stderr")?).lines();
    let addr = loop {
        let line = lines.next_line().await?.context("trellis-control exited")?;
        if let Some(a) = line.split("addr=").nth(1) {
            break a.trim().to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Replica {
        child,
        pid,
        url: format!("http://{addr}"),
    })
}

/// Every replica's connected proxies, and how many are in sync.
async fn fleet_status(apis: &[ApiClient]) -> anyhow::Result<(usize, usize)> {
    let (mut connected, mut synced) = (0, 0);
    for api in apis {
        // Each replica's own proxies (its plain status counts the others' too).
        let s = api.get("/v1/status?local=true").await?;
        let proxies = s["proxies"].as_array().cloned().unwrap_or_default();
        connected += proxies.len();
        synced += proxies
            .iter()
            .filter(|p| !p["desiredVersion"].is_null() && p["desiredVersion"] == p["ackedVersion"])
            .count();
    }
    Ok((connected, synced))
}

async fn run(
    n: usize,
    control_bin: &PathBuf,
    etcd: Option<&trellis_testkit::etcd::EtcdCluster>,
) -> anyhow::Result<()> {
    let data = std::env::temp_dir().join(format!("trellis-propagation-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let store = match etcd {
        Some(e) => vec![
            "--store".to_string(),
            e.url(),
            "--etcd-prefix".into(),
            format!("/bench-{}-{n}/", std::process::id()),
        ],
        None => Vec::new(),
    };
    let mut replicas = Vec::new();
    for r in 0..if etcd.is_some() { 3 } else { 1 } {
        replicas.push(start_control(control_bin, &data.join(r.to_string()), &store).await?);
    }
    let apis: Vec<ApiClient> = replicas
        .iter()
        .map(|r| ApiClient::new(&r.url))
        .collect::<Result<_, _>>()?;
    let api = &apis[0];
    api.post("/v1/apply", MESH.as_bytes().to_vec()).await?;
    for (i, v) in ["blue", "green", "red"].iter().enumerate() {
        let body = serde_json::json!({"namespace": "demo", "service": "colorteller", "id": v, "address": "127.0.0.1", "port": 20000 + i, "attributes": {"version": v}});
        api.post("/v1/instances", serde_json::to_vec(&body)?)
            .await?;
    }
    let rss = |rs: &[Replica]| rs.iter().map(|r| rss_kib(r.pid)).sum::<u64>();
    let idle_rss = rss(&replicas);

    // Pushes received (and ACKed) by all proxies since the last reset.
    let received = Arc::new(AtomicUsize::new(0));
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let notify = Arc::new(Notify::new());
    for i in 0..n {
        let f = (received.clone(), notify.clone());
        // Spread over the replicas; on a failed or ended stream, the next one after a pause
        // (200 ms, growing, jittered: as real proxies), as long as the benchmark runs.
        let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
        let stopping = stopping.clone();
        tokio::spawn(async move {
            let mut failures = 0u64;
            loop {
                let url = urls[(i + failures as usize) % urls.len()].clone();
                let result = proxy(url, f.clone(), i).await;
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                failures += 1;
                if failures == 50 {
                    eprintln!("proxy {i}: gave up: {result:?}");
                    return;
                }
                let pause = 200 * failures.min(10);
                tokio::time::sleep(Duration::from_millis(
                    pause / 2 + fastrand::u64(..=pause / 2),
                ))
                .await;
            }
        });
    }
    // Wait for every proxy to be connected and in sync.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, synced) = fleet_status(&apis).await?;
        if synced == n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {synced}/{n} proxies synced");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connected_rss = rss(&replicas);

    let mut acks = Vec::new();
    for round in 0..ROUNDS {
        let w = [
            (90, 10, 0),
            (50, 50, 0),
            (10, 90, 0),
            (0, 50, 50),
            (34, 33, 33),
            (0, 0, 100),
            (100, 0, 0),
        ][round % 7];
        received.store(0, Ordering::SeqCst);
        let start = Instant::now();
        api.post("/v1/apply", router_manifest(w).into_bytes())
            .await?;
        // Client view: every proxy received the push and sent its ACK.
        while received.load(Ordering::SeqCst) < n {
            if tokio::time::timeout(Duration::from_secs(60), notify.notified())
                .await
                .is_err()
            {
                bail!(
                    "round {round}: only {}/{n} proxies got the push",
                    received.load(Ordering::SeqCst)
                );
            }
        }
        acks.push(start.elapsed());
        // Server view (not timed): the control plane recorded every ACK.
        loop {
            let (connected, synced) = fleet_status(&apis).await?;
            if connected == n && synced == n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Through etcd: a replica (a third of the proxies) dies; the time until every proxy is
    // connected to a survivor and in sync again.
    let failover = if replicas.len() > 1 {
        let mut victim = replicas.pop().context("a replica")?;
        let _ = victim.child.kill().await;
        let start = Instant::now();
        let survivors = &apis[..replicas.len()];
        loop {
            let (connected, synced) = fleet_status(survivors).await?;
            if connected == n && synced == n {
                break;
            }
            if start.elapsed() > Duration::from_secs(300) {
                bail!("after a replica died, only {synced}/{n} proxies synced again");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        format!(" {:.2} s |", start.elapsed().as_secs_f64())
    } else {
        String::new()
    };
    acks.sort();
    let median = acks[acks.len() / 2];
    let max = acks[acks.len() - 1];
    let per_proxy = (connected_rss.saturating_sub(idle_rss)) as f64 / n as f64;
    println!(
        "| {n} | {:.1} ms | {:.1} ms | {:.1} MiB | {:.1} MiB | {:.1} KiB |{failover}",
        median.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        idle_rss as f64 / 1024.0,
        connected_rss as f64 / 1024.0,
        per_proxy
    );
    stopping.store(true, Ordering::SeqCst);
    for mut r in replicas {
        let _ = r.child.kill().await;
    }
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let through_etcd = std::env::args().any(|a| a == "--etcd");
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let counts = if counts.is_empty() {
        vec![100, 1000]
    } else {
        counts
    };
    let control_bin = std::env::current_exe()?.with_file_name("trellis-control");
    if !control_bin.exists() {
        bail!(
            "{} not found: cargo build --release -p trellis-control",
            control_bin.display()
        );
    }
    println!(
        "apply → every proxy received its new snapshot and ACKed it; median and max of {ROUNDS} rounds; control-plane RSS"
    );
    println!();
    println!("| proxies | median | max | RSS before | RSS connected | RSS per proxy |");
    println!("|---|---|---|---|---|---|");
    let etcd = if through_etcd {
        println!(
            "(3 trellis-control replicas on a 3-member etcd; proxies spread over them; RSS summed over the replicas; last column: one replica killed, until every proxy is synced on the survivors)"
        );
        println!();
        Some(trellis_testkit::etcd::EtcdCluster::start(3).await)
    } else {
        None
    };
    for n in counts {
        run(n, &control_bin, etcd.as_ref()).await?;
    }
    Ok(())
}
