//! The L7 features beyond App Mesh (issue 15), each through real sidecars: header rules, ...

use trellis_testkit::{TestServer, client::Client, process::ControlProcess};

use crate::{
    CONTROL, apply, apply_result,
    mtls::{id, sidecar, wait_identity},
    register_instance, stderr, wait_synced,
};

const API: &str = "apiVersion: mesh.trellis.dev/v1beta1";

/// A mesh under mTLS STRICT: `front` calls `blue` through the router `blue` (route `r`, with
/// `route_rules` under its httpRoute); `blue`'s own rules (`node_rules`, under its spec) apply at
/// its sidecar.
fn rules_mesh(blue_port: u16, route_rules: &str, node_rules: &str) -> String {
    format!(
        "{API}\nkind: Mesh\nmetadata: {{ name: m }}\nspec: {{ mtls: STRICT }}\n---\n\
         {API}\nkind: VirtualNode\nmetadata: {{ name: blue }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: {blue_port}, protocol: http }} }}]\n  \
         serviceDiscovery: {{ registry: {{ namespaceName: test, serviceName: blue }} }}\n{node_rules}---\n\
         {API}\nkind: VirtualNode\nmetadata: {{ name: front }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: 1, protocol: http }} }}]\n  \
         backends: [{{ virtualService: {{ virtualServiceRef: {{ name: blue }} }} }}]\n---\n\
         {API}\nkind: VirtualRouter\nmetadata: {{ name: blue }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: {blue_port}, protocol: http }} }}]\n  routes:\n    \
         - name: r\n      httpRoute:\n        match: {{ prefix: / }}\n        \
         action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: blue }}, weight: 1 }}] }}\n{route_rules}---\n\
         {API}\nkind: VirtualService\nmetadata: {{ name: blue }}\nspec:\n  \
         provider: {{ virtualRouter: {{ virtualRouterRef: {{ name: blue }} }} }}\n"
    )
}

/// Header rules on a route (at the caller's sidecar) and on a node (at its own sidecar, before
/// its app): set replaces what the client sent, add appends, remove removes, variables come from
/// the route and the verified caller — a client cannot forge the caller's identity header, and
/// a response loses the header the app set. A rule naming a framing header is refused whole,
/// naming its field, and the running config stays.
#[tokio::test]
async fn header_rules_change_requests_and_responses_at_both_sidecars() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let app = TestServer::start("blue").await;
    let route_rules = "        requestHeaders:\n          \
         set: [{ name: x-env, value: prod }]\n          \
         add: [{ name: x-route, value: \"via %ROUTE_NAME%\" }]\n          \
         remove: [x-secret]\n        \
         responseHeaders:\n          \
         set: [{ name: x-served-by, value: \"trellis %ROUTE_NAME%\" }]\n";
    let node_rules = "  requestHeaders:\n    \
         set: [{ name: x-caller, value: \"%PEER_IDENTITY%\" }]\n  \
         responseHeaders:\n    remove: [x-server]\n";
    let yaml = rules_mesh(app.addr.port(), route_rules, node_rules);
    apply(&url, &yaml);
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let front = sidecar(&url, "front", dirs[0].path(), true).await;
    let blue = sidecar(&url, "blue", dirs[1].path(), true).await;
    register_instance(&url, ("test", "blue"), "blue-1", blue.ingress, &[]);
    wait_synced(&url, 2).await;
    for p in [&front, &blue] {
        wait_identity(p).await;
    }

    let mut c = Client::h1(front.egress).await.unwrap();
    let r = send_with_headers(&mut c).await;
    assert_eq!((r.status.as_u16(), r.text()), (200, "blue".to_string()));
    // The route's rules, at front's sidecar.
    assert_eq!(r.header("x-seen-x-env"), Some("prod"), "set replaces");
    assert_eq!(
        r.header("x-seen-x-route"),
        Some("from-client, via blue/r"),
        "add appends, with the route's name"
    );
    assert_eq!(r.header("x-seen-x-secret"), None, "removed");
    assert_eq!(r.header("x-served-by"), Some("trellis blue/r"));
    // The node's rules, at blue's sidecar: the verified caller, never the client's header.
    let front_id = id("front");
    assert_eq!(r.header("x-seen-x-caller"), Some(front_id.as_str()));
    assert_eq!(r.header("x-server"), None, "the app's header removed");

    // Refused whole, naming the field; the running config stays.
    let bad = rules_mesh(
        app.addr.port(),
        "        requestHeaders:\n          set: [{ name: transfer-encoding, value: chunked }]\n",
        "",
    );
    let out = apply_result(&url, &bad);
    assert!(!out.status.success());
    let why = stderr(&out);
    assert!(
        why.contains("spec.routes[0].httpRoute.requestHeaders.set[0].name")
            && why.contains("cannot be changed by a rule"),
        "{why}"
    );
    let r = send_with_headers(&mut c).await;
    assert_eq!(
        r.header("x-seen-x-env"),
        Some("prod"),
        "still the old rules"
    );

    // The README's example applies as written (on a control plane of its own: its mesh
    // would make this one's resources ambiguous).
    let other = tempfile::tempdir().unwrap();
    let example = ControlProcess::start(CONTROL, other.path()).await;
    apply(
        &example.url,
        include_str!("../../../examples/l7/header-rules.yaml"),
    );
}

/// A GET to blue through `c` carrying the headers the rules act on, asking the app to echo them.
async fn send_with_headers(c: &mut Client) -> trellis_testkit::client::Reply {
    let req = http::Request::get("http://blue.default/")
        .header("host", "blue.default")
        .header("x-env", "dev")
        .header("x-route", "from-client")
        .header("x-secret", "s3cret")
        .header("x-caller", "spiffe://evil/ns/x/vn/forged")
        .header("x-echo-headers", "x-env,x-route,x-secret,x-caller")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    c.send(req).await.unwrap()
}
