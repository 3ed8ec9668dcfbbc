//! End-to-end tests: real `trellis-control`, `trellis-proxy` and `trellis` processes with real
//! upstream servers, all on 127.0.0.1 with ports the OS picks.

#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod appmesh;
mod auth;
mod canary;
mod ecs;
mod envoy;
mod etcd;
mod gateway;
mod identity;
mod import;
mod inject;
mod kubernetes;
mod l7;
mod mesh;
mod mtls;
mod ports;
mod preview;
mod registration;
mod tls;
mod tracing;

use std::{
    collections::HashMap, net::SocketAddr, path::PathBuf, process::Output, sync::OnceLock,
    time::Duration,
};

use serde_json::Value;
use trellis_testkit::{client::Client, eventually};

pub const CLI: &str = env!("CARGO_BIN_EXE_trellis");
pub const CONTROL: &str = env!("CARGO_BIN_EXE_trellis-control");

/// The trellis-proxy binary of this workspace. Tests never build the product: `./scripts/test`
/// (`cargo nextest run --workspace`) builds it; a narrower run must build it first.
pub fn proxy_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let path = PathBuf::from(CLI).with_file_name("trellis-proxy");
        assert!(
            path.exists(),
            "{} is missing: build first (cargo build -p trellis-proxy)",
            path.display()
        );
        path.display().to_string()
    })
}

/// Runs the CLI against `server`.
pub fn cli(server: &str, args: &[&str]) -> Output {
    std::process::Command::new(CLI)
        .args(["--server", server])
        .args(args)
        .env("NO_COLOR", "1")
        // Never a developer's `trellis login`.
        .env("TRELLIS_CONFIG", "/nonexistent/trellis-config.json")
        .output()
        .unwrap()
}

/// `trellis apply -f` of `yaml`, which must succeed; returns what it printed.
pub fn apply(server: &str, yaml: &str) -> String {
    let out = apply_file(server, yaml);
    assert!(out.status.success(), "apply failed: {}", stderr(&out));
    stdout(&out)
}

/// `trellis apply -f` of `yaml`, which must fail; returns its error output.
pub fn apply_refused(server: &str, yaml: &str) -> String {
    let out = apply_file(server, yaml);
    assert!(!out.status.success(), "applied: {}", stdout(&out));
    stderr(&out)
}

/// `trellis apply -f` of `yaml`, whatever it answers.
pub fn apply_result(server: &str, yaml: &str) -> Output {
    apply_file(server, yaml)
}

fn apply_file(server: &str, yaml: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, yaml).unwrap();
    cli(server, &["apply", "-f", file.to_str().unwrap()])
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `trellis status -o json`.
pub fn status(server: &str) -> Value {
    let out = cli(server, &["status", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until `n` proxies are connected and every one acknowledged its desired version.
pub async fn wait_synced(server: &str, n: usize) -> Value {
    eventually(Duration::from_secs(20), "proxies in sync", || async {
        let s = status(server);
        let proxies = s["proxies"].as_array().cloned().unwrap_or_default();
        let synced = proxies
            .iter()
            .filter(|p| !p["desiredVersion"].is_null() && p["desiredVersion"] == p["ackedVersion"])
            .count();
        if proxies.len() == n && synced == n {
            Ok(s)
        } else {
            Err(format!(
                "{synced}/{} synced, want {n}: {}",
                proxies.len(),
                s["proxies"]
            ))
        }
    })
    .await
}

/// `trellis instances register` of instance `id` of registry service `namespace/service` at
/// 127.0.0.1 on `addr`'s port, with `attrs` (`KEY=VALUE`); it must succeed.
pub fn register_instance(
    server: &str,
    (namespace, service): (&str, &str),
    id: &str,
    addr: SocketAddr,
    attrs: &[&str],
) {
    let port = addr.port().to_string();
    let mut args = vec![
        "instances",
        "register",
        "--namespace",
        namespace,
        "--service",
        service,
        "--id",
        id,
        "--address",
        "127.0.0.1",
        "--port",
        &port,
    ];
    for attr in attrs {
        args.extend(["--attr", attr]);
    }
    let out = cli(server, &args);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// An HTTP/1.1 connection to `via` once its listener accepts. An Envoy binds a listener after it
/// has acknowledged it, and a listener re-created by a new snapshot refuses for a moment.
pub async fn connect_when_listening(via: SocketAddr) -> Client {
    eventually(
        Duration::from_secs(10),
        "the listener accepting",
        || async { Client::h1(via).await.map_err(|e| e.to_string()) },
    )
    .await
}

/// Sends `n` GETs for `host` through `via`; counts answers by body (errors by kind).
pub async fn split(via: SocketAddr, host: &str, n: usize) -> HashMap<String, usize> {
    let mut c = connect_when_listening(via).await;
    let mut counts = HashMap::new();
    for _ in 0..n {
        let r = c.get(host, "/").await.unwrap();
        let key = match r.header("x-trellis-error") {
            Some(kind) => format!("error:{kind}"),
            None if r.status == 200 => r.text(),
            None => format!("status:{}", r.status),
        };
        *counts.entry(key).or_default() += 1;
    }
    counts
}
