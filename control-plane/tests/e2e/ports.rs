//! Ports chosen by routes (issue 10): a weighted target's `port` and a gateway route's
//! `target.port` reach the listener they name, and routes match the request's scheme.

use http::Request;
use http_body_util::Full;
use trellis_testkit::{ProxyProcess, TestServer, client::Client, process::ControlProcess};

use crate::{CONTROL, apply, apply_refused, proxy_bin, wait_synced};

/// Registers `addr` as instance `id` of registry service `demo/service`.
fn register(server: &str, service: &str, id: &str, addr: std::net::SocketAddr) {
    crate::register_instance(server, ("demo", service), id, addr, &[]);
}

/// A node `multi` with two listeners, `api` (first) and `admin`, reached through its sidecar
/// (registry) and as `multidns` by DNS; a router with two listeners whose routes target one
/// node listener each by `port`; a front node calling it; a gateway whose routes pick the router
/// listener by `target.port`.
fn mesh(api: u16, admin: u16, gw: u16) -> String {
    format!(
        r#"apiVersion: mesh.trellis.dev/v1beta1
kind: Mesh
metadata: {{ name: m }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: {{ name: multi }}
spec:
  listeners:
    - portMapping: {{ port: {api}, protocol: http }}
    - portMapping: {{ port: {admin}, protocol: http }}
  serviceDiscovery: {{ registry: {{ namespaceName: demo, serviceName: multi }} }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: {{ name: multidns }}
spec:
  listeners:
    - portMapping: {{ port: {api}, protocol: http }}
    - portMapping: {{ port: {admin}, protocol: http }}
  serviceDiscovery: {{ dns: {{ hostname: 127.0.0.1 }} }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualRouter
metadata: {{ name: r }}
spec:
  listeners:
    - portMapping: {{ port: 8080, protocol: http }}
    - portMapping: {{ port: 8081, protocol: http }}
  routes:
    - name: dns
      priority: 1
      httpRoute:
        match: {{ prefix: /dns, port: 8081 }}
        action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: multidns }}, weight: 1, port: {admin} }}] }}
    - name: admin
      priority: 2
      httpRoute:
        match: {{ prefix: /, port: 8081 }}
        action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: multi }}, weight: 1, port: {admin} }}] }}
    - name: api
      httpRoute:
        match: {{ prefix: /, port: 8080 }}
        action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: multi }}, weight: 1, port: {api} }}] }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualService
metadata: {{ name: svc }}
spec:
  provider: {{ virtualRouter: {{ virtualRouterRef: {{ name: r }} }} }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: {{ name: front }}
spec:
  listeners: [{{ portMapping: {{ port: 1, protocol: http }} }}]
  backends: [{{ virtualService: {{ virtualServiceRef: {{ name: svc }} }} }}]
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualGateway
metadata: {{ name: gw }}
spec:
  listeners: [{{ portMapping: {{ port: {gw}, protocol: http }} }}]
---
apiVersion: mesh.trellis.dev/v1beta1
kind: GatewayRoute
metadata: {{ name: to-admin }}
spec:
  virtualGatewayRef: {{ name: gw }}
  httpRoute:
    match: {{ prefix: /admin/ }}
    action: {{ target: {{ port: 8081, virtualService: {{ virtualServiceRef: {{ name: svc }} }} }} }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: GatewayRoute
metadata: {{ name: to-api }}
spec:
  virtualGatewayRef: {{ name: gw }}
  httpRoute:
    match: {{ prefix: /api/ }}
    action: {{ target: {{ port: 8080, virtualService: {{ virtualServiceRef: {{ name: svc }} }} }} }}
"#
    )
}

/// A weighted target's `port` reaches the node listener it names — through the node's sidecar
/// (registered instance: the ingress forwards by the authority's port, which the caller sets) and
/// by DNS (`hostname:port`) — also when it is not the node's first listener; a gateway route's
/// `target.port` picks the router listener whose routes apply. Ports the target does not listen
/// on, and a missing `target.port` with a router of several listeners, fail the apply.
#[tokio::test]
async fn target_ports_reach_the_listener_they_name() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let api = TestServer::start("api").await;
    let admin = TestServer::start("admin").await;
    let gw_port = trellis_testkit::free_port();
    let yaml = mesh(api.addr.port(), admin.addr.port(), gw_port);
    apply(&control.url, &yaml);
    let dirs = [(); 3].map(|()| tempfile::tempdir().unwrap());
    let multi =
        ProxyProcess::sidecar(proxy_bin(), &control.url, "default/multi", dirs[0].path()).await;
    register(&control.url, "multi", "multi-1", multi.ingress);
    let front =
        ProxyProcess::sidecar(proxy_bin(), &control.url, "default/front", dirs[1].path()).await;
    let gw = ProxyProcess::gateway(proxy_bin(), &control.url, "default/gw", dirs[2].path()).await;
    wait_synced(&control.url, 3).await;

    let mut c = Client::h1(front.egress).await.unwrap();
    for (host, path, want) in [
        ("svc.default:8080", "/x", "api"),
        // The second listener of the node, through its sidecar's ingress.
        ("svc.default:8081", "/x", "admin"),
        // By DNS, on the port itself.
        ("svc.default:8081", "/dns", "admin"),
    ] {
        let r = c.get(host, path).await.unwrap();
        assert_eq!(
            r.status,
            200,
            "{host}{path}: {:?}",
            r.header("x-trellis-error")
        );
        assert_eq!(r.text(), want, "{host}{path}");
    }
    assert_eq!(
        admin.requests_to("/dns"),
        1,
        "the DNS target went straight to admin"
    );

    let mut g = Client::h1(gw.listener_addr(&format!("gateway:{gw_port}")).await)
        .await
        .unwrap();
    for (path, want) in [("/admin/x", "admin"), ("/api/x", "api")] {
        let r = g.get("www.example.com", path).await.unwrap();
        assert_eq!(r.status, 200, "{path}: {:?}", r.header("x-trellis-error"));
        assert_eq!(r.text(), want, "{path}");
    }

    let admin_port = admin.addr.port();
    let wrong = yaml.replacen(
        &format!("name: multi }}, weight: 1, port: {admin_port}"),
        "name: multi }, weight: 1, port: 1",
        1,
    );
    assert_ne!(wrong, yaml);
    let refused = apply_refused(&control.url, &wrong);
    assert!(
        refused.contains(
            "spec.routes[1].httpRoute.action.weightedTargets[0].port: 1 is not a listener port of VirtualNode default/multi"
        ),
        "{refused}"
    );
    let ambiguous = yaml.replacen("target: { port: 8081, ", "target: { ", 1);
    assert_ne!(ambiguous, yaml);
    let refused = apply_refused(&control.url, &ambiguous);
    assert!(
        refused.contains("spec.httpRoute.action.target.port: required: VirtualRouter default/r"),
        "{refused}"
    );
}

/// A route's `match.scheme` matches the request's scheme: `https` the HTTP/2 `:scheme` or an
/// absolute-form request-target naming it; `http` (and requests naming none) the rest.
#[tokio::test]
async fn routes_match_the_request_scheme() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let secure = TestServer::start("secure").await;
    let plain = TestServer::start("plain").await;
    let yaml = format!(
        r#"apiVersion: mesh.trellis.dev/v1beta1
kind: Mesh
metadata: {{ name: m }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: {{ name: secure }}
spec:
  listeners: [{{ portMapping: {{ port: {}, protocol: http }} }}]
  serviceDiscovery: {{ dns: {{ hostname: 127.0.0.1 }} }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: {{ name: plain }}
spec:
  listeners: [{{ portMapping: {{ port: {}, protocol: http }} }}]
  serviceDiscovery: {{ dns: {{ hostname: 127.0.0.1 }} }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualRouter
metadata: {{ name: r }}
spec:
  listeners: [{{ portMapping: {{ port: 8080, protocol: http }} }}]
  routes:
    - name: secure
      priority: 1
      httpRoute:
        match: {{ prefix: /, scheme: https }}
        action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: secure }}, weight: 1 }}] }}
    - name: plain
      priority: 2
      httpRoute:
        match: {{ prefix: /, scheme: http }}
        action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: plain }}, weight: 1 }}] }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualService
metadata: {{ name: svc }}
spec:
  provider: {{ virtualRouter: {{ virtualRouterRef: {{ name: r }} }} }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: {{ name: front }}
spec:
  listeners: [{{ portMapping: {{ port: 1, protocol: http }} }}]
  backends: [{{ virtualService: {{ virtualServiceRef: {{ name: svc }} }} }}]
"#,
        secure.addr.port(),
        plain.addr.port()
    );
    apply(&control.url, &yaml);
    let dir = tempfile::tempdir().unwrap();
    let front = ProxyProcess::sidecar(proxy_bin(), &control.url, "default/front", dir.path()).await;
    wait_synced(&control.url, 1).await;

    let get = |uri: &str, version| {
        Request::get(uri)
            .version(version)
            .header("x-case", uri)
            .body(Full::default())
            .unwrap()
    };
    let mut h1 = Client::h1(front.egress).await.unwrap();
    let mut h2 = Client::h2(front.egress).await.unwrap();
    let h1_origin = Request::get("/")
        .header("host", "svc.default:8080")
        .body(Full::default())
        .unwrap();
    for (req, want) in [
        (h1_origin, "plain"),
        (
            get("http://svc.default:8080/", http::Version::HTTP_11),
            "plain",
        ),
        (
            get("https://svc.default:8080/", http::Version::HTTP_11),
            "secure",
        ),
        (
            get("http://svc.default:8080/", http::Version::HTTP_2),
            "plain",
        ),
        (
            get("https://svc.default:8080/", http::Version::HTTP_2),
            "secure",
        ),
    ] {
        let h2_request = req.version() == http::Version::HTTP_2;
        let case = format!("{} {}", req.uri(), if h2_request { "h2" } else { "h1" });
        let client = if h2_request { &mut h2 } else { &mut h1 };
        let r = client.send(req).await.unwrap();
        assert_eq!(r.status, 200, "{case}: {:?}", r.header("x-trellis-error"));
        assert_eq!(r.text(), want, "{case}");
    }

    // Only http and https exist (the CRD's enum).
    let refused = apply_refused(&control.url, &yaml.replace("scheme: https", "scheme: ftp"));
    assert!(
        refused.contains("spec.routes[0].httpRoute.match.scheme"),
        "{refused}"
    );
}
