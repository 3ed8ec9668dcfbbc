//! End-to-end tests: the proxy between real clients and real upstream servers, all on 127.0.0.1
//! with ports the OS picks. Request-path tests serve the proxy library's app in the test's own
//! runtime ([`inprocess`]); what needs a process (signals, reloads from a file, exit codes,
//! restore) runs the real `trellis-proxy` binary.

#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod capture;
mod circuit;
mod config_input;
mod hardening;
mod health;
mod http1;
mod inprocess;
mod lifecycle;
mod mirror;
mod protocols;
mod resilience;
mod routing;
mod timing;

use std::{net::SocketAddr, time::Duration};

use inprocess::InProcessProxy;

use trellis_testkit::ProxyProcess;

pub const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");

/// A cluster entry for the snapshot YAML.
pub fn cluster(name: &str, protocol: &str, endpoints: &[SocketAddr]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{ address: \"{a}\" }}"))
        .collect();
    format!(
        "  - name: {name}\n    protocol: {protocol}\n    endpoints: [{}]\n",
        eps.join(", ")
    )
}

/// Serves, in process, a proxy with an egress listener of `hosts` (YAML list items, indented 6)
/// and `clusters`. `extra` takes the binary's `--idle-timeout`.
pub async fn proxy_with(
    version: &str,
    hosts: &str,
    clusters: &str,
    extra: &[&str],
) -> InProcessProxy {
    let idle = match extra {
        [] => Duration::from_secs(60),
        ["--idle-timeout", d] => humantime::parse_duration(d).unwrap(),
        other => panic!("in-process proxies take only --idle-timeout, not {other:?}"),
    };
    InProcessProxy::start(&snapshot(version, hosts, clusters), idle).await
}

/// Starts the `trellis-proxy` binary with `--snapshot` of the same snapshot and `extra` flags.
pub async fn process_with(
    version: &str,
    hosts: &str,
    clusters: &str,
    extra: &[&str],
) -> ProxyProcess {
    ProxyProcess::start(BIN, &snapshot(version, hosts, clusters), extra).await
}

pub fn snapshot(version: &str, hosts: &str, clusters: &str) -> String {
    format!(
        "version: {version}\nlisteners:\n  - name: egress\n    role: EGRESS\n    virtualHosts:\n{hosts}clusters:\n{clusters}"
    )
}

/// One virtual host with one catch-all route to `cluster`, plus optional route fields.
pub fn host_to(domain: &str, cluster: &str, route_extra: &str) -> String {
    format!(
        "      - name: {domain}\n        domains: [\"{domain}\"]\n        routes:\n          - name: {domain}-default\n            match: {{ prefix: / }}\n            action: {{ weightedTargets: [{{ cluster: {cluster}, weight: 1 }}] }}\n{route_extra}"
    )
}
