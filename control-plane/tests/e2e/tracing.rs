//! Distributed tracing (issue 16) through real sidecars to a real OpenTelemetry collector.

use std::time::Duration;

use trellis_testkit::{TestServer, client::Client, otlp::Rotel, process::ControlProcess};

use crate::{CONTROL, apply, mtls::sidecar, register_instance, wait_synced};

const API: &str = "apiVersion: mesh.trellis.dev/v1beta1";

/// `front` calls `blue` through two sidecars; the mesh traces to `collector` with `percent`.
fn mesh(blue_port: u16, collector: std::net::SocketAddr, percent: f64) -> String {
    format!(
        "{API}\nkind: Mesh\nmetadata: {{ name: m }}\nspec:\n  \
         tracing: {{ collector: \"{collector}\", samplingPercent: {percent} }}\n---\n\
         {API}\nkind: VirtualNode\nmetadata: {{ name: blue }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: {blue_port}, protocol: http }} }}]\n  \
         serviceDiscovery: {{ registry: {{ namespaceName: test, serviceName: blue }} }}\n---\n\
         {API}\nkind: VirtualNode\nmetadata: {{ name: front }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: 1, protocol: http }} }}]\n  \
         backends: [{{ virtualService: {{ virtualServiceRef: {{ name: blue }} }} }}]\n---\n\
         {API}\nkind: VirtualService\nmetadata: {{ name: blue }}\nspec:\n  \
         provider: {{ virtualNode: {{ virtualNodeRef: {{ name: blue }} }} }}\n"
    )
}

/// The two spans of `trace` (one per sidecar), once the collector has both.
async fn two_spans(rotel: &Rotel, trace: &str) -> Vec<trellis_testkit::otlp::ReceivedSpan> {
    trellis_testkit::eventually(
        Duration::from_secs(15),
        "both spans of the trace",
        || async {
            let spans: Vec<_> = rotel
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace)
                .collect();
            if spans.len() == 2 {
                Ok(spans)
            } else {
                Err(format!("{spans:#?}"))
            }
        },
    )
    .await
}

async fn get(
    egress: std::net::SocketAddr,
    headers: &[(&str, &str)],
) -> trellis_testkit::client::Reply {
    let mut req = http::Request::get("http://blue.default/")
        .header("host", "blue.default")
        .header(
            "x-echo-headers",
            "traceparent,x-b3-traceid,x-b3-parentspanid",
        );
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    Client::h1(egress).await.unwrap().send(req).await.unwrap()
}

/// A request without trace headers starts a trace at the caller's sidecar (sampled at 100%):
/// the collector receives the caller's CLIENT span (service default/front, a root) and the
/// called node's SERVER span (service default/blue) as its child, in one trace, and the app
/// sees the SERVER span as its parent. A request carrying B3 joins that trace, its B3 headers
/// naming the sidecar's span. At 0%, a request without a trace is not traced: no header added.
#[tokio::test]
async fn traces_join_across_sidecars_in_a_real_collector() {
    let rotel = Rotel::start().await;
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let app = TestServer::start("blue").await;
    apply(&url, &mesh(app.addr.port(), rotel.grpc, 100.0));
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let front = sidecar(&url, "front", dirs[0].path(), false).await;
    let blue = sidecar(&url, "blue", dirs[1].path(), false).await;
    register_instance(&url, ("test", "blue"), "blue-1", blue.ingress, &[]);
    wait_synced(&url, 2).await;

    let r = get(front.egress, &[]).await;
    assert_eq!(r.status.as_u16(), 200);
    let seen = r
        .header("x-seen-traceparent")
        .expect("the app sees a traceparent")
        .to_string();
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!((parts.len(), parts[0], parts[3]), (4, "00", "01"), "{seen}");
    let (trace, app_parent) = (parts[1].to_string(), parts[2].to_string());
    let spans = two_spans(&rotel, &trace).await;
    let client = spans.iter().find(|s| s.service == "default/front").unwrap();
    let server = spans.iter().find(|s| s.service == "default/blue").unwrap();
    assert_eq!(client.kind, "SPAN_KIND_CLIENT", "{spans:#?}");
    assert_eq!(
        client.parent_id, "",
        "the caller's span is the root: {spans:#?}"
    );
    assert_eq!(server.kind, "SPAN_KIND_SERVER", "{spans:#?}");
    assert_eq!(server.parent_id, client.id, "{spans:#?}");
    assert_eq!(
        app_parent, server.id,
        "the app's parent is the called sidecar's span"
    );

    // A client cannot list the trace context away (`Connection: traceparent`): what Connection
    // lists goes as the request arrives, before the sidecar adds its own; the trace still has
    // both sidecars' spans.
    let r = get(front.egress, &[("connection", "traceparent")]).await;
    assert_eq!(r.status.as_u16(), 200);
    let seen = r.header("x-seen-traceparent").unwrap_or_default();
    let trace = seen.split('-').nth(1).unwrap_or_default().to_string();
    let spans = two_spans(&rotel, &trace).await;
    assert!(
        spans.iter().any(|s| s.service == "default/front"),
        "{spans:#?}"
    );

    // B3 from the caller's app: joined, and B3 answered in kind.
    let b3_trace = "463ac35c9f6413ad48485a3953bb6124";
    let r = get(
        front.egress,
        &[
            ("x-b3-traceid", b3_trace),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(r.header("x-seen-x-b3-traceid"), Some(b3_trace));
    let spans = two_spans(&rotel, b3_trace).await;
    let client = spans.iter().find(|s| s.service == "default/front").unwrap();
    assert_eq!(client.parent_id, "a2fb4a1d1a96d312", "{spans:#?}");
    let server = spans.iter().find(|s| s.service == "default/blue").unwrap();
    assert_eq!(
        r.header("x-seen-x-b3-parentspanid"),
        Some(client.id.as_str())
    );
    assert_eq!(server.parent_id, client.id);

    // Sampling 0%: a request without a trace goes untraced, marked so for the proxies after
    // the first (they keep the decision rather than draw again).
    apply(&url, &mesh(app.addr.port(), rotel.grpc, 0.0));
    wait_synced(&url, 2).await;
    let r = get(front.egress, &[]).await;
    assert_eq!(r.status.as_u16(), 200);
    let seen = r.header("x-seen-traceparent").unwrap_or_default();
    assert!(seen.starts_with("00-") && seen.ends_with("-00"), "{seen}");
}
