//! `trellis demo`: App Mesh's colorapp on 127.0.0.1 — a control plane on the embedded store, a
//! front app and blue/green/red colortellers each with a trellis-proxy sidecar, and the colorapp
//! gateway, every proxy with a workload identity from a join token; the files in
//! `examples/colorapp/` applied (the mesh in mTLS STRICT), then the router's weights shifted step
//! by step while the live split of requests sent to the gateway is shown, with the identities
//! the apps saw. With `--canary`, a Canary moves the route from blue to green step by step on
//! the sidecars' own measurements (promoted), then from green to a red that answers 500 (rolled
//! back by itself in its first step). Everything it starts is stopped when it ends.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpListener, process::Child};

use crate::{
    client::ApiClient,
    manifests::{MESH, router_manifest},
};
use trellis_control::{
    registry::{InstanceStatus, Registration},
    server::Results,
    status::Status,
};

const GATEWAY: &str = include_str!("../../../../examples/colorapp/gateway.yaml");
const STEPS: [(u32, u32, u32); 5] = [
    (100, 0, 0),
    (70, 30, 0),
    (34, 33, 33),
    (0, 50, 50),
    (0, 0, 100),
];
const COLORS: [(&str, u16); 3] = [("blue", 9081), ("green", 9082), ("red", 9083)];
const FRONT_PORT: u16 = 8080;
/// The colorapp gateway's listener (examples/colorapp/gateway.yaml).
const GATEWAY_PORT: u16 = 8088;

/// The caller identity each app saw last (`x-forwarded-client-cert`, set by its sidecar from the
/// verified certificate), by app.
type Seen = Arc<parking_lot::Mutex<BTreeMap<&'static str, String>>>;

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find the trellis binary")?;
    let path = me.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found next to {}: build it with `cargo build --release --bins`",
            name,
            me.display()
        );
    }
    Ok(path)
}

/// A free port on 127.0.0.1 (the demo is not a test: it may race, and says so if it loses).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log)?;
    tokio::process::Command::new(bin)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

async fn serve(
    addr: SocketAddr,
    app: &'static str,
    seen: Seen,
    handler: Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, (u16, String)> + Send + Sync>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr} (the demo's apps use the ports in examples/colorapp/mesh.yaml)"
        )
    })?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let handler = handler.clone();
                    let caller = req
                        .headers()
                        .get("x-forwarded-client-cert")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.split(';').find_map(|p| p.strip_prefix("URI=")))
                        .unwrap_or("(none: plaintext)")
                        .to_string();
                    seen.lock().insert(app, caller);
                    async move {
                        let (status, body) = handler().await;
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() =
                            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

/// GET through a proxy socket with the given Host; the status and body, or the error kind
/// (status 502).
async fn get(via: SocketAddr, host: &str) -> (u16, String) {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(via).await.ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let req = Request::get("/")
            .header("host", host)
            .body(Full::<Bytes>::default())
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        let error = resp
            .headers()
            .get("x-trellis-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((
            status,
            error.map_or_else(
                || String::from_utf8_lossy(&body).trim().to_string(),
                |e| format!("error:{e}"),
            ),
        ))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| (502, "error:unreachable".into()))
}

async fn wait_synced(api: &ApiClient, proxies: usize) -> anyhow::Result<()> {
    for _ in 0..200 {
        let status: Status = serde_json::from_value(api.get("/v1/status").await?)
            .context("unexpected status from the control plane")?;
        let synced = status.proxies.iter().filter(|p| p.in_sync()).count();
        if status.proxies.len() >= proxies && synced >= proxies {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("proxies did not converge in 10 s")
}

/// Each sidecar's (ingress, egress) ports, by node.
type Sidecars = BTreeMap<&'static str, (u16, u16)>;

pub(crate) async fn run(step: Duration, canary: bool) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let mut children = Vec::new();
    let (server, api) = start_control_plane(&dir, &mut children).await?;
    println!("==> the dashboard: {server}/ui");
    let sidecars = start_sidecars(&server, &api, &dir, &mut children).await?;
    start_gateway(&server, &api, &dir, &mut children).await?;
    let proxies = sidecars.len() + 1;
    let seen = Seen::default();
    let red_fails = Arc::new(AtomicBool::new(false));
    start_apps(&sidecars, &seen, red_fails.clone()).await?;
    apply_and_register(&api, &sidecars).await?;
    println!("==> registered instances; waiting for every proxy to apply its config");
    wait_synced(&api, proxies).await?;

    let gateway = SocketAddr::from(([127, 0, 0, 1], GATEWAY_PORT));
    if canary {
        run_canaries(&api, gateway, &red_fails).await?;
        show_identities(&seen, sidecars["blue"].0).await;
        println!("==> cleaning up");
        drop(children);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    for (i, weights) in STEPS.into_iter().enumerate() {
        api.post("/v1/apply", router_manifest(weights).into_bytes())
            .await?;
        wait_synced(&api, proxies).await?;
        show_split(gateway, weights, step).await;
        if i == 0 {
            show_identities(&seen, sidecars["blue"].0).await;
        }
    }
    let status: Status = serde_json::from_value(api.get("/v1/status").await?)
        .context("unexpected status from the control plane")?;
    println!(
        "==> {} proxies connected, all in sync; cleaning up",
        status.proxies.len()
    );
    drop(children);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Starts trellis-control on the embedded store in `dir` and waits until it answers.
async fn start_control_plane(
    dir: &Path,
    children: &mut Vec<Child>,
) -> anyhow::Result<(String, ApiClient)> {
    let control_bin = sibling("trellis-control")?;
    let api_port = free_port()?;
    let server = format!("http://127.0.0.1:{api_port}");
    println!(
        "==> control plane on {server} (embedded store in {})",
        dir.display()
    );
    children.push(spawn(
        &control_bin,
        &[
            "--data-dir".into(),
            dir.join("control").display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{api_port}"),
        ],
        &dir.join("control.log"),
    )?);
    let api = ApiClient::new(&server)?;
    for i in 0.. {
        if api.get("/healthz").await.is_ok() {
            break;
        }
        if i > 100 {
            bail!(
                "the control plane did not start; see {}",
                dir.join("control.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((server, api))
}

/// A single-use join token for `node` (`gateway`: a VirtualGateway's).
async fn join_token(api: &ApiClient, node: &str, gateway: bool) -> anyhow::Result<String> {
    let request = serde_json::json!({
        "node": node, "gateway": gateway, "ttlSeconds": 600, "uses": 1,
    });
    let created = api
        .post("/v1/tokens", serde_json::to_vec(&request)?)
        .await?;
    created["token"]
        .as_str()
        .map(str::to_owned)
        .context("unexpected token answer from the control plane")
}

/// Sidecars: one per node, each with its own ports and a join token for its identity.
async fn start_sidecars(
    server: &str,
    api: &ApiClient,
    dir: &Path,
    children: &mut Vec<Child>,
) -> anyhow::Result<Sidecars> {
    let proxy_bin = sibling("trellis-proxy")?;
    let mut sidecars = BTreeMap::new();
    for node in ["front", "blue", "green", "red"] {
        let (ingress, egress) = (free_port()?, free_port()?);
        let token = join_token(api, &format!("default/{node}"), false).await?;
        children.push(spawn(
            &proxy_bin,
            &[
                "--control-plane".into(),
                server.to_string(),
                "--token".into(),
                token,
                "--node".into(),
                format!("default/{node}"),
                "--data-dir".into(),
                dir.join(node).display().to_string(),
                "--ingress-addr".into(),
                format!("127.0.0.1:{ingress}"),
                "--egress-addr".into(),
                format!("127.0.0.1:{egress}"),
                "--admin-addr".into(),
                "127.0.0.1:0".into(),
                "--workers".into(),
                "1".into(),
            ],
            &dir.join(format!("{node}-proxy.log")),
        )?);
        sidecars.insert(node, (ingress, egress));
    }
    println!(
        "==> sidecars: {}",
        sidecars
            .iter()
            .map(|(n, (i, e))| format!("{n} (ingress :{i}, egress :{e})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(sidecars)
}

/// The colorapp gateway, with its own identity, answering on GATEWAY_PORT.
async fn start_gateway(
    server: &str,
    api: &ApiClient,
    dir: &Path,
    children: &mut Vec<Child>,
) -> anyhow::Result<()> {
    let token = join_token(api, "default/colorapp-gateway", true).await?;
    children.push(spawn(
        &sibling("trellis-proxy")?,
        &[
            "--control-plane".into(),
            server.to_string(),
            "--token".into(),
            token,
            "--gateway".into(),
            "default/colorapp-gateway".into(),
            "--data-dir".into(),
            dir.join("gateway").display().to_string(),
            "--ingress-addr".into(),
            "127.0.0.1:0".into(),
            "--egress-addr".into(),
            "127.0.0.1:0".into(),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--workers".into(),
            "1".into(),
        ],
        &dir.join("gateway-proxy.log"),
    )?);
    println!("==> gateway colorapp-gateway on 127.0.0.1:{GATEWAY_PORT}");
    Ok(())
}

/// Apps: colortellers answer their color (red a 500 while `red_fails`); front asks
/// colorteller through its sidecar and answers as it was answered.
async fn start_apps(
    sidecars: &Sidecars,
    seen: &Seen,
    red_fails: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    for (color, port) in COLORS {
        let red_fails = red_fails.clone();
        serve(
            SocketAddr::from(([127, 0, 0, 1], port)),
            color,
            seen.clone(),
            Arc::new(move || {
                let failing = color == "red" && red_fails.load(Ordering::Relaxed);
                Box::pin(async move { (if failing { 500 } else { 200 }, color.to_string()) })
            }),
        )
        .await?;
    }
    let front_egress = SocketAddr::from(([127, 0, 0, 1], sidecars["front"].1));
    serve(
        SocketAddr::from(([127, 0, 0, 1], FRONT_PORT)),
        "front",
        seen.clone(),
        Arc::new(move || Box::pin(get(front_egress, "colorteller.default:9080"))),
    )
    .await
}

/// What mTLS STRICT did: the callers each app saw, as their sidecars verified them, and a
/// plaintext request straight to a sidecar's ingress refused.
async fn show_identities(seen: &Seen, blue_ingress: u16) {
    println!("==> mTLS STRICT: each app's last caller, as its sidecar verified it");
    for (app, caller) in seen.lock().iter() {
        println!("    {app:<6} <- {caller}");
    }
    let (_, plain) = get(SocketAddr::from(([127, 0, 0, 1], blue_ingress)), "blue").await;
    println!(
        "    plaintext straight to blue's sidecar: {}",
        if plain.starts_with("error:") {
            "refused".to_string()
        } else {
            format!("answered {plain:?} (unexpected)")
        }
    );
}

/// Applies the files in examples/colorapp/ (from the working tree when run from the
/// repository) and registers each node's instance at its sidecar's ingress.
async fn apply_and_register(api: &ApiClient, sidecars: &Sidecars) -> anyhow::Result<()> {
    let text = match (
        std::fs::read_to_string("examples/colorapp/mesh.yaml"),
        std::fs::read_to_string("examples/colorapp/gateway.yaml"),
    ) {
        (Ok(m), Ok(g)) => format!("{m}\n---\n{g}"),
        _ => format!("{MESH}\n---\n{GATEWAY}"),
    };
    let applied: Results = serde_json::from_value(api.post("/v1/apply", text.into_bytes()).await?)
        .context("unexpected apply results from the control plane")?;
    println!(
        "==> applied examples/colorapp/: {} resources",
        applied.results.len()
    );
    for (node, (ingress, _)) in sidecars {
        let (service, attributes) = if *node == "front" {
            ("front", BTreeMap::new())
        } else {
            (
                "colorteller",
                BTreeMap::from([("version".to_string(), node.to_string())]),
            )
        };
        let registration = Registration {
            namespace: "demo".into(),
            service: service.into(),
            id: node.to_string(),
            address: "127.0.0.1".into(),
            port: (*ingress).into(),
            attributes,
            status: InstanceStatus::Healthy,
            ttl_seconds: None,
        };
        api.post("/v1/instances", serde_json::to_vec(&registration)?)
            .await?;
    }
    Ok(())
}

/// Sends requests through the gateway (to front) for `step` and prints which color answered them.
async fn show_split(gateway: SocketAddr, weights: (u32, u32, u32), step: Duration) {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let end = tokio::time::Instant::now() + step;
    let mut total = 0usize;
    while tokio::time::Instant::now() < end {
        let answers =
            futures_util::future::join_all((0..8).map(|_| get(gateway, "colorapp.example"))).await;
        for (_, a) in answers {
            *counts.entry(a).or_default() += 1;
            total += 1;
        }
    }
    let split: Vec<String> = counts
        .iter()
        .map(|(c, n)| {
            format!(
                "{c} {:>5.1}% {}",
                100.0 * *n as f64 / total.max(1) as f64,
                "#".repeat(n * 30 / total.max(1))
            )
        })
        .collect();
    println!(
        "weights blue/green/red = {:>3}/{:>3}/{:>3}  ({total} requests)\n    {}",
        weights.0,
        weights.1,
        weights.2,
        split.join("\n    ")
    );
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("trellis-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The canary of the colorteller router's route (the demo's file), from `stable` to `canary`.
fn canary_manifest(stable: &str, canary: &str) -> String {
    format!(
        "apiVersion: mesh.trellis.dev/v1beta1\nkind: Canary\nmetadata: {{ name: colorteller }}\nspec:\n  \
         virtualRouterRef: {{ name: colorteller }}\n  route: split\n  \
         stableRef: {{ name: {stable} }}\n  canaryRef: {{ name: {canary} }}\n  \
         steps:\n  - {{ weight: 20, duration: {{ unit: s, value: 3 }} }}\n  \
         - {{ weight: 50, duration: {{ unit: s, value: 3 }} }}\n  \
         - {{ weight: 80, duration: {{ unit: s, value: 3 }} }}\n  \
         gates: {{ minRequests: 50, minSuccessRate: 99, maxLatencyP99: {{ unit: ms, value: 250 }} }}\n  \
         interval: {{ unit: s, value: 1 }}\n"
    )
}

/// `--canary`: traffic through the gateway all along; a Canary from blue to green (healthy:
/// promoted), then the same Canary changed to go from green to red while red answers 500
/// (rolled back by itself), each shown second by second with its decisions.
async fn run_canaries(
    api: &ApiClient,
    gateway: SocketAddr,
    red_fails: &AtomicBool,
) -> anyhow::Result<()> {
    api.post("/v1/apply", router_manifest((100, 0, 0)).into_bytes())
        .await?;
    let answers: Arc<parking_lot::Mutex<BTreeMap<String, usize>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic: Vec<_> = (0..4)
        .map(|_| {
            let (answers, stop) = (answers.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (status, body) = get(gateway, "colorapp.example").await;
                    let key = if status == 200 {
                        body
                    } else {
                        format!("{body} ({status})")
                    };
                    *answers.lock().entry(key).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    println!(
        "==> a canary: colorteller's route from blue to green, judged by the sidecars' measurements"
    );
    api.post("/v1/apply", canary_manifest("blue", "green").into_bytes())
        .await?;
    let promoted = follow_canary(api, &answers, "Succeeded").await;
    if promoted.is_err() {
        stop.store(true, Ordering::Relaxed);
        return promoted;
    }
    println!("==> a bad version: red answers 500; the same canary now from green to red");
    red_fails.store(true, Ordering::Relaxed);
    api.post("/v1/apply", canary_manifest("green", "red").into_bytes())
        .await?;
    let rolled_back = follow_canary(api, &answers, "RolledBack").await;
    stop.store(true, Ordering::Relaxed);
    for t in traffic {
        let _ = t.await;
    }
    rolled_back
}

/// Prints the canary and the live split every second until it reaches `phase` (or another end),
/// then its decisions.
async fn follow_canary(
    api: &ApiClient,
    answers: &parking_lot::Mutex<BTreeMap<String, usize>>,
    phase: &str,
) -> anyhow::Result<()> {
    use trellis_control::canary::Status as Canary;
    answers.lock().clear();
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let c: Canary = serde_json::from_value(api.get("/v1/canaries/default/colorteller").await?)
            .context("unexpected canary status from the control plane")?;
        let seen = std::mem::take(&mut *answers.lock());
        let total: usize = seen.values().sum();
        let split: Vec<String> = seen
            .iter()
            .map(|(k, n)| format!("{k} {:.0}%", 100.0 * *n as f64 / total.max(1) as f64))
            .collect();
        let w = c.window.clone().unwrap_or_default();
        println!(
            "    {:<11} step {}/{}  {} {}% / {} {}%  | step: {} req, success {}, p99 {} | answered: {}",
            c.phase,
            c.step + 1,
            c.steps,
            c.stable.trim_start_matches("default/"),
            100 - c.weight,
            c.canary.trim_start_matches("default/"),
            c.weight,
            w.requests,
            w.success_rate.map_or("-".into(), |r| format!("{r:.1}%")),
            w.p99_ms.map_or("-".into(), |p| format!("{p:.1} ms")),
            split.join(", ")
        );
        if ["Succeeded", "RolledBack", "Aborted", "Paused"].contains(&c.phase.as_str()) {
            println!("    decisions:");
            for d in &c.history {
                println!("      {:<8} -> {:>3}%  {}", d.action, d.weight, d.reason);
            }
            if c.phase != phase {
                bail!("the canary ended {}, not {phase}: {}", c.phase, c.message);
            }
            return Ok(());
        }
    }
    bail!("the canary did not end within 2 minutes")
}
