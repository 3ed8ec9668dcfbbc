//! `trellis import` round trips: a file in one of App Mesh's formats → Trellis manifests →
//! `trellis validate` → applied to a real control plane → the proxies' snapshots carry what the
//! file configured; the report names what could not be carried over.

use std::path::PathBuf;

use serde_json::Value;
use trellis_testkit::{ProxyProcess, process::ControlProcess};

use crate::{CLI, CONTROL, apply, proxy_bin, stderr, stdout, wait_synced};

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/import")
        .join(name)
        .display()
        .to_string()
}

/// `trellis import --from FROM PATHS -n colorapp`: (manifests, report).
fn import(from: &str, paths: &[String]) -> (String, String) {
    let out = std::process::Command::new(CLI)
        .args(["import", "--from", from, "-n", "colorapp"])
        .args(paths)
        .output()
        .unwrap();
    assert!(out.status.success(), "import failed: {}", stderr(&out));
    (stdout(&out), stderr(&out))
}

/// `trellis validate` of `yaml`, offline.
fn validates(yaml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("imported.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = std::process::Command::new(CLI)
        .args(["validate", "-f", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{yaml}", stderr(&out));
}

/// The snapshot a proxy runs, from its `/config_dump`.
async fn snapshot(proxy: &ProxyProcess) -> Value {
    let (status, body) = proxy.admin("/config_dump").await;
    assert_eq!(status, 200);
    let dump: Value = serde_json::from_str(&body).unwrap();
    dump["snapshot"].clone()
}

fn named<'a>(items: &'a Value, name: &str) -> &'a Value {
    items
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == name))
        .unwrap_or_else(|| panic!("{name} not in {items:#}"))
}

/// What a fixture configures, as the proxies should run it.
struct Expect {
    /// The caller's node and the cluster it calls the health-checked node by.
    front: &'static str,
    checked: &'static str,
    health_path: &'static str,
    max_server_errors: Option<u64>,
    max_connections: Option<u64>,
    /// The router's host at the caller, the weights of its retrying route, its retries and
    /// timeouts, and a header some route matches.
    host: &'static str,
    split: &'static [(&'static str, u64)],
    max_retries: u64,
    per_try: &'static str,
    per_request: &'static str,
    header: &'static str,
    access_log: Option<&'static str>,
    /// The gateway, its listener port in the file, its health check path and a route prefix.
    gateway: &'static str,
    gateway_port: u16,
    gateway_health: &'static str,
    gateway_prefix: &'static str,
}

/// Applies `yaml` (its gateway moved to a free port) and checks that the caller's sidecar and
/// the gateway run what `e` says.
async fn runs_as_configured(yaml: &str, e: &Expect) {
    let port = trellis_testkit::free_port();
    let yaml = yaml.replace(
        &format!("port: {}\n", e.gateway_port),
        &format!("port: {port}\n"),
    );
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    apply(&control.url, &yaml);
    let dir = tempfile::tempdir().unwrap();
    let front = ProxyProcess::sidecar(proxy_bin(), &control.url, e.front, dir.path()).await;
    wait_synced(&control.url, 1).await;
    let snap = snapshot(&front).await;

    // The checked node's listener settings on the cluster that calls it.
    let checked = named(&snap["clusters"], e.checked);
    assert_eq!(checked["healthCheck"]["path"], e.health_path, "{checked:#}");
    if let Some(n) = e.max_server_errors {
        assert_eq!(
            checked["outlierDetection"]["maxServerErrors"], n,
            "{checked:#}"
        );
    }
    if let Some(n) = e.max_connections {
        assert_eq!(
            checked["connectionPool"]["maxConnections"], n,
            "{checked:#}"
        );
    }
    // The router's routes: the split with its retries and timeout, and a header match.
    let egress = named(&snap["listeners"], "egress");
    let host = egress["virtualHosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["domains"].as_array().unwrap().iter().any(|d| d == e.host))
        .unwrap_or_else(|| panic!("no {} host in {egress:#}", e.host));
    let routes = host["routes"].as_array().unwrap();
    let split = routes
        .iter()
        .find(|r| r["retryPolicy"]["maxRetries"] == e.max_retries)
        .unwrap_or_else(|| panic!("no route with {} retries in {host:#}", e.max_retries));
    let weights: Vec<(&str, u64)> = split["action"]["weightedTargets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["cluster"].as_str().unwrap(),
                t["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(weights, e.split, "{split:#}");
    assert_eq!(
        split["retryPolicy"]["perTryTimeout"], e.per_try,
        "{split:#}"
    );
    assert_eq!(split["timeout"]["perRequest"], e.per_request, "{split:#}");
    assert!(
        routes.iter().any(|r| r["match"]["headers"]
            .as_array()
            .is_some_and(|h| h.iter().any(|h| h["name"] == e.header))),
        "no route matching {} in {host:#}",
        e.header
    );
    if let Some(path) = e.access_log {
        assert_eq!(snap["accessLog"]["path"], path);
    }

    let gw_dir = tempfile::tempdir().unwrap();
    let gateway = ProxyProcess::gateway(proxy_bin(), &control.url, e.gateway, gw_dir.path()).await;
    wait_synced(&control.url, 2).await;
    let snap = snapshot(&gateway).await;
    let listener = named(&snap["listeners"], &format!("gateway:{port}"));
    let routes: Vec<&Value> = listener["virtualHosts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|h| h["routes"].as_array().unwrap())
        .collect();
    assert!(
        routes
            .iter()
            .any(|r| r["name"] == "healthCheck" && r["match"]["exact"] == e.gateway_health),
        "{listener:#}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r["match"]["prefix"] == e.gateway_prefix),
        "{listener:#}"
    );
}

/// The App Mesh API export (`describe-*` answers): every kind, Routes folded into their router,
/// ACM certificates and a node's ipPreference reported, the ECS task's Envoy replaced.
#[tokio::test]
async fn an_app_mesh_api_export_round_trips() {
    let (yaml, report) = import("appmesh-json", &[fixture("colorapp.appmesh.json")]);
    for expected in [
        "spec.listeners[0].tls.certificate.acm: not carried over: not supported by Trellis: AWS Certificate Manager",
        "spec.listeners[0].tls: not carried over: its certificate is required and missing in the input",
        "spec.serviceDiscovery.dns.ipPreference: not carried over: App Mesh's Kubernetes CRDs (the shape Trellis reads) have no such field",
        "environment.ENVOY_LOG_LEVEL: not carried over",
        "replace container \"envoy\"",
        "it runs as --node colorapp/front",
        "\"1337\"",
    ] {
        assert!(report.contains(expected), "{expected:?} not in:\n{report}");
    }
    validates(&yaml);
    runs_as_configured(
        &yaml,
        &Expect {
            front: "colorapp/front",
            checked: "colorapp/blue",
            health_path: "/ping",
            max_server_errors: Some(5),
            max_connections: Some(10),
            host: "color.colorapp.local:8080",
            split: &[("colorapp/blue", 90), ("colorapp/green", 10)],
            max_retries: 3,
            per_try: "0.500s",
            per_request: "5s",
            header: "x-canary",
            access_log: Some("/dev/stdout"),
            gateway: "colorapp/ingress",
            gateway_port: 8088,
            gateway_health: "/health",
            gateway_prefix: "/color/",
        },
    )
    .await;
}

/// A CloudFormation template: parameters, !Sub/!GetAtt/!Ref resolved, Routes as resources of
/// their own, ACM certificates and trust and tags reported, the ECS task definition's Envoy replaced.
#[tokio::test]
async fn a_cloudformation_template_round_trips() {
    let (yaml, report) = import("cloudformation", &[fixture("colorapp.cfn.yaml")]);
    for expected in [
        "Resources.BlueNode: spec.listeners[0].tls.certificate.acm: not carried over: not supported by Trellis: AWS Certificate Manager",
        "Resources.FrontNode: spec.backendDefaults.clientPolicy.tls.validation.trust.acm: not carried over: not supported by Trellis: AWS Certificate Manager",
        "Resources.Mesh: Properties.Tags",
        "it runs as --node colorapp/front",
    ] {
        assert!(report.contains(expected), "{expected:?} not in:\n{report}");
    }
    validates(&yaml);
    runs_as_configured(
        &yaml,
        &Expect {
            front: "colorapp/front",
            checked: "colorapp/colorteller-blue",
            health_path: "/ping",
            max_server_errors: None,
            max_connections: None,
            host: "colorteller.colorapp.local:9080",
            split: &[
                ("colorapp/colorteller-blue", 3),
                ("colorapp/colorteller-red:9080", 1),
            ],
            max_retries: 3,
            per_try: "2s",
            per_request: "10s",
            header: "x-color-debug",
            access_log: None,
            gateway: "colorapp/ingress",
            gateway_port: 8088,
            gateway_health: "/health",
            gateway_prefix: "/color/",
        },
    )
    .await;
}

/// A Terraform module (two files): variables, locals and references between resources
/// resolved; what cannot be (a data source, for_each, a module) reported.
#[tokio::test]
async fn a_terraform_module_round_trips() {
    let (yaml, report) = import("terraform", &[fixture("terraform")]);
    for expected in [
        "aws_appmesh_virtual_node.front: spec.service_discovery.dns.hostname: data.aws_lb.front.dns_name cannot be resolved offline",
        "aws_appmesh_virtual_node.front: spec.serviceDiscovery.dns: not carried over: its hostname is required",
        "aws_appmesh_virtual_node.extra: for_each",
        "module.observability",
        "aws_appmesh_virtual_node.blue: spec.listeners[0].tls: not carried over",
    ] {
        assert!(report.contains(expected), "{expected:?} not in:\n{report}");
    }
    validates(&yaml);
    runs_as_configured(
        &yaml,
        &Expect {
            front: "colorapp/front-prod",
            checked: "colorapp/colorteller-blue-prod",
            health_path: "/ping",
            max_server_errors: Some(5),
            max_connections: Some(100),
            host: "colorteller.colors.local:8080",
            split: &[
                ("colorapp/colorteller-blue-prod", 3),
                ("colorapp/colorteller-red-prod", 1),
            ],
            max_retries: 2,
            per_try: "0.500s",
            per_request: "5s",
            header: "x-color",
            access_log: None,
            gateway: "colorapp/colorapp-prod-ingress",
            gateway_port: 8443,
            gateway_health: "/healthz",
            gateway_prefix: "/color/",
        },
    )
    .await;
}

/// `--parameter` and `--var` stand in for the defaults a template or module lacks (the public
/// App Mesh templates take their mesh name so), and override those it has.
#[tokio::test]
async fn parameters_and_variables_given_on_the_command_line() {
    let (_, report) = import("cloudformation", &[fixture("shop.cfn.json")]);
    assert!(report.contains("unresolved parameter CartHost"), "{report}");
    let (yaml, report) = import(
        "cloudformation",
        &[
            fixture("shop.cfn.json"),
            "--parameter".into(),
            "CartHost=cart.shop.internal".into(),
        ],
    );
    assert!(
        !report.contains("unresolved parameter CartHost"),
        "{report}"
    );
    assert!(yaml.contains("hostname: cart.shop.internal"), "{yaml}");
    validates(&yaml);

    let (yaml, _) = import(
        "terraform",
        &[fixture("terraform"), "--var".into(), "env=staging".into()],
    );
    assert!(yaml.contains("name: colorteller-blue-staging"), "{yaml}");
    assert!(!yaml.contains("colorteller-blue-prod"), "{yaml}");
    validates(&yaml);
}
