//! `trellis-control --source kubernetes` against the in-repo API stand-in
//! (`testkit/kube-standin.py`: list and watch with resourceVersions, 410 after compaction,
//! status subresources, Leases), with the real kube-rs client, a real sidecar and real
//! upstreams at the "pods'" addresses. No Kubernetes API server can run here; the live test
//! (`live_cluster`, gated on TRELLIS_TEST_KUBECONFIG) runs the same source against a real one.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use http::Request;
use http_body_util::Full;
use serde_json::{Value, json};
use trellis_testkit::{
    client::Client,
    eventually,
    process::{ControlProcess, ProxyProcess},
    upstream::TestServer,
};

use crate::{CONTROL, apply_refused, cli, proxy_bin, split, stdout};

/// The stand-in API server, stopped when dropped.
struct Standin {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Standin {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// With `args` (`--unserved GROUP`: a group whose CRDs are not installed).
    fn start_with(args: &[&str]) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../testkit/kube-standin.py");
        let mut child = Command::new("python3")
            .args([script, "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening http://")
            .unwrap_or_else(|| panic!("stand-in said {line:?}"))
            .parse()
            .unwrap();
        Self { child, addr }
    }

    fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster: {{ server: 'http://{}' }}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context: {{ cluster: standin, user: test }}\ncurrent-context: test\n",
                self.addr
            ),
        )
        .unwrap();
        path
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut c = Client::h1(self.addr).await.unwrap();
        let content_type = if method == "PATCH" {
            "application/merge-patch+json"
        } else {
            "application/json"
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", content_type)
            .body(Full::from(body.map(|b| b.to_string()).unwrap_or_default()))
            .unwrap();
        let r = c.send(req).await.unwrap();
        let value = serde_json::from_str(&r.text()).unwrap_or(Value::Null);
        (r.status.as_u16(), value)
    }

    async fn create(&self, collection: &str, object: Value) {
        let (status, body) = self.call("POST", collection, Some(object)).await;
        assert_eq!(status, 201, "{collection}: {body}");
    }
}

const APPMESH: &str = "/apis/appmesh.k8s.aws/v1beta2";

fn pod(name: &str, version: &str, ip: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "shop", "labels": { "app": "reviews", "version": version } },
        "spec": { "containers": [{ "name": "app", "image": "reviews" }] },
        "status": {
            "podIP": ip,
            "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }],
        },
    })
}

/// Two upstreams on one port at two loopback addresses: the pods.
async fn pods_at(ips: [&str; 2]) -> (TestServer, TestServer) {
    for _ in 0..20 {
        let a = TestServer::start_at("reviews-a", format!("{}:0", ips[0]).parse().unwrap())
            .await
            .unwrap();
        let at = SocketAddr::new(ips[1].parse().unwrap(), a.addr.port());
        if let Ok(b) = TestServer::start_at("reviews-b", at).await {
            return (a, b);
        }
    }
    panic!("no port free on both addresses");
}

/// The App Mesh walkthrough's shape, applied to the cluster: a labelled Namespace, a Mesh
/// selecting it, a VirtualNode selecting pods by label (Cloud Map discovery), its
/// VirtualService named after a Service, and a caller. The control plane runs it: the caller's
/// sidecar reaches the ready pods (and the Service's cluster IP), statuses say what is valid
/// and converged, an invalid resource degrades only itself, a terminating pod drains, a
/// watch gap (compaction: 410) is recovered by relisting, and the API refuses writes.
#[tokio::test]
async fn the_mesh_and_the_registry_come_from_the_cluster() {
    // A cluster with App Mesh's CRDs only (Trellis's group is not served), as during a
    // migration.
    let api = Standin::start_with(&["--unserved", "mesh.trellis.dev"]);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pods_at(["127.0.0.2", "127.0.0.3"]).await;
    let port = a.addr.port();

    api.create("/api/v1/namespaces", json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "shop", "labels": { "mesh": "shop" } } })).await;
    api.create(
        &format!("{APPMESH}/meshes"),
        json!({
            "apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "Mesh", "metadata": { "name": "shop" },
            "spec": { "namespaceSelector": { "matchLabels": { "mesh": "shop" } } },
        }),
    )
    .await;
    let ns = format!("{APPMESH}/namespaces/shop");
    api.create(&format!("{ns}/virtualnodes"), json!({
        "apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "VirtualNode", "metadata": { "name": "reviews-v1", "namespace": "shop" },
        "spec": {
            "podSelector": { "matchLabels": { "app": "reviews", "version": "v1" } },
            "listeners": [{ "portMapping": { "port": port, "protocol": "http" } }],
            // Attributes the pods do not carry as labels: their instances get them (as App Mesh
            // registered them), so the node's own selection finds them.
            "serviceDiscovery": { "awsCloudMap": { "namespaceName": "shop.local", "serviceName": "reviews", "attributes": [{ "key": "track", "value": "stable" }] } },
            // A backend by ARN (App Mesh's spelling): its pods are registered all the same.
            "backends": [{ "virtualService": { "virtualServiceARN": "arn:aws:appmesh:us-west-2:111122223333:mesh/shop/virtualService/reviews" } }],
        },
    })).await;
    api.create(&format!("{ns}/virtualservices"), json!({
        "apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "VirtualService", "metadata": { "name": "reviews", "namespace": "shop" },
        "spec": { "awsName": "reviews.shop.svc.cluster.local", "provider": { "virtualNode": { "virtualNodeRef": { "name": "reviews-v1" } } } },
    })).await;
    api.create(&format!("{ns}/virtualnodes"), json!({
        "apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "VirtualNode", "metadata": { "name": "productpage", "namespace": "shop" },
        "spec": {
            "podSelector": { "matchLabels": { "app": "productpage" } },
            "listeners": [{ "portMapping": { "port": 9080, "protocol": "http" } }],
            "serviceDiscovery": { "dns": { "hostname": "productpage.shop.svc.cluster.local" } },
            "backends": [{ "virtualService": { "virtualServiceRef": { "name": "reviews" } } }],
        },
    })).await;
    api.create("/api/v1/namespaces/shop/services", json!({
        "apiVersion": "v1", "kind": "Service", "metadata": { "name": "reviews", "namespace": "shop" },
        "spec": { "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": [{ "port": 9080 }] },
    })).await;
    api.create(
        "/api/v1/namespaces/shop/pods",
        pod("reviews-v1-a", "v1", "127.0.0.2", true),
    )
    .await;
    api.create(
        "/api/v1/namespaces/shop/pods",
        pod("reviews-v1-b", "v1", "127.0.0.3", true),
    )
    .await;
    // Not ready: not an instance.
    api.create(
        "/api/v1/namespaces/shop/pods",
        pod("reviews-v1-c", "v1", "127.0.0.4", false),
    )
    .await;
    // Another version: not selected.
    api.create(
        "/api/v1/namespaces/shop/pods",
        pod("reviews-v2-a", "v2", "127.0.0.5", true),
    )
    .await;

    let kubeconfig = api.kubeconfig(dir.path());
    let control = ControlProcess::start_with(
        CONTROL,
        &dir.path().join("control"),
        "127.0.0.1:0",
        &[
            "--source",
            "kubernetes",
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--lease-namespace",
            "trellis-system",
            "--lease-identity",
            "control-1",
        ],
    )
    .await;
    let server = control.url.clone();

    let instances = |want: usize| {
        let server = server.clone();
        async move {
            let out = cli(&server, &["instances", "list", "-o", "json"]);
            let v: Value = serde_json::from_str(&stdout(&out))
                .map_err(|e| format!("{e}: {}", stdout(&out)))?;
            let list = v.as_array().cloned().unwrap_or_default();
            if list.len() == want {
                Ok(list)
            } else {
                Err(format!("{} instances: {v}", list.len()))
            }
        }
    };
    let list = eventually(Duration::from_secs(15), "the pods as instances", || {
        instances(2)
    })
    .await;
    let mut addresses: Vec<&str> = list.iter().filter_map(|i| i["address"].as_str()).collect();
    addresses.sort_unstable();
    assert_eq!(addresses, ["127.0.0.2", "127.0.0.3"]);
    assert!(
        list.iter().all(|i| i["namespace"] == "shop.local"
            && i["service"] == "reviews"
            && i["port"] == port)
    );
    for i in &list {
        let a = &i["attributes"];
        assert_eq!(a["k8s.io/namespace"], "shop", "{i}");
        assert_eq!(a["track"], "stable", "{i}");
        assert_eq!(a["AWS_INSTANCE_IPV4"], i["address"], "{i}");
        assert_eq!(a["AWS_INSTANCE_PORT"], port.to_string(), "{i}");
        assert_eq!(a["appmesh.k8s.aws/mesh"], "shop", "{i}");
        assert_eq!(a["appmesh.k8s.aws/virtualNode"], "reviews-v1", "{i}");
    }

    // The caller's sidecar reaches both pods, by name and by the Service's cluster IP.
    let proxy = ProxyProcess::sidecar(
        proxy_bin(),
        &server,
        "shop/productpage",
        &dir.path().join("proxy"),
    )
    .await;
    crate::wait_synced(&server, 1).await;
    let host = format!("reviews.shop.svc.cluster.local:{port}");
    let counts = eventually(Duration::from_secs(10), "both pods", || async {
        let c = split(proxy.egress, &host, 20).await;
        if c.get("reviews-a").copied().unwrap_or(0) > 0
            && c.get("reviews-b").copied().unwrap_or(0) > 0
        {
            Ok(c)
        } else {
            Err(format!("{c:?}"))
        }
    })
    .await;
    assert_eq!(counts.values().sum::<usize>(), 20, "{counts:?}");
    let by_ip = split(proxy.egress, "10.96.0.10:9080", 4).await;
    assert_eq!(
        by_ip.get("error:egress_denied"),
        None,
        "the cluster IP is the service's: {by_ip:?}"
    );
    assert_eq!(by_ip.values().sum::<usize>(), 4);

    // Statuses: valid, converged on the one proxy that uses them.
    let vs_path = format!("{ns}/virtualservices/reviews");
    eventually(
        Duration::from_secs(15),
        "the VirtualService's status",
        || async {
            let (_, o) = api.call("GET", &vs_path, None).await;
            let conds = &o["status"]["conditions"];
            let valid = conds
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Valid"))
                .cloned()
                .unwrap_or_default();
            let converged = conds
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Converged"))
                .cloned()
                .unwrap_or_default();
            if valid["status"] == "True"
                && converged["status"] == "True"
                && o["status"]["convergence"] == "1/1"
                && o["status"]["observedGeneration"] == 1
            {
                Ok(())
            } else {
                Err(o["status"].to_string())
            }
        },
    )
    .await;

    // An invalid resource degrades itself: its status says why, its neighbours keep running.
    api.create(&format!("{ns}/virtualservices"), json!({
        "apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "VirtualService", "metadata": { "name": "ratings", "namespace": "shop" },
        "spec": { "awsName": "ratings.shop.svc.cluster.local", "provider": { "virtualRouter": { "virtualRouterRef": { "name": "ratings-router" } } } },
    })).await;
    let message = eventually(
        Duration::from_secs(15),
        "the invalid resource's status",
        || async {
            let (_, o) = api
                .call("GET", &format!("{ns}/virtualservices/ratings"), None)
                .await;
            let valid = o["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Valid"))
                .cloned()
                .unwrap_or_default();
            if valid["status"] == "False" {
                Ok(valid["message"].as_str().unwrap_or_default().to_string())
            } else {
                Err(o["status"].to_string())
            }
        },
    )
    .await;
    assert!(message.contains("ratings-router"), "{message}");
    let out = cli(&server, &["get", "virtualservices", "-n", "shop"]);
    assert!(
        !stdout(&out).contains("ratings"),
        "not stored: {}",
        stdout(&out)
    );
    let c = split(proxy.egress, &host, 6).await;
    assert_eq!(
        c.get("reviews-a").copied().unwrap_or(0) + c.get("reviews-b").copied().unwrap_or(0),
        6,
        "{c:?}"
    );

    // A terminating pod drains: no new requests.
    // (Deleted while a finalizer holds it, as a kubelet holds a pod while it stops.)
    let b_path = "/api/v1/namespaces/shop/pods/reviews-v1-b";
    let (status, _) = api
        .call(
            "PATCH",
            b_path,
            Some(json!({ "metadata": { "finalizers": ["test/stopping"] } })),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = api.call("DELETE", b_path, None).await;
    assert_eq!(status, 200);
    eventually(Duration::from_secs(15), "pod b draining", || async {
        let list = instances(2).await?;
        let b = list
            .iter()
            .find(|i| i["address"] == "127.0.0.3")
            .cloned()
            .unwrap_or_default();
        if b["status"] == "draining" {
            Ok(())
        } else {
            Err(b.to_string())
        }
    })
    .await;
    eventually(Duration::from_secs(10), "only pod a", || async {
        let c = split(proxy.egress, &host, 10).await;
        if c.get("reviews-a") == Some(&10) {
            Ok(())
        } else {
            Err(format!("{c:?}"))
        }
    })
    .await;

    // A gap in the watch (history compacted: the watch resumes with 410) is recovered by
    // listing again: changes made meanwhile arrive.
    let (status, _) = api.call("POST", "/standin/compact", None).await;
    assert_eq!(status, 200);
    let (status, _) = api
        .call(
            "PATCH",
            b_path,
            Some(json!({ "metadata": { "finalizers": null } })),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = api.call("POST", "/standin/compact", None).await;
    assert_eq!(status, 200);
    let list = eventually(Duration::from_secs(20), "pod b gone after the gap", || {
        instances(1)
    })
    .await;
    assert_eq!(list[0]["address"], "127.0.0.2");

    // The API does not write what the cluster owns.
    let refused = apply_refused(
        &server,
        "apiVersion: appmesh.k8s.aws/v1beta2\nkind: Mesh\nmetadata: { name: other }\nspec: {}\n",
    );
    assert!(refused.contains("kubectl"), "{refused}");

    // A resource being deleted is gone for the mesh, also while a finalizer (App Mesh's, whose
    // controller is no longer there to remove it) holds it in the cluster.
    let (status, _) = api.call("PATCH", &vs_path, Some(json!({ "metadata": { "finalizers": ["finalizers.appmesh.k8s.aws/aws-resources"] } }))).await;
    assert_eq!(status, 200);
    let (status, _) = api.call("DELETE", &vs_path, None).await;
    assert_eq!(status, 200);
    eventually(
        Duration::from_secs(15),
        "the deleted VirtualService gone",
        || async {
            let out = stdout(&cli(&server, &["get", "virtualservices", "-n", "shop"]));
            if out.contains("reviews") {
                Err(out)
            } else {
                Ok(())
            }
        },
    )
    .await;

    // The status writer holds the Lease.
    let (status, lease) = api
        .call(
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases/trellis-control",
            None,
        )
        .await;
    assert_eq!(status, 200, "{lease}");
    assert_eq!(lease["spec"]["holderIdentity"], "control-1");
    drop((a, b));
}

/// The `Valid` condition of the stand-in object at `path`, once it has one.
async fn valid_condition(api: &Standin, path: &str) -> Value {
    eventually(Duration::from_secs(20), "a Valid condition", || async {
        let (_, o) = api.call("GET", path, None).await;
        o["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Valid"))
            .cloned()
            .ok_or_else(|| o.to_string())
    })
    .await
}

/// Two replicas: one holds the Lease and writes statuses; when it dies, the other takes the
/// Lease once it expires and writes them from then on.
#[tokio::test]
async fn a_second_replica_takes_over_status_writes() {
    let api = Standin::start();
    let dir = tempfile::tempdir().unwrap();
    api.create(
        "/api/v1/namespaces",
        json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "shop" } }),
    )
    .await;
    api.create(&format!("{APPMESH}/meshes"), json!({ "apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "Mesh", "metadata": { "name": "shop" }, "spec": {} })).await;
    let kubeconfig = api.kubeconfig(dir.path()).display().to_string();
    let start = |name: &'static str| {
        let (dir, kubeconfig) = (dir.path().join(name), kubeconfig.clone());
        async move {
            ControlProcess::start_with(
                CONTROL,
                &dir,
                "127.0.0.1:0",
                &[
                    "--source",
                    "kubernetes",
                    "--kubeconfig",
                    &kubeconfig,
                    "--lease-namespace",
                    "trellis-system",
                    "--lease-identity",
                    name,
                    "--lease-duration",
                    "2s",
                ],
            )
            .await
        }
    };
    let lease = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases/trellis-control";
    let api = &api;
    let holder = move |want: &'static str| async move {
        let (_, l) = api.call("GET", lease, None).await;
        if l["spec"]["holderIdentity"] == want {
            Ok(l)
        } else {
            Err(l.to_string())
        }
    };
    let mut first = start("control-1").await;
    eventually(Duration::from_secs(10), "control-1 leads", || {
        holder("control-1")
    })
    .await;
    let second = start("control-2").await;
    let vs = |name: &str| {
        json!({
            "apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "VirtualService", "metadata": { "name": name, "namespace": "shop" },
            "spec": { "provider": { "virtualNode": { "virtualNodeRef": { "name": "missing" } } } },
        })
    };
    let ns = format!("{APPMESH}/namespaces/shop/virtualservices");
    api.create(&ns, vs("before")).await;
    assert_eq!(
        valid_condition(api, &format!("{ns}/before")).await["status"],
        "False"
    );

    first.kill().await;
    let l = eventually(Duration::from_secs(20), "control-2 leads", || {
        holder("control-2")
    })
    .await;
    assert!(l["spec"]["leaseTransitions"].as_u64() >= Some(1), "{l}");
    api.create(&ns, vs("after")).await;
    let valid = valid_condition(api, &format!("{ns}/after")).await;
    assert_eq!(valid["status"], "False", "{valid}");
    assert!(
        valid["message"]
            .as_str()
            .unwrap_or_default()
            .contains("missing"),
        "{valid}"
    );
    drop(second);
}

/// The same source against a real cluster (kind, k3s, EKS): run with
/// `TRELLIS_TEST_KUBECONFIG=PATH cargo nextest run -p trellis-control --run-ignored all live_cluster`
/// (`kubectl` on PATH; it installs the CRDs and makes a namespace and a mesh of its own, removed
/// afterwards). Not run in CI: no API server can run on our machines.
#[tokio::test]
#[ignore = "needs a real cluster: TRELLIS_TEST_KUBECONFIG"]
async fn live_cluster() {
    let kubeconfig = std::env::var("TRELLIS_TEST_KUBECONFIG")
        .expect("TRELLIS_TEST_KUBECONFIG names the kubeconfig of a cluster to test against");
    let kubectl = |args: &[&str], input: Option<&str>| {
        use std::io::Write as _;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl on PATH");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.unwrap_or_default().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let crds = Command::new(crate::CLI)
        .args(["crds", "--group", "appmesh"])
        .output()
        .unwrap();
    let (ok, out) = kubectl(
        &["apply", "-f", "-"],
        Some(&String::from_utf8_lossy(&crds.stdout)),
    );
    assert!(ok, "{out}");
    let name = format!("trellis-live-{}", std::process::id());
    let manifests = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{ name: {name}, labels: {{ mesh: {name} }} }}\n---\n\
         apiVersion: appmesh.k8s.aws/v1beta2\nkind: Mesh\nmetadata: {{ name: {name} }}\nspec: {{ namespaceSelector: {{ matchLabels: {{ mesh: {name} }} }} }}\n---\n\
         apiVersion: appmesh.k8s.aws/v1beta2\nkind: VirtualNode\nmetadata: {{ name: app, namespace: {name} }}\n\
         spec: {{ podSelector: {{ matchLabels: {{ app: app }} }}, listeners: [{{ portMapping: {{ port: 8080, protocol: http }} }}], serviceDiscovery: {{ dns: {{ hostname: app.{name}.svc.cluster.local }} }} }}\n"
    );
    let (ok, out) = kubectl(&["apply", "-f", "-"], Some(&manifests));
    assert!(ok, "{out}");
    let dir = tempfile::tempdir().unwrap();
    let control = ControlProcess::start_with(
        CONTROL,
        &dir.path().join("control"),
        "127.0.0.1:0",
        &[
            "--source",
            "kubernetes",
            "--kubeconfig",
            &kubeconfig,
            "--lease-namespace",
            &name,
            "--lease-duration",
            "5s",
        ],
    )
    .await;
    let server = control.url.clone();
    eventually(
        Duration::from_secs(60),
        "the VirtualNode in the control plane",
        || async {
            let out = stdout(&cli(&server, &["get", "virtualnodes", "-n", &name]));
            if out.contains("app") {
                Ok(())
            } else {
                Err(out)
            }
        },
    )
    .await;
    eventually(
        Duration::from_secs(60),
        "its status in the cluster",
        || async {
            let (_, out) = kubectl(
                &[
                    "get",
                    "virtualnode",
                    "app",
                    "-n",
                    &name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Valid\")].status}",
                ],
                None,
            );
            if out.trim() == "True" {
                Ok(())
            } else {
                Err(out)
            }
        },
    )
    .await;
    let _ = kubectl(&["delete", "mesh", &name, "--wait=false"], None);
    let _ = kubectl(&["delete", "namespace", &name, "--wait=false"], None);
}

/// With identities required, a sidecar proves its node with its pod's service-account token:
/// the API server reviews it (audience `trellis`), the pod it is bound to must be in the node's
/// namespace and selected by its podSelector. Another pod's token, or one for another audience,
/// admits nothing.
#[tokio::test]
async fn a_pod_proves_its_node_with_its_service_account_token() {
    let api = Standin::start();
    let dir = tempfile::tempdir().unwrap();
    api.create(
        "/api/v1/namespaces",
        json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "shop" } }),
    )
    .await;
    api.create(&format!("{APPMESH}/meshes"), json!({ "apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "Mesh", "metadata": { "name": "shop" }, "spec": {} })).await;
    let node = |name: &str, app: &str| {
        json!({
            "apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "VirtualNode", "metadata": { "name": name, "namespace": "shop" },
            "spec": {
                "podSelector": { "matchLabels": { "app": app } },
                "listeners": [{ "portMapping": { "port": 9080, "protocol": "http" } }],
                "serviceDiscovery": { "dns": { "hostname": format!("{name}.shop.svc.cluster.local") } },
            },
        })
    };
    let nodes = format!("{APPMESH}/namespaces/shop/virtualnodes");
    api.create(&nodes, node("productpage", "productpage")).await;
    api.create(&nodes, node("reviews", "reviews")).await;
    let mut uids = std::collections::HashMap::new();
    for (pod, app) in [("productpage-1", "productpage"), ("reviews-1", "reviews")] {
        let (status, o) = api
            .call("POST", "/api/v1/namespaces/shop/pods", Some(json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": pod, "namespace": "shop", "labels": { "app": app } } })))
            .await;
        assert_eq!(status, 201, "{o}");
        uids.insert(pod, o["metadata"]["uid"].as_str().unwrap().to_string());
    }
    let token = |name: &str, pod: &str, audience: &str| {
        let token = format!("eyJhbGciOiJSUzI1NiJ9.{name}.signature");
        // A legacy (secret) token is bound to no pod.
        let extra = if name == "unbound" {
            json!({})
        } else {
            json!({
                "authentication.kubernetes.io/pod-name": [pod],
                "authentication.kubernetes.io/pod-uid": [uids[pod]],
            })
        };
        let body = json!({
            "token": token, "audiences": [audience],
            "user": { "username": "system:serviceaccount:shop:default", "extra": extra },
        });
        let path = dir.path().join(name);
        std::fs::write(&path, &token).unwrap();
        (path.display().to_string(), body)
    };
    let mut files = std::collections::HashMap::new();
    for (name, pod, audience) in [
        ("productpage", "productpage-1", "trellis"),
        ("reviews", "reviews-1", "trellis"),
        (
            "apiserver",
            "productpage-1",
            "https://kubernetes.default.svc",
        ),
        ("unbound", "productpage-1", "trellis"),
    ] {
        let (file, body) = token(name, pod, audience);
        let (status, _) = api.call("POST", "/standin/tokens", Some(body)).await;
        assert_eq!(status, 200);
        files.insert(name, file);
    }
    let kubeconfig = api.kubeconfig(dir.path()).display().to_string();
    let control = ControlProcess::start_with(
        CONTROL,
        &dir.path().join("control"),
        "127.0.0.1:0",
        &[
            "--source",
            "kubernetes",
            "--kubeconfig",
            &kubeconfig,
            "--lease-namespace",
            "trellis-system",
            "--require-identity",
        ],
    )
    .await;
    let server = control.url.clone();
    eventually(Duration::from_secs(10), "the nodes", || async {
        let out = stdout(&cli(&server, &["get", "virtualnodes", "-n", "shop"]));
        if out.contains("reviews") && out.contains("productpage") {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;

    let sidecar = |token: &'static str| {
        let (server, file, data) = (
            server.clone(),
            files[token].clone(),
            dir.path().join(format!("proxy-{token}")),
        );
        async move {
            ProxyProcess::sidecar_with(
                proxy_bin(),
                &server,
                "shop/productpage",
                &data,
                &["--token-file", &file],
            )
            .await
        }
    };
    let admitted = sidecar("productpage").await;
    let status = crate::wait_synced(&server, 1).await;
    assert!(
        status["proxies"][0]["identity"]
            .as_str()
            .unwrap_or_default()
            .ends_with("/ns/shop/vn/productpage"),
        "a workload certificate was issued: {}",
        status["proxies"]
    );
    for (token, why) in [
        ("reviews", "podSelector"),
        ("apiserver", "does not accept"),
        ("unbound", "not bound to a pod"),
    ] {
        let refused = sidecar(token).await;
        eventually(Duration::from_secs(10), "the refusal", || async {
            let logs = refused.logs();
            if logs.contains(why) {
                Ok(())
            } else {
                Err(logs)
            }
        })
        .await;
    }
    let status = crate::status(&server);
    assert_eq!(
        status["proxies"].as_array().map(Vec::len),
        Some(1),
        "{}",
        status["proxies"]
    );
    drop(admitted);
}
