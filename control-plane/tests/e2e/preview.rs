//! Knowing a change before making it (issue 16): `trellis diff -f` and `trellis apply
//! --dry-run`, against a real control plane with a connected sidecar.

use trellis_testkit::{TestServer, client::Client, process::ControlProcess};

use crate::{CONTROL, apply, cli, mtls::sidecar, register_instance, stderr, stdout, wait_synced};

const API: &str = "apiVersion: mesh.trellis.dev/v1beta1";

/// `front` calls `blue` through the router `blue`, split `v1`/`v2` by `weights`.
fn mesh(port: u16, weights: (u32, u32)) -> String {
    let node = |name: &str| {
        format!(
            "{API}\nkind: VirtualNode\nmetadata: {{ name: {name} }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: {port}, protocol: http }} }}]\n  \
             serviceDiscovery: {{ registry: {{ namespaceName: test, serviceName: {name} }} }}\n---\n"
        )
    };
    format!(
        "{API}\nkind: Mesh\nmetadata: {{ name: m }}\nspec: {{}}\n---\n{}{}\
         {API}\nkind: VirtualNode\nmetadata: {{ name: front }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: 1, protocol: http }} }}]\n  \
         backends: [{{ virtualService: {{ virtualServiceRef: {{ name: blue }} }} }}]\n---\n\
         {API}\nkind: VirtualRouter\nmetadata: {{ name: blue }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: {port}, protocol: http }} }}]\n  routes:\n    \
         - name: r\n      httpRoute:\n        match: {{ prefix: / }}\n        \
         action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: v1 }}, weight: {} }}, \
         {{ virtualNodeRef: {{ name: v2 }}, weight: {} }}] }}\n---\n\
         {API}\nkind: VirtualService\nmetadata: {{ name: blue }}\nspec:\n  \
         provider: {{ virtualRouter: {{ virtualRouterRef: {{ name: blue }} }} }}\n",
        node("v1"),
        node("v2"),
        weights.0,
        weights.1
    )
}

fn run(server: &str, args: &[&str], yaml: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut all = args.to_vec();
    all.extend(["-f", file.to_str().unwrap()]);
    cli(server, &all)
}

/// `trellis diff` names each resource's action and, for each node whose proxies' config would
/// change, each changed field — here one route's weights at the caller's sidecar, and nothing
/// at the nodes it calls — while nothing is stored and the proxy keeps its config; the same
/// file again after the apply differs in nothing. `apply --dry-run` says what it would do and
/// stores nothing. An invalid file gets the apply's errors.
#[tokio::test]
async fn diff_and_dry_run_say_what_would_change_and_store_nothing() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let app = TestServer::start("app").await;
    let port = app.addr.port();
    apply(&url, &mesh(port, (90, 10)));
    let dir = tempfile::tempdir().unwrap();
    let front = sidecar(&url, "front", dir.path(), false).await;
    register_instance(&url, ("test", "v1"), "v1-1", app.addr, &[]);
    register_instance(&url, ("test", "v2"), "v2-1", app.addr, &[]);
    wait_synced(&url, 1).await;
    let version = front.version().await;

    let out = run(&url, &["diff"], &mesh(port, (50, 50)));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(
        said.contains("virtualrouter/default/blue configured"),
        "{said}"
    );
    assert!(said.contains("virtualnode/default/v1 unchanged"), "{said}");
    assert!(
        said.contains("VirtualNode default/front (1 proxy connected):"),
        "{said}"
    );
    let route = "listeners[egress].virtualHosts";
    assert!(
        said.lines().any(|l| l.trim_start().starts_with("~ ")
            && l.contains(route)
            && l.contains("weightedTargets[default/v1].weight: 90 -> 50")),
        "{said}"
    );
    assert!(
        !said.contains("VirtualNode default/v1 ("),
        "v1's own proxies see no change: {said}"
    );
    // Nothing stored, nothing pushed.
    assert_eq!(front.version().await, version);
    let out = cli(&url, &["get", "virtualrouter", "blue", "-o", "json"]);
    assert!(
        stdout(&out).contains("\"weight\": 90") || stdout(&out).contains("\"weight\":90"),
        "{}",
        stdout(&out)
    );

    // apply --dry-run: what it would do; still nothing stored.
    let out = run(&url, &["apply", "--dry-run"], &mesh(port, (50, 50)));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("virtualrouter/default/blue configured (dry run)"),
        "{}",
        stdout(&out)
    );
    assert_eq!(front.version().await, version);

    // Applied: the same file differs in nothing.
    apply(&url, &mesh(port, (50, 50)));
    wait_synced(&url, 1).await;
    let out = run(&url, &["diff"], &mesh(port, (50, 50)));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("no proxy's config changes"),
        "{}",
        stdout(&out)
    );

    // An invalid file: the apply's errors, naming the field.
    let out = run(&url, &["diff"], &mesh(port, (50, 500)));
    assert_eq!(out.status.code(), Some(2), "a failure, not a change");
    assert!(
        stderr(&out).contains("weightedTargets[1].weight"),
        "{}",
        stderr(&out)
    );
    let mut c = Client::h1(front.egress).await.unwrap();
    assert_eq!(
        c.get("blue.default", "/").await.unwrap().status.as_u16(),
        200
    );
}
