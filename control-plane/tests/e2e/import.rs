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

/// Applies `yaml` and checks what the colorapp fixtures configure, as the front sidecar and
/// the gateway run it.
async fn runs_as_configured(yaml: &str) {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    apply(&control.url, yaml);
    let dir = tempfile::tempdir().unwrap();
    let front =
        ProxyProcess::sidecar(proxy_bin(), &control.url, "colorapp/front", dir.path()).await;
    wait_synced(&control.url, 1).await;
    let snap = snapshot(&front).await;

    // blue's listener settings on the cluster that calls it.
    let blue = named(&snap["clusters"], "colorapp/blue");
    assert_eq!(blue["healthCheck"]["path"], "/ping", "{blue:#}");
    assert_eq!(blue["outlierDetection"]["maxServerErrors"], 5, "{blue:#}");
    assert_eq!(blue["connectionPool"]["maxConnections"], 10, "{blue:#}");
    // The router's two routes, in priority order, with their match, split, retries, timeout.
    let egress = named(&snap["listeners"], "egress");
    let color = egress["virtualHosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| {
            h["domains"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d == "color.colorapp.local:8080")
        })
        .unwrap_or_else(|| panic!("no color host in {egress:#}"));
    let routes = color["routes"].as_array().unwrap();
    let canary = &routes[0];
    assert_eq!(
        canary["match"]["headers"][0]["name"], "x-canary",
        "{canary:#}"
    );
    let split = &routes[1];
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
    assert_eq!(weights, [("colorapp/blue", 90), ("colorapp/green", 10)]);
    assert_eq!(split["retryPolicy"]["maxRetries"], 3, "{split:#}");
    assert_eq!(split["retryPolicy"]["perTryTimeout"], "0.500s", "{split:#}");
    assert_eq!(split["timeout"]["perRequest"], "5s", "{split:#}");
    assert_eq!(snap["accessLog"]["path"], "/dev/stdout");

    let gw_dir = tempfile::tempdir().unwrap();
    let gateway =
        ProxyProcess::gateway(proxy_bin(), &control.url, "colorapp/ingress", gw_dir.path()).await;
    wait_synced(&control.url, 2).await;
    let snap = snapshot(&gateway).await;
    let listener = named(&snap["listeners"], "gateway:8088");
    let routes: Vec<&Value> = listener["virtualHosts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|h| h["routes"].as_array().unwrap())
        .collect();
    assert!(
        routes
            .iter()
            .any(|r| r["name"] == "healthCheck" && r["match"]["exact"] == "/health"),
        "{listener:#}"
    );
    assert!(
        routes.iter().any(|r| r["match"]["prefix"] == "/color/"),
        "{listener:#}"
    );
}

/// The App Mesh API export (`describe-*` answers): every kind, Routes folded into their router,
/// TLS and a node's ipPreference reported, the ECS task's Envoy replaced.
#[tokio::test]
async fn an_app_mesh_api_export_round_trips() {
    let (yaml, report) = import("appmesh-json", &[fixture("colorapp.appmesh.json")]);
    for expected in [
        "spec.listeners[0].tls: not carried over: not supported by Trellis: TLS",
        "spec.serviceDiscovery.dns.ipPreference: not carried over: unknown field",
        "environment.ENVOY_LOG_LEVEL: not carried over",
        "replace container \"envoy\"",
        "it runs as --node colorapp/front",
        "\"1337\"",
    ] {
        assert!(report.contains(expected), "{expected:?} not in:\n{report}");
    }
    validates(&yaml);
    runs_as_configured(&yaml).await;
}
