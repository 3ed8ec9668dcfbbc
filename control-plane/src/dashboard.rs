//! The control plane's web dashboard: one page (`GET /ui`, no data of its own) that reads the
//! API the CLI uses — `/v1/graph` (the mesh graph with live rates), `/v1/status` (every proxy's
//! convergence) and `/v1/canaries` — every two seconds. It only reads: a viewer's token is
//! enough (given once as `/ui#token=...`, kept in the tab's session storage).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    measure::Rate,
    model::{Kind, ResourceKey, Spec},
    validate::State,
};

/// The page.
pub const PAGE: &str = include_str!("dashboard.html");

/// The mesh as a graph: its resources, and who sends to whom with the live rates of the
/// proxies connected to this control plane.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Graph {
    pub nodes: Vec<Vertex>,
    pub edges: Vec<Edge>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vertex {
    /// `KIND/NAMESPACE/NAME`.
    pub id: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Edge {
    pub from: String,
    pub to: String,
    /// backend, provider, route (a router's route to a node) or gatewayRoute.
    pub kind: String,
    /// The route's name (route edges).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The target's weight in the route, percent of the route's total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_percent: Option<f64>,
    /// Requests per second over the last ~10 s, and the share not 5xx (percent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
}

fn id(key: &ResourceKey) -> String {
    format!("{}/{}/{}", key.kind, key.namespace, key.name)
}

/// Sums the rates that `keep` selects.
fn sum(rates: &[Rate], keep: impl Fn(&Rate) -> bool) -> (Option<f64>, Option<f64>) {
    let (mut rps, mut ok) = (0.0, 0.0);
    let mut any = false;
    for r in rates.iter().filter(|r| keep(r)) {
        any = true;
        rps += r.requests_per_second;
        ok += r.requests_per_second * r.success_rate.unwrap_or(100.0) / 100.0;
    }
    if !any {
        return (None, None);
    }
    (Some(rps), (rps > 0.0).then(|| 100.0 * ok / rps))
}

/// The route names (as proxies know them) a virtual service's callers use: its router's
/// `ROUTER/ROUTE`, or `SERVICE/default` for a node provider.
fn routes_of(state: &State, service: &ResourceKey) -> Vec<String> {
    let Some(Spec::VirtualService(vs)) = state.get(service).map(|r| &r.spec) else {
        return Vec::new();
    };
    let Some(p) = &vs.provider else {
        return Vec::new();
    };
    if let Some(r) = &p.virtual_router {
        let key = r
            .virtual_router_ref
            .key(Kind::VirtualRouter, &service.namespace);
        if let Some(Spec::VirtualRouter(vr)) = state.get(&key).map(|r| &r.spec) {
            return vr
                .routes
                .iter()
                .map(|route| format!("{}/{}", key.name, route.name))
                .collect();
        }
        return Vec::new();
    }
    vec![format!("{}/default", service.name)]
}

/// The graph of `state`, with `rates`.
pub fn graph(state: &State, rates: &[Rate]) -> Graph {
    let mut g = Graph::default();
    let mut edges: Vec<Edge> = Vec::new();
    let edge = |from: &ResourceKey, to: &ResourceKey, kind: &str| Edge {
        from: id(from),
        to: id(to),
        kind: kind.into(),
        route: None,
        weight_percent: None,
        requests_per_second: None,
        success_rate: None,
    };
    for (key, r) in state {
        if !matches!(
            key.kind,
            Kind::VirtualNode | Kind::VirtualService | Kind::VirtualRouter | Kind::VirtualGateway
        ) {
            continue;
        }
        g.nodes.push(Vertex {
            id: id(key),
            kind: key.kind.to_string(),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        });
        let ns = key.namespace.as_str();
        match &r.spec {
            Spec::VirtualNode(n) => {
                let caller = id(key);
                for b in &n.backends {
                    let vs = b
                        .virtual_service
                        .virtual_service_ref
                        .key(Kind::VirtualService, ns);
                    let routes = routes_of(state, &vs);
                    let mut e = edge(key, &vs, "backend");
                    (e.requests_per_second, e.success_rate) =
                        sum(rates, |r| r.caller == caller && routes.contains(&r.route));
                    edges.push(e);
                }
            }
            Spec::VirtualService(vs) => {
                let routes = routes_of(state, key);
                let provider = vs.provider.as_ref().and_then(|p| {
                    p.virtual_router
                        .as_ref()
                        .map(|r| r.virtual_router_ref.key(Kind::VirtualRouter, ns))
                        .or_else(|| {
                            p.virtual_node
                                .as_ref()
                                .map(|n| n.virtual_node_ref.key(Kind::VirtualNode, ns))
                        })
                });
                if let Some(to) = provider {
                    let mut e = edge(key, &to, "provider");
                    (e.requests_per_second, e.success_rate) =
                        sum(rates, |r| routes.contains(&r.route));
                    edges.push(e);
                }
            }
            Spec::VirtualRouter(vr) => {
                for route in &vr.routes {
                    let Some(action) = route.action() else {
                        continue;
                    };
                    let total: i64 = action.weighted_targets.iter().map(|t| t.weight).sum();
                    let name = format!("{}/{}", key.name, route.name);
                    for t in &action.weighted_targets {
                        let node = t.virtual_node_ref.key(Kind::VirtualNode, ns);
                        let target = format!("{}/{}", node.namespace, node.name);
                        let mut e = edge(key, &node, "route");
                        e.route = Some(route.name.clone());
                        e.weight_percent =
                            (total > 0).then(|| 100.0 * t.weight as f64 / total as f64);
                        (e.requests_per_second, e.success_rate) =
                            sum(rates, |r| r.route == name && r.node == target);
                        edges.push(e);
                    }
                }
            }
            _ => {}
        }
    }
    // A gateway's routes to virtual services.
    let mut gateway_targets: BTreeMap<(String, String), (ResourceKey, ResourceKey)> =
        BTreeMap::new();
    for (key, r) in state.iter().filter(|(k, _)| k.kind == Kind::GatewayRoute) {
        let Spec::GatewayRoute(gr) = &r.spec else {
            continue;
        };
        let Some(gw) = &gr.virtual_gateway_ref else {
            continue;
        };
        let gw = gw.key(Kind::VirtualGateway, &key.namespace);
        let spec = serde_json::to_value(gr).unwrap_or_default();
        for route in ["httpRoute", "http2Route", "grpcRoute"] {
            let target = &spec[route]["action"]["target"]["virtualService"]["virtualServiceRef"];
            if let Some(name) = target["name"].as_str() {
                let ns = target["namespace"].as_str().unwrap_or(&key.namespace);
                let vs = ResourceKey::new(Kind::VirtualService, ns, name);
                gateway_targets.insert((id(&gw), id(&vs)), (gw.clone(), vs));
            }
        }
    }
    // A gateway's rates are its requests whatever its route (its routes are named after its
    // GatewayRoutes): shown on its edge when it has one.
    let mut targets_of: BTreeMap<String, usize> = BTreeMap::new();
    for (gw, _) in gateway_targets.keys() {
        *targets_of.entry(gw.clone()).or_default() += 1;
    }
    for (gw, vs) in gateway_targets.into_values() {
        let caller = id(&gw);
        let mut e = edge(&gw, &vs, "gatewayRoute");
        if targets_of.get(&caller) == Some(&1) {
            (e.requests_per_second, e.success_rate) = sum(rates, |r| r.caller == caller);
        }
        edges.push(e);
    }
    g.edges = edges;
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_reads_the_api_and_writes_nothing() {
        for path in ["/v1/graph", "/v1/status", "/v1/canaries"] {
            assert!(PAGE.contains(path), "{path}");
        }
        for write in ["POST", "PUT", "DELETE", "PATCH"] {
            assert!(!PAGE.contains(write), "the page must not {write}");
        }
    }
}
