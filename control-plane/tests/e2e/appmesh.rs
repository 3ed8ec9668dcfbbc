//! App Mesh users' manifests, as App Mesh's walkthroughs write them, applied unchanged.

use std::time::Duration;

use serde_json::Value;
use trellis_testkit::{
    ProxyProcess, TestServer, client::Client, eventually, process::ControlProcess,
};

use crate::{CONTROL, apply, apply_refused, cli, proxy_bin, stderr, stdout, wait_synced};

/// A walkthrough-style file: a labelled Namespace, a Mesh selecting it, nodes with pod selectors
/// and Cloud Map discovery, a router whose target is an ARN, a service with its AWS name, and
/// the app's own Kubernetes Deployment in the same file.
const HOWTO: &str = include_str!("../../../examples/appmesh/howto.yaml");

const HOST: &str = "color.howto.svc.cluster.local:8080";

/// App Mesh documents as the walkthroughs write them, each ending with `---`.
mod doc {
    const API: &str = "apiVersion: appmesh.k8s.aws/v1beta2";

    /// Mesh `m` with `spec` (YAML flow, e.g. `{}`).
    pub fn mesh(spec: &str) -> String {
        format!("{API}\nkind: Mesh\nmetadata: {{ name: m }}\nspec: {spec}\n---\n")
    }

    /// Node `name` of `namespace` with one http listener on `port`, discovered by `discovery`
    /// (YAML flow), and `extra` spec lines (each `  key: value\n`).
    pub fn node(namespace: &str, name: &str, port: u16, discovery: &str, extra: &str) -> String {
        format!(
            "{API}\nkind: VirtualNode\nmetadata: {{ name: {name}, namespace: {namespace} }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: {port}, protocol: http }} }}]\n  \
             serviceDiscovery: {discovery}\n{extra}---\n"
        )
    }

    /// VirtualService `name` of `namespace`, provided by the node of that name.
    pub fn service(namespace: &str, name: &str) -> String {
        format!(
            "{API}\nkind: VirtualService\nmetadata: {{ name: {name}, namespace: {namespace} }}\nspec:\n  \
             provider: {{ virtualNode: {{ virtualNodeRef: {{ name: {name} }} }} }}\n---\n"
        )
    }

    /// Node `front` of `default`, a caller with `backends` (services of its namespace) and
    /// `extra` spec lines.
    pub fn front(backends: &[&str], extra: &str) -> String {
        let backends: Vec<String> = backends
            .iter()
            .map(|b| format!("{{ virtualService: {{ virtualServiceRef: {{ name: {b} }} }} }}"))
            .collect();
        format!(
            "{API}\nkind: VirtualNode\nmetadata: {{ name: front }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: 1, protocol: http }} }}]\n  \
             backends: [{}]\n{extra}---\n",
            backends.join(", ")
        )
    }
}

/// Applied unchanged: the mesh resources are stored with App Mesh's API group, the Deployment is
/// reported as skipped, and traffic flows through a sidecar, where App Mesh's default retry
/// policy (the router sets none) hides an instance answering 503.
#[tokio::test]
async fn a_walkthrough_file_applies_unchanged_and_runs() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let applied = apply(&control.url, HOWTO);
    assert!(
        applied.contains("deployment/howto/blue skipped (not a mesh resource)"),
        "{applied}"
    );
    assert!(
        applied.contains("service/howto/color skipped (not a mesh resource)"),
        "{applied}"
    );
    assert!(applied.contains("namespace/howto created"), "{applied}");
    assert!(
        applied.contains("virtualrouter/howto/color-router created"),
        "{applied}"
    );

    let out = cli(
        &control.url,
        &["get", "virtualrouters", "-n", "howto", "-o", "json"],
    );
    let routers: Value = serde_json::from_slice(&out.stdout).unwrap();
    let router = &routers[0];
    assert_eq!(router["apiVersion"], "appmesh.k8s.aws/v1beta2");
    assert_eq!(
        router["spec"]["routes"][0]["httpRoute"]["action"]["weightedTargets"][0]["virtualNodeRef"]
            ["name"],
        "blue",
        "the ARN resolved to the node it names"
    );
    let out = cli(&control.url, &["get", "meshes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("howto-mesh"), "{}", stdout(&out));

    // Two blue instances in Cloud Map's stead, one of them failing.
    let good = TestServer::start("blue-good").await;
    let bad = TestServer::start("blue-bad").await;
    bad.fail_with(503);
    for (id, server) in [("good", &good), ("bad", &bad)] {
        crate::register_instance(
            &control.url,
            ("howto.pvt.aws.local", "color"),
            id,
            server.addr,
            &["version=blue"],
        );
    }
    let front_dir = tempfile::tempdir().unwrap();
    let front =
        ProxyProcess::sidecar(proxy_bin(), &control.url, "howto/front", front_dir.path()).await;
    wait_synced(&control.url, 1).await;
    let mut c = Client::h1(front.egress).await.unwrap();
    eventually(Duration::from_secs(10), "the route is served", || async {
        let r = Client::h1(front.egress)
            .await
            .map_err(|e| e.to_string())?
            .get(HOST, "/")
            .await;
        match r {
            Ok(r) if r.status == 200 => Ok(()),
            Ok(r) => Err(format!("{} {:?}", r.status, r.header("x-trellis-error"))),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    for i in 0..40 {
        let r = c.get(HOST, "/").await.unwrap();
        assert_eq!(
            r.status,
            200,
            "request {i}: {:?}",
            r.header("x-trellis-error")
        );
        assert_eq!(r.text(), "blue-good");
    }
    assert!(
        bad.requests() > 0,
        "the failing instance got first tries, which were retried"
    );
}

/// A VirtualNode listener's inbound timeout bounds requests to its app at its sidecar's ingress:
/// a slow request ends in 504 there, a fast one goes through.
#[tokio::test]
async fn listener_timeouts_bound_inbound_requests() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let app = TestServer::start("app").await;
    let port = app.addr.port();
    let yaml = format!(
        "apiVersion: appmesh.k8s.aws/v1beta2\nkind: Mesh\nmetadata: {{ name: m }}\n---\n\
         apiVersion: appmesh.k8s.aws/v1beta2\nkind: VirtualNode\nmetadata: {{ name: app }}\nspec:\n  \
         listeners:\n    - portMapping: {{ port: {port}, protocol: http }}\n      \
         timeout: {{ http: {{ perRequest: {{ unit: ms, value: 300 }} }} }}\n"
    );
    apply(&control.url, &yaml);
    let proxy_dir = tempfile::tempdir().unwrap();
    let sidecar =
        ProxyProcess::sidecar(proxy_bin(), &control.url, "default/app", proxy_dir.path()).await;
    wait_synced(&control.url, 1).await;
    let mut c = Client::h1(sidecar.ingress).await.unwrap();
    let r = c.get("app.default", "/").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "app".to_string()));
    let slow = http::Request::get("/")
        .header("host", "app.default")
        .header("x-delay-ms", "5000")
        .body(http_body_util::Full::default())
        .unwrap();
    let r = c.send(slow).await.unwrap();
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-trellis-error"), Some("request_timeout"));
}

/// A VirtualRouter with two listeners: its service is reached on both ports, and each route
/// (by its `match.port`) sends its port's requests to its own node.
#[tokio::test]
async fn a_router_with_several_listeners_routes_by_port() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let (a, b) = (TestServer::start("a").await, TestServer::start("b").await);
    let node = |name: &str, port: u16| {
        format!(
            "---\napiVersion: appmesh.k8s.aws/v1beta2\nkind: VirtualNode\nmetadata: {{ name: {name} }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: {port}, protocol: http }} }}]\n  \
             serviceDiscovery: {{ dns: {{ hostname: 127.0.0.1 }} }}\n"
        )
    };
    let yaml = format!(
        "apiVersion: appmesh.k8s.aws/v1beta2\nkind: Mesh\nmetadata: {{ name: m }}\n{}{}{}\
         ---\napiVersion: appmesh.k8s.aws/v1beta2\nkind: VirtualRouter\nmetadata: {{ name: r }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: 9080, protocol: http }} }}, {{ portMapping: {{ port: 9090, protocol: http }} }}]\n  \
         routes:\n    - name: to-a\n      httpRoute: {{ match: {{ prefix: /, port: 9080 }}, action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: a }}, weight: 1 }}] }} }}\n    \
         - name: to-b\n      httpRoute: {{ match: {{ prefix: /, port: 9090 }}, action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: b }}, weight: 1 }}] }} }}\n\
         ---\napiVersion: appmesh.k8s.aws/v1beta2\nkind: VirtualService\nmetadata: {{ name: svc }}\nspec:\n  \
         provider: {{ virtualRouter: {{ virtualRouterRef: {{ name: r }} }} }}\n",
        node("front", 1)
            + "  backends: [{ virtualService: { virtualServiceRef: { name: svc } } }]\n",
        node("a", a.addr.port()),
        node("b", b.addr.port()),
    );
    apply(&control.url, &yaml);
    let front_dir = tempfile::tempdir().unwrap();
    let front =
        ProxyProcess::sidecar(proxy_bin(), &control.url, "default/front", front_dir.path()).await;
    wait_synced(&control.url, 1).await;
    let mut c = Client::h1(front.egress).await.unwrap();
    for (host, want) in [("svc.default:9080", "a"), ("svc.default:9090", "b")] {
        let r = c.get(host, "/").await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.text()),
            (200, want.to_string()),
            "{host}"
        );
    }
    // A route of such a router must say whose it is.
    let refused = apply_refused(&control.url, &yaml.replace(", port: 9090 }", " }"));
    assert!(
        refused.contains("spec.routes[1].httpRoute.match.port: required"),
        "{refused}"
    );
}

/// A GatewayRoute matching an exact path rewrites it to another (`rewrite.path.exact`), through
/// a router whose routes see the new path; the query stays.
#[tokio::test]
async fn gateway_routes_rewrite_exact_paths() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let app = TestServer::start("app").await;
    let port = app.addr.port();
    let gw_port = trellis_testkit::free_port();
    let yaml = format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{ name: m }}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{ name: app }}
spec:
  listeners: [{{ portMapping: {{ port: {port}, protocol: http }} }}]
  serviceDiscovery: {{ dns: {{ hostname: 127.0.0.1 }} }}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualRouter
metadata: {{ name: r }}
spec:
  listeners: [{{ portMapping: {{ port: 8080, protocol: http }} }}]
  routes:
    - name: new
      httpRoute:
        match: {{ prefix: /new }}
        action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: app }}, weight: 1 }}] }}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{ name: app }}
spec:
  provider: {{ virtualRouter: {{ virtualRouterRef: {{ name: r }} }} }}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualGateway
metadata: {{ name: gw }}
spec:
  listeners: [{{ portMapping: {{ port: {gw_port}, protocol: http }} }}]
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {{ name: old-to-new }}
spec:
  virtualGatewayRef: {{ name: gw, uid: x }}
  httpRoute:
    match: {{ path: {{ exact: /old }} }}
    action:
      target: {{ virtualService: {{ virtualServiceRef: {{ name: app }} }} }}
      rewrite: {{ path: {{ exact: /new }} }}
"#
    );
    apply(&control.url, &yaml);
    let gw_dir = tempfile::tempdir().unwrap();
    let gateway =
        ProxyProcess::gateway(proxy_bin(), &control.url, "default/gw", gw_dir.path()).await;
    wait_synced(&control.url, 1).await;
    let addr = gateway.listener_addr(&format!("gateway:{gw_port}")).await;
    let mut c = Client::h1(addr).await.unwrap();
    let r = c.get("anything.example", "/old?x=1").await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.header("x-trellis-error"));
    assert_eq!(r.header("x-seen-path"), Some("/new?x=1"));
    let r = c.get("anything.example", "/old/more").await.unwrap();
    assert_eq!(r.status, 404, "only the exact path");

    // Without an exact path match there is nothing to rewrite exactly: refused.
    let prefix = yaml.replace(
        "match: { path: { exact: /old } }",
        "match: { prefix: /old }",
    );
    let refused = apply_refused(&control.url, &prefix);
    assert!(
        refused.contains("spec.httpRoute.action.rewrite.path: needs match.path.exact"),
        "{refused}"
    );
}

/// The mesh's egressFilter: DROP_ALL (also when unset) makes a sidecar's egress refuse hosts its
/// node does not declare with 403 `egress_denied`; ALLOW_ALL forwards them to the host they name
/// (HTTP and CONNECT).
#[tokio::test]
async fn egress_filters_deny_or_pass_undeclared_destinations() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let app = TestServer::start("app").await;
    let yaml = [
        doc::mesh("{ egressFilter: { type: DROP_ALL } }"),
        doc::node(
            "default",
            "app",
            app.addr.port(),
            "{ dns: { hostname: 127.0.0.1 } }",
            "",
        ),
        doc::service("default", "app"),
        doc::front(&["app"], ""),
    ]
    .concat();
    apply(&control.url, &yaml);
    let dir = tempfile::tempdir().unwrap();
    let front = ProxyProcess::sidecar(proxy_bin(), &control.url, "default/front", dir.path()).await;
    wait_synced(&control.url, 1).await;
    let mut c = Client::h1(front.egress).await.unwrap();
    let r = c.get("app.default", "/").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "app".to_string()));
    let r = c.get("api.example.com", "/").await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-trellis-error"), Some("egress_denied"));

    let outside = TestServer::start("outside").await;
    let outside_host = outside.addr.to_string();
    let r = c.get(&outside_host, "/").await.unwrap();
    assert_eq!(r.header("x-trellis-error"), Some("egress_denied"));

    // ALLOW_ALL: an undeclared host is reached as the request names it, by HTTP and by
    // CONNECT; declared services are still routed by the mesh.
    apply(&control.url, &yaml.replace("DROP_ALL", "ALLOW_ALL"));
    eventually(
        Duration::from_secs(10),
        "an undeclared host is reached",
        || async {
            let mut c = Client::h1(front.egress).await.map_err(|e| e.to_string())?;
            let r = c
                .get(&outside_host, "/x")
                .await
                .map_err(|e| e.to_string())?;
            if (r.status.as_u16(), r.text()) == (200, "outside".to_string()) {
                Ok(())
            } else {
                Err(format!("{} {:?}", r.status, r.header("x-trellis-error")))
            }
        },
    )
    .await;
    let r = c.get("app.default", "/").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "app".to_string()));
    // A host with no port is reached on port 80: nothing listens there on this machine.
    let r = c.get("127.0.0.1", "/").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-trellis-error"), Some("connect_failure"));

    let db = trellis_testkit::TcpEchoServer::start("db").await;
    let mut s = tokio::net::TcpStream::connect(front.egress).await.unwrap();
    let connect = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", db.addr);
    tokio::io::AsyncWriteExt::write_all(&mut s, connect.as_bytes())
        .await
        .unwrap();
    let mut reader = tokio::io::BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut line)
            .await
            .unwrap();
        head.push_str(&line);
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut greeting = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut greeting)
        .await
        .unwrap();
    assert_eq!(greeting, "db\n");
}

/// `logging.accessLog`: each node's proxy writes its own file in the format the node asks for
/// (Envoy's default, or JSON with typed values), a new format applies on the next request, and a
/// format the proxy cannot render is refused at apply with its field path.
#[tokio::test]
async fn access_logs_follow_each_nodes_logging() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let app = TestServer::start("app").await;
    let logs = tempfile::tempdir().unwrap();
    let app_log = logs.path().join("app.log");
    let front_log = logs.path().join("front.log");
    let manifest = |app_format: &str| {
        let app_logging = format!(
            "  logging: {{ accessLog: {{ file: {{ path: {}, format: {app_format} }} }} }}\n",
            app_log.display()
        );
        let front_logging = format!(
            "  logging: {{ accessLog: {{ file: {{ path: {} }} }} }}\n",
            front_log.display()
        );
        [
            doc::mesh("{}"),
            doc::node(
                "default",
                "app",
                app.addr.port(),
                "{ dns: { hostname: 127.0.0.1 } }",
                &app_logging,
            ),
            doc::service("default", "app"),
            doc::front(&["app"], &front_logging),
        ]
        .concat()
    };
    let json = "{ json: [{ key: status, value: '%RESPONSE_CODE%' }, { key: path, value: '%REQ(:PATH)%' }, \
                { key: agent, value: '%REQ(USER-AGENT)%' }, { key: upstream, value: '%UPSTREAM_HOST%' }, \
                { key: sent, value: '%BYTES_SENT%' }, { key: received, value: '%BYTES_RECEIVED%' }, \
                { key: peer, value: '%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%' }] }";
    apply(&control.url, &manifest(json));
    let dir = tempfile::tempdir().unwrap();
    let front = ProxyProcess::sidecar(proxy_bin(), &control.url, "default/front", dir.path()).await;
    let app_dir = tempfile::tempdir().unwrap();
    let app_sidecar =
        ProxyProcess::sidecar(proxy_bin(), &control.url, "default/app", app_dir.path()).await;
    wait_synced(&control.url, 2).await;

    // The caller's proxy: Envoy's default format.
    let mut c = Client::h1(front.egress).await.unwrap();
    let r = c.get("app.default", "/from-front?q=1").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "app".to_string()));
    let line = eventually(
        Duration::from_secs(10),
        "the front proxy's access log line",
        || async {
            std::fs::read_to_string(&front_log)
                .ok()
                .filter(|s| s.ends_with('\n'))
                .ok_or_else(|| "no line yet".to_string())
        },
    )
    .await;
    let upstream = format!("\"{}\"\n", app.addr);
    assert!(
        line.starts_with('[')
            && line.contains("] \"GET /from-front?q=1 HTTP/1.1\" 200 - 0 3 ")
            && line.contains("\"app.default\" ")
            && line.ends_with(&upstream),
        "{line}"
    );

    // The app's proxy: its own file, JSON with numbers where Envoy writes them.
    let post = http::Request::post("/in")
        .header("host", "app.default")
        .header("user-agent", "e2e/1")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"hello",
        )))
        .unwrap();
    let mut c = Client::h1(app_sidecar.ingress).await.unwrap();
    assert_eq!(c.send(post).await.unwrap().status, 200);
    let line = eventually(
        Duration::from_secs(10),
        "the app proxy's access log line",
        || async {
            std::fs::read_to_string(&app_log)
                .ok()
                .filter(|s| s.ends_with('\n'))
                .ok_or_else(|| "no line yet".to_string())
        },
    )
    .await;
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["status"], 200, "{line}");
    assert_eq!(v["path"], "/in");
    assert_eq!(v["agent"], "e2e/1");
    assert_eq!(v["sent"], 3);
    assert_eq!(v["received"], 5);
    assert_eq!(v["peer"], "127.0.0.1");
    assert!(
        v["upstream"]
            .as_str()
            .is_some_and(|u| u.starts_with("127.0.0.1:")),
        "{line}"
    );
    assert!(!std::fs::read_to_string(&front_log).unwrap().contains("/in"));

    // A new format: the next request is written in it.
    apply(
        &control.url,
        &manifest("{ text: '%RESPONSE_CODE% %REQ(:PATH)%' }"),
    );
    let lines = eventually(
        Duration::from_secs(10),
        "a text line after the format changed",
        || async {
            let mut c = Client::h1(app_sidecar.ingress)
                .await
                .map_err(|e| e.to_string())?;
            c.get("app.default", "/text")
                .await
                .map_err(|e| e.to_string())?;
            std::fs::read_to_string(&app_log)
                .ok()
                .filter(|s| s.contains("200 /text\n"))
                .ok_or_else(|| "no text line yet".to_string())
        },
    )
    .await;
    assert!(lines.lines().count() >= 2, "{lines}");

    // Refused whole, naming the field; the running format stays.
    let refused = apply_refused(
        &control.url,
        &manifest("{ text: '%FILTER_STATE(x)% %REQ(:PATH)%' }"),
    );
    assert!(
        refused.contains(
            "spec.logging.accessLog.file.format.text: %FILTER_STATE% is not supported by Trellis"
        ),
        "{refused}"
    );
    let refused = apply_refused(&control.url, &manifest("{ text: a, json: [] }"));
    assert!(
        refused.contains("spec.logging.accessLog.file.format: give exactly one of json, text"),
        "{refused}"
    );
}

/// `meshServiceDiscovery.ipPreference`: a registry instance is dialled at its address of the
/// mesh's family (Cloud Map's `AWS_INSTANCE_IPV4` attribute, or the registered address), and DNS
/// discovery dials only addresses of it; unset, the registered address is used.
#[tokio::test]
async fn ip_preference_picks_the_addresses_dialled() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let v4 = TestServer::start("v4").await;
    let port = v4.addr.port();
    // The same port on the IPv6 loopback answers "v6".
    let v6 = tokio::net::TcpListener::bind(("::1", port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = v6.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nv6",
                    )
                    .await;
            });
        }
    });
    let out = cli(
        &control.url,
        &[
            "instances",
            "register",
            "--namespace",
            "ns",
            "--service",
            "app",
            "--id",
            "one",
            "--address",
            "::1",
            "--port",
            &port.to_string(),
            "--attr",
            "AWS_INSTANCE_IPV4=127.0.0.1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest = |preference: &str| {
        [
            doc::mesh(preference),
            doc::node(
                "default",
                "app",
                port,
                "{ awsCloudMap: { namespaceName: ns, serviceName: app } }",
                "",
            ),
            doc::service("default", "app"),
            doc::node(
                "default",
                "named",
                port,
                "{ dns: { hostname: 127.0.0.1 } }",
                "",
            ),
            doc::service("default", "named"),
            doc::front(&["app", "named"], ""),
        ]
        .concat()
    };
    let dir = tempfile::tempdir().unwrap();
    apply(
        &control.url,
        &manifest("{ meshServiceDiscovery: { ipPreference: IPv4_ONLY } }"),
    );
    let front = ProxyProcess::sidecar(proxy_bin(), &control.url, "default/front", dir.path()).await;
    // (service, what it answers or the error) once the mesh's preference has reached the proxy.
    let expect = |want: [(&'static str, &'static str); 2]| {
        let egress = front.egress;
        eventually(
            Duration::from_secs(10),
            "the preference applies",
            move || async move {
                let mut got = Vec::new();
                for (service, _) in want {
                    let mut c = Client::h1(egress).await.map_err(|e| e.to_string())?;
                    let r = c.get(service, "/").await.map_err(|e| e.to_string())?;
                    got.push(match r.header("x-trellis-error") {
                        Some(e) => e.to_owned(),
                        None => r.text(),
                    });
                }
                let want: Vec<String> = want.iter().map(|(_, w)| w.to_string()).collect();
                if got == want {
                    Ok(())
                } else {
                    Err(format!("{got:?}, want {want:?}"))
                }
            },
        )
    };
    expect([("app.default", "v4"), ("named.default", "v4")]).await;
    apply(
        &control.url,
        &manifest("{ meshServiceDiscovery: { ipPreference: IPv6_ONLY } }"),
    );
    // An IPv4 address is not dialled in an IPv6 mesh.
    expect([("app.default", "v6"), ("named.default", "connect_failure")]).await;
    apply(&control.url, &manifest("{}"));
    expect([("app.default", "v6"), ("named.default", "v4")]).await;

    let refused = apply_refused(
        &control.url,
        &manifest("{ meshServiceDiscovery: { ipPreference: IPv4_PREFERRED } }"),
    );
    assert!(
        refused.contains("spec.meshServiceDiscovery.ipPreference"),
        "{refused}"
    );
}

/// `backendGroups: [{ name: "*" }]`: every VirtualService of the namespace is a backend, one
/// applied later too; services of other namespaces stay undeclared. A named group is refused.
#[tokio::test]
async fn a_wildcard_backend_group_declares_the_namespaces_services() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let app = TestServer::start("app").await;
    let service = |name: &str, namespace: &str| {
        let dns = "{ dns: { hostname: 127.0.0.1 } }";
        doc::node(namespace, name, app.addr.port(), dns, "") + &doc::service(namespace, name)
    };
    let front = |group: &str| {
        let node = doc::front(&[], &format!("  backendGroups: [{{ name: '{group}' }}]\n"));
        doc::mesh("{}") + &node
    };
    apply(
        &control.url,
        &format!(
            "{}{}{}",
            front("*"),
            service("one", "default"),
            service("elsewhere", "other")
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::sidecar(proxy_bin(), &control.url, "default/front", dir.path()).await;
    wait_synced(&control.url, 1).await;
    let status = |host: &'static str| {
        let egress = proxy.egress;
        async move {
            let mut c = Client::h1(egress).await.unwrap();
            c.get(host, "/").await.unwrap().status.as_u16()
        }
    };
    assert_eq!(status("one.default").await, 200);
    assert_eq!(status("elsewhere.other").await, 403);
    assert_eq!(status("two.default").await, 403);

    apply(&control.url, &service("two", "default"));
    eventually(
        Duration::from_secs(10),
        "a new service of the namespace is a backend",
        || async {
            match status("two.default").await {
                200 => Ok(()),
                s => Err(s.to_string()),
            }
        },
    )
    .await;

    let refused = apply_refused(&control.url, &front("color-group"));
    assert!(
        refused.contains(
            "spec.backendGroups[0].name: not supported by Trellis: BackendGroup resources"
        ),
        "{refused}"
    );
}

/// DNS discovery with `responseType: ENDPOINTS`: the caller's proxy resolves the name itself
/// and balances over its addresses as endpoints of their own (seen in `/clusters`), while
/// LOADBALANCER keeps the name and resolves it per connection.
#[tokio::test]
async fn dns_endpoints_become_one_endpoint_per_address() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let app = TestServer::start("app").await;
    let port = app.addr.port();
    let manifest = |response_type: &str| {
        let dns = format!("{{ dns: {{ hostname: localhost, responseType: {response_type} }} }}");
        [
            doc::mesh("{}"),
            doc::node("default", "app", port, &dns, ""),
            doc::service("default", "app"),
            doc::front(&["app"], ""),
        ]
        .concat()
    };
    apply(&control.url, &manifest("ENDPOINTS"));
    let dir = tempfile::tempdir().unwrap();
    let front = ProxyProcess::sidecar(proxy_bin(), &control.url, "default/front", dir.path()).await;
    let endpoints = || async {
        let (_, clusters) = front.admin("/clusters").await;
        let clusters: Value = serde_json::from_str(&clusters).unwrap();
        let app = clusters["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "default/app")
            .cloned()
            .unwrap_or_default();
        app["endpoints"]
            .as_array()
            .map(|e| {
                e.iter()
                    .map(|e| e["address"].as_str().unwrap_or_default().to_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    // localhost's addresses here (127.0.0.1, and ::1 where /etc/hosts names it).
    let mut want: Vec<String> = tokio::net::lookup_host(("localhost", port))
        .await
        .unwrap()
        .map(|a| a.to_string())
        .collect();
    want.sort();
    want.dedup();
    eventually(
        Duration::from_secs(10),
        "the name's addresses as endpoints",
        || async {
            let got = endpoints().await;
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?}, want {want:?}"))
            }
        },
    )
    .await;
    let mut c = Client::h1(front.egress).await.unwrap();
    let r = c.get("app.default", "/").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "app".to_string()));

    apply(&control.url, &manifest("LOADBALANCER"));
    let name = format!("localhost:{port}");
    eventually(
        Duration::from_secs(10),
        "the name as the endpoint",
        || async {
            let got = endpoints().await;
            if got == [name.clone()] {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .await;
}
