//! Route matching and weighted targets, through the real proxy.

use std::collections::HashMap;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use trellis_testkit::{TestServer, client::Client};

use crate::{cluster, proxy_with};

#[tokio::test]
async fn weighted_split_90_10_over_10000_requests() {
    let v1 = TestServer::start("v1").await;
    let v2 = TestServer::start("v2").await;
    let hosts = "      - name: svc\n        domains: ['svc.test']\n        routes:\n          - name: split\n            action: { weightedTargets: [{ cluster: v1, weight: 90 }, { cluster: v2, weight: 10 }, { cluster: v3, weight: 0 }] }\n";
    let v3 = TestServer::start("v3").await;
    let clusters = cluster("v1", "HTTP1", &[v1.addr])
        + &cluster("v2", "HTTP1", &[v2.addr])
        + &cluster("v3", "HTTP1", &[v3.addr]);
    let proxy = proxy_with("v1", hosts, &clusters, &[]).await;

    const TOTAL: usize = 10_000;
    const TASKS: usize = 8;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let egress = proxy.egress;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::h1(egress).await.unwrap();
            let mut counts: HashMap<String, usize> = HashMap::new();
            for _ in 0..TOTAL / TASKS {
                let r = c.get("svc.test", "/").await.unwrap();
                assert_eq!(r.status, 200);
                *counts.entry(r.text()).or_default() += 1;
            }
            counts
        }));
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *counts.entry(k).or_default() += v;
        }
    }
    let share = |k: &str| 100.0 * counts.get(k).copied().unwrap_or(0) as f64 / TOTAL as f64;
    assert!(
        (share("v1") - 90.0).abs() <= 2.0,
        "v1 got {:.2}% ({counts:?})",
        share("v1")
    );
    assert!(
        (share("v2") - 10.0).abs() <= 2.0,
        "v2 got {:.2}% ({counts:?})",
        share("v2")
    );
    assert_eq!(counts.get("v3"), None, "weight 0 gets nothing");
    assert_eq!(v3.requests(), 0);
}

#[tokio::test]
async fn each_match_type_routes_as_specified() {
    // One upstream per route, named after it; each request must reach exactly its route's.
    let names = [
        "exact",
        "regex",
        "prefix",
        "hdr-exact",
        "hdr-prefix",
        "hdr-suffix",
        "hdr-regex",
        "hdr-range",
        "hdr-present",
        "hdr-invert",
        "method",
        "query",
        "grpc-method",
        "grpc-service",
        "port",
        "priority-first",
        "priority-last",
        "fallback",
    ];
    let mut servers = Vec::new();
    let mut clusters = String::new();
    for n in names {
        let s = TestServer::start(n).await;
        clusters += &cluster(n, "HTTP1", &[s.addr]);
        servers.push(s);
    }
    let route = |name: &str, priority: i32, m: &str| {
        format!(
            "          - name: {name}\n            priority: {priority}\n            match: {m}\n            action: {{ weightedTargets: [{{ cluster: {name}, weight: 1 }}] }}\n"
        )
    };
    // Listed out of priority order on purpose.
    let routes = [
        route("fallback", 100, "{ prefix: / }"),
        route("exact", 1, "{ exact: /exact }"),
        route("regex", 2, "{ regex: '/users/[0-9]+' }"),
        route(
            "hdr-exact",
            3,
            "{ prefix: /h, headers: [{ name: x-v, exact: two }] }",
        ),
        route(
            "hdr-prefix",
            4,
            "{ prefix: /h, headers: [{ name: x-p, prefix: canary- }] }",
        ),
        route(
            "hdr-suffix",
            5,
            "{ prefix: /h, headers: [{ name: x-s, suffix: -beta }] }",
        ),
        route(
            "hdr-regex",
            6,
            "{ prefix: /h, headers: [{ name: x-r, regex: '[a-c]{3}' }] }",
        ),
        route(
            "hdr-range",
            7,
            "{ prefix: /h, headers: [{ name: x-n, range: { start: 10, end: 20 } }] }",
        ),
        route(
            "hdr-present",
            8,
            "{ prefix: /h, headers: [{ name: x-here }] }",
        ),
        route(
            "hdr-invert",
            9,
            "{ prefix: /h, headers: [{ name: x-user, exact: bot, invert: true }] }",
        ),
        route("method", 10, "{ prefix: /m, method: DELETE }"),
        route(
            "query",
            11,
            "{ prefix: /q, queryParameters: [{ name: env, exact: dev }] }",
        ),
        route(
            "grpc-method",
            12,
            "{ grpc: { serviceName: pkg.Svc, methodName: Get } }",
        ),
        route("grpc-service", 13, "{ grpc: { serviceName: pkg.Svc } }"),
        route("port", 14, "{ prefix: /p, port: 8443 }"),
        route("priority-last", 21, "{ prefix: /prio }"),
        route("priority-first", 20, "{ prefix: /prio }"),
    ]
    .concat();
    let hosts = format!(
        "      - name: svc\n        domains: ['svc.test', 'svc.test:8443']\n        routes:\n{routes}"
    );
    let proxy = proxy_with("v1", &hosts, &clusters, &[]).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();

    type Case<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case<'_>] = &[
        // (method, authority, path, headers, expected route)
        ("GET", "svc.test", "/exact", &[], "exact"),
        ("GET", "svc.test", "/exact/more", &[], "fallback"),
        ("GET", "svc.test", "/users/42", &[], "regex"),
        ("GET", "svc.test", "/users/42x", &[], "fallback"),
        ("GET", "svc.test", "/h", &[("x-v", "two")], "hdr-exact"),
        (
            "GET",
            "svc.test",
            "/h",
            &[("x-v", "three"), ("x-user", "bot")],
            "fallback",
        ),
        (
            "GET",
            "svc.test",
            "/h",
            &[("x-p", "canary-7"), ("x-user", "bot")],
            "hdr-prefix",
        ),
        (
            "GET",
            "svc.test",
            "/h",
            &[("x-s", "v2-beta"), ("x-user", "bot")],
            "hdr-suffix",
        ),
        (
            "GET",
            "svc.test",
            "/h",
            &[("x-r", "abc"), ("x-user", "bot")],
            "hdr-regex",
        ),
        (
            "GET",
            "svc.test",
            "/h",
            &[("x-r", "abcd"), ("x-user", "bot")],
            "fallback",
        ),
        (
            "GET",
            "svc.test",
            "/h",
            &[("x-n", "15"), ("x-user", "bot")],
            "hdr-range",
        ),
        (
            "GET",
            "svc.test",
            "/h",
            &[("x-n", "20"), ("x-user", "bot")],
            "fallback",
        ),
        (
            "GET",
            "svc.test",
            "/h",
            &[("x-here", ""), ("x-user", "bot")],
            "hdr-present",
        ),
        (
            "GET",
            "svc.test",
            "/h",
            &[("x-user", "alice")],
            "hdr-invert",
        ),
        ("GET", "svc.test", "/h", &[], "hdr-invert"),
        ("GET", "svc.test", "/h", &[("x-user", "bot")], "fallback"),
        ("DELETE", "svc.test", "/m", &[], "method"),
        ("GET", "svc.test", "/m", &[], "fallback"),
        ("GET", "svc.test", "/q?a=1&env=dev", &[], "query"),
        ("GET", "svc.test", "/q?env=prod", &[], "fallback"),
        ("POST", "svc.test", "/pkg.Svc/Get", &[], "grpc-method"),
        ("POST", "svc.test", "/pkg.Svc/List", &[], "grpc-service"),
        ("GET", "svc.test:8443", "/p", &[], "port"),
        ("GET", "svc.test", "/p", &[], "fallback"),
        ("GET", "svc.test", "/prio", &[], "priority-first"),
    ];
    for (method, authority, path, headers, want) in cases {
        let mut req = Request::builder()
            .method(*method)
            .uri(*path)
            .header("host", *authority);
        for (k, v) in *headers {
            req = req.header(*k, *v);
        }
        let r = c
            .send(req.body(Full::<Bytes>::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{method} {authority}{path} {headers:?}");
        assert_eq!(r.text(), *want, "{method} {authority}{path} {headers:?}");
    }
}

#[tokio::test]
async fn routes_rewrite_path_prefix_and_host() {
    let app = TestServer::start("app").await;
    let hosts = "      - name: gw\n        domains: ['*']\n        routes:\n          - name: colors\n            match: { prefix: /colors/ }\n            action: { weightedTargets: [{ cluster: app, weight: 1 }], pathRewrite: { prefix: /colors/, replacement: / }, hostRewrite: 'colorteller.default:9080' }\n";
    let proxy = proxy_with("v1", hosts, &cluster("app", "HTTP1", &[app.addr]), &[]).await;
    let mut c = Client::h1(proxy.egress).await.unwrap();
    let r = c
        .get("public.example.com", "/colors/blue?x=1")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-seen-path"),
        Some("/blue?x=1"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("x-seen-host"), Some("colorteller.default:9080"));
    let mut c2 = Client::h2(proxy.egress).await.unwrap();
    let r = c2
        .send(trellis_testkit::client::get_h2(
            "public.example.com",
            "/colors/red",
        ))
        .await
        .unwrap();
    assert_eq!(r.header("x-seen-path"), Some("/red"));
    assert_eq!(r.header("x-seen-host"), Some("colorteller.default:9080"));
}

/// A route with a direct response is answered by the proxy, before any route below it: a static
/// response, a readiness answer (200 while ready) and a gRPC health answer that a real gRPC
/// client accepts (SERVING); other requests still reach their cluster.
#[tokio::test]
async fn direct_responses_are_answered_by_the_proxy() {
    use trellis_testkit::grpc::health::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let app = TestServer::start("app").await;
    let hosts = "      - name: svc\n        domains: ['*']\n        routes:\n          - name: health\n            match: { exact: /healthz }\n            action: { directResponse: { kind: READINESS, body: \"ok\\n\" } }\n          - name: grpc-health\n            match: { exact: /grpc.health.v1.Health/Check }\n            action: { directResponse: { kind: GRPC_HEALTH } }\n          - name: teapot\n            match: { exact: /teapot }\n            action: { directResponse: { status: 418, body: short and stout } }\n          - name: app\n            match: { prefix: / }\n            action: { weightedTargets: [{ cluster: app, weight: 1 }] }\n";
    let proxy = proxy_with("v1", hosts, &cluster("app", "HTTP1", &[app.addr]), &[]).await;

    let mut c = Client::h1(proxy.egress).await.unwrap();
    let r = c.get("gw.test", "/healthz").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok\n"));
    let r = c.get("gw.test", "/teapot").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (418, "short and stout")
    );
    let r = c.get("gw.test", "/other").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "app"));
    assert_eq!(
        app.requests(),
        1,
        "direct responses never reach the cluster"
    );

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.egress))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status, ServingStatus::Serving as i32);
    assert_eq!(app.requests(), 1);
    assert_eq!(
        proxy
            .metric(
                "trellis_proxy_requests_total",
                &[("route", "grpc-health"), ("cluster", "")]
            )
            .await,
        1.0
    );
}
