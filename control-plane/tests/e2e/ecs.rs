//! The ECS example (`examples/ecs/task-definition.json`): the proxy container configured only by
//! the task definition's environment and secrets, its health check command, against a real
//! control plane over TLS that requires identities. (ECS itself, and the capture its agent sets
//! up from `proxyConfiguration`, cannot run here; the capture rules are `trellis-proxy init`'s,
//! tested in network namespaces.)

use std::{process::Stdio, time::Duration};

use serde_json::Value;
use trellis_testkit::{eventually, free_port, process::ControlProcess};

use crate::{CONTROL, cli, proxy_bin, stderr, stdout};

#[tokio::test]
async fn the_ecs_task_definitions_proxy_joins_with_its_environment() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/ecs/task-definition.json"
    );
    let task: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let containers = task["containerDefinitions"].as_array().unwrap();
    let proxy = containers
        .iter()
        .find(|c| c["name"] == task["proxyConfiguration"]["containerName"])
        .expect("the proxyConfiguration names the proxy container");
    let app = containers.iter().find(|c| c["name"] == "app").unwrap();
    assert_eq!(app["dependsOn"][0]["condition"], "HEALTHY");
    let property = |name: &str| {
        task["proxyConfiguration"]["properties"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["value"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(property("IgnoredUID"), proxy["user"].as_str().unwrap());
    let env: Vec<(String, String)> = proxy["environment"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().into(),
                e["value"].as_str().unwrap().into(),
            )
        })
        .collect();
    let get = |name: &str| {
        env.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert!(
        get("TRELLIS_PROXY_INGRESS_ADDR").ends_with(&format!(":{}", property("ProxyIngressPort")))
    );
    assert!(
        get("TRELLIS_PROXY_EGRESS_ADDR").ends_with(&format!(":{}", property("ProxyEgressPort")))
    );

    // A control plane over TLS that requires identities, with the example's node.
    let dir = tempfile::tempdir().unwrap();
    let control = ControlProcess::start_with(
        CONTROL,
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--tls", "--require-identity"],
    )
    .await;
    let url = format!("https://{}", control.addr);
    let ca_file = dir.path().join("control").join("ca.pem");
    let ca = ca_file.to_str().unwrap();
    let node = get("TRELLIS_PROXY_NODE");
    let (namespace, name) = node.split_once('/').unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, format!(
        "apiVersion: appmesh.k8s.aws/v1beta2\nkind: Mesh\nmetadata: {{ name: colorapp }}\nspec: {{}}\n---\n\
         apiVersion: appmesh.k8s.aws/v1beta2\nkind: VirtualNode\nmetadata: {{ name: {name}, namespace: {namespace} }}\n\
         spec: {{ listeners: [{{ portMapping: {{ port: {}, protocol: http }} }}], serviceDiscovery: {{ dns: {{ hostname: {name}.local }} }} }}\n",
        property("AppPorts")
    )).unwrap();
    let out = cli(
        &url,
        &["--ca-file", ca, "apply", "-f", file.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&url, &["--ca-file", ca, "token", "create", "--node", &node]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_string();

    // The container as ECS starts it: the task's environment (addresses on free ports here),
    // the secrets as environment variables, nothing else.
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = tokio::process::Command::new(proxy_bin());
    cmd.env_clear()
        .kill_on_drop(true)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (n, v) in &env {
        let v = match n.as_str() {
            "TRELLIS_PROXY_CONTROL_PLANE" => url.clone(),
            "TRELLIS_PROXY_INGRESS_ADDR" | "TRELLIS_PROXY_EGRESS_ADDR" => {
                format!("127.0.0.1:{}", free_port())
            }
            "TRELLIS_PROXY_ADMIN_ADDR" => admin.clone(),
            "TRELLIS_PROXY_DATA_DIR" => dir.path().join("proxy").display().to_string(),
            _ => v.clone(),
        };
        cmd.env(n, v);
    }
    let secrets: Vec<&str> = proxy["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        secrets,
        ["TRELLIS_PROXY_TOKEN", "TRELLIS_PROXY_CONTROL_PLANE_CA_PEM"]
    );
    cmd.env("TRELLIS_PROXY_TOKEN", &token);
    cmd.env(
        "TRELLIS_PROXY_CONTROL_PLANE_CA_PEM",
        std::fs::read_to_string(&ca_file).unwrap(),
    );
    let _proxy = cmd.spawn().unwrap();

    // The task's health check command, with the example's arguments (the admin address moved).
    let check: Vec<String> = proxy["healthCheck"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    assert_eq!(check[0], "trellis-proxy");
    let args: Vec<String> = check[1..]
        .iter()
        .map(|a| {
            if a.starts_with("127.0.0.1:") {
                admin.clone()
            } else {
                a.clone()
            }
        })
        .collect();
    eventually(
        Duration::from_secs(15),
        "the health check passes",
        || async {
            let out = std::process::Command::new(proxy_bin())
                .args(&args)
                .output()
                .unwrap();
            if out.status.success() {
                Ok(())
            } else {
                Err(stderr(&out))
            }
        },
    )
    .await;
    let out = cli(&url, &["--ca-file", ca, "status", "-o", "json"]);
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(
        status["proxies"][0]["identity"]
            .as_str()
            .unwrap_or_default()
            .ends_with(&format!("/ns/{namespace}/vn/{name}")),
        "joined with its token: {}",
        status["proxies"]
    );
}
