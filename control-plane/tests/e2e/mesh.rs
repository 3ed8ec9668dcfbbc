//! A mesh end to end: apply, sidecars, registry, weights, drain, outages, bad input, examples.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use tempfile::TempDir;
use trellis_testkit::{
    ProxyProcess, TestServer, client::Client, eventually, process::ControlProcess,
};

use crate::{CONTROL, apply, cli, proxy_bin, split, status, stderr, stdout, wait_synced};

const HOST: &str = "colorteller.default:9080";

struct Env {
    _data: TempDir,
    control: ControlProcess,
    blue: TestServer,
    green: [TestServer; 2],
    red: TestServer,
    front: ProxyProcess,
    front_dir: TempDir,
    _blue_proxy: ProxyProcess,
    _blue_dir: TempDir,
}

fn mesh_yaml(blue_port: u16, weights: (u32, u32, u32), red_discovery: &str) -> String {
    format!(
        r#"apiVersion: mesh.trellis.dev/v1beta1
kind: Mesh
metadata: {{ name: test }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: {{ name: front }}
spec:
  listeners: [{{ portMapping: {{ port: 8080, protocol: http }} }}]
  backends: [{{ virtualService: {{ virtualServiceRef: {{ name: colorteller }} }} }}]
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: {{ name: blue }}
spec:
  listeners: [{{ portMapping: {{ port: {blue_port}, protocol: http }} }}]
  serviceDiscovery: {{ registry: {{ namespaceName: test, serviceName: colorteller, attributes: {{ version: blue }} }} }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: {{ name: green }}
spec:
  listeners: [{{ portMapping: {{ port: 9080, protocol: http }} }}]
  serviceDiscovery: {{ registry: {{ namespaceName: test, serviceName: colorteller, attributes: {{ version: green }} }} }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: {{ name: red }}
spec:
  listeners: [{{ portMapping: {{ port: 9080, protocol: http }} }}]
  serviceDiscovery: {red_discovery}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualRouter
metadata: {{ name: colorteller }}
spec:
  listeners: [{{ portMapping: {{ port: 9080, protocol: http }} }}]
  routes:
    - name: split
      httpRoute:
        match: {{ prefix: / }}
        action:
          weightedTargets:
            - {{ virtualNodeRef: {{ name: blue }}, weight: {} }}
            - {{ virtualNodeRef: {{ name: green }}, weight: {} }}
            - {{ virtualNodeRef: {{ name: red }}, weight: {} }}
        retryPolicy:
          maxRetries: 2
          perRetryTimeout: {{ unit: ms, value: 2000 }}
          httpRetryEvents: [gateway-error]
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualService
metadata: {{ name: colorteller }}
spec:
  provider: {{ virtualRouter: {{ virtualRouterRef: {{ name: colorteller }} }} }}
"#,
        weights.0, weights.1, weights.2
    )
}

const RED_REGISTRY: &str =
    "{ registry: { namespaceName: test, serviceName: colorteller, attributes: { version: red } } }";

fn register(server: &str, id: &str, version: &str, addr: std::net::SocketAddr) {
    let attr = format!("version={version}");
    crate::register_instance(server, ("test", "colorteller"), id, addr, &[&attr]);
}

async fn setup(weights: (u32, u32, u32)) -> Env {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let blue = TestServer::start("blue").await;
    let green = [
        TestServer::start("green").await,
        TestServer::start("green").await,
    ];
    let red = TestServer::start("red").await;
    apply(
        &control.url,
        &mesh_yaml(blue.addr.port(), weights, RED_REGISTRY),
    );

    let front_dir = tempfile::tempdir().unwrap();
    let blue_dir = tempfile::tempdir().unwrap();
    let front =
        ProxyProcess::sidecar(proxy_bin(), &control.url, "default/front", front_dir.path()).await;
    let blue_proxy =
        ProxyProcess::sidecar(proxy_bin(), &control.url, "default/blue", blue_dir.path()).await;
    // Blue is reached through its sidecar; green and red instances directly.
    register(&control.url, "blue-1", "blue", blue_proxy.ingress);
    register(&control.url, "green-1", "green", green[0].addr);
    register(&control.url, "green-2", "green", green[1].addr);
    register(&control.url, "red-1", "red", red.addr);
    wait_synced(&control.url, 2).await;
    Env {
        _data: data,
        control,
        blue,
        green,
        red,
        front,
        front_dir,
        _blue_proxy: blue_proxy,
        _blue_dir: blue_dir,
    }
}

/// Continuous load through the front sidecar; returns the failures when stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(via: std::net::SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let tasks = (0..4)
            .map(|_| {
                let (stop, ok) = (stop.clone(), ok.clone());
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    let mut c = Client::h1(via).await.unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        match c.get(HOST, "/").await {
                            Ok(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => failures.push(format!(
                                "{} {:?} {}",
                                r.status,
                                r.header("x-trellis-error"),
                                r.text()
                            )),
                            Err(e) => {
                                failures.push(e.to_string());
                                c = Client::h1(via).await.unwrap();
                            }
                        }
                    }
                    failures
                })
            })
            .collect();
        Self { stop, ok, tasks }
    }

    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for t in self.tasks {
            failures.extend(t.await.unwrap());
        }
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

#[tokio::test]
async fn traffic_follows_weights_and_weight_changes_under_load() {
    let env = setup((100, 0, 0)).await;
    let counts = split(env.front.egress, HOST, 100).await;
    assert_eq!(counts.get("blue"), Some(&100), "{counts:?}");
    assert!(
        env.blue.requests() >= 100,
        "blue is reached through its sidecar"
    );

    let load = Load::start(env.front.egress);
    apply(
        &env.control.url,
        &mesh_yaml(env.blue.addr.port(), (0, 50, 50), RED_REGISTRY),
    );
    wait_synced(&env.control.url, 2).await;
    let counts = split(env.front.egress, HOST, 2000).await;
    let (ok, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 50, "load ran");
    assert_eq!(counts.get("blue"), None, "{counts:?}");
    let green = *counts.get("green").unwrap_or(&0) as f64 / 2000.0;
    assert!(
        (green - 0.5).abs() < 0.05,
        "green share {green} ({counts:?})"
    );
    assert_eq!(counts.values().sum::<usize>(), 2000);

    // Status: every resource the proxies use is applied by all of them.
    let s = status(&env.control.url);
    let router = s["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "VirtualRouter")
        .unwrap();
    assert_eq!(router["proxies"], 1, "only front uses the router");
    assert_eq!(router["applied"], 1);
}

/// Waits until `server` received `more` requests beyond what it has now.
async fn wait_more(server: &TestServer, more: usize) {
    server.wait_requests(server.requests() + more + 1).await;
}

#[tokio::test]
async fn draining_then_deregistering_an_instance_under_load_fails_nothing() {
    let env = setup((0, 100, 0)).await;
    let load = Load::start(env.front.egress);
    wait_more(&env.green[0], 10).await;
    wait_more(&env.green[1], 10).await;
    let out = cli(
        &env.control.url,
        &[
            "instances",
            "drain",
            "--namespace",
            "test",
            "--service",
            "colorteller",
            "--id",
            "green-2",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    wait_synced(&env.control.url, 2).await;
    let list = cli(
        &env.control.url,
        &["instances", "list", "--namespace", "test"],
    );
    assert!(
        stdout(&list)
            .lines()
            .any(|l| l.contains("green-2") && l.contains("DRAINING")),
        "{}",
        stdout(&list)
    );
    // Requests that picked green-2 just before the swap may still land; after that, none.
    wait_more(&env.green[0], 20).await;
    let drained_at = env.green[1].requests();
    wait_more(&env.green[0], 100).await;
    assert_eq!(
        env.green[1].requests(),
        drained_at,
        "a draining instance gets no new requests"
    );
    let out = cli(
        &env.control.url,
        &[
            "instances",
            "deregister",
            "--namespace",
            "test",
            "--service",
            "colorteller",
            "--id",
            "green-2",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    wait_synced(&env.control.url, 2).await;
    let (ok, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 100);
}

#[tokio::test]
async fn outages_proxies_keep_serving_and_restarts_keep_everything() {
    let mut env = setup((0, 0, 100)).await;
    assert_eq!(
        split(env.front.egress, HOST, 20).await.get("red"),
        Some(&20)
    );

    // The control plane dies: traffic goes on.
    env.control.kill().await;
    assert_eq!(
        split(env.front.egress, HOST, 200).await.get("red"),
        Some(&200)
    );

    // A proxy restarted while the control plane is down serves its persisted snapshot.
    env.front.kill().await;
    let dead = env.control.url.clone();
    let front =
        ProxyProcess::sidecar(proxy_bin(), &dead, "default/front", env.front_dir.path()).await;
    eventually(Duration::from_secs(10), "restarted proxy ready", || async {
        let (code, _) = front.admin("/ready").await;
        if code == 200 {
            Ok(())
        } else {
            Err(format!("/ready {code}"))
        }
    })
    .await;
    assert_eq!(split(front.egress, HOST, 100).await.get("red"), Some(&100));

    // The control plane comes back on the same store: every resource and instance is there.
    let control = ControlProcess::start(CONTROL, env._data.path()).await;
    let out = cli(&control.url, &["get", "virtualnodes", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let nodes: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["blue", "front", "green", "red"]);
    let out = cli(&control.url, &["instances", "list", "-o", "json"]);
    let instances: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(instances.as_array().unwrap().len(), 4);
    for kind in ["mesh", "virtualrouter", "virtualservice"] {
        let out = cli(&control.url, &["get", kind, "-o", "json"]);
        let items: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(items.as_array().unwrap().len(), 1, "{kind}");
    }
}

#[tokio::test]
async fn invalid_manifest_is_rejected_with_its_field_and_nothing_changes() {
    let env = setup((100, 0, 0)).await;
    let before = stdout(&cli(
        &env.control.url,
        &["get", "virtualrouter", "colorteller", "-o", "json"],
    ));
    let mut bad = mesh_yaml(env.blue.addr.port(), (0, 100, 0), RED_REGISTRY);
    bad = bad.replace("weight: 100 }", "weight: 150 }");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, &bad).unwrap();
    let out = cli(&env.control.url, &["apply", "-f", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("document 5: VirtualRouter default/colorteller: spec.routes[0].httpRoute.action.weightedTargets[1].weight: must be 0..=100"),
        "{err}"
    );
    assert!(err.contains("nothing changed"), "{err}");
    let after = stdout(&cli(
        &env.control.url,
        &["get", "virtualrouter", "colorteller", "-o", "json"],
    ));
    assert_eq!(before, after, "the store is unchanged");
    // Offline validation reports the same problem.
    let out = std::process::Command::new(crate::CLI)
        .args(["validate", "-f", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("weightedTargets[1].weight: must be 0..=100"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        split(env.front.egress, HOST, 10).await.get("blue"),
        Some(&10)
    );

    // Deleting something still referenced is refused the same way; describe shows convergence.
    let out = cli(&env.control.url, &["delete", "virtualnode", "green"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("VirtualRouter default/colorteller: spec.routes[0].httpRoute.action.weightedTargets[1].virtualNodeRef: VirtualNode default/green not found"), "{}", stderr(&out));
    let out = cli(
        &env.control.url,
        &["describe", "virtualrouter", "colorteller"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("1 use it, 1 applied their current snapshot"),
        "{}",
        stdout(&out)
    );
    let out = cli(&env.control.url, &["get", "virtualnodes"]);
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.contains("front") && l.contains("1/1")),
        "{}",
        stdout(&out)
    );
    let out = cli(&env.control.url, &["get", "widgets"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown kind \"widgets\""),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_sidecar_fails_over_to_the_next_control_plane() {
    let blue = TestServer::start("blue").await;
    let green = TestServer::start("green").await;
    let red = TestServer::start("red").await;
    // Two control planes with their own stores; B sends everything to red.
    let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = ControlProcess::start(CONTROL, data_a.path()).await;
    let b = ControlProcess::start(CONTROL, data_b.path()).await;
    for (cp, weights) in [(&a, (100, 0, 0)), (&b, (0, 0, 100))] {
        apply(&cp.url, &mesh_yaml(blue.addr.port(), weights, RED_REGISTRY));
        register(&cp.url, "blue-1", "blue", blue.addr);
        register(&cp.url, "green-1", "green", green.addr);
        register(&cp.url, "red-1", "red", red.addr);
    }
    let dir = tempfile::tempdir().unwrap();
    let urls = format!("{},{}", a.url, b.url);
    let front = ProxyProcess::sidecar(proxy_bin(), &urls, "default/front", dir.path()).await;
    // It starts at either (proxies spread over the control planes they list).
    let on_a = eventually(
        Duration::from_secs(10),
        "the proxy on one of them",
        || async {
            let connected = |url: &str| status(url)["proxies"].as_array().map_or(0, Vec::len);
            match (connected(&a.url), connected(&b.url)) {
                (1, 0) => Ok(true),
                (0, 1) => Ok(false),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let (mut first, second, colors) = if on_a {
        (a, b, ["blue", "red"])
    } else {
        (b, a, ["red", "blue"])
    };
    wait_synced(&first.url, 1).await;
    assert_eq!(
        split(front.egress, HOST, 10).await.get(colors[0]),
        Some(&10),
        "the control plane it started with"
    );
    first.kill().await;
    wait_synced(&second.url, 1).await;
    assert_eq!(
        split(front.egress, HOST, 10).await.get(colors[1]),
        Some(&10),
        "then the next one"
    );
}

/// POSTs a raw registration body; returns the status and the body.
async fn post_instance(control: &ControlProcess, body: &str) -> (u16, String) {
    let mut c = Client::h1(control.addr).await.unwrap();
    let req = http::Request::post("/v1/instances")
        .header("host", "trellis")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let r = c.send(req).await.unwrap();
    (r.status.as_u16(), r.text())
}

#[tokio::test]
async fn registrations_and_manifests_a_proxy_would_reject_are_refused_naming_the_field() {
    let env = setup((0, 0, 100)).await;
    let ok = r#""namespace": "test", "service": "colorteller", "id": "x""#;
    let cases = [
        (
            format!(r#"{{{ok}, "address": "ünï.example", "port": 80}}"#),
            "address: \"ünï.example\" is not an IP address or a DNS name",
        ),
        (
            format!(r#"{{{ok}, "address": "bad!host", "port": 80}}"#),
            "address: \"bad!host\" is not an IP address or a DNS name",
        ),
        (
            format!(r#"{{{ok}, "address": "a\r\nb", "port": 80}}"#),
            "address: \"a\\r\\nb\" is not an IP address or a DNS name",
        ),
        (
            format!(r#"{{{ok}, "address": "10.0.0.1", "port": 70000}}"#),
            "port: 70000 is out of range: must be 1..=65535",
        ),
        (
            format!(r#"{{{ok}, "address": "10.0.0.1", "port": 80, "ttlSeconds": 9223372036854775807}}"#),
            "ttlSeconds: 9223372036854775807 is out of range: must be 1..=86400",
        ),
        (
            r#"{"namespace": "test", "service": "colorteller", "id": "a b", "address": "10.0.0.1", "port": 80}"#.to_string(),
            "id: \"a b\" must be 1 to 253 ASCII letters",
        ),
        (
            format!(
                r#"{{{ok}, "address": "10.0.0.1", "port": 80, "attributes": {{{}}}}}"#,
                (0..31).map(|i| format!(r#""k{i}": "v""#)).collect::<Vec<_>>().join(",")
            ),
            "attributes: 31 attributes: at most 30 are allowed",
        ),
        (
            format!(r#"{{{ok}, "address": "10.0.0.1", "port": 80, "ttl": 30}}"#),
            "unknown field `ttl`",
        ),
    ];
    for (body, want) in &cases {
        let (code, text) = post_instance(&env.control, body).await;
        assert_eq!(code, 400, "{body}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        let error = error["error"].as_str().unwrap();
        assert!(error.contains(want), "{body}\nwant {want}\ngot {error}");
    }
    let out = cli(&env.control.url, &["instances", "list", "-o", "json"]);
    let instances: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        instances.as_array().unwrap().len(),
        4,
        "nothing was registered"
    );

    // A VirtualNode whose DNS name the proxy could not dial, TLS without a certificate and TLS
    // from AWS Certificate Manager are refused at apply.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    let dns = mesh_yaml(
        env.blue.addr.port(),
        (0, 0, 100),
        "{ dns: { hostname: 'red_svc!.local' } }",
    );
    std::fs::write(&file, &dns).unwrap();
    let out = cli(&env.control.url, &["apply", "-f", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("VirtualNode default/red: spec.serviceDiscovery.dns.hostname: \"red_svc!.local\" is not a DNS name"),
        "{}",
        stderr(&out)
    );
    for (tls, problem) in [
        (
            "  listeners: [{ portMapping: { port: 8080, protocol: http }, tls: { mode: STRICT } }]\n",
            "spec.listeners[0].tls.certificate: required",
        ),
        (
            "  listeners: [{ portMapping: { port: 8080, protocol: http } }]\n  backendDefaults: { clientPolicy: { tls: { validation: { trust: { acm: { certificateAuthorityARNs: [arn] } } } } } }\n",
            "spec.backendDefaults.clientPolicy.tls.validation.trust.acm: not supported by Trellis: AWS Certificate Manager",
        ),
    ] {
        let yaml = format!(
            "apiVersion: mesh.trellis.dev/v1beta1\nkind: VirtualNode\nmetadata: {{ name: secure }}\nspec:\n{tls}"
        );
        std::fs::write(&file, yaml).unwrap();
        let out = cli(&env.control.url, &["apply", "-f", file.to_str().unwrap()]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(problem), "{}", stderr(&out));
    }
    let out = cli(&env.control.url, &["get", "virtualnodes", "-o", "json"]);
    let nodes: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 4, "nothing was applied");

    // Every proxy stays in sync and traffic flows as before.
    wait_synced(&env.control.url, 2).await;
    assert_eq!(
        split(env.front.egress, HOST, 20).await.get("red"),
        Some(&20)
    );
}

#[tokio::test]
async fn deeply_nested_api_bodies_are_refused_before_parsing() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let mut c = Client::h1(control.addr).await.unwrap();
    for path in ["/v1/apply", "/v1/delete"] {
        let req = http::Request::post(path)
            .header("host", "trellis")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                "[".repeat(100_000),
            )))
            .unwrap();
        let r = c.send(req).await.unwrap();
        assert_eq!(r.status, 422, "{}", r.text());
        let body: Value = serde_json::from_str(&r.text()).unwrap();
        assert_eq!(
            body["problems"][0]["reason"],
            "line 1: nested deeper than 64 levels (refused before parsing)",
            "{body}"
        );
    }
    let r = c.get("trellis", "/healthz").await.unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn two_registrations_of_one_address_are_one_endpoint() {
    let env = setup((0, 0, 100)).await;
    // A restarted instance registers again under a new id before its old lease ends.
    register(&env.control.url, "red-2", "red", env.red.addr);
    let s = wait_synced(&env.control.url, 2).await;
    assert!(
        s["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["nackedVersion"].is_null() && p["problems"].is_null()),
        "{s}"
    );
    assert_eq!(
        split(env.front.egress, HOST, 20).await.get("red"),
        Some(&20)
    );
    // Draining one registration does not drain the endpoint while the other is healthy.
    let drain = |id: &str| {
        let out = cli(
            &env.control.url,
            &[
                "instances",
                "drain",
                "--namespace",
                "test",
                "--service",
                "colorteller",
                "--id",
                id,
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
    };
    drain("red-1");
    wait_synced(&env.control.url, 2).await;
    assert_eq!(
        split(env.front.egress, HOST, 20).await.get("red"),
        Some(&20)
    );
    drain("red-2");
    eventually(Duration::from_secs(20), "red drained", || async {
        let counts = split(env.front.egress, HOST, 5).await;
        match counts.get("error:no_healthy_endpoint") {
            Some(5) => Ok(()),
            _ => Err(format!("{counts:?}")),
        }
    })
    .await;
}

#[tokio::test]
async fn a_stored_instance_a_proxy_would_reject_degrades_only_itself() {
    let mut env = setup((0, 0, 100)).await;
    // A registration stored before its address was checked (an older control plane).
    env.control.kill().await;
    {
        use trellis_control::store::{Expect, Op, Store as _, embedded::EmbeddedStore};
        let store = EmbeddedStore::open(env._data.path()).unwrap();
        let bad = serde_json::json!({
            "namespace": "test", "service": "colorteller", "id": "bad",
            "address": "bad!host", "port": 9, "attributes": { "version": "red" },
        });
        store
            .apply(vec![Op::Put {
                key: "instances/test/colorteller/bad".into(),
                value: serde_json::to_vec(&bad).unwrap(),
                expect: Expect::Any,
                lease: None,
            }])
            .await
            .unwrap();
    }
    let listen = env.control.addr.to_string();
    env.control = ControlProcess::start_on(CONTROL, env._data.path(), &listen).await;

    // The proxies are sent snapshots without the bad endpoint, and ACK them.
    let s = wait_synced(&env.control.url, 2).await;
    let problems = s["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{s}");
    let p = &problems[0];
    assert_eq!(p["source"], "instance test/colorteller/bad", "{p}");
    assert_eq!(
        p["effect"], "endpoint \"bad!host:9\" of cluster \"default/red\" left out",
        "{p}"
    );
    assert!(
        p["reason"]
            .as_str()
            .unwrap()
            .ends_with("\"bad!host:9\" is not HOST:PORT"),
        "{p}"
    );
    assert_eq!(p["proxies"], serde_json::json!(["default/front"]), "{p}");
    assert_eq!(
        split(env.front.egress, HOST, 20).await.get("red"),
        Some(&20),
        "the good red endpoint still serves"
    );
    let table = stdout(&cli(&env.control.url, &["status"]));
    assert!(
        table
            .lines()
            .any(|l| l.contains("instance test/colorteller/bad") && l.contains("default/front")),
        "{table}"
    );

    // The rest of the mesh keeps converging.
    apply(
        &env.control.url,
        &mesh_yaml(env.blue.addr.port(), (0, 100, 0), RED_REGISTRY),
    );
    wait_synced(&env.control.url, 2).await;
    let counts = split(env.front.egress, HOST, 20).await;
    assert_eq!(counts.get("green"), Some(&20), "{counts:?}");
}

#[tokio::test]
async fn control_plane_metrics_count_proxies_pushes_and_answers() {
    let env = setup((0, 0, 100)).await;
    let mut c = Client::h1(env.control.addr).await.unwrap();
    let text = c.get("trellis", "/metrics").await.unwrap().text();
    let value = |name: &str, labels: &[(&str, &str)]| {
        trellis_testkit::process::metric_value(&text, name, labels)
    };
    assert_eq!(
        value("trellis_control_connected_proxies", &[]),
        2.0,
        "{text}"
    );
    assert_eq!(value("trellis_control_proxies_out_of_sync", &[]), 0.0);
    assert!(value("trellis_control_pushes_total", &[("kind", "sidecar")]) >= 2.0);
    assert!(value("trellis_control_push_answers_total", &[("outcome", "ack")]) >= 2.0);
    assert_eq!(
        value("trellis_control_push_answers_total", &[("outcome", "nack")]),
        0.0
    );
    assert!(value("trellis_control_push_ack_seconds_count", &[]) >= 2.0);
    assert!(value("trellis_control_apply_seconds_count", &[]) >= 1.0);
    // Every store call timed, by operation.
    assert!(value("trellis_control_store_seconds_count", &[("op", "apply")]) >= 1.0);
    assert!(value("trellis_control_store_seconds_count", &[("op", "list")]) >= 1.0);
    assert_eq!(value("trellis_control_store_errors_total", &[]), 0.0);
    // The mesh CA's root expires in the future (10 years from its creation).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expiry = value("trellis_control_ca_root_expiry_timestamp_seconds", &[]);
    assert!(expiry > now + 86_400.0 * 365.0, "{expiry} vs {now}");

    // The exposition format passes promtool.
    trellis_testkit::process::promtool_check(&text);
}

/// A proxy may still reject what it is sent (an older proxy, a socket it cannot bind): its NACK
/// shows in status with every reason. No current proxy NACKs what this control plane sends, so a
/// scripted peer speaks the config stream here.
#[tokio::test]
async fn a_proxy_nack_shows_in_status_with_its_reasons() {
    use trellis_proto::v1::{
        Hello, Nack, ProxyMessage, SnapshotFieldError, config_stream_client::ConfigStreamClient,
        hello::Kind as HelloKind, proxy_message::Kind as Msg,
    };
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    apply(&control.url, &mesh_yaml(9081, (0, 0, 100), RED_REGISTRY));
    let channel = tonic::transport::Endpoint::from_shared(control.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ConfigStreamClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel::<ProxyMessage>(4);
    tx.send(ProxyMessage {
        kind: Some(Msg::Hello(Hello {
            node: "default/front".into(),
            kind: HelloKind::Sidecar as i32,
            proxy_version: "0.0.1".into(),
            applied_version: String::new(),
            instance: "scripted".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut inbound = client.stream(outbound).await.unwrap().into_inner();
    let push = inbound.message().await.unwrap().unwrap();
    let version = push.snapshot.unwrap().version;
    tx.send(ProxyMessage {
        kind: Some(Msg::Nack(Nack {
            nonce: push.nonce,
            version: version.clone(),
            errors: vec![SnapshotFieldError {
                path: "listeners[0].address".into(),
                reason: "cannot bind 10.0.0.1:80".into(),
            }],
        })),
    })
    .await
    .unwrap();
    let front = eventually(Duration::from_secs(10), "the NACK is recorded", || async {
        let s = status(&control.url);
        let front = s["proxies"][0].clone();
        if front["nackedVersion"] == version.as_str() {
            Ok(front)
        } else {
            Err(format!("{s}"))
        }
    })
    .await;
    assert_eq!(
        front["nackReason"],
        "listeners[0].address: cannot bind 10.0.0.1:80"
    );
    let table = stdout(&cli(&control.url, &["status"]));
    assert!(
        table.lines().any(|l| l.contains("default/front")
            && l.contains("NACK")
            && l.contains("cannot bind 10.0.0.1:80")),
        "{table}"
    );
    let mut c = Client::h1(control.addr).await.unwrap();
    let text = c.get("trellis", "/metrics").await.unwrap().text();
    assert_eq!(
        trellis_testkit::process::metric_value(
            &text,
            "trellis_control_push_answers_total",
            &[("outcome", "nack")]
        ),
        1.0,
        "{text}"
    );
}

/// A gateway answers on each of its VirtualGateway's listener ports (bound on the IP of its
/// --ingress-addr), each serving the GatewayRoutes whose `match.port` names it.
#[tokio::test]
async fn a_gateway_routes_to_virtual_services_through_their_router() {
    let env = setup((100, 0, 0)).await;
    let (web, api) = (trellis_testkit::free_port(), trellis_testkit::free_port());
    let gateway = format!(
        r#"apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualGateway
metadata: {{ name: gw }}
spec:
  listeners:
    - portMapping: {{ port: {web}, protocol: http }}
    - portMapping: {{ port: {api}, protocol: http }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: GatewayRoute
metadata: {{ name: colors }}
spec:
  virtualGatewayRef: {{ name: gw }}
  httpRoute:
    match: {{ prefix: /colors/, port: {web} }}
    action: {{ target: {{ virtualService: {{ virtualServiceRef: {{ name: colorteller }} }} }} }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: GatewayRoute
metadata: {{ name: api }}
spec:
  virtualGatewayRef: {{ name: gw }}
  httpRoute:
    match: {{ prefix: /api/, port: {api} }}
    action: {{ target: {{ virtualService: {{ virtualServiceRef: {{ name: colorteller }} }} }} }}
"#
    );
    apply(&env.control.url, &gateway);
    let dir = tempfile::tempdir().unwrap();
    let gw = ProxyProcess::gateway(proxy_bin(), &env.control.url, "default/gw", dir.path()).await;
    let s = wait_synced(&env.control.url, 3).await;
    assert!(
        s["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["node"] == "default/gw" && p["kind"] == "gateway")
    );
    let web_addr = gw.listener_addr(&format!("gateway:{web}")).await;
    let api_addr = gw.listener_addr(&format!("gateway:{api}")).await;
    assert_eq!(
        (web_addr, api_addr),
        (
            std::net::SocketAddr::from(([127, 0, 0, 1], web)),
            std::net::SocketAddr::from(([127, 0, 0, 1], api))
        ),
        "each listener's port, on the ingress address's IP"
    );
    // Each listener serves its own routes, and only those.
    let mut a = Client::h1(api_addr).await.unwrap();
    let r = a.get("www.example.com", "/api/x").await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.header("x-trellis-error"));
    assert_eq!(
        (r.text(), r.header("x-seen-path")),
        ("blue".into(), Some("/x"))
    );
    assert_eq!(
        a.get("www.example.com", "/colors/x").await.unwrap().status,
        404
    );
    let mut c = Client::h1(web_addr).await.unwrap();
    assert_eq!(
        c.get("www.example.com", "/api/x").await.unwrap().status,
        404
    );
    let r = c
        .get("www.example.com", "/colors/paint?shade=dark")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.header("x-trellis-error"));
    assert_eq!(r.text(), "blue");
    assert_eq!(
        r.header("x-seen-path"),
        Some("/paint?shade=dark"),
        "the matched prefix became /"
    );
    assert_eq!(
        r.header("x-seen-host"),
        Some("colorteller.default"),
        "Host became the service's"
    );
    let r = c.get("www.example.com", "/other").await.unwrap();
    assert_eq!(r.status, 404);
    // Weights apply through the gateway too.
    apply(
        &env.control.url,
        &mesh_yaml(env.blue.addr.port(), (0, 0, 100), RED_REGISTRY),
    );
    wait_synced(&env.control.url, 3).await;
    assert_eq!(
        c.get("www.example.com", "/colors/x").await.unwrap().text(),
        "red"
    );
}

#[tokio::test]
async fn every_example_validates_and_applies() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files = Vec::new();
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    // Manifests are applied a directory at a time, as users apply them; proxy snapshots must
    // start a proxy.
    let mut manifest_dirs = std::collections::BTreeSet::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        if text.contains("apiVersion: mesh.trellis.dev/")
            || text.contains("apiVersion: appmesh.k8s.aws/")
        {
            manifest_dirs.insert(f.parent().unwrap().to_path_buf());
        } else {
            let proxy = ProxyProcess::try_start(proxy_bin(), &text, &[]).await;
            assert!(proxy.is_ok(), "{}: {:?}", f.display(), proxy.err());
        }
    }
    assert!(!manifest_dirs.is_empty());
    for d in manifest_dirs {
        let path = d.to_str().unwrap();
        let out = std::process::Command::new(crate::CLI)
            .args(["validate", "-f", path])
            .output()
            .unwrap();
        assert!(out.status.success(), "{path}: {}", stderr(&out));
        let out = cli(&control.url, &["apply", "-f", path]);
        assert!(out.status.success(), "{path}: {}", stderr(&out));
        assert!(stdout(&out).contains("created"), "{}", stdout(&out));
    }
}

/// The shipped observability files (charts/trellis/observability): the Prometheus rules pass
/// `promtool check rules` and their unit tests (`promtool test rules`: recorded values and
/// alerts on made-up series), and every series the Grafana dashboard queries is a metric the
/// proxy or the control plane exports (a histogram's `_bucket` too) or one the rules record.
#[test]
fn the_observability_rules_and_dashboard_hold_together() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/trellis/observability");
    for args in [
        ["check", "rules", "prometheus-rules.yaml"],
        ["test", "rules", "prometheus-rules.test.yaml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool (Debian package prometheus) must be installed; the test command installs it");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            stdout(&out),
            stderr(&out)
        );
    }
    // What exists: the metrics the code registers, and the rules' records.
    let name = regex::Regex::new(r"trellis(?:_[a-z0-9_]+|:[a-z0-9_:]+)").unwrap();
    let sources = [
        include_str!("../../../proxy/src/metrics.rs"),
        include_str!("../../src/metrics.rs"),
    ];
    let mut known: std::collections::BTreeSet<String> = sources
        .iter()
        .flat_map(|s| name.find_iter(s).map(|m| m.as_str().to_string()))
        .collect();
    for n in known.clone() {
        for suffix in ["_bucket", "_sum", "_count"] {
            known.insert(format!("{n}{suffix}"));
        }
    }
    let rules = std::fs::read_to_string(dir.join("prometheus-rules.yaml")).unwrap();
    let record = regex::Regex::new(r"(?m)^\s*- record: (\S+)").unwrap();
    known.extend(record.captures_iter(&rules).map(|c| c[1].to_string()));
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap())
            .unwrap();
    let mut exprs = Vec::new();
    let mut stack = vec![&dashboard];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(e)) => exprs.push(e.clone()),
                        _ => stack.push(v),
                    }
                }
            }
            serde_json::Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    assert!(exprs.len() >= 20, "{exprs:?}");
    let mut used = 0;
    for e in &exprs {
        for m in name.find_iter(e) {
            used += 1;
            assert!(
                known.contains(m.as_str()),
                "{:?} in {e:?} is no metric or record",
                m.as_str()
            );
        }
    }
    assert!(
        used >= exprs.len() - 1,
        "every query names a Trellis series"
    );
}
