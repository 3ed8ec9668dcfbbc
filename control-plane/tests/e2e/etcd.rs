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
    let (da, db, dp) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let a = control_on(&etcd, da.path()).await;
    let b = control_on(&etcd, db.path()).await;
    let blue = TestServer::start("blue").await;
    let green = TestServer::start("green").await;

    apply(&a.url, &mesh(100, 0));
    register_instance(
        &b.url,
        ("test", "colorteller"),
        "blue-1",
        blue.addr,
        &["version=blue"],
    );
    register_instance(
        &a.url,
        ("test", "colorteller"),
        "green-1",
        green.addr,
        &["version=green"],
    );
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
            let connected =
                |url: &str| crate::status(url)["proxies"].as_array().map_or(0, Vec::len);
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
    let counts = split(front.egress, HOST, 20).await;
    assert_eq!(counts.get("blue"), Some(&20), "{counts:?}");

    // A change through the other reaches the proxy.
    apply(&other.url, &mesh(0, 100));
    eventually(
        Duration::from_secs(10),
        "green through the other's change",
        || async {
            let c = split(front.egress, HOST, 10).await;
            if c.get("green") == Some(&10) {
                Ok(())
            } else {
                Err(format!("{c:?}"))
            }
        },
    )
    .await;

    // Its control plane dies under load: the proxy keeps serving, moves to the other, and
    // follows its changes.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(front.egress, stop.clone());
    holder.kill().await;
    wait_synced(&other.url, 1).await;
    apply(&other.url, &mesh(100, 0));
    eventually(
        Duration::from_secs(10),
        "blue again, through the survivor",
        || async {
            let c = split(front.egress, HOST, 10).await;
            if c.get("blue") == Some(&10) {
                Ok(())
            } else {
                Err(format!("{c:?}"))
            }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failures) = traffic.await.unwrap();
    assert!(ok > 20, "the load ran ({ok})");
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}
