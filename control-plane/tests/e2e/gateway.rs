//! VirtualGateway listeners' healthCheck and connectionPool, and the gateway's namespaceSelector
//! and gatewayRouteSelector (issue 10), through real control-plane and gateway processes.

use std::time::Duration;

use http::Request;
use http_body_util::Full;
use trellis_testkit::{
    ProxyProcess, TestServer, client::Client, eventually, process::ControlProcess,
};

use crate::{CONTROL, apply, apply_refused, proxy_bin, wait_synced};

/// A mesh with a service `svc` provided by node `app` (by DNS, on `app`'s port) and gateway
/// `gw` with `listeners` (YAML list items), whose one route `to-app` sends everything on the
/// listener of `route_port` to `svc`.
fn gateway_mesh(app: u16, listeners: &str, route_port: u16) -> String {
    format!(
        r#"apiVersion: mesh.trellis.dev/v1beta1
kind: Mesh
metadata: {{ name: m }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: {{ name: app }}
spec:
  listeners: [{{ portMapping: {{ port: {app}, protocol: http }} }}]
  serviceDiscovery: {{ dns: {{ hostname: 127.0.0.1 }} }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualService
metadata: {{ name: svc }}
spec:
  provider: {{ virtualNode: {{ virtualNodeRef: {{ name: app }} }} }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualGateway
metadata: {{ name: gw }}
spec:
  listeners:
{listeners}---
apiVersion: mesh.trellis.dev/v1beta1
kind: GatewayRoute
metadata: {{ name: to-app }}
spec:
  httpRoute:
    match: {{ prefix: /, port: {route_port} }}
    action: {{ target: {{ virtualService: {{ virtualServiceRef: {{ name: svc }} }} }} }}
"#
    )
}

/// A gateway listener's healthCheck is answered by the gateway itself, before its routes and
/// never forwarded: http `path` → 200 while it serves, grpc → grpc.health.v1 SERVING to a real
/// gRPC client (with a route on the same listener too). A probe port other than the listener's
/// is refused with the field; a path on a grpc check is accepted and not used (App Mesh's).
#[tokio::test]
async fn gateway_answers_its_listeners_health_checks() {
    use trellis_testkit::grpc::health::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let data = tempfile::tempdir().unwrap();
    let mut control = ControlProcess::start(CONTROL, data.path()).await;
    let app = TestServer::start("app").await;
    let (web, rpc) = (trellis_testkit::free_port(), trellis_testkit::free_port());
    let listeners = format!(
        "    - portMapping: {{ port: {web}, protocol: http }}\n      healthCheck: {{ protocol: http, path: /healthz, port: {web}, intervalMillis: 5000, timeoutMillis: 2000, unhealthyThreshold: 2 }}\n    - portMapping: {{ port: {rpc}, protocol: grpc }}\n      healthCheck: {{ protocol: grpc, intervalMillis: 5000, timeoutMillis: 2000, healthyThreshold: 2, unhealthyThreshold: 2 }}\n"
    );
    let yaml = gateway_mesh(app.addr.port(), &listeners, web);
    apply(&control.url, &yaml);
    let dir = tempfile::tempdir().unwrap();
    let gw = ProxyProcess::gateway(proxy_bin(), &control.url, "default/gw", dir.path()).await;
    wait_synced(&control.url, 1).await;

    let mut c = Client::h1(gw.listener_addr(&format!("gateway:{web}")).await)
        .await
        .unwrap();
    for host in ["lb.example.com", "10.0.0.1"] {
        let r = c.get(host, "/healthz").await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.header("x-trellis-error"));
        assert_eq!(r.text(), "ready\n");
    }
    let r = c.get("www.example.com", "/healthz/not").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "app".to_string()));
    assert_eq!(
        app.requests_to("/healthz"),
        0,
        "the probe is never forwarded"
    );

    let channel = tonic::transport::Endpoint::from_shared(format!(
        "http://{}",
        gw.listener_addr(&format!("gateway:{rpc}")).await
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let reply = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status, ServingStatus::Serving as i32);

    let wrong_port = yaml.replacen(
        &format!("path: /healthz, port: {web}"),
        "path: /healthz, port: 1",
        1,
    );
    assert_ne!(wrong_port, yaml);
    let refused = apply_refused(&control.url, &wrong_port);
    assert!(
        refused.contains(&format!(
            "spec.listeners[0].healthCheck.port: 1: must be the listener's port {web}"
        )),
        "{refused}"
    );
    let grpc_path = yaml.replacen(
        "protocol: grpc, intervalMillis",
        "protocol: grpc, path: /x, intervalMillis",
        1,
    );
    assert_ne!(grpc_path, yaml);
    // App Mesh ignores a grpc check's path: accepted, and the probe is still answered.
    apply(&control.url, &grpc_path);
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status, ServingStatus::Serving as i32);

    // Restarted, the control plane reads the gateway back from its store and its proxy is in
    // sync again (a healthCheck without healthyThreshold was once stored as 0 and refused on
    // reading: the gateway left the mesh; the store's watch could do the same without a restart).
    control.kill().await;
    let listen = control.addr.to_string();
    control = ControlProcess::start_on(CONTROL, data.path(), &listen).await;
    wait_synced(&control.url, 1).await;
}

/// Sends `n` GETs at once, each on its own connection, that the test server holds `delay_ms`;
/// returns (status, x-trellis-error) of each.
async fn at_once(via: std::net::SocketAddr, n: usize, delay_ms: u64) -> Vec<(u16, Option<String>)> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::h1(via).await.unwrap();
            let req = Request::get("/")
                .header("host", "www.example.com")
                .header("x-delay-ms", delay_ms.to_string())
                .body(Full::default())
                .unwrap();
            let r = c.send(req).await.unwrap();
            (
                r.status.as_u16(),
                r.header("x-trellis-error").map(str::to_owned),
            )
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// A gateway listener's connectionPool bounds the gateway's traffic from that listener to the
/// service (maxConnections 1 + maxPendingRequests 1: of four requests at once, two are served
/// and two refused at once with 503 overflow), while another listener of the gateway routing to
/// the same service has its own cluster, without the limit. A pool of another protocol than the
/// listener's is refused with the field.
#[tokio::test]
async fn gateway_listener_connection_pool_limits_its_traffic() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let app = TestServer::start("app").await;
    let (limited, open) = (trellis_testkit::free_port(), trellis_testkit::free_port());
    let listeners = format!(
        "    - portMapping: {{ port: {limited}, protocol: http }}\n      connectionPool: {{ http: {{ maxConnections: 1, maxPendingRequests: 1 }} }}\n    - portMapping: {{ port: {open}, protocol: http }}\n"
    );
    let yaml = gateway_mesh(app.addr.port(), &listeners, limited)
        + &format!(
            r#"---
apiVersion: mesh.trellis.dev/v1beta1
kind: GatewayRoute
metadata: {{ name: to-app-open }}
spec:
  httpRoute:
    match: {{ prefix: /, port: {open} }}
    action: {{ target: {{ virtualService: {{ virtualServiceRef: {{ name: svc }} }} }} }}
"#
        );
    apply(&control.url, &yaml);
    let dir = tempfile::tempdir().unwrap();
    let gw = ProxyProcess::gateway(proxy_bin(), &control.url, "default/gw", dir.path()).await;
    wait_synced(&control.url, 1).await;

    let results = at_once(
        gw.listener_addr(&format!("gateway:{limited}")).await,
        4,
        1500,
    )
    .await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let overflow = results
        .iter()
        .filter(|r| r.0 == 503 && r.1.as_deref() == Some("overflow"))
        .count();
    assert_eq!((ok, overflow), (2, 2), "{results:?}");

    let results = at_once(gw.listener_addr(&format!("gateway:{open}")).await, 4, 500).await;
    assert!(results.iter().all(|r| r.0 == 200), "{results:?}");

    let wrong = yaml.replacen(
        "connectionPool: { http: { maxConnections: 1, maxPendingRequests: 1 } }",
        "connectionPool: { grpc: { maxRequests: 1 } }",
        1,
    );
    assert_ne!(wrong, yaml);
    let refused = apply_refused(&control.url, &wrong);
    assert!(
        refused.contains("spec.listeners[0].connectionPool.grpc: the listener's protocol is http: give connectionPool.http"),
        "{refused}"
    );
}

/// A team namespace's labels, service and node (by DNS to `app`), and a gateway route to it.
fn team(ns: &str, ns_labels: &str, app: u16, route: &str) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Namespace
metadata: {{ name: {ns}, labels: {{ {ns_labels} }} }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: {{ name: app, namespace: {ns} }}
spec:
  listeners: [{{ portMapping: {{ port: {app}, protocol: http }} }}]
  serviceDiscovery: {{ dns: {{ hostname: 127.0.0.1 }} }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualService
metadata: {{ name: svc, namespace: {ns} }}
spec:
  provider: {{ virtualNode: {{ virtualNodeRef: {{ name: app }} }} }}
{route}"#
    )
}

/// A gateway route of namespace `ns` for `prefix`, with `labels` and `extra` spec fields.
fn route(ns: &str, name: &str, labels: &str, prefix: &str, extra: &str) -> String {
    format!(
        r#"---
apiVersion: mesh.trellis.dev/v1beta1
kind: GatewayRoute
metadata: {{ name: {name}, namespace: {ns}, labels: {{ {labels} }} }}
spec:
{extra}  httpRoute:
    match: {{ prefix: {prefix} }}
    action: {{ target: {{ virtualService: {{ virtualServiceRef: {{ name: svc }} }} }} }}
"#
    )
}

/// App Mesh's designation of gateway routes: gateway `gw/edge` serves the routes (without a
/// virtualGatewayRef) of the namespaces its namespaceSelector selects whose labels its
/// gatewayRouteSelector selects; a route naming the gateway is served whatever the selectors;
/// relabelling a namespace brings its routes in. A gateway without selectors keeps serving its
/// own namespace's routes.
#[tokio::test]
async fn gateway_selectors_choose_the_routes_it_serves() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let (a, b, c) = (
        TestServer::start("a").await,
        TestServer::start("b").await,
        TestServer::start("c").await,
    );
    let edge = trellis_testkit::free_port();
    let local = trellis_testkit::free_port();
    let gateways = format!(
        r#"apiVersion: mesh.trellis.dev/v1beta1
kind: Mesh
metadata: {{ name: m }}
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualGateway
metadata: {{ name: edge, namespace: gw }}
spec:
  namespaceSelector: {{ matchLabels: {{ gateway: shared }} }}
  gatewayRouteSelector: {{ matchExpressions: [{{ key: expose, operator: In, values: ["true"] }}] }}
  listeners: [{{ portMapping: {{ port: {edge}, protocol: http }} }}]
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualGateway
metadata: {{ name: local, namespace: team-c }}
spec:
  listeners: [{{ portMapping: {{ port: {local}, protocol: http }} }}]
"#
    );
    let exposed = "expose: \"true\"";
    let team_c = |labels: &str| {
        team(
            "team-c",
            labels,
            c.addr.port(),
            &(route("team-c", "c1", exposed, "/c", "")
                + &route(
                    "team-c",
                    "named",
                    "",
                    "/named",
                    "  virtualGatewayRef: { name: edge, namespace: gw }\n",
                )),
        )
    };
    let yaml = gateways
        + &team(
            "team-a",
            "gateway: shared",
            a.addr.port(),
            &route("team-a", "a1", exposed, "/a", ""),
        )
        + &team(
            "team-b",
            "gateway: shared",
            b.addr.port(),
            &(route("team-b", "b1", exposed, "/b", "")
                + &route("team-b", "hidden", "", "/hidden", "")),
        )
        + &team_c("gateway: private");
    apply(&control.url, &yaml);
    let dirs = [(); 2].map(|()| tempfile::tempdir().unwrap());
    let gw = ProxyProcess::gateway(proxy_bin(), &control.url, "gw/edge", dirs[0].path()).await;
    let lgw =
        ProxyProcess::gateway(proxy_bin(), &control.url, "team-c/local", dirs[1].path()).await;
    wait_synced(&control.url, 2).await;

    let edge_addr = gw.listener_addr(&format!("gateway:{edge}")).await;
    let mut g = Client::h1(edge_addr).await.unwrap();
    for (path, want) in [
        ("/a/x", "a"),
        ("/b/x", "b"),
        // Not selected by the gatewayRouteSelector.
        ("/hidden/x", "404"),
        // team-c is not selected by the namespaceSelector...
        ("/c/x", "404"),
        // ...but a route naming the gateway is its.
        ("/named/x", "c"),
    ] {
        let r = g.get("www.example.com", path).await.unwrap();
        let got = if r.status == 200 {
            r.text()
        } else {
            r.status.as_u16().to_string()
        };
        assert_eq!(got, want, "{path}: {:?}", r.header("x-trellis-error"));
    }
    // The gateway without selectors serves its namespace's routes without a ref.
    let mut l = Client::h1(lgw.listener_addr(&format!("gateway:{local}")).await)
        .await
        .unwrap();
    let r = l.get("www.example.com", "/c/x").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "c".to_string()));
    let r = l.get("www.example.com", "/named/x").await.unwrap();
    assert_eq!(
        r.status, 404,
        "a route naming another gateway is that one's"
    );

    // Relabelled, team-c's exposed route is the edge gateway's too.
    apply(
        &control.url,
        "apiVersion: v1\nkind: Namespace\nmetadata: { name: team-c, labels: { gateway: shared } }\n",
    );
    eventually(
        Duration::from_secs(20),
        "team-c's route on the edge gateway",
        || async move {
            let mut g = Client::h1(edge_addr).await.map_err(|e| e.to_string())?;
            let r = g
                .get("www.example.com", "/c/x")
                .await
                .map_err(|e| e.to_string())?;
            if r.status == 200 && r.text() == "c" {
                Ok(())
            } else {
                Err(format!("{} {}", r.status, r.text()))
            }
        },
    )
    .await;
}
