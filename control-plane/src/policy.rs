//! mTLS policy (issue 12): a mesh's mode, and the mesh graph read as authorization — the nodes
//! and gateways whose traffic the mesh's resources send to a node are the only callers its
//! sidecar admits under STRICT.

use std::collections::BTreeSet;

use crate::{
    model::{Kind, MeshSpec, Mtls, ResourceKey, Spec, VirtualNodeSpec},
    validate::State,
};

/// What translation needs of the mesh's identities.
#[derive(Debug, Clone, Copy, Default)]
pub struct Security<'a> {
    /// The CA that names identities; None (in-process tests): a mesh asking for mTLS gets no
    /// snapshot rather than a plaintext one.
    pub ca: Option<&'a crate::identity::Ca>,
    /// The mode of a mesh without `spec.mtls`: STRICT when every proxy must have an identity
    /// (`--require-identity`), else DISABLED.
    pub default_mode: Mtls,
    /// Revoked identities: the node or gateway, and until when its certificates were issued
    /// (Unix seconds).
    pub revoked: Option<&'a std::collections::BTreeMap<ResourceKey, u64>>,
}

impl Security<'_> {
    /// The mode of a mesh (validation has checked the value).
    pub fn mode(&self, mesh: Option<&MeshSpec>) -> Mtls {
        mesh.and_then(|m| m.mtls.as_deref())
            .and_then(Mtls::parse)
            .unwrap_or(self.default_mode)
    }
}

/// The VirtualServices a node declares as backends: its `backends`, and for `backendGroups`
/// (`*`), every VirtualService of the group's namespace in the node's mesh.
pub fn backend_services(
    state: &State,
    node: &ResourceKey,
    spec: &VirtualNodeSpec,
) -> Vec<ResourceKey> {
    let mut keys: Vec<ResourceKey> = spec
        .backends
        .iter()
        .map(|backend| {
            let r = &backend.virtual_service.virtual_service_ref;
            r.key(Kind::VirtualService, &node.namespace)
        })
        .collect();
    let mesh = state
        .get(node)
        .and_then(|r| crate::validate::mesh_of(state, r));
    for group in &spec.backend_groups {
        let namespace = group.namespace.as_deref().unwrap_or(&node.namespace);
        for (key, r) in state.iter() {
            if key.kind == Kind::VirtualService
                && key.namespace == namespace
                && crate::validate::mesh_of(state, r) == mesh
                && !keys.contains(key)
            {
                keys.push(key.clone());
            }
        }
    }
    keys
}

/// The VirtualNodes a VirtualService's traffic goes to: its provider node, or the targets of its
/// router's routes.
fn service_nodes(state: &State, service: &ResourceKey) -> BTreeSet<ResourceKey> {
    let mut out = BTreeSet::new();
    let Some(Spec::VirtualService(vs)) = state.get(service).map(|r| &r.spec) else {
        return out;
    };
    let Some(provider) = &vs.provider else {
        return out;
    };
    let ns = &service.namespace;
    if let Some(p) = &provider.virtual_node {
        out.insert(p.virtual_node_ref.key(Kind::VirtualNode, ns));
    }
    if let Some(p) = &provider.virtual_router {
        let router = p.virtual_router_ref.key(Kind::VirtualRouter, ns);
        if let Some(Spec::VirtualRouter(r)) = state.get(&router).map(|r| &r.spec) {
            for route in &r.routes {
                let http = route.http_route.as_ref().or(route.http2_route.as_ref());
                let action = http
                    .map(|h| &h.action)
                    .or(route.grpc_route.as_ref().map(|g| &g.action))
                    .or(route.tcp_route.as_ref().map(|t| &t.action));
                for t in action.iter().flat_map(|a| &a.weighted_targets) {
                    out.insert(t.virtual_node_ref.key(Kind::VirtualNode, &router.namespace));
                }
                // A mirror's target is called too.
                let mirror = http
                    .and_then(|h| h.mirror.as_ref())
                    .or(route.grpc_route.as_ref().and_then(|g| g.mirror.as_ref()));
                if let Some(m) = mirror {
                    out.insert(m.virtual_node_ref.key(Kind::VirtualNode, &router.namespace));
                }
            }
        }
    }
    out
}

/// The nodes and gateways whose traffic the mesh sends to `node`: VirtualNodes declaring as a
/// backend a VirtualService whose traffic goes to it, and VirtualGateways with a route to one.
pub fn callers(state: &State, node: &ResourceKey) -> BTreeSet<ResourceKey> {
    let mut out = BTreeSet::new();
    let reaches = |service: &ResourceKey| service_nodes(state, service).contains(node);
    for (key, r) in state.iter() {
        match &r.spec {
            Spec::VirtualNode(spec) if backend_services(state, key, spec).iter().any(&reaches) => {
                out.insert(key.clone());
            }
            Spec::VirtualGateway(gw) => {
                let routes_to_node = state.iter().any(|(route_key, route)| {
                    let Spec::GatewayRoute(gr) = &route.spec else {
                        return false;
                    };
                    if !crate::validate::gateway_serves(state, (key, &**gw), route) {
                        return false;
                    }
                    let target = gr
                        .http_route
                        .as_ref()
                        .or(gr.http2_route.as_ref())
                        .map(|h| &h.action.target)
                        .or(gr.grpc_route.as_ref().map(|g| &g.action.target));
                    target.is_some_and(|t| {
                        let vs = t
                            .virtual_service
                            .virtual_service_ref
                            .key(Kind::VirtualService, &route_key.namespace);
                        reaches(&vs)
                    })
                });
                if routes_to_node {
                    out.insert(key.clone());
                }
            }
            _ => {}
        }
    }
    out
}
