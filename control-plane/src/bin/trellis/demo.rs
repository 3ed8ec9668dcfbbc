//! `trellis demo`: App Mesh's colorapp on 127.0.0.1 — a control plane on the embedded store, a
//! front app and blue/green/red colortellers each with a trellis-proxy sidecar, and the colorapp
//! gateway, every proxy with a workload identity from a join token; the files in
//! `examples/colorapp/` applied (the mesh in mTLS STRICT), then the router's weights shifted step
//! by step while the live split of requests sent to the gateway is shown, with the identities
//! the apps saw. Everything it starts is stopped when it ends.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
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
    handler: Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, String> + Send + Sync>,
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
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(handler().await))))
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

/// GET through a proxy socket with the given Host; the body, or the error kind.
async fn get(via: SocketAddr, host: &str) -> String {
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
        let error = resp
            .headers()
            .get("x-trellis-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some(error.map_or_else(
            || String::from_utf8_lossy(&body).trim().to_string(),
            |e| format!("error:{e}"),
        ))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| "error:unreachable".into())
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

pub(crate) async fn run(step: Duration) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let mut children = Vec::new();
    let (server, api) = start_control_plane(&dir, &mut children).await?;
    let sidecars = start_sidecars(&server, &api, &dir, &mut children).await?;
    start_gateway(&server, &api, &dir, &mut children).await?;
    let proxies = sidecars.len() + 1;
    let seen = Seen::default();
    start_apps(&sidecars, &seen).await?;
    apply_and_register(&api, &sidecars).await?;
    println!("==> registered instances; waiting for every proxy to apply its config");
    wait_synced(&api, proxies).await?;

    let gateway = SocketAddr::from(([127, 0, 0, 1], GATEWAY_PORT));
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

/// Apps: colortellers answer their color; front asks colorteller through its sidecar.
async fn start_apps(sidecars: &Sidecars, seen: &Seen) -> anyhow::Result<()> {
    for (color, port) in COLORS {
        serve(
            SocketAddr::from(([127, 0, 0, 1], port)),
            color,
            seen.clone(),
            Arc::new(move || Box::pin(async move { color.to_string() })),
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
    let plain = get(SocketAddr::from(([127, 0, 0, 1], blue_ingress)), "blue").await;
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
        for a in answers {
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
