//! Several trellis-control processes on one real etcd cluster (Debian's `etcd-server`, three
//! members on loopback ports the OS picks): a write through any of them reaches the proxies of
//! every one, and a proxy whose control plane dies moves to another with traffic flowing.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use trellis_testkit::{
    ProxyProcess, TestServer, client::Client, etcd::EtcdCluster, eventually,
    process::ControlProcess,
};

use crate::{CONTROL, apply, cli, proxy_bin, register_instance, split, stdout, wait_synced};

const HOST: &str = "colorteller.default:9080";

fn mesh(blue: u32, green: u32) -> String {
    let node = |name: &str| {
        format!(
            "---\napiVersion: mesh.trellis.dev/v1beta1\nkind: VirtualNode\nmetadata: {{ name: {name} }}\nspec:\n  listeners: [{{ portMapping: {{ port: 9080, protocol: http }} }}]\n  serviceDiscovery: {{ registry: {{ namespaceName: test, serviceName: colorteller, attributes: {{ version: {name} }} }} }}\n"
        )
    };
    format!(
        "apiVersion: mesh.trellis.dev/v1beta1\nkind: Mesh\nmetadata: {{ name: test }}\n---\n\
         apiVersion: mesh.trellis.dev/v1beta1\nkind: VirtualNode\nmetadata: {{ name: front }}\nspec:\n  listeners: [{{ portMapping: {{ port: 8080, protocol: http }} }}]\n  backends: [{{ virtualService: {{ virtualServiceRef: {{ name: colorteller }} }} }}]\n{}{}---\n\
         apiVersion: mesh.trellis.dev/v1beta1\nkind: VirtualRouter\nmetadata: {{ name: colorteller }}\nspec:\n  listeners: [{{ portMapping: {{ port: 9080, protocol: http }} }}]\n  routes:\n    - name: split\n      httpRoute:\n        match: {{ prefix: / }}\n        action:\n          weightedTargets:\n            - {{ virtualNodeRef: {{ name: blue }}, weight: {blue} }}\n            - {{ virtualNodeRef: {{ name: green }}, weight: {green} }}\n---\n\
         apiVersion: mesh.trellis.dev/v1beta1\nkind: VirtualService\nmetadata: {{ name: colorteller }}\nspec:\n  provider: {{ virtualRouter: {{ virtualRouterRef: {{ name: colorteller }} }} }}\n",
        node("blue"),
        node("green")
    )
}

/// `n` GETs through `via`, counted by answer; an error (the proxy has no config yet and closes
/// connections) is an `Err`, for `eventually`.
async fn answers(
    via: std::net::SocketAddr,
    n: usize,
) -> Result<std::collections::HashMap<String, usize>, String> {
    let mut c = Client::h1(via).await.map_err(|e| e.to_string())?;
    let mut counts = std::collections::HashMap::new();
    for _ in 0..n {
        let r = c.get(HOST, "/").await.map_err(|e| e.to_string())?;
        let key = match r.header("x-trellis-error") {
            Some(kind) => format!("error:{kind}"),
            None => r.text(),
        };
        *counts.entry(key).or_default() += 1;
    }
    Ok(counts)
}

/// Waits until every one of 10 requests through `via` is answered by `colour`.
async fn all(via: std::net::SocketAddr, colour: &str) {
    eventually(Duration::from_secs(20), colour, || async {
        let c = answers(via, 10).await?;
        if c.get(colour) == Some(&10) {
            Ok(())
        } else {
            Err(format!("{c:?}"))
        }
    })
    .await;
}

/// Applies `yaml` through `url` once it can (a quorum back, a leader elected); other answers
/// until then must name the store.
async fn applied(url: &str, yaml: &str, what: &str) {
    eventually(Duration::from_secs(30), what, || async {
        let out = crate::apply_result(url, yaml);
        if out.status.success() {
            return Ok(());
        }
        let why = crate::stderr(&out);
        assert!(
            why.contains("store") || why.contains("etcd"),
            "a clear error: {why}"
        );
        Err(why)
    })
    .await;
}

/// Stops the load and checks it ran (more than `min` answers) with no failure.
async fn no_failures(
    stop: &AtomicBool,
    traffic: tokio::task::JoinHandle<(usize, Vec<String>)>,
    min: usize,
) {
    stop.store(true, Ordering::Relaxed);
    let (ok, failures) = traffic.await.unwrap();
    assert!(ok > min, "the load ran ({ok})");
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

/// `trellis status --local`: the proxies connected to that control plane only.
fn local(url: &str) -> serde_json::Value {
    let out = cli(url, &["status", "--local", "-o", "json"]);
    assert!(out.status.success(), "{}", crate::stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Two control planes on `etcd`, the mesh (all to blue) applied through A, blue's instance
/// registered through B and green's through A, with the upstreams and data directories.
struct Two {
    a: ControlProcess,
    b: ControlProcess,
    _servers: [TestServer; 2],
    _dirs: [tempfile::TempDir; 2],
}

impl Two {
    async fn start(etcd: &EtcdCluster) -> Self {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let a = control_on(etcd, dirs[0].path()).await;
        let b = control_on(etcd, dirs[1].path()).await;
        let blue = TestServer::start("blue").await;
        let green = TestServer::start("green").await;
        apply(&a.url, &mesh(100, 0));
        let service = ("test", "colorteller");
        register_instance(&b.url, service, "blue-1", blue.addr, &["version=blue"]);
        register_instance(&a.url, service, "green-1", green.addr, &["version=green"]);
        Self {
            a,
            b,
            _servers: [blue, green],
            _dirs: dirs,
        }
    }
}

async fn control_on(etcd: &EtcdCluster, dir: &std::path::Path) -> ControlProcess {
    let url = etcd.url();
    ControlProcess::start_with(
        CONTROL,
        dir,
        "127.0.0.1:0",
        &["--store", &url, "--etcd-prefix", "/e2e/"],
    )
    .await
}

/// Requests through `via` until stopped; the failures.
fn load(
    via: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let (mut ok, mut failures) = (0, Vec::new());
        let mut c = Client::h1(via).await.unwrap();
        while !stop.load(Ordering::Relaxed) {
            match c.get(HOST, "/").await {
                Ok(r) if r.status == 200 => ok += 1,
                Ok(r) => failures.push(format!("{} {:?}", r.status, r.header("x-trellis-error"))),
                Err(e) => {
                    failures.push(e.to_string());
                    c = Client::h1(via).await.unwrap();
                }
            }
        }
        (ok, failures)
    })
}

/// Two control planes on a three-member etcd: the mesh applied through one and the instances
/// registered through the other make one mesh; a weight change through either reaches a proxy
/// of the other; when the proxy's control plane is killed it moves to the survivor, traffic
/// flowing throughout (no failed request), and follows changes made there.
#[tokio::test]
async fn control_planes_on_one_etcd_share_the_mesh() {
    let etcd = EtcdCluster::start(3).await;
    let Two {
        a,
        b,
        _servers,
        _dirs,
    } = Two::start(&etcd).await;
    let dp = tempfile::tempdir().unwrap();
    let listed = stdout(&cli(&b.url, &["get", "virtualnodes"]));
    assert!(
        listed.contains("front") && listed.contains("green"),
        "{listed}"
    );

    // The proxy follows one of them (proxies spread over the control planes they list).
    let front = ProxyProcess::sidecar(
        proxy_bin(),
        &format!("{},{}", a.url, b.url),
        "default/front",
        dp.path(),
    )
    .await;
    let on_a = eventually(
        Duration::from_secs(10),
        "the proxy on one of them",
        || async {
            let connected = |url: &str| local(url)["proxies"].as_array().map_or(0, Vec::len);
            match (connected(&a.url), connected(&b.url)) {
                (1, 0) => Ok(true),
                (0, 1) => Ok(false),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let (mut holder, other) = if on_a { (a, b) } else { (b, a) };
    wait_synced(&holder.url, 1).await;
    // `trellis status` through the other shows it too (published through etcd).
    wait_synced(&other.url, 1).await;
    assert_eq!(
        local(&other.url)["proxies"].as_array().map(Vec::len),
        Some(0)
    );
    all(front.egress, "blue").await;

    // A change through the other reaches the proxy.
    apply(&other.url, &mesh(0, 100));
    all(front.egress, "green").await;

    // Its control plane dies under load: the proxy keeps serving, moves to the other, and
    // follows its changes.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(front.egress, stop.clone());
    holder.kill().await;
    wait_synced(&other.url, 1).await;
    apply(&other.url, &mesh(100, 0));
    all(front.egress, "blue").await;
    no_failures(&stop, traffic, 20).await;
}

/// Whether `control`'s `/readyz` says its store answers.
fn ready(control: &ControlProcess) -> bool {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, urllib.request as u\ntry:\n    u.urlopen(sys.argv[1] + '/readyz', timeout=10)\nexcept Exception:\n    sys.exit(1)",
            &control.url,
        ])
        .status()
        .unwrap();
    out.success()
}

/// Faults of etcd under continuous traffic, no failed request: the leader killed (an apply
/// through a control plane lands whole once a new leader is elected, or fails saying why);
/// every member down (control planes say they are not ready, applies fail clearly, proxies keep
/// serving their snapshot); the members back (everything resumes).
#[tokio::test]
async fn etcd_faults_fail_no_request() {
    let mut etcd = EtcdCluster::start(3).await;
    let Two {
        a,
        b,
        _servers,
        _dirs,
    } = Two::start(&etcd).await;
    let dp = tempfile::tempdir().unwrap();
    let urls = format!("{},{}", a.url, b.url);
    let front = ProxyProcess::sidecar(proxy_bin(), &urls, "default/front", dp.path()).await;
    all(front.egress, "blue").await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(front.egress, stop.clone());

    // The leader dies: an apply lands (or says why it cannot) once another leads.
    let leader = etcd.leader().await;
    etcd.members[leader].kill();
    applied(&b.url, &mesh(0, 100), "an apply through a survivor").await;
    all(front.egress, "green").await;
    etcd.members[leader].restart();

    // Every member down: not ready, applies refused saying why, the proxy serves on.
    for m in &mut etcd.members {
        m.kill();
    }
    eventually(
        Duration::from_secs(20),
        "the control planes not ready",
        || async {
            if !ready(&a) && !ready(&b) {
                Ok(())
            } else {
                Err("still ready".to_string())
            }
        },
    )
    .await;
    let out = crate::apply_result(&a.url, &mesh(100, 0));
    assert!(!out.status.success(), "applied with etcd down");
    let why = crate::stderr(&out);
    assert!(why.contains("store") || why.contains("etcd"), "{why}");
    let c = split(front.egress, HOST, 20).await;
    assert_eq!(
        c.get("green"),
        Some(&20),
        "the last snapshot serves on: {c:?}"
    );

    // Back: ready again, and a change goes through to the proxy.
    for m in &mut etcd.members {
        m.restart();
    }
    eventually(
        Duration::from_secs(30),
        "the control planes ready",
        || async {
            if ready(&a) && ready(&b) {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await;
    applied(&a.url, &mesh(100, 0), "an apply after the outage").await;
    all(front.egress, "blue").await;
    no_failures(&stop, traffic, 20).await;
}

/// The etcd leader paused (SIGSTOP) for 30 s, then resumed, under continuous traffic: applies
/// land once another member leads, the resumed member rejoins, and no request fails.
#[tokio::test]
async fn a_paused_etcd_leader_fails_no_request() {
    let etcd = EtcdCluster::start(3).await;
    let Two {
        a,
        b,
        _servers,
        _dirs,
    } = Two::start(&etcd).await;
    let dp = tempfile::tempdir().unwrap();
    let urls = format!("{},{}", a.url, b.url);
    let front = ProxyProcess::sidecar(proxy_bin(), &urls, "default/front", dp.path()).await;
    all(front.egress, "blue").await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(front.egress, stop.clone());

    let leader = etcd.leader().await;
    let paused_at = tokio::time::Instant::now();
    etcd.members[leader].pause(true);
    applied(&a.url, &mesh(0, 100), "an apply while the leader is paused").await;
    all(front.egress, "green").await;
    // The fault lasts 30 s (its definition, not a wait for something to happen).
    tokio::time::sleep_until(paused_at + Duration::from_secs(30)).await;
    etcd.members[leader].pause(false);
    eventually(
        Duration::from_secs(20),
        "the resumed member answering",
        || async {
            if etcd.answers(leader) {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await;
    applied(&b.url, &mesh(100, 0), "an apply after it resumed").await;
    all(front.egress, "blue").await;
    no_failures(&stop, traffic, 100).await;
}

/// `trellis-control migrate` moves an embedded store's mesh to etcd: a control plane on etcd
/// then serves the same resources and instances, and its proxies route as before.
#[tokio::test]
async fn an_embedded_mesh_migrates_to_etcd() {
    let etcd = EtcdCluster::start(1).await;
    let (data, de, dp) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let green = TestServer::start("green").await;
    let mut embedded = ControlProcess::start(CONTROL, data.path()).await;
    apply(&embedded.url, &mesh(0, 100));
    register_instance(
        &embedded.url,
        ("test", "colorteller"),
        "green-1",
        green.addr,
        &["version=green"],
    );
    let before = stdout(&cli(&embedded.url, &["get", "virtualnodes"]));
    embedded.kill().await;

    let out = std::process::Command::new(CONTROL)
        .args([
            "migrate",
            "--from",
            data.path().to_str().unwrap(),
            "--to",
            &etcd.url(),
            "--etcd-prefix",
            "/e2e/",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", crate::stderr(&out));
    let said = stdout(&out);
    assert!(
        said.contains("content hash") && said.starts_with("migrated "),
        "{said}"
    );
    // Into a store that is not empty: refused.
    let again = std::process::Command::new(CONTROL)
        .args([
            "migrate",
            "--from",
            data.path().to_str().unwrap(),
            "--to",
            &etcd.url(),
            "--etcd-prefix",
            "/e2e/",
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        crate::stderr(&again).contains("not empty"),
        "{}",
        crate::stderr(&again)
    );

    let on_etcd = control_on(&etcd, de.path()).await;
    assert_eq!(stdout(&cli(&on_etcd.url, &["get", "virtualnodes"])), before);
    let front = ProxyProcess::sidecar(proxy_bin(), &on_etcd.url, "default/front", dp.path()).await;
    all(front.egress, "green").await;
}

/// `trellis export --instances` of a mesh, applied to an empty control plane (on etcd here),
/// restores it: the same resources, the same instances, the same routing.
#[tokio::test]
async fn an_export_restores_the_mesh() {
    let etcd = EtcdCluster::start(1).await;
    let (data, de, dp) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let green = TestServer::start("green").await;
    let source = ControlProcess::start(CONTROL, data.path()).await;
    apply(
        &source.url,
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{ name: default, labels: {{ team: colors }} }}\n---\n{}",
            mesh(0, 100)
        ),
    );
    register_instance(
        &source.url,
        ("test", "colorteller"),
        "green-1",
        green.addr,
        &["version=green"],
    );
    let out = cli(&source.url, &["export", "--instances"]);
    assert!(out.status.success(), "{}", crate::stderr(&out));
    let exported = stdout(&out);
    assert!(
        exported.contains("kind: Instance") && exported.contains("kind: Namespace"),
        "{exported}"
    );
    assert!(
        !exported.contains("resourceVersion") && !exported.contains("status:\n  proxies"),
        "{exported}"
    );

    let target = control_on(&etcd, de.path()).await;
    let applied = apply(&target.url, &exported);
    assert!(
        applied.contains("instance/test/colorteller/green-1"),
        "{applied}"
    );
    // The same names (the creation times are the target's own).
    let names = |url: &str, what: &[&str]| -> Vec<String> {
        stdout(&cli(url, what))
            .lines()
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .collect()
    };
    for what in [&["get", "virtualnodes"][..], &["get", "namespaces"]] {
        assert_eq!(
            names(&target.url, what),
            names(&source.url, what),
            "{what:?}"
        );
    }
    assert_eq!(
        stdout(&cli(&target.url, &["instances", "list"])),
        stdout(&cli(&source.url, &["instances", "list"]))
    );
    // An Instance document is checked as a registration is: the metadata service's address is
    // refused, naming the field, and nothing of the file is applied.
    let bad = format!(
        "{}---\napiVersion: mesh.trellis.dev/v1beta1\nkind: Instance\nmetadata: {{ name: evil, namespace: test }}\nspec: {{ service: colorteller, address: 169.254.169.254, port: 80 }}\n",
        mesh(100, 0)
    );
    let refused = crate::apply_refused(&target.url, &bad);
    assert!(refused.contains("spec.address"), "{refused}");
    all_after_refusal(&target.url).await;
    // Applying it again changes nothing.
    assert!(!apply(&target.url, &exported).contains("created"));
    let front = ProxyProcess::sidecar(proxy_bin(), &target.url, "default/front", dp.path()).await;
    all(front.egress, "green").await;
}

/// A root rotation's steps taken through one control plane are followed by the other on the
/// same etcd (its roots, its proxies' bundle): the next step can be taken through either.
#[tokio::test]
async fn a_root_rotation_is_followed_across_control_planes() {
    let etcd = EtcdCluster::start(1).await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let url = etcd.url();
    let args = [
        "--store",
        &url,
        "--etcd-prefix",
        "/e2e/",
        "--require-identity",
    ];
    let a = ControlProcess::start_with(CONTROL, da.path(), "127.0.0.1:0", &args).await;
    let b = ControlProcess::start_with(CONTROL, db.path(), "127.0.0.1:0", &args).await;
    let rotation = |url: &str| -> serde_json::Value {
        let out = cli(url, &["ca", "status", "-o", "json"]);
        assert!(out.status.success(), "{}", crate::stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["rotation"].clone()
    };
    assert_eq!(rotation(&a.url), rotation(&b.url), "one CA in the store");
    let step = |url: &str, step: &str| {
        let out = cli(url, &["ca", step]);
        assert!(out.status.success(), "{step}: {}", crate::stderr(&out));
    };
    step(&a.url, "rotate");
    let begun = rotation(&a.url);
    assert_eq!(begun["stage"], "begun");
    eventually(
        Duration::from_secs(10),
        "B following the rotation",
        || async {
            let r = rotation(&b.url);
            if r == begun {
                Ok(())
            } else {
                Err(r.to_string())
            }
        },
    )
    .await;
    // The next step through B (it refuses one on roots it does not use).
    step(&b.url, "promote");
    eventually(
        Duration::from_secs(10),
        "A following the promotion",
        || async {
            let r = rotation(&a.url);
            if r["stage"] == "promoted" && r["current"] == begun["next"] {
                Ok(())
            } else {
                Err(r.to_string())
            }
        },
    )
    .await;
    step(&a.url, "finish");
    eventually(
        Duration::from_secs(10),
        "B following the finish",
        || async {
            let r = rotation(&b.url);
            if r["stage"] == "none" && r["current"] == begun["next"] {
                Ok(())
            } else {
                Err(r.to_string())
            }
        },
    )
    .await;
}

/// After a refused apply the router still sends everything to green (the export's weights).
async fn all_after_refusal(url: &str) {
    let out = cli(url, &["get", "virtualrouter", "colorteller", "-o", "json"]);
    let router: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let targets = router["spec"]["routes"][0]["httpRoute"]["action"]["weightedTargets"].clone();
    assert_eq!(targets[0]["weight"], 0, "unchanged: {targets}");
    assert_eq!(targets[1]["weight"], 100, "unchanged: {targets}");
}

/// The failover: the replica holding most of the proxies is killed under traffic, an
/// apply through the survivor lands during the failover, and every proxy moves over and runs it
/// — no request fails.
#[tokio::test]
async fn proxies_of_a_killed_replica_converge_on_a_change_made_during_the_failover() {
    let etcd = EtcdCluster::start(3).await;
    let Two {
        a,
        b,
        _servers,
        _dirs,
    } = Two::start(&etcd).await;
    let urls = format!("{},{}", a.url, b.url);
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut proxies = Vec::new();
    for d in &dirs {
        proxies.push(ProxyProcess::sidecar(proxy_bin(), &urls, "default/front", d.path()).await);
    }
    wait_synced(&a.url, 4).await;
    for p in &proxies {
        all(p.egress, "blue").await;
    }
    // Kill the replica holding more of them (at least half).
    let on_a = local(&a.url)["proxies"].as_array().map_or(0, Vec::len);
    let (mut victim, survivor) = if on_a >= 2 { (a, b) } else { (b, a) };
    let stop = Arc::new(AtomicBool::new(false));
    let traffic: Vec<_> = proxies
        .iter()
        .map(|p| load(p.egress, stop.clone()))
        .collect();
    victim.kill().await;
    apply(&survivor.url, &mesh(0, 100));
    wait_synced(&survivor.url, 4).await;
    for p in &proxies {
        all(p.egress, "green").await;
    }
    assert_eq!(
        local(&survivor.url)["proxies"].as_array().map(Vec::len),
        Some(4),
        "all on the survivor"
    );
    stop.store(true, Ordering::Relaxed);
    for t in traffic {
        let (ok, failures) = t.await.unwrap();
        assert!(ok > 10, "the load ran ({ok})");
        assert!(
            failures.is_empty(),
            "{} failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }
}

/// `trellis status -o json` of `url`: who answered and who it says leads.
fn who(url: &str) -> (String, Option<String>) {
    let out = cli(url, &["status", "-o", "json"]);
    assert!(out.status.success(), "{}", crate::stderr(&out));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        s["replica"].as_str().unwrap().to_string(),
        s["leader"].as_str().map(str::to_string),
    )
}

/// Waits until the control plane at `url` names `leader` as the leader.
async fn says_leader(url: &str, leader: &str, what: &str) {
    eventually(Duration::from_secs(30), what, || async {
        match who(url).1 {
            Some(l) if l == leader => Ok(()),
            seen => Err(format!("{seen:?}")),
        }
    })
    .await;
}

/// Leadership among control planes on one etcd: both agree on one leader; when it is killed
/// (its lease left to end) the survivor leads, says so, and does the leader's duty — the audit
/// log's retention (here: at most one entry) — which it did not do when it started as a
/// follower.
#[tokio::test]
async fn a_new_leader_takes_over_when_the_leader_dies() {
    let etcd = EtcdCluster::start(1).await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let url = etcd.url();
    let flags = [
        "--store",
        &url,
        "--etcd-prefix",
        "/lead/",
        "--leader-lease",
        "3s",
        "--audit-max-entries",
        "1",
    ];
    let entries = |url: &str| {
        let out = cli(url, &["audit", "-o", "json"]);
        assert!(out.status.success(), "{}", crate::stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .map_or(0, Vec::len)
    };
    let mut a = ControlProcess::start_with(CONTROL, dirs[0].path(), "127.0.0.1:0", &flags).await;
    let first = who(&a.url).0;
    says_leader(&a.url, &first, "the first leads").await;
    // Writes recorded while it leads (it pruned when it became leader, before them).
    apply(&a.url, &mesh(100, 0));
    apply(&a.url, &mesh(0, 100));
    let b = ControlProcess::start_with(CONTROL, dirs[1].path(), "127.0.0.1:0", &flags).await;
    let second = who(&b.url).0;
    assert_ne!(first, second);
    says_leader(&b.url, &first, "both agree").await;
    assert!(
        entries(&b.url) >= 2,
        "a follower does not prune the audit log"
    );

    a.kill().await;
    says_leader(&b.url, &second, "the survivor leads").await;
    let table = stdout(&cli(&b.url, &["status"]));
    assert!(table.contains("leader: this one"), "{table}");
    eventually(Duration::from_secs(10), "the new leader prunes", || async {
        match entries(&b.url) {
            1 => Ok(()),
            n => Err(format!("{n} entries")),
        }
    })
    .await;
}
