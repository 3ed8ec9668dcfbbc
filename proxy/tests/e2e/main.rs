//! End-to-end tests: the real `trellis-proxy` binary between real clients and real upstream
//! servers, all on 127.0.0.1 with ports the OS picks.

#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod config_input;
mod hardening;
mod lifecycle;
mod protocols;
mod resilience;
mod routing;

use std::net::SocketAddr;

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

/// Starts a proxy with an egress listener of `hosts` (YAML list items, indented 6) and `clusters`.
pub async fn proxy_with(
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
