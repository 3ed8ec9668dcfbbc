//! The L7 features beyond App Mesh (issue 15), each through real sidecars: header rules, ...

use std::time::Duration;

use trellis_testkit::{TestServer, client::Client, process::ControlProcess};

use crate::{
    CONTROL, apply, apply_result,
    mtls::{id, sidecar, wait_identity},
    register_instance, stderr, wait_synced,
};

const API: &str = "apiVersion: mesh.trellis.dev/v1beta1";

/// The README's example applies as written (on a control plane of its own: its mesh would make
/// a test's resources ambiguous).
async fn example_applies(yaml: &str) {
    let data = tempfile::tempdir().unwrap();
    let example = ControlProcess::start(CONTROL, data.path()).await;
    apply(&example.url, yaml);
}

/// Applying `yaml` is refused, naming `field`.
fn refused_naming(url: &str, yaml: &str, field: &str) {
    let out = apply_result(url, yaml);
    assert!(!out.status.success());
    let why = stderr(&out);
    assert!(why.contains(field), "{why}");
}

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

/// A plaintext mesh: `front` calls `blue` through the router `blue`, whose route carries
/// `fault` (YAML under its httpRoute).
fn fault_mesh(blue_port: u16, fault: &str) -> String {
    let route_rules = format!("        fault:\n{fault}");
    rules_mesh(blue_port, &route_rules, "").replace("spec: { mtls: STRICT }", "spec: {}")
}

/// `n` GETs to blue through `egress` over `parallel` connections, `header` added to each:
/// how many got each (status, x-trellis-error).
async fn tally(
    egress: std::net::SocketAddr,
    n: usize,
    parallel: usize,
    header: Option<(&'static str, &'static str)>,
) -> std::collections::HashMap<(u16, String), usize> {
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::h1(egress).await.unwrap();
            let mut seen = Vec::new();
            for _ in 0..n / parallel {
                let mut req =
                    http::Request::get("http://blue.default/").header("host", "blue.default");
                if let Some((k, v)) = header {
                    req = req.header(k, v);
                }
                let req = req
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                let r = c.send(req).await.unwrap();
                seen.push((
                    r.status.as_u16(),
                    r.header("x-trellis-error").unwrap_or_default().to_string(),
                ));
            }
            seen
        }));
    }
    let mut counts = std::collections::HashMap::new();
    for t in tasks {
        for k in t.await.unwrap() {
            *counts.entry(k).or_default() += 1;
        }
    }
    counts
}

/// Fault injection on a route: an abort of 50% answers 50% ± 5 of 2,000 requests with the
/// configured status (`fault_injected`); a delay for requests with a header delays those, and
/// only those, by at least its duration, before the route's timeout starts (as Envoy's); a
/// gRPC request gets the configured grpc-status. A share out of range is refused naming its
/// field.
#[tokio::test]
async fn faults_abort_and_delay_the_share_of_requests_asked() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let app = TestServer::start("blue").await;
    let port = app.addr.port();
    apply(
        &url,
        &fault_mesh(
            port,
            "          abort: { httpStatus: 503, grpcStatus: 14, percentage: 50 }\n",
        ),
    );
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let front = sidecar(&url, "front", dirs[0].path(), false).await;
    let blue = sidecar(&url, "blue", dirs[1].path(), false).await;
    register_instance(&url, ("test", "blue"), "blue-1", blue.ingress, &[]);
    wait_synced(&url, 2).await;

    let counts = tally(front.egress, 2000, 4, None).await;
    let aborted = counts
        .get(&(503, "fault_injected".to_string()))
        .copied()
        .unwrap_or(0);
    let served = counts.get(&(200, String::new())).copied().unwrap_or(0);
    assert_eq!(aborted + served, 2000, "{counts:?}");
    assert!((900..=1100).contains(&aborted), "50% ± 5: {counts:?}");
    assert_eq!(
        front
            .metric("trellis_proxy_faults_total", &[("kind", "abort")])
            .await,
        aborted as f64
    );
    // A gRPC request aborted: HTTP 200, grpc-status 14 (until one is drawn).
    let mut h2 = Client::h2(front.egress).await.unwrap();
    let mut tries = 0;
    let grpc = loop {
        tries += 1;
        assert!(tries < 200, "no gRPC request aborted in 200");
        let req = http::Request::post("http://blue.default/pkg.Svc/Method")
            .header("content-type", "application/grpc")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let r = h2.send(req).await.unwrap();
        if r.header("x-trellis-error") == Some("fault_injected") {
            break r;
        }
    };
    assert_eq!(grpc.status.as_u16(), 200);
    assert_eq!(grpc.header("grpc-status"), Some("14"));

    // A delay for requests carrying x-fault: yes, and no abort.
    apply(
        &url,
        &fault_mesh(
            port,
            "          headers: [{ name: x-fault, match: { exact: \"yes\" } }]\n          \
             delay: { fixedDelay: { unit: ms, value: 300 }, percentage: 100 }\n        \
             timeout: { perRequest: { unit: ms, value: 200 } }\n",
        ),
    );
    wait_synced(&url, 2).await;
    let delays = || front.metric("trellis_proxy_faults_total", &[("kind", "delay")]);
    let before = delays().await;
    let counts = tally(front.egress, 20, 2, None).await;
    assert_eq!(counts.get(&(200, String::new())), Some(&20), "{counts:?}");
    assert_eq!(
        delays().await - before,
        0.0,
        "requests without the header are not delayed"
    );
    let start = std::time::Instant::now();
    let counts = tally(front.egress, 4, 2, Some(("x-fault", "yes"))).await;
    assert_eq!(
        counts.get(&(200, String::new())),
        Some(&4),
        "the delay comes before the route's 200 ms timeout starts: {counts:?}"
    );
    assert!(
        start.elapsed() >= std::time::Duration::from_millis(600),
        "two in a row on each connection, 300 ms each"
    );
    assert_eq!(delays().await - before, 4.0);

    // Refused naming its field; the running config stays.
    refused_naming(
        &url,
        &fault_mesh(
            port,
            "          abort: { httpStatus: 503, percentage: 150 }\n",
        ),
        "spec.routes[0].httpRoute.fault.abort.percentage",
    );

    example_applies(include_str!("../../../examples/l7/faults.yaml")).await;
}

/// Rate limiting: a route's limit holds its rate within 5% under a load far above it (the
/// burst apart), answering the rest 429 `rate_limited` with retry-after and the route's
/// response rules; a node's limit keyed
/// by a header gives each value its own bucket, at the node's sidecar. A limit without a rate is
/// refused naming its field.
#[tokio::test]
async fn rate_limits_hold_their_rate_per_route_and_per_key() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let app = TestServer::start("blue").await;
    let port = app.addr.port();
    let plain = |route: &str, node: &str| {
        rules_mesh(port, route, node).replace("spec: { mtls: STRICT }", "spec: {}")
    };
    // 50 per second, a burst of 50 (a second's worth: a stall of the loaded machine below a
    // second loses no token).
    apply(
        &url,
        &plain(
            "        rateLimit: { requests: 50, per: { unit: s, value: 1 }, burst: 50 }\n        \
             responseHeaders: { set: [{ name: x-via, value: trellis }] }\n",
            "",
        ),
    );
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let front = sidecar(&url, "front", dirs[0].path(), false).await;
    let blue = sidecar(&url, "blue", dirs[1].path(), false).await;
    register_instance(&url, ("test", "blue"), "blue-1", blue.ingress, &[]);
    wait_synced(&url, 2).await;

    let start = std::time::Instant::now();
    let window = std::time::Duration::from_secs(3);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let egress = front.egress;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::h1(egress).await.unwrap();
            let (mut ok, mut limited, mut other) = (0usize, 0usize, Vec::new());
            while start.elapsed() < window {
                let r = c.get("blue.default", "/").await.unwrap();
                if r.header("x-via") != Some("trellis") {
                    other.push(format!("{} without the route's response rules", r.status));
                }
                match (r.status.as_u16(), r.header("x-trellis-error")) {
                    (200, None) => ok += 1,
                    (429, Some("rate_limited"))
                        if r.header("retry-after")
                            .is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)) =>
                    {
                        limited += 1
                    }
                    (s, e) => other.push(format!("{s} {e:?}")),
                }
            }
            (ok, limited, other)
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (o, l, other) = t.await.unwrap();
        assert!(other.is_empty(), "{other:?}");
        ok += o;
        limited += l;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let rate = (ok as f64 - 50.0) / elapsed;
    assert!(
        limited > ok,
        "the load was far above the rate: {ok} admitted, {limited} limited"
    );
    assert!(
        (47.5..=52.5).contains(&rate),
        "{ok} admitted in {elapsed:.2} s: {rate:.1}/s beyond the burst, not 50 ± 5%"
    );

    // A node's limit keyed by x-user: each user its own bucket of 3 (per minute: none refills
    // during the test).
    apply(
        &url,
        &plain(
            "",
            "  rateLimit: { requests: 3, per: { unit: s, value: 60 }, key: { header: x-user } }\n",
        ),
    );
    wait_synced(&url, 2).await;
    let mut c = Client::h1(front.egress).await.unwrap();
    let mut as_user = async |user: &str| {
        let req = http::Request::get("http://blue.default/")
            .header("host", "blue.default")
            .header("x-user", user)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let r = c.send(req).await.unwrap();
        (
            r.status.as_u16(),
            r.header("x-trellis-error").map(str::to_string),
        )
    };
    for _ in 0..3 {
        assert_eq!(as_user("alice").await, (200, None));
    }
    assert_eq!(
        as_user("alice").await,
        (429, Some("rate_limited".to_string())),
        "alice's bucket is empty"
    );
    for _ in 0..3 {
        assert_eq!(as_user("bob").await, (200, None), "bob has his own");
    }
    assert_eq!(as_user("bob").await.0, 429);

    // Refused naming its field.
    refused_naming(
        &url,
        &plain(
            "        rateLimit: { requests: 0, per: { unit: s, value: 1 } }\n",
            "",
        ),
        "spec.routes[0].httpRoute.rateLimit.requests",
    );

    example_applies(include_str!("../../../examples/l7/rate-limits.yaml")).await;
}

/// Path and host rewrites on router routes, at the caller's sidecar: a prefix replaced, a whole
/// path replaced, a regex's matches replaced with its groups and the authority sent, the query
/// kept each time. A prefix rewrite on a route matching no prefix is refused naming its field.
#[tokio::test]
async fn router_routes_rewrite_paths_and_hosts() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let app = TestServer::start("blue").await;
    let port = app.addr.port();
    let routes = |second: &str| {
        format!(
            "    - name: prefix\n      priority: 1\n      httpRoute:\n        match: {{ prefix: /old/ }}\n        \
             action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: blue }}, weight: 1 }}] }}\n        \
             rewrite: {{ prefix: /new/ }}\n\
             {second}\
             - name: regex\n      priority: 3\n      httpRoute:\n        match: {{ prefix: /users/ }}\n        \
             action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: blue }}, weight: 1 }}] }}\n        \
             rewrite: {{ regex: {{ pattern: \"^/users/([0-9]+)$\", substitution: \"/u/$1\" }}, hostname: \"users.internal:8080\" }}\n"
        )
    };
    let exact = "    - name: exact\n      priority: 2\n      httpRoute:\n        match: { path: { exact: /status } }\n        \
                 action: { weightedTargets: [{ virtualNodeRef: { name: blue }, weight: 1 }] }\n        \
                 rewrite: { path: /internal/health }\n    ";
    let mesh = |second: &str| {
        let one = "    - name: r\n      httpRoute:\n        match: { prefix: / }\n        \
                   action: { weightedTargets: [{ virtualNodeRef: { name: blue }, weight: 1 }] }\n";
        rules_mesh(port, "", "")
            .replace("spec: { mtls: STRICT }", "spec: {}")
            .replace(one, &routes(second))
    };
    let yaml = mesh(exact);
    assert!(yaml.contains("name: regex"), "{yaml}");
    apply(&url, &yaml);
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let front = sidecar(&url, "front", dirs[0].path(), false).await;
    let blue = sidecar(&url, "blue", dirs[1].path(), false).await;
    register_instance(&url, ("test", "blue"), "blue-1", blue.ingress, &[]);
    wait_synced(&url, 2).await;

    let mut c = Client::h1(front.egress).await.unwrap();
    let mut seen = async |path: &str| {
        let r = c.get("blue.default", path).await.unwrap();
        assert_eq!(r.status.as_u16(), 200, "{path}: {}", r.text());
        (
            r.header("x-seen-path").unwrap_or_default().to_string(),
            r.header("x-seen-host").unwrap_or_default().to_string(),
        )
    };
    assert_eq!(seen("/old/a?q=1").await.0, "/new/a?q=1");
    assert_eq!(seen("/status?verbose").await.0, "/internal/health?verbose");
    assert_eq!(
        seen("/users/42?x=y").await,
        ("/u/42?x=y".to_string(), "users.internal:8080".to_string())
    );
    assert_eq!(
        seen("/users/abc").await.0,
        "/users/abc",
        "no match: the path as it was"
    );

    let bad = mesh(&exact.replace(
        "rewrite: { path: /internal/health }",
        "rewrite: { prefix: /x/ }",
    ));
    refused_naming(&url, &bad, "spec.routes[1].httpRoute.rewrite.prefix");

    example_applies(include_str!("../../../examples/l7/rewrites.yaml")).await;
}

/// Slow start: a node's instance registered next to a serving one gets a small share at first
/// (its weight ramps from the minimum over the window), then an equal one.
#[tokio::test]
async fn slow_start_ramps_a_new_instances_share() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let (one, two) = (
        TestServer::start("one").await,
        TestServer::start("two").await,
    );
    let node = "  loadBalancer: { slowStart: { window: { unit: s, value: 10 } } }\n";
    let yaml = rules_mesh(one.addr.port(), "", node).replace("spec: { mtls: STRICT }", "spec: {}");
    apply(&url, &yaml);
    let dir = tempfile::tempdir().unwrap();
    let front = sidecar(&url, "front", dir.path(), false).await;
    register_instance(&url, ("test", "blue"), "one", one.addr, &[]);
    wait_synced(&url, 1).await;
    let share_of_two = |n: usize| {
        let egress = front.egress;
        async move {
            let mut c = Client::h1(egress).await.unwrap();
            let mut got = 0;
            for _ in 0..n {
                let r = c.get("blue.default", "/").await.unwrap();
                assert_eq!(r.status.as_u16(), 200);
                if r.text() == "two" {
                    got += 1;
                }
            }
            got as f64 / n as f64
        }
    };
    assert_eq!(share_of_two(20).await, 0.0);

    register_instance(&url, ("test", "blue"), "two", two.addr, &[]);
    // Measured once the caller's proxy has both endpoints.
    trellis_testkit::eventually(
        Duration::from_secs(10),
        "two endpoints at front",
        || async {
            let (_, clusters) = front.admin("/clusters").await;
            if clusters.contains(&two.addr.to_string()) {
                Ok(())
            } else {
                Err(clusters)
            }
        },
    )
    .await;
    // Its first moments: a weight from the minimum (10%) against 1 (a second into a 10 s
    // window, 20%: a share of at most 17%).
    let early = share_of_two(300).await;
    assert!(
        early > 0.0 && early < 0.3,
        "a new instance's share at first: {early}"
    );
    // As it ages: about half (equal past the window).
    trellis_testkit::eventually(Duration::from_secs(30), "an equal share", || async {
        let later = share_of_two(400).await;
        if (0.4..=0.6).contains(&later) {
            Ok(())
        } else {
            Err(format!("{later}"))
        }
    })
    .await;
}

/// Peak EWMA: of two instances, the one that answers 50 ms later gets few requests (round
/// robin would give it half).
#[tokio::test]
async fn peak_ewma_sends_most_requests_to_the_faster_instance() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let (fast, slow) = (
        TestServer::start("fast").await,
        TestServer::start("slow").await,
    );
    slow.delay(50);
    let node = "  loadBalancer: { policy: PEAK_EWMA }\n";
    let yaml = rules_mesh(fast.addr.port(), "", node).replace("spec: { mtls: STRICT }", "spec: {}");
    apply(&url, &yaml);
    let dir = tempfile::tempdir().unwrap();
    let front = sidecar(&url, "front", dir.path(), false).await;
    register_instance(&url, ("test", "blue"), "fast", fast.addr, &[]);
    register_instance(&url, ("test", "blue"), "slow", slow.addr, &[]);
    wait_synced(&url, 1).await;
    trellis_testkit::eventually(
        Duration::from_secs(10),
        "both endpoints at front",
        || async {
            let (_, clusters) = front.admin("/clusters").await;
            if clusters.contains(&slow.addr.to_string())
                && clusters.contains(&fast.addr.to_string())
            {
                Ok(())
            } else {
                Err(clusters)
            }
        },
    )
    .await;
    let mut c = Client::h1(front.egress).await.unwrap();
    let mut to_fast = 0;
    for _ in 0..200 {
        let r = c.get("blue.default", "/").await.unwrap();
        assert_eq!(r.status.as_u16(), 200);
        if r.text() == "fast" {
            to_fast += 1;
        }
    }
    // Round robin would send it 100; peak EWMA tries the slower one at most until it has
    // answered once (a fast answer costs less than the 30 ms a fresh endpoint is assumed at).
    assert!(to_fast > 160, "{to_fast} of 200 to the faster instance");
}

/// Mirroring: a route's 10% copied to another node (through its own sidecar, under mTLS
/// STRICT: the mirror makes the caller one its sidecar admits) is 10% ± 3 points of 2,000
/// requests; the copies' target holds each 2 s and no primary request waits for it. A mirror
/// to a node that does not exist, or of more than 100%, is refused naming its field.
#[tokio::test]
async fn mirrors_copy_their_share_without_holding_the_primary() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let (app, copies) = (
        TestServer::start("blue").await,
        TestServer::start("shadow").await,
    );
    const HOLD: Duration = Duration::from_secs(2);
    copies.delay(HOLD.as_millis() as u64);
    let mesh = |mirror: &str| {
        rules_mesh(
            app.addr.port(),
            &format!("        mirror: {{ {mirror} }}\n"),
            "",
        ) + &format!(
            "---\n{API}\nkind: VirtualNode\nmetadata: {{ name: shadow }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: {}, protocol: http }} }}]\n  \
             serviceDiscovery: {{ registry: {{ namespaceName: test, serviceName: shadow }} }}\n",
            copies.addr.port()
        )
    };
    apply(
        &url,
        &mesh("virtualNodeRef: { name: shadow }, percentage: 10"),
    );
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let front = sidecar(&url, "front", dirs[0].path(), true).await;
    let blue = sidecar(&url, "blue", dirs[1].path(), true).await;
    let shadow = sidecar(&url, "shadow", dirs[2].path(), true).await;
    register_instance(&url, ("test", "blue"), "blue-1", blue.ingress, &[]);
    register_instance(&url, ("test", "shadow"), "shadow-1", shadow.ingress, &[]);
    wait_synced(&url, 3).await;
    for p in [&front, &blue, &shadow] {
        wait_identity(p).await;
    }

    const TOTAL: usize = 2000;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let egress = front.egress;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::h1(egress).await.unwrap();
            let mut slowest = Duration::ZERO;
            for _ in 0..TOTAL / 4 {
                let start = std::time::Instant::now();
                let r = c.get("blue.default", "/").await.unwrap();
                slowest = slowest.max(start.elapsed());
                assert_eq!((r.status.as_u16(), r.text()), (200, "blue".to_string()));
            }
            slowest
        }));
    }
    let mut slowest = Duration::ZERO;
    for t in tasks {
        slowest = slowest.max(t.await.unwrap());
    }
    assert!(slowest < HOLD, "a request waited for its copy: {slowest:?}");
    let sent = trellis_testkit::eventually(Duration::from_secs(15), "copies answered", || async {
        let sent = front
            .metric(
                "trellis_proxy_mirrored_requests_total",
                &[("outcome", "sent")],
            )
            .await as usize;
        if sent > 0 && sent == copies.requests() {
            Ok(sent)
        } else {
            Err(format!("{sent} answered, {} received", copies.requests()))
        }
    })
    .await;
    assert!((140..=260).contains(&sent), "10% ± 3 of {TOTAL}: {sent}");

    // Refused naming the field; the running config stays.
    for (mirror, field) in [
        (
            "virtualNodeRef: { name: nowhere }, percentage: 10",
            "spec.routes[0].httpRoute.mirror.virtualNodeRef",
        ),
        (
            "virtualNodeRef: { name: shadow }, percentage: 150",
            "spec.routes[0].httpRoute.mirror.percentage",
        ),
    ] {
        let out = apply_result(&url, &mesh(mirror));
        assert!(!out.status.success());
        let why = stderr(&out);
        assert!(why.contains(field), "{why}");
    }
    // A node whose listener is tcp takes no copies.
    let raw = format!(
        "---\n{API}\nkind: VirtualNode\nmetadata: {{ name: raw }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: 9, protocol: tcp }} }}]\n  \
         serviceDiscovery: {{ registry: {{ namespaceName: test, serviceName: raw }} }}\n"
    );
    let out = apply_result(
        &url,
        &(mesh("virtualNodeRef: { name: raw }, percentage: 10") + &raw),
    );
    assert!(!out.status.success());
    let why = stderr(&out);
    assert!(
        why.contains("spec.routes[0].httpRoute.mirror.virtualNodeRef") && why.contains("tcp"),
        "{why}"
    );
    // The copies' cluster is the node's under a name of its own (its own connections and
    // limits at the caller).
    let (_, clusters) = front.admin("/clusters").await;
    assert!(clusters.contains("default/shadow#mirror"), "{clusters}");
    let version = front.version().await;
    let r = Client::h1(front.egress)
        .await
        .unwrap()
        .get("blue.default", "/")
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(front.version().await, version);

    example_applies(include_str!("../../../examples/l7/mirroring.yaml")).await;
}

/// Consistent hashing: with RING_HASH (keyed by a header) and MAGLEV (by a cookie), each of 200
/// users keeps its instance of four; when an instance leaves, only its users move (Maglev: at
/// most a few others), about a quarter of them. A hash key without a hashing policy is refused
/// naming its field.
#[tokio::test]
async fn hashing_keeps_each_key_on_its_instance_and_moves_only_the_leavers_keys() {
    for (policy, key, send_key) in [
        ("RING_HASH", "{ header: x-user }", "x-user"),
        ("MAGLEV", "{ cookie: session }", "cookie"),
    ] {
        let data = tempfile::tempdir().unwrap();
        let control = ControlProcess::start(CONTROL, data.path()).await;
        let url = control.url.clone();
        let apps = [
            TestServer::start("s0").await,
            TestServer::start("s1").await,
            TestServer::start("s2").await,
            TestServer::start("s3").await,
        ];
        let node = format!("  loadBalancer: {{ policy: {policy}, hashKey: {key} }}\n");
        let yaml = rules_mesh(apps[0].addr.port(), "", &node)
            .replace("spec: { mtls: STRICT }", "spec: {}");
        apply(&url, &yaml);
        let dir = tempfile::tempdir().unwrap();
        let front = sidecar(&url, "front", dir.path(), false).await;
        for app in &apps {
            register_instance(&url, ("test", "blue"), app.name(), app.addr, &[]);
        }
        wait_synced(&url, 1).await;
        let endpoints_at_front = |n: usize| {
            let front = &front;
            let apps = &apps;
            async move {
                trellis_testkit::eventually(
                    Duration::from_secs(10),
                    "front's endpoints",
                    || async {
                        let (_, clusters) = front.admin("/clusters").await;
                        let held = apps
                            .iter()
                            .filter(|a| clusters.contains(&a.addr.to_string()))
                            .count();
                        if held == n { Ok(()) } else { Err(clusters) }
                    },
                )
                .await;
            }
        };
        endpoints_at_front(4).await;
        let placement = || {
            let egress = front.egress;
            async move {
                let mut c = Client::h1(egress).await.unwrap();
                let mut placed = Vec::new();
                for user in 0..200 {
                    let value = match send_key {
                        "cookie" => format!("theme=dark; session=user-{user}"),
                        _ => format!("user-{user}"),
                    };
                    let req = http::Request::get("http://blue.default/")
                        .header("host", "blue.default")
                        .header(send_key, value)
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                        .unwrap();
                    let r = c.send(req).await.unwrap();
                    assert_eq!(r.status.as_u16(), 200);
                    placed.push(r.text());
                }
                placed
            }
        };
        let before = placement().await;
        assert_eq!(
            placement().await,
            before,
            "{policy}: every user kept its instance"
        );
        for app in &apps {
            let users = before.iter().filter(|p| *p == app.name()).count();
            assert!(
                (20..=90).contains(&users),
                "{policy}: {} has {users} of 200",
                app.name()
            );
        }

        // s2 leaves.
        let out = crate::cli(
            &url,
            &[
                "instances",
                "deregister",
                "--namespace",
                "test",
                "--service",
                "blue",
                "--id",
                "s2",
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        endpoints_at_front(3).await;
        let after = placement().await;
        let others_moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b != a && *b != "s2")
            .count();
        let allowed = if policy == "RING_HASH" { 0 } else { 4 };
        assert!(
            others_moved <= allowed,
            "{policy}: {others_moved} users of others moved"
        );
        assert!(after.iter().all(|p| p != "s2"));
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert!(moved <= 200 / 4 + 25, "{policy}: {moved} of 200 moved");

        // A key without a hashing policy: refused, naming the field.
        let bad = rules_mesh(
            apps[0].addr.port(),
            "",
            "  loadBalancer: { policy: ROUND_ROBIN, hashKey: { header: x-user } }\n",
        )
        .replace("spec: { mtls: STRICT }", "spec: {}");
        let out = apply_result(&url, &bad);
        assert!(!out.status.success());
        let why = stderr(&out);
        assert!(why.contains("spec.loadBalancer.hashKey"), "{why}");
    }

    example_applies(include_str!("../../../examples/l7/hashing.yaml")).await;
}

/// Zone-aware balancing: a caller in zone-a sends only to the instances in zone-a (by their
/// AVAILABILITY_ZONE attribute), one in zone-b only to zone-b's; when zone-a has fewer in
/// service than `minEndpoints`, its caller sends to every zone. A minimum of 0 is refused naming
/// its field.
#[tokio::test]
async fn zone_aware_callers_keep_to_their_zone_while_it_has_enough() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let apps = [
        TestServer::start("a1").await,
        TestServer::start("a2").await,
        TestServer::start("b1").await,
        TestServer::start("b2").await,
    ];
    let node = "  loadBalancer: { zoneAware: { minEndpoints: 2 } }\n";
    let yaml =
        rules_mesh(apps[0].addr.port(), "", node).replace("spec: { mtls: STRICT }", "spec: {}");
    apply(&url, &yaml);
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let in_zone = |dir: &std::path::Path, zone: &'static str| {
        let url = url.clone();
        let dir = dir.to_path_buf();
        async move {
            trellis_testkit::ProxyProcess::sidecar_with(
                crate::proxy_bin(),
                &url,
                "default/front",
                &dir,
                &["--zone", zone],
            )
            .await
        }
    };
    let front_a = in_zone(dirs[0].path(), "zone-a").await;
    let front_b = in_zone(dirs[1].path(), "zone-b").await;
    for app in &apps {
        let zone = format!("AVAILABILITY_ZONE=zone-{}", &app.name()[..1]);
        register_instance(&url, ("test", "blue"), app.name(), app.addr, &[&zone]);
    }
    wait_synced(&url, 2).await;
    let spread =
        |via: std::net::SocketAddr| async move { crate::split(via, "blue.default", 200).await };
    trellis_testkit::eventually(
        Duration::from_secs(10),
        "zone-a's caller in zone-a",
        || async {
            let got = spread(front_a.egress).await;
            let mut seen: Vec<_> = got.keys().cloned().collect();
            seen.sort();
            if seen == ["a1", "a2"] {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .await;
    let got = spread(front_b.egress).await;
    let mut seen: Vec<_> = got.keys().cloned().collect();
    seen.sort();
    assert_eq!(seen, ["b1", "b2"], "zone-b's caller: {got:?}");

    // a2 leaves: zone-a has one instance, fewer than minEndpoints: its caller uses every zone.
    let out = crate::cli(
        &url,
        &[
            "instances",
            "deregister",
            "--namespace",
            "test",
            "--service",
            "blue",
            "--id",
            "a2",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    trellis_testkit::eventually(
        Duration::from_secs(10),
        "zone-a's caller in every zone",
        || async {
            let got = spread(front_a.egress).await;
            let mut seen: Vec<_> = got.keys().cloned().collect();
            seen.sort();
            if seen == ["a1", "b1", "b2"] {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .await;

    let bad = yaml.replace("minEndpoints: 2", "minEndpoints: 0");
    refused_naming(&url, &bad, "spec.loadBalancer.zoneAware.minEndpoints");
}

/// WebSockets through an HTTP/2 hop: a node whose listener is `http2` (its app speaks
/// WebSocket over HTTP/2, RFC 8441) reached through two sidecars under mTLS STRICT — from an
/// HTTP/1.1 WebSocket client (its caller's sidecar makes the upgrade an extended CONNECT and
/// answers the client's key) and from an HTTP/2 one.
#[tokio::test]
async fn websockets_cross_an_http2_hop_between_sidecars() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let app = trellis_testkit::WsEchoServer::start_h2("chat").await;
    let yaml = rules_mesh(app.addr.port(), "", "")
        .replace(
            &format!("port: {}, protocol: http }}", app.addr.port()),
            &format!("port: {}, protocol: http2 }}", app.addr.port()),
        )
        .replace("      httpRoute:\n", "      http2Route:\n");
    assert_eq!(yaml.matches("protocol: http2").count(), 2, "{yaml}");
    apply(&url, &yaml);
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let front = sidecar(&url, "front", dirs[0].path(), true).await;
    let blue = sidecar(&url, "blue", dirs[1].path(), true).await;
    register_instance(&url, ("test", "blue"), "blue-1", blue.ingress, &[]);
    wait_synced(&url, 2).await;
    for p in [&front, &blue] {
        wait_identity(p).await;
    }

    let stream = tokio::net::TcpStream::connect(front.egress).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://blue.default/chat", stream)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("chat:hello")
    );
    ws.close(None).await.unwrap();

    let (head, mut ws) =
        trellis_testkit::client::websocket_h2(front.egress, "http://blue.default/chat", &[])
            .await
            .unwrap();
    assert_eq!(head.status, 200);
    ws.send(Message::text("over h2")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("chat:over h2")
    );
    ws.close(None).await.unwrap();
}

/// Hedging through sidecars: both instances answer in 300 ms, the per-retry timeout is 200 ms;
/// with `hedgeOnPerRetryTimeout` a GET is answered (the first attempt goes on beside the
/// hedge), without it every attempt is cut and the caller gets 504. On a grpcRoute it is
/// refused naming its field.
#[tokio::test]
async fn hedged_requests_outlast_the_per_retry_timeout() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let apps = [TestServer::start("a").await, TestServer::start("b").await];
    for a in &apps {
        a.delay(300);
    }
    let mesh = |hedge: bool| {
        let retry = format!(
            "        retryPolicy:\n          maxRetries: 1\n          \
             perRetryTimeout: {{ unit: ms, value: 200 }}\n          \
             httpRetryEvents: [gateway-error]\n          hedgeOnPerRetryTimeout: {hedge}\n"
        );
        rules_mesh(apps[0].addr.port(), &retry, "").replace("spec: { mtls: STRICT }", "spec: {}")
    };
    apply(&url, &mesh(true));
    let dir = tempfile::tempdir().unwrap();
    let front = sidecar(&url, "front", dir.path(), false).await;
    for a in &apps {
        register_instance(&url, ("test", "blue"), a.name(), a.addr, &[]);
    }
    wait_synced(&url, 1).await;
    let mut c = Client::h1(front.egress).await.unwrap();
    for _ in 0..4 {
        let r = c.get("blue.default", "/").await.unwrap();
        assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    }

    apply(&url, &mesh(false));
    wait_synced(&url, 1).await;
    let r = c.get("blue.default", "/").await.unwrap();
    assert_eq!(r.status.as_u16(), 504, "each attempt cut at 200 ms");

    let grpc = mesh(true).replace(
        "      httpRoute:\n        match: { prefix: / }\n",
        "      grpcRoute:\n        match: {}\n",
    );
    assert!(grpc.contains("grpcRoute"), "{grpc}");
    refused_naming(&url, &grpc, "grpcRoute.retryPolicy.hedgeOnPerRetryTimeout");

    example_applies(include_str!("../../../examples/l7/balancing.yaml")).await;
}
