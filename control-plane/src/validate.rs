//! Validation: schema, ranges, references and names, over the whole state an apply would leave.
//! Every problem names its document (for applied files), its resource and its field path.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    sync::Arc,
};

use crate::model::{
    API_VERSION, APPMESH_API_VERSION, ApiVersion, DEFAULT_NAMESPACE, Duration, GatewayRouteSpec,
    HeaderMatch, HttpMatch, Kind, LabelSelector, Listener, Manifest, Metadata, Ref, ResourceKey,
    RetryPolicy, RouteAction, Spec, Timeouts, VirtualGatewaySpec, VirtualNodeSpec,
    VirtualRouterSpec, VirtualServiceSpec, parse_spec,
};
use crate::registry;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    /// Index of the document in the applied stream, when the problem is in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    pub path: String,
    pub reason: String,
}

impl Problem {
    pub fn document(index: usize, path: &str, reason: impl Into<String>) -> Self {
        Self {
            document: Some(index),
            resource: None,
            path: path.to_string(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.document, &self.resource) {
            (Some(d), Some(r)) => write!(f, "document {d} ({r}): ")?,
            (Some(d), None) => write!(f, "document {d}: ")?,
            (None, Some(r)) => write!(f, "{r}: ")?,
            (None, None) => {}
        }
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// A resource as the control plane holds it: its metadata and its spec, parsed once and kept
/// typed (the manifest's JSON is not kept beside it).
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub key: ResourceKey,
    /// (field path, mesh) of the ARN references it was applied with that named a mesh while the
    /// resource named none: checked against the mesh it belongs to. Not stored.
    pub arn_meshes: Vec<(String, String)>,
    /// The API group it was applied with (Trellis's or App Mesh's), served back with it.
    pub api_version: ApiVersion,
    /// As stored: `resourceVersion` is never set here (see `revision`).
    pub metadata: Metadata,
    pub spec: Spec,
    /// The store revision of the resource's last change; 0 before it is stored.
    pub revision: u64,
}

impl Resource {
    /// Whether `other` says the same thing (ignoring server-set metadata).
    pub fn same(&self, other: &Resource) -> bool {
        self.spec == other.spec
            && self.api_version == other.api_version
            && self.metadata.labels == other.metadata.labels
            && self.metadata.annotations == other.metadata.annotations
    }
}

/// Serialises as the manifest that is stored (and, with a `resourceVersion` and status, served):
/// `apiVersion`, `kind`, `metadata`, `spec`.
impl serde::Serialize for Resource {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut m = serializer.serialize_struct("Manifest", 4)?;
        m.serialize_field("apiVersion", self.api_version.as_str())?;
        m.serialize_field("kind", self.key.kind.as_str())?;
        m.serialize_field("metadata", &self.metadata)?;
        m.serialize_field("spec", &self.spec)?;
        m.end()
    }
}

/// Every resource, by key. Resources are shared between views: a change replaces its own.
pub type State = BTreeMap<ResourceKey, Arc<Resource>>;

/// Splits a YAML stream (documents separated by `---`; JSON is YAML too) into manifests. Empty
/// documents are skipped; a document that is not a manifest is an error naming its index.
pub fn parse_documents(text: &str) -> Result<Vec<Manifest>, Vec<Problem>> {
    use serde::Deserialize as _;
    // Deep flow nesting takes the YAML parser quadratic time: refused before parsing.
    trellis_proxy::snapshot::check_nesting(text)
        .map_err(|reason| vec![Problem::document(0, "(input)", reason)])?;
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = match serde_json::Value::deserialize(doc) {
            Ok(serde_json::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                problems.push(Problem::document(i, "(document)", e.to_string()));
                break;
            }
        };
        if let Some(other) = not_mesh(&value) {
            out.push(other);
            continue;
        }
        match serde_path_to_error::deserialize::<_, Manifest>(value) {
            Ok(m) => out.push(m),
            Err(e) => {
                let path = trellis_proxy::snapshot::field_path(e.path());
                problems.push(Problem::document(i, &path, e.into_inner().to_string()));
            }
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// A Kubernetes document that is not a mesh resource (a Namespace, Deployment, Service, ... in
/// the same file, as App Mesh's walkthroughs have them): kept as a manifest with only its
/// identity, which [`is_mesh`] tells apart, so that an apply reports it as skipped. A document of
/// a mesh group or a mesh kind is a mesh resource, whatever else is wrong with it.
fn not_mesh(value: &serde_json::Value) -> Option<Manifest> {
    fn text(v: Option<&serde_json::Value>) -> &str {
        v.and_then(|v| v.as_str()).unwrap_or_default()
    }
    let api_version = text(value.get("apiVersion"));
    let kind = text(value.get("kind"));
    let mesh_group = matches!(
        ApiVersion::parse(api_version),
        Some(ApiVersion::Trellis | ApiVersion::AppMesh)
    );
    if kind.is_empty() || mesh_group || Kind::parse(kind).is_some() {
        return None;
    }
    let metadata = value.get("metadata");
    Some(Manifest {
        api_version: api_version.to_string(),
        kind: kind.to_string(),
        metadata: Metadata {
            name: text(metadata.and_then(|m| m.get("name"))).to_string(),
            namespace: metadata
                .and_then(|m| m.get("namespace"))
                .and_then(|n| n.as_str())
                .map(str::to_string),
            ..Metadata::default()
        },
        spec: serde_json::Value::Null,
        status: None,
    })
}

/// Whether a parsed manifest is a mesh resource (else a Kubernetes document to skip).
pub fn is_mesh(manifest: &Manifest) -> bool {
    matches!(
        ApiVersion::parse(&manifest.api_version),
        Some(ApiVersion::Trellis | ApiVersion::AppMesh)
    ) || Kind::parse(&manifest.kind).is_some()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
}

/// Checks one document on its own (apiVersion, kind, names, spec schema) and parses it.
/// The key a manifest would be stored under, when its kind is known.
pub fn manifest_key(manifest: &Manifest) -> Option<ResourceKey> {
    let kind = Kind::parse(&manifest.kind).filter(|k| k.as_str() == manifest.kind)?;
    let namespace = if kind.namespaced() {
        manifest
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
    } else {
        String::new()
    };
    Some(ResourceKey::new(kind, &namespace, &manifest.metadata.name))
}

pub fn admit(mut manifest: Manifest, document: Option<usize>) -> Result<Resource, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut p = |path: &str, reason: String| {
        problems.push(Problem {
            document,
            resource: None,
            path: path.to_string(),
            reason,
        })
    };
    let api_version = ApiVersion::parse(&manifest.api_version);
    if api_version.is_none() {
        p(
            "apiVersion",
            format!(
                "must be {API_VERSION:?} or {APPMESH_API_VERSION:?}, not {:?}",
                manifest.api_version
            ),
        );
    }
    let Some(kind) = Kind::parse(&manifest.kind).filter(|k| k.as_str() == manifest.kind) else {
        let kinds: Vec<_> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        p(
            "kind",
            format!(
                "unknown kind {:?} (one of {})",
                manifest.kind,
                kinds.join(", ")
            ),
        );
        return Err(problems);
    };
    if !valid_name(&manifest.metadata.name) {
        p(
            "metadata.name",
            format!(
                "{:?} is not a valid name (lowercase letters, digits, '-', '.')",
                manifest.metadata.name
            ),
        );
    }
    if let Some(v) = api_version.filter(|v| !v.has(kind)) {
        p(
            "apiVersion",
            if kind == Kind::Namespace {
                format!("a Namespace is \"v1\", not {:?}", v.as_str())
            } else if kind == Kind::Canary {
                format!(
                    "a Canary is Trellis's own kind: {API_VERSION:?}, not {:?}",
                    v.as_str()
                )
            } else {
                format!(
                    "\"v1\" is only for Namespace documents; a {kind} is {API_VERSION:?} or {APPMESH_API_VERSION:?}"
                )
            },
        );
    }
    let namespace = manifest
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    if kind.namespaced() && !valid_name(&namespace) {
        p(
            "metadata.namespace",
            format!("{namespace:?} is not a valid namespace"),
        );
    }
    // App Mesh's schema and Trellis's status of every field first (it also turns ARN
    // references into references); the typed model then parses what passed.
    let compat = if kind.is_appmesh() {
        crate::compat::check(kind, &mut manifest.spec)
    } else {
        crate::compat::Checked::default()
    };
    let arn_meshes = compat.arn_meshes;
    let spec = if !compat.problems.is_empty() {
        for (path, reason) in compat.problems {
            p(&path, reason);
        }
        None
    } else {
        match parse_spec(kind, std::mem::take(&mut manifest.spec)) {
            Ok(s) => Some(s),
            Err((path, reason)) => {
                p(&path, reason);
                None
            }
        }
    };
    let key = ResourceKey::new(kind, &namespace, &manifest.metadata.name);
    let resource = key.to_string();
    for problem in &mut problems {
        problem.resource = Some(resource.clone());
    }
    match spec {
        Some(spec) if problems.is_empty() => {
            if kind.namespaced() {
                manifest.metadata.namespace = Some(namespace);
            } else {
                manifest.metadata.namespace = None;
            }
            Ok(Resource {
                key,
                arn_meshes,
                api_version: api_version.unwrap_or_default(),
                metadata: manifest.metadata,
                spec,
                revision: 0,
            })
        }
        _ => Err(problems),
    }
}

/// Checks references, ranges and names across `state`. `origin` maps resources to the applied
/// document they came from.
pub fn check(state: &State, origin: &HashMap<ResourceKey, usize>) -> Vec<Problem> {
    check_apply(state, origin, &HashSet::new())
}

/// [`check`] for an apply some of whose documents were refused on admission (`refused`): a
/// reference to one of them is not reported again as missing (its own problems say why).
pub fn check_apply(
    state: &State,
    origin: &HashMap<ResourceKey, usize>,
    refused: &HashSet<ResourceKey>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let meshes = Meshes::new(state);
    // Each `trellis.dev/addresses` address is one VirtualService's (the first one's, in key
    // order): a sidecar serves each address with one virtual host.
    let mut addressed: HashMap<std::net::SocketAddr, &ResourceKey> = HashMap::new();
    for (key, resource) in state.iter().filter(|(k, _)| k.kind == Kind::VirtualService) {
        let addresses = crate::model::annotated_addresses(&resource.metadata.annotations);
        for a in addresses.unwrap_or_default() {
            addressed.entry(a).or_insert(key);
        }
    }
    for (key, resource) in state {
        let mut c = Checker {
            state,
            meshes: &meshes,
            key,
            refused,
            problems: Vec::new(),
        };
        // A Canary belongs to its router's mesh.
        if key.kind.namespaced() && key.kind != Kind::Canary {
            match resource.spec.mesh_ref() {
                Some(m) if !meshes.names().any(|n| n == m.name) => {
                    c.err("spec.meshRef.name", format!("mesh {:?} not found", m.name));
                }
                Some(_) => {}
                None => {
                    if let Err(reason) = meshes.of(key, &resource.spec) {
                        c.err("spec.meshRef", reason);
                    }
                }
            }
        }
        if let Ok(Some(mesh)) = meshes.of(key, &resource.spec) {
            for (path, named) in &resource.arn_meshes {
                if named != mesh {
                    c.err(
                        path.clone(),
                        format!("names mesh {named:?}, but the resource belongs to mesh {mesh:?}"),
                    );
                }
            }
        }
        c.spec(&resource.spec);
        let path = format!(
            "metadata.annotations.{}",
            crate::model::ADDRESSES_ANNOTATION
        );
        match crate::model::annotated_addresses(&resource.metadata.annotations) {
            Err(reason) if key.kind == Kind::VirtualService => c.err(path, reason),
            Ok(addresses) if key.kind == Kind::VirtualService => {
                let mut seen = HashSet::new();
                for a in addresses {
                    if !seen.insert(a) {
                        c.err(path.clone(), format!("{a} is listed twice"));
                    } else if let Some(other) = addressed.get(&a).filter(|o| **o != key) {
                        c.err(path.clone(), format!("{a} is already {other}'s address"));
                    }
                }
            }
            _ if resource
                .metadata
                .annotations
                .contains_key(crate::model::ADDRESSES_ANNOTATION) =>
            {
                c.err(path, "only a VirtualService has addresses".into());
            }
            _ => {}
        }
        let document = origin.get(key).copied();
        problems.extend(c.problems.into_iter().map(|(path, reason)| Problem {
            document,
            resource: Some(key.to_string()),
            path,
            reason,
        }));
    }
    problems
}

/// The meshes of a state, and which one a resource belongs to.
#[derive(Debug)]
pub struct Meshes<'a> {
    state: &'a State,
    /// Each mesh's name and namespace selector (meshes sort first in a state).
    meshes: Vec<(&'a str, Option<&'a LabelSelector>)>,
}

impl<'a> Meshes<'a> {
    pub fn new(state: &'a State) -> Self {
        let meshes = state
            .iter()
            .take_while(|(k, _)| k.kind == Kind::Mesh)
            .map(|(k, r)| {
                let selector = match &r.spec {
                    Spec::Mesh(m) => m.namespace_selector.as_ref(),
                    _ => None,
                };
                (k.name.as_str(), selector)
            })
            .collect();
        Self { state, meshes }
    }

    fn names(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.meshes.iter().map(|(n, _)| *n)
    }

    /// The mesh `key` belongs to: its `spec.meshRef`; else the one mesh whose namespace
    /// selector selects its namespace (by the labels of the `Namespace` applied for it); else
    /// the one mesh without a selector, if there is exactly one. `Ok(None)` for meshes and
    /// namespaces themselves.
    pub fn of(&self, key: &ResourceKey, spec: &'a Spec) -> Result<Option<&'a str>, String> {
        if !key.kind.namespaced() {
            return Ok(None);
        }
        if let Some(m) = spec.mesh_ref() {
            return Ok(Some(m.name.as_str()));
        }
        let labels = &namespace_labels(self.state, &key.namespace);
        let selecting: Vec<&str> = self
            .meshes
            .iter()
            .filter(|(_, s)| s.is_some_and(|s| s.matches(labels)))
            .map(|(n, _)| *n)
            .collect();
        // Meshes without a selector take the resources no selector claims: the one such mesh.
        let open: Vec<&str> = self
            .meshes
            .iter()
            .filter(|(_, s)| s.is_none())
            .map(|(n, _)| *n)
            .collect();
        match (selecting.as_slice(), open.as_slice()) {
            ([one], _) => Ok(Some(one)),
            ([_, _, ..], _) => Err(format!(
                "namespace {:?} is selected by the namespaceSelector of meshes {}: name one in spec.meshRef.name",
                key.namespace,
                selecting.join(", ")
            )),
            ([], [only]) => Ok(Some(only)),
            ([], []) if self.meshes.is_empty() => Err("no Mesh exists: apply a Mesh first".into()),
            ([], []) => Err(format!(
                "namespace {:?} is not selected by any mesh's namespaceSelector: label the namespace (apply a v1 Namespace) or name the mesh in spec.meshRef.name",
                key.namespace
            )),
            ([], _) => Err(
                "several meshes without a namespaceSelector exist: name one in spec.meshRef.name, or select the namespace with a mesh's namespaceSelector"
                    .into(),
            ),
        }
    }
}

/// A namespace's labels: those of the `v1 Namespace` applied for it, and the name label
/// Kubernetes gives every namespace.
pub fn namespace_labels(state: &State, namespace: &str) -> BTreeMap<String, String> {
    let mut labels = state
        .get(&ResourceKey::new(Kind::Namespace, "", namespace))
        .map(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    labels.insert("kubernetes.io/metadata.name".into(), namespace.to_owned());
    labels
}

/// Whether gateway `gateway` serves the gateway route `route`, as App Mesh's controller
/// designated them: the gateway the route names in `virtualGatewayRef` (whatever the selectors);
/// without one, every gateway of the route's mesh whose `namespaceSelector` selects the
/// route's namespace (a gateway without one: its own namespace) and whose
/// `gatewayRouteSelector`, if set, selects the route's labels.
pub fn gateway_serves(
    state: &State,
    (gw_key, gw): (&ResourceKey, &VirtualGatewaySpec),
    route: &Resource,
) -> bool {
    let Spec::GatewayRoute(gr) = &route.spec else {
        return false;
    };
    let gr_key = &route.key;
    if let Some(r) = &gr.virtual_gateway_ref {
        return r.name == gw_key.name
            && r.namespace.as_deref().unwrap_or(&gr_key.namespace) == gw_key.namespace;
    }
    let namespace = match &gw.namespace_selector {
        None => gr_key.namespace == gw_key.namespace,
        Some(selector) => {
            selector.matches(&namespace_labels(state, &gr_key.namespace)) && {
                let meshes = Meshes::new(state);
                let gw_spec = state.get(gw_key).map(|r| &r.spec);
                let gw_mesh = gw_spec.and_then(|s| meshes.of(gw_key, s).ok().flatten());
                gw_mesh == meshes.of(gr_key, &route.spec).ok().flatten()
            }
        }
    };
    namespace
        && gw
            .gateway_route_selector
            .as_ref()
            .is_none_or(|s| s.matches(&route.metadata.labels))
}

/// A router route's kind and the port its match names.
pub(crate) fn route_port(route: &crate::model::Route) -> (&'static str, Option<i64>) {
    if let Some(h) = &route.http_route {
        ("httpRoute", h.matcher.port)
    } else if let Some(h) = &route.http2_route {
        ("http2Route", h.matcher.port)
    } else if let Some(g) = &route.grpc_route {
        ("grpcRoute", g.matcher.port)
    } else if let Some(t) = &route.tcp_route {
        let port = t
            .matcher
            .as_ref()
            .and_then(|m| m.get("port"))
            .and_then(serde_json::Value::as_i64);
        ("tcpRoute", port)
    } else {
        ("httpRoute", None)
    }
}

/// The mesh a resource belongs to, if it can be told (see [`Meshes::of`]).
pub fn mesh_of<'a>(state: &'a State, resource: &'a Resource) -> Option<&'a str> {
    Meshes::new(state)
        .of(&resource.key, &resource.spec)
        .ok()
        .flatten()
}

struct Checker<'a> {
    state: &'a State,
    /// The mesh, when there is exactly one.
    meshes: &'a Meshes<'a>,
    key: &'a ResourceKey,
    /// Resources of the same apply refused on admission.
    refused: &'a HashSet<ResourceKey>,
    problems: Vec<(String, String)>,
}

const PROTOCOLS: [&str; 4] = ["http", "http2", "grpc", "tcp"];
pub(crate) const HTTP_EVENTS: [&str; 6] = [
    "server-error",
    "gateway-error",
    "client-error",
    "stream-error",
    "connect-failure",
    "refused-stream",
];

impl Checker<'_> {
    fn err(&mut self, path: impl Into<String>, reason: String) {
        self.problems.push((path.into(), reason));
    }

    /// A Canary: its router's route (http, http2 or grpc), whose targets are the stable node
    /// and the canary (any other at weight 0); rising steps; gates with a minimum of requests;
    /// one canary per route.
    fn canary(&mut self, c: &crate::model::CanarySpec) {
        self.exists(
            "spec.virtualRouterRef",
            Kind::VirtualRouter,
            &c.virtual_router_ref,
        );
        self.exists("spec.stableRef", Kind::VirtualNode, &c.stable_ref);
        self.exists("spec.canaryRef", Kind::VirtualNode, &c.canary_ref);
        let ns = self.key.namespace.as_str();
        let router = c.virtual_router_ref.key(Kind::VirtualRouter, ns);
        let stable = c.stable_ref.key(Kind::VirtualNode, ns);
        let canary = c.canary_ref.key(Kind::VirtualNode, ns);
        if stable == canary {
            self.err("spec.canaryRef", format!("{canary} is also the stableRef"));
        }
        if let Some(Spec::VirtualRouter(vr)) = self.state.get(&router).map(|r| &r.spec) {
            match vr.routes.iter().find(|r| r.name == c.route) {
                None => {
                    let names: Vec<&str> = vr.routes.iter().map(|r| r.name.as_str()).collect();
                    self.err(
                        "spec.route",
                        format!(
                            "{router} has no route {:?} (its routes: {})",
                            c.route,
                            names.join(", ")
                        ),
                    );
                }
                Some(route) if route.grpc_route.is_some() => self.err(
                    "spec.route",
                    format!(
                        "not supported by Trellis: {:?} is a grpcRoute; a canary judges HTTP status codes, and a gRPC error travels in a 200 response's grpc-status",
                        c.route
                    ),
                ),
                Some(route) => match route.action() {
                    None => self.err(
                        "spec.route",
                        format!(
                            "not supported by Trellis: {:?} is a tcpRoute; a canary judges HTTP and gRPC requests",
                            c.route
                        ),
                    ),
                    Some(action) => {
                        let mut has_stable = false;
                        for t in &action.weighted_targets {
                            let node = t.virtual_node_ref.key(Kind::VirtualNode, &router.namespace);
                            has_stable |= node == stable;
                            if node != stable && node != canary && t.weight != 0 {
                                self.err(
                                    "spec.route",
                                    format!(
                                        "the route sends weight {} to {node}: a canary's route may only send traffic to its stableRef and canaryRef (give other targets weight 0)",
                                        t.weight
                                    ),
                                );
                            }
                        }
                        if !has_stable {
                            self.err(
                                "spec.stableRef",
                                format!("{stable} is not a target of route {:?}", c.route),
                            );
                        }
                    }
                },
            }
        }
        let canaries = self
            .state
            .range(ResourceKey::new(Kind::Canary, "", "")..)
            .take_while(|(k, _)| k.kind == Kind::Canary);
        for (key, other) in canaries {
            let Spec::Canary(o) = &other.spec else {
                continue;
            };
            if key < self.key
                && o.route == c.route
                && o.virtual_router_ref
                    .key(Kind::VirtualRouter, &key.namespace)
                    == router
            {
                self.err(
                    "spec.route",
                    format!(
                        "{key} runs route {:?} of {router} too: one canary per route",
                        c.route
                    ),
                );
            }
        }
        if c.steps.is_empty() {
            self.err("spec.steps", "at least one step".into());
        }
        if c.steps.len() > 100 {
            self.err("spec.steps", "at most 100 steps".into());
        }
        let mut previous = 0;
        for (i, step) in c.steps.iter().enumerate() {
            if !(1..=100).contains(&step.weight) || step.weight <= previous {
                self.err(
                    format!("spec.steps[{i}].weight"),
                    format!(
                        "must be 1..=100 and more than the step before's ({previous}), not {}",
                        step.weight
                    ),
                );
            } else {
                previous = step.weight;
            }
            if step.duration.to_std().is_none() {
                self.err(
                    format!("spec.steps[{i}].duration.value"),
                    "must not be negative".into(),
                );
            }
        }
        if c.gates.min_requests < 1 {
            self.err(
                "spec.gates.minRequests",
                "must be at least 1: a step is never judged on no requests".into(),
            );
        }
        if let Some(rate) = c.gates.min_success_rate
            && !(0.0..=100.0).contains(&rate)
        {
            self.err(
                "spec.gates.minSuccessRate",
                format!("must be 0..=100 (percent), not {rate}"),
            );
        }
        // The proxies' latency buckets end at 10 s: a p99 beyond is known to be beyond, no more.
        if let Some(p99) = c.gates.max_latency_p99
            && p99
                .to_std()
                .is_none_or(|d| d.is_zero() || d >= std::time::Duration::from_secs(10))
        {
            self.err(
                "spec.gates.maxLatencyP99.value",
                format!(
                    "must be more than 0 and less than 10 s (the proxies' largest latency bucket), not {} {}",
                    p99.value,
                    if p99.unit == crate::model::DurationUnit::S { "s" } else { "ms" }
                ),
            );
        }
        if let Some(interval) = c.interval {
            let allowed = std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(3600);
            if !interval.to_std().is_some_and(|i| allowed.contains(&i)) {
                self.err(
                    "spec.interval",
                    format!(
                        "must be 1 s to 1 h, not {} {}",
                        interval.value,
                        if interval.unit == crate::model::DurationUnit::S {
                            "s"
                        } else {
                            "ms"
                        }
                    ),
                );
            }
        }
        for (path, r) in [
            ("spec.virtualRouterRef.uid", &c.virtual_router_ref),
            ("spec.stableRef.uid", &c.stable_ref),
            ("spec.canaryRef.uid", &c.canary_ref),
        ] {
            if r.uid.is_some() {
                self.err(
                    path,
                    "unknown field: a canary's references are by name".into(),
                );
            }
        }
        // The canary is added on the stable target's port: it must listen there.
        if let Some(Spec::VirtualRouter(vr)) = self.state.get(&router).map(|r| &r.spec)
            && let Some(port) = vr
                .routes
                .iter()
                .find(|r| r.name == c.route)
                .and_then(crate::model::Route::action)
                .and_then(|a| {
                    a.weighted_targets.iter().find(|t| {
                        t.virtual_node_ref.key(Kind::VirtualNode, &router.namespace) == stable
                    })
                })
                .and_then(|t| t.port)
        {
            self.target_port("spec.canaryRef", &c.canary_ref, port, false);
        }
    }

    fn exists(&mut self, path: &str, kind: Kind, r: &Ref) {
        let target = r.key(kind, &self.key.namespace);
        let Some(found) = self.state.get(&target) else {
            if !self.refused.contains(&target) {
                self.err(path, format!("{target} not found"));
            }
            return;
        };
        // References stay inside one mesh.
        let here = self
            .state
            .get(self.key)
            .and_then(|r| self.meshes.of(self.key, &r.spec).ok().flatten());
        let there = self.meshes.of(&target, &found.spec).ok().flatten();
        if let (Some(here), Some(there)) = (here, there)
            && here != there
        {
            self.err(
                path,
                format!("{target} belongs to mesh {there:?}, not {here:?}"),
            );
        }
    }

    /// A label selector's requirements: a known operator, with values exactly when it takes them.
    fn selector(&mut self, path: &str, selector: &LabelSelector) {
        for (i, r) in selector.match_expressions.iter().enumerate() {
            let path = format!("{path}.matchExpressions[{i}]");
            match (r.operator.as_str(), r.values.is_empty()) {
                ("In" | "NotIn", false) | ("Exists" | "DoesNotExist", true) => {}
                ("In" | "NotIn", true) => {
                    self.err(format!("{path}.values"), "must not be empty".into())
                }
                ("Exists" | "DoesNotExist", false) => {
                    self.err(format!("{path}.values"), "must be empty".into())
                }
                (op, _) => self.err(
                    format!("{path}.operator"),
                    format!("must be In, NotIn, Exists or DoesNotExist, not {op:?}"),
                ),
            }
        }
    }

    fn listeners(&mut self, path: &str, listeners: &[Listener]) {
        let mut ports = HashSet::new();
        for (i, l) in listeners.iter().enumerate() {
            let lp = format!("{path}[{i}].portMapping");
            if !(1..=65535).contains(&l.port_mapping.port) {
                self.err(format!("{lp}.port"), "must be 1..=65535".into());
            } else if !ports.insert(l.port_mapping.port) {
                self.err(
                    format!("{lp}.port"),
                    format!("port {} is listed twice", l.port_mapping.port),
                );
            }
            if let Some(t) = &l.tls {
                let tp = format!("{path}[{i}].tls");
                if let Some(c) = &t.certificate {
                    self.certificate(&format!("{tp}.certificate"), c);
                } else if t.mode != "DISABLED" {
                    self.err(format!("{tp}.certificate"), "required".into());
                }
                if let Some(v) = &t.validation {
                    self.tls_validation(&format!("{tp}.validation"), v);
                }
            }
            if let Some(t) = &l.timeout {
                let protocol = l.port_mapping.protocol.as_str();
                for (name, timeouts) in [
                    ("http", &t.http),
                    ("http2", &t.http2),
                    ("grpc", &t.grpc),
                    ("tcp", &t.tcp),
                ] {
                    let tpath = format!("{path}[{i}].timeout.{name}");
                    if timeouts.is_some() && name != protocol {
                        self.err(
                            tpath.clone(),
                            format!("the listener's protocol is {protocol}: only timeout.{protocol} applies"),
                        );
                    }
                    self.timeouts(&tpath, timeouts.as_ref());
                }
            }
            if !PROTOCOLS.contains(&l.port_mapping.protocol.as_str()) {
                self.err(
                    format!("{lp}.protocol"),
                    format!(
                        "{:?} is not one of http, http2, grpc, tcp",
                        l.port_mapping.protocol
                    ),
                );
            }
        }
    }

    /// A VirtualNode listener's health check, outlier detection and connection pool, beyond the
    /// CRD schema: what the proxies that call the node need (a path only where it is used,
    /// Envoy's minimums, the pool of the listener's protocol).
    fn listener_resilience(&mut self, path: &str, listeners: &[Listener]) {
        for (i, l) in listeners.iter().enumerate() {
            let lp = format!("{path}[{i}]");
            match &l.outlier_detection {
                None => {}
                Some(o) => {
                    let op = format!("{lp}.outlierDetection");
                    self.duration(&format!("{op}.interval.value"), &o.interval, 1);
                    self.duration(
                        &format!("{op}.baseEjectionDuration.value"),
                        &o.base_ejection_duration,
                        1,
                    );
                }
            }
            // A path with grpc or tcp is accepted and not used, as App Mesh documented ("only
            // used if the protocol is HTTP or HTTP/2; for any other protocol, ignored"): its
            // walkthroughs' gRPC nodes set one.
            match &l.health_check {
                Some(h)
                    if h.path.as_ref().is_some_and(|p| {
                        !p.starts_with('/') || p.parse::<http::uri::PathAndQuery>().is_err()
                    }) =>
                {
                    self.err(
                        format!("{lp}.healthCheck.path"),
                        "must be a path starting with /".into(),
                    );
                }
                _ => {}
            }
            self.listener_pool(&lp, l);
        }
    }

    /// A listener's connection pool: exactly one, of the listener's protocol.
    fn listener_pool(&mut self, lp: &str, l: &Listener) {
        let Some(pool) = &l.connection_pool else {
            return;
        };
        let set: Vec<&str> = [
            ("http", pool.http.is_some()),
            ("http2", pool.http2.is_some()),
            ("grpc", pool.grpc.is_some()),
            ("tcp", pool.tcp.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        let protocol = l.port_mapping.protocol.as_str();
        match set.as_slice() {
            [one] if *one == protocol => {}
            [one] => self.err(
                format!("{lp}.connectionPool.{one}"),
                format!("the listener's protocol is {protocol}: give connectionPool.{protocol}"),
            ),
            _ => self.err(
                format!("{lp}.connectionPool"),
                "give exactly one of http, http2, grpc, tcp (the listener's protocol)".into(),
            ),
        }
    }

    fn spec(&mut self, spec: &Spec) {
        match spec {
            Spec::Namespace => {}
            Spec::Mesh(m) => {
                if let Some(selector) = &m.namespace_selector {
                    self.selector("spec.namespaceSelector", selector);
                }
                if let Some(p) = m.ip_preference()
                    && p != "IPv4_ONLY"
                    && p != "IPv6_ONLY"
                {
                    self.err(
                        "spec.meshServiceDiscovery.ipPreference",
                        format!("must be IPv4_ONLY or IPv6_ONLY, not {p:?}"),
                    );
                }
                if let Some(v) = &m.mtls
                    && crate::model::Mtls::parse(v).is_none()
                {
                    self.err(
                        "spec.mtls",
                        format!(
                            "must be one of {}, not {v:?}",
                            crate::model::Mtls::VALUES.join(", ")
                        ),
                    );
                }
                if let Some(v) = &m.app_mesh_defaults
                    && v != "ENABLED"
                    && v != "DISABLED"
                {
                    self.err(
                        "spec.appMeshDefaults",
                        format!("must be ENABLED or DISABLED, not {v:?}"),
                    );
                }
                if let Some(t) = &m.tracing {
                    // Checked by the proxy's compiler, as the proxies will take it.
                    let snapshot = trellis_proto::v1::Snapshot {
                        version: "check".into(),
                        tracing: Some(t.to_proto(self.key)),
                        ..Default::default()
                    };
                    if let Err(trellis_proxy::snapshot::SnapshotError::Invalid(errors)) =
                        trellis_proxy::snapshot::check(&snapshot)
                    {
                        for e in errors {
                            self.err(format!("spec.{}", e.path), e.reason);
                        }
                    }
                }
            }
            Spec::VirtualService(s) => self.virtual_service(s),
            Spec::VirtualRouter(r) => self.virtual_router(r),
            Spec::Canary(c) => self.canary(c),
            Spec::VirtualNode(n) => self.virtual_node(n),
            Spec::VirtualGateway(g) => self.virtual_gateway(g),
            Spec::GatewayRoute(r) => self.gateway_route(r),
        }
    }

    fn virtual_service(&mut self, s: &VirtualServiceSpec) {
        if let Some(h) = &s.hostname {
            // It becomes a gateway's host rewrite: a DNS name or IPv4 address, no port.
            if h.contains(['/', ':', ' ', '*']) || !trellis_proxy::snapshot::valid_host(h) {
                self.err("spec.hostname", format!("{h:?} is not a hostname"));
            }
        }
        if let Some(p) = &s.provider {
            match (&p.virtual_node, &p.virtual_router) {
                (Some(_), Some(_)) => self.err(
                    "spec.provider",
                    "give virtualNode or virtualRouter, not both".into(),
                ),
                (Some(n), None) => self.exists(
                    "spec.provider.virtualNode.virtualNodeRef",
                    Kind::VirtualNode,
                    &n.virtual_node_ref,
                ),
                (None, Some(r)) => self.exists(
                    "spec.provider.virtualRouter.virtualRouterRef",
                    Kind::VirtualRouter,
                    &r.virtual_router_ref,
                ),
                (None, None) => {
                    self.err("spec.provider", "give virtualNode or virtualRouter".into())
                }
            }
        }
    }

    fn virtual_router(&mut self, r: &VirtualRouterSpec) {
        if r.listeners.is_empty() {
            self.err("spec.listeners", "a VirtualRouter needs a listener".into());
        }
        self.listeners("spec.listeners", &r.listeners);
        // With several listeners a route says whose it is: its match names one of their ports.
        if r.listeners.len() > 1 {
            let ports: Vec<i64> = r.listeners.iter().map(|l| l.port_mapping.port).collect();
            for (i, route) in r.routes.iter().enumerate() {
                let (kind, port) = route_port(route);
                let path = format!("spec.routes[{i}].{kind}.match.port");
                let protocol = r
                    .listeners
                    .iter()
                    .find(|l| Some(l.port_mapping.port) == port)
                    .map(|l| l.port_mapping.protocol.as_str());
                let fits = match kind {
                    "httpRoute" => "http",
                    "http2Route" => "http2",
                    "grpcRoute" => "grpc",
                    _ => "tcp",
                };
                match port {
                    Some(p) if protocol.is_some_and(|proto| proto != fits) => self.err(
                        path,
                        format!("listener {p} is {}, not {fits}: a {kind} needs a {fits} listener", protocol.unwrap_or_default()),
                    ),
                    Some(p) if ports.contains(&p) => {}
                    Some(p) => self.err(path, format!("{p} is not one of the router's listener ports")),
                    None => self.err(
                        path,
                        "required: the router has several listeners, and a route names the one it is for".into(),
                    ),
                }
            }
        }
        let mut names = HashSet::new();
        for (i, route) in r.routes.iter().enumerate() {
            let rp = format!("spec.routes[{i}]");
            if !valid_name(&route.name) {
                self.err(
                    format!("{rp}.name"),
                    format!("{:?} is not a valid name", route.name),
                );
            } else if !names.insert(route.name.as_str()) {
                self.err(
                    format!("{rp}.name"),
                    format!("duplicate route name {:?}", route.name),
                );
            }
            if let Some(p) = route.priority
                && !(0..=1000).contains(&p)
            {
                self.err(format!("{rp}.priority"), "must be 0..=1000".into());
            }
            let kinds = [
                route.http_route.is_some(),
                route.http2_route.is_some(),
                route.grpc_route.is_some(),
                route.tcp_route.is_some(),
            ];
            if kinds.iter().filter(|k| **k).count() != 1 {
                self.err(
                    &rp,
                    "give exactly one of httpRoute, http2Route, grpcRoute, tcpRoute".into(),
                );
            }
            for (field, http) in [
                ("httpRoute", &route.http_route),
                ("http2Route", &route.http2_route),
            ] {
                if let Some(h) = http {
                    let hp = format!("{rp}.{field}");
                    self.http_match(&format!("{hp}.match"), &h.matcher);
                    self.action(&format!("{hp}.action"), &h.action, false);
                    self.retry(&format!("{hp}.retryPolicy"), h.retry_policy.as_ref());
                    self.timeouts(&format!("{hp}.timeout"), h.timeout.as_ref());
                    self.route_header_rules(
                        &format!("{hp}.requestHeaders"),
                        h.request_headers.as_ref(),
                    );
                    self.route_header_rules(
                        &format!("{hp}.responseHeaders"),
                        h.response_headers.as_ref(),
                    );
                    self.fault(&format!("{hp}.fault"), h.fault.as_ref());
                    self.rewrite(
                        &format!("{hp}.rewrite"),
                        h.rewrite.as_ref(),
                        h.matcher.prefix.as_deref(),
                    );
                    self.rate_limit(&format!("{hp}.rateLimit"), h.rate_limit.as_ref(), false);
                    self.mirror(&format!("{hp}.mirror"), h.mirror.as_ref());
                }
            }
            if let Some(g) = &route.grpc_route {
                let gp = format!("{rp}.grpcRoute");
                if g.matcher.method_name.is_some() && g.matcher.service_name.is_none() {
                    self.err(format!("{gp}.match.methodName"), "needs serviceName".into());
                }
                self.headers(&format!("{gp}.match.metadata"), &g.matcher.metadata);
                self.match_port(&format!("{gp}.match.port"), g.matcher.port);
                self.action(&format!("{gp}.action"), &g.action, false);
                self.retry(&format!("{gp}.retryPolicy"), g.retry_policy.as_ref());
                if g.retry_policy
                    .as_ref()
                    .is_some_and(|r| r.hedge_on_per_retry_timeout == Some(true))
                {
                    self.err(
                        format!("{gp}.retryPolicy.hedgeOnPerRetryTimeout"),
                        "not supported by Trellis on gRPC routes: hedging sends idempotent requests without a body again, and a gRPC call is a POST with one".into(),
                    );
                }
                self.timeouts(&format!("{gp}.timeout"), g.timeout.as_ref());
                self.route_header_rules(
                    &format!("{gp}.requestHeaders"),
                    g.request_headers.as_ref(),
                );
                self.route_header_rules(
                    &format!("{gp}.responseHeaders"),
                    g.response_headers.as_ref(),
                );
                self.fault(&format!("{gp}.fault"), g.fault.as_ref());
                self.rate_limit(&format!("{gp}.rateLimit"), g.rate_limit.as_ref(), false);
                self.mirror(&format!("{gp}.mirror"), g.mirror.as_ref());
            }
            if let Some(t) = &route.tcp_route {
                // Its `match` has only `port` (compat): a port, when given.
                self.match_port(&format!("{rp}.tcpRoute.match.port"), route_port(route).1);
                self.action(&format!("{rp}.tcpRoute.action"), &t.action, true);
                self.timeouts(&format!("{rp}.tcpRoute.timeout"), t.timeout.as_ref());
            }
        }
    }

    fn virtual_node(&mut self, n: &VirtualNodeSpec) {
        if let Some(selector) = &n.pod_selector {
            self.selector("spec.podSelector", selector);
        }
        for (i, a) in n.allowed_callers.iter().enumerate() {
            let path = format!("spec.allowedCallers[{i}]");
            match (&a.virtual_node_ref, &a.virtual_gateway_ref, &a.spiffe_id) {
                (Some(r), None, None) => {
                    self.exists(&format!("{path}.virtualNodeRef"), Kind::VirtualNode, r)
                }
                (None, Some(r), None) => self.exists(
                    &format!("{path}.virtualGatewayRef"),
                    Kind::VirtualGateway,
                    r,
                ),
                (None, None, Some(id)) => {
                    let valid = id
                        .strip_prefix("spiffe://")
                        .and_then(|rest| rest.split_once('/'))
                        .is_some_and(|(domain, p)| {
                            !domain.is_empty()
                                && !p.is_empty()
                                && !id.contains(|c: char| c.is_whitespace() || c == ',')
                        });
                    if !valid {
                        self.err(
                            format!("{path}.spiffeId"),
                            format!("{id:?} is not a SPIFFE ID (spiffe://TRUST-DOMAIN/PATH)"),
                        );
                    }
                }
                _ => self.err(
                    &path,
                    "give exactly one of virtualNodeRef, virtualGatewayRef or spiffeId".into(),
                ),
            }
        }
        if !n.allowed_callers.is_empty() && n.listeners.iter().any(|l| l.tls.is_some()) {
            self.err(
                "spec.allowedCallers",
                "not supported with a listener's tls: that tls's own validation decides who may call; allowedCallers widens the mesh's STRICT mTLS authorization".into(),
            );
        }
        self.listeners("spec.listeners", &n.listeners);
        self.listener_resilience("spec.listeners", &n.listeners);
        self.rate_limit("spec.rateLimit", n.rate_limit.as_ref(), true);
        let node_parts = [
            ("spec.requestHeaders", n.request_headers.is_some()),
            ("spec.responseHeaders", n.response_headers.is_some()),
            ("spec.rateLimit", n.rate_limit.is_some()),
        ];
        self.header_rules("spec.requestHeaders", n.request_headers.as_ref());
        self.header_rules("spec.responseHeaders", n.response_headers.as_ref());
        for (field, set) in node_parts {
            if !set {
                continue;
            }
            // Applied on the routes to the app: a node served only over TCP has none.
            if !n.listeners.is_empty()
                && n.listeners.iter().all(|l| l.port_mapping.protocol == "tcp")
            {
                self.err(
                    field,
                    "applies to HTTP requests: it needs an HTTP listener (http, http2 or grpc); this node's listeners are tcp".into(),
                );
            }
            if n.listeners.is_empty() {
                self.err(
                    field,
                    "applies at the node's sidecar, before its app: the node has no listener"
                        .into(),
                );
            }
        }
        self.logging(n.logging.as_ref());
        for (i, g) in n.backend_groups.iter().enumerate() {
            if g.name != "*" {
                self.err(
                    format!("spec.backendGroups[{i}].name"),
                    format!(
                        "not supported by Trellis: BackendGroup resources (an experimental App Mesh controller feature); {:?} cannot be resolved — name \"*\" (every VirtualService of the namespace) is supported, or list the services in spec.backends",
                        g.name
                    ),
                );
            }
            if let Some(ns) = &g.namespace
                && !valid_name(ns)
            {
                self.err(
                    format!("spec.backendGroups[{i}].namespace"),
                    format!("{ns:?} is not a namespace name"),
                );
            }
        }
        if let Some(sd) = &n.service_discovery {
            let count = [
                sd.registry.is_some(),
                sd.aws_cloud_map.is_some(),
                sd.dns.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if count != 1 {
                self.err(
                    "spec.serviceDiscovery",
                    "give exactly one of registry, awsCloudMap, dns".into(),
                );
            }
            for (field, reg) in [
                ("registry", &sd.registry),
                ("awsCloudMap", &sd.aws_cloud_map),
            ] {
                let Some(reg) = reg else { continue };
                for (name, value) in [
                    ("namespaceName", &reg.namespace_name),
                    ("serviceName", &reg.service_name),
                ] {
                    if !registry::valid_name(value) {
                        self.err(
                            format!("spec.serviceDiscovery.{field}.{name}"),
                            format!("{value:?} is not a registry name: {}", registry::NAME_RULE),
                        );
                    }
                }
            }
            if let Some(dns) = &sd.dns {
                if !trellis_proxy::snapshot::valid_host(&dns.hostname) {
                    self.err(
                        "spec.serviceDiscovery.dns.hostname",
                        format!(
                            "{:?} is not a DNS name or an IP address (ASCII labels of \
                             letters, digits, '-' and '_')",
                            dns.hostname
                        ),
                    );
                }
                if n.listeners.is_empty() {
                    self.err(
                        "spec.listeners",
                        "dns service discovery needs a listener port".into(),
                    );
                }
            }
        }
        for (i, b) in n.backends.iter().enumerate() {
            self.exists(
                &format!("spec.backends[{i}].virtualService.virtualServiceRef"),
                Kind::VirtualService,
                &b.virtual_service.virtual_service_ref,
            );
            self.client_policy_tls(
                &format!("spec.backends[{i}].virtualService.clientPolicy"),
                b.virtual_service.client_policy.as_ref(),
            );
        }
        self.client_policy_tls(
            "spec.backendDefaults.clientPolicy",
            n.backend_defaults
                .as_ref()
                .and_then(|d| d.client_policy.as_ref()),
        );
        // One ingress socket serves every listener of the node: one TLS for all.
        if let Some((first, t)) = n
            .listeners
            .iter()
            .enumerate()
            .find_map(|(i, l)| Some((i, l.tls.as_ref()?)))
        {
            for (i, l) in n.listeners.iter().enumerate().skip(first + 1) {
                if l.tls.as_ref() != Some(t) {
                    self.err(
                        format!("spec.listeners[{i}].tls"),
                        format!(
                            "differs from spec.listeners[{first}].tls: not supported by Trellis: \
                             a node's listeners share its sidecar's ingress, give them the same tls"
                        ),
                    );
                }
            }
        }
        if let Some(ss) = n.load_balancer.as_ref().and_then(|l| l.slow_start.as_ref()) {
            let path = "spec.loadBalancer.slowStart";
            self.duration(&format!("{path}.window.value"), &ss.window, 1);
            let dns_one = n
                .service_discovery
                .as_ref()
                .and_then(|sd| sd.dns.as_ref())
                .is_some_and(|d| d.response_type.as_deref() != Some("ENDPOINTS"));
            if dns_one || n.service_discovery.is_none() {
                self.err(
                    path.to_string(),
                    "ramps new instances among others: this node is one endpoint to its callers (no service discovery, or DNS resolved per connection); use the registry, awsCloudMap or DNS responseType ENDPOINTS".into(),
                );
            }
            if ss.aggression.is_some_and(|a| !(a.is_finite() && a > 0.0)) {
                self.err(format!("{path}.aggression"), "must be more than 0".into());
            }
            if ss
                .min_weight_percent
                .is_some_and(|m| !(m.is_finite() && m > 0.0 && m <= 100.0))
            {
                self.err(
                    format!("{path}.minWeightPercent"),
                    "must be more than 0, at most 100".into(),
                );
            }
        }
        if let Some(lb) = &n.load_balancer {
            self.load_balancer(lb);
        }
    }

    /// A node's `loadBalancer`: a known policy, and its hash key and slow start as the proxy's
    /// compiler takes them together (a key only with RING_HASH or MAGLEV, and required there;
    /// no slow start with them).
    fn load_balancer(&mut self, lb: &crate::model::LoadBalancer) {
        const POLICIES: [&str; 6] = [
            "ROUND_ROBIN",
            "LEAST_REQUEST",
            "RANDOM",
            "PEAK_EWMA",
            "RING_HASH",
            "MAGLEV",
        ];
        let path = "spec.loadBalancer";
        if !POLICIES.contains(&lb.policy.as_str()) {
            self.err(
                format!("{path}.policy"),
                format!("{:?} is not one of {}", lb.policy, POLICIES.join(", ")),
            );
            return;
        }
        if let Some(k) = &lb.hash_key {
            let given = [
                k.header.is_some(),
                k.cookie.is_some(),
                k.source_ip.is_some(),
            ];
            if given.iter().filter(|g| **g).count() > 1 {
                self.err(
                    format!("{path}.hashKey"),
                    "give one of header, cookie or sourceIp".into(),
                );
                return;
            }
        }
        if let Some(m) = lb.zone_aware.as_ref().and_then(|z| z.min_endpoints)
            && !(1..=10_000).contains(&m)
        {
            self.err(
                format!("{path}.zoneAware.minEndpoints"),
                "must be 1..=10000".into(),
            );
        }
        let cluster = trellis_proto::v1::Cluster {
            lb_policy: lb.policy_proto() as i32,
            hash_key: lb.hash_key_proto(),
            zone_aware: lb.zone_aware_proto(),
            // Its own fields are checked above; here only whether it goes with the policy.
            slow_start: lb
                .slow_start
                .as_ref()
                .map(|_| trellis_proto::v1::SlowStart {
                    window: Some(trellis_proto::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
            ..Default::default()
        };
        for e in trellis_proxy::snapshot::check_cluster(&cluster) {
            self.err(format!("{path}.{}", e.path), e.reason);
        }
    }

    /// A node's or gateway's access log: one format, which the proxy can render.
    fn logging(&mut self, logging: Option<&crate::model::Logging>) {
        let Some(file) = logging
            .and_then(|l| l.access_log.as_ref())
            .and_then(|a| a.file.as_ref())
        else {
            return;
        };
        let path = "spec.logging.accessLog.file";
        if let Some(f) = &file.format
            && f.json.is_some() == f.text.is_some()
        {
            self.err(
                format!("{path}.format"),
                "give exactly one of json, text".into(),
            );
            return;
        }
        let snapshot = trellis_proto::v1::Snapshot {
            access_log: Some(file.to_proto()),
            ..Default::default()
        };
        if let Err(trellis_proxy::snapshot::SnapshotError::Invalid(errors)) =
            trellis_proxy::snapshot::check(&snapshot)
        {
            for e in errors {
                let field = match e.path.as_str() {
                    "access_log.text" if file.format.is_some() => "format.text".to_owned(),
                    "access_log.text" => "path".to_owned(),
                    "access_log.path" => "path".to_owned(),
                    p => p
                        .strip_prefix("access_log.json.fields")
                        .map_or_else(|| p.to_owned(), |rest| format!("format.json{rest}")),
                };
                self.err(format!("{path}.{field}"), e.reason);
            }
        }
    }

    fn virtual_gateway(&mut self, g: &VirtualGatewaySpec) {
        self.logging(g.logging.as_ref());
        for (field, selector) in [
            ("spec.podSelector", &g.pod_selector),
            ("spec.namespaceSelector", &g.namespace_selector),
            ("spec.gatewayRouteSelector", &g.gateway_route_selector),
        ] {
            if let Some(selector) = selector {
                self.selector(field, selector);
            }
        }
        for (i, l) in g.listeners.iter().enumerate() {
            let lp = format!("spec.listeners[{i}]");
            self.listener_pool(&lp, l);
            let Some(h) = &l.health_check else {
                continue;
            };
            // The gateway answers the probe itself, on the listener's port. A grpc check's path
            // is accepted and not used (a gRPC probe calls grpc.health.v1.Health/Check), as App
            // Mesh documented.
            if h.protocol != "grpc"
                && h.path.as_ref().is_some_and(|p| {
                    !p.starts_with('/')
                        || p.parse::<http::uri::PathAndQuery>().is_err()
                        || p.contains('?')
                })
            {
                self.err(
                    format!("{lp}.healthCheck.path"),
                    "must be a path starting with / (without a query)".into(),
                );
            }
            if let Some(port) = h.port.filter(|p| *p != l.port_mapping.port) {
                self.err(
                    format!("{lp}.healthCheck.port"),
                    format!(
                        "{port}: must be the listener's port {} (the gateway answers the health check on the listener)",
                        l.port_mapping.port
                    ),
                );
            }
        }
        if g.listeners.is_empty() {
            self.err("spec.listeners", "a VirtualGateway needs a listener".into());
        }
        self.listeners("spec.listeners", &g.listeners);
        self.client_policy_tls(
            "spec.backendDefaults.clientPolicy",
            g.backend_defaults
                .as_ref()
                .and_then(|d| d.client_policy.as_ref()),
        );
    }

    fn gateway_route(&mut self, r: &GatewayRouteSpec) {
        if let Some(g) = &r.virtual_gateway_ref {
            self.exists("spec.virtualGatewayRef", Kind::VirtualGateway, g);
        }
        let kind = [
            (
                "httpRoute",
                "http",
                r.http_route.as_ref().map(|h| &h.action.target),
            ),
            (
                "http2Route",
                "http2",
                r.http2_route.as_ref().map(|h| &h.action.target),
            ),
            (
                "grpcRoute",
                "grpc",
                r.grpc_route.as_ref().map(|g| &g.action.target),
            ),
        ]
        .into_iter()
        .find_map(|(field, protocol, target)| target.map(|t| (field, protocol, t)));
        if let Some((field, protocol, target)) = kind {
            self.gateway_listener(r, field, protocol);
            self.gateway_target(&format!("spec.{field}.action.target"), target);
        }
        let kinds = [
            r.http_route.is_some(),
            r.http2_route.is_some(),
            r.grpc_route.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            self.err(
                "spec",
                "give exactly one of httpRoute, http2Route, grpcRoute".into(),
            );
        }
        if let Some(g) = &r.grpc_route {
            self.headers("spec.grpcRoute.match.metadata", &g.matcher.metadata);
            self.hostname_match("spec.grpcRoute.match.hostname", g.matcher.hostname.as_ref());
            self.match_port("spec.grpcRoute.match.port", g.matcher.port);
            self.exists(
                "spec.grpcRoute.action.target.virtualService.virtualServiceRef",
                Kind::VirtualService,
                &g.action.target.virtual_service.virtual_service_ref,
            );
        }
        for (field, http) in [("httpRoute", &r.http_route), ("http2Route", &r.http2_route)] {
            if let Some(h) = http {
                if h.matcher.prefix.is_some() && h.matcher.path.is_some() {
                    self.err(
                        format!("spec.{field}.match"),
                        "give prefix or path, not both".into(),
                    );
                }
                if h.matcher
                    .prefix
                    .as_ref()
                    .is_some_and(|p| !p.starts_with('/'))
                {
                    self.err(
                        format!("spec.{field}.match.prefix"),
                        "must start with \"/\"".into(),
                    );
                }
                self.gateway_http_match(&format!("spec.{field}.match"), &h.matcher);
                if h.matcher.prefix.is_none()
                    && let Some(prefix) = h.action.rewrite.as_ref().and_then(|r| r.prefix.as_ref())
                    && prefix.value.is_some()
                {
                    self.err(
                        format!("spec.{field}.action.rewrite.prefix.value"),
                        "needs match.prefix: only a matched prefix is rewritten".into(),
                    );
                }
                if let Some(rw) = h.action.rewrite.as_ref() {
                    let exact_match = h.matcher.path.as_ref().and_then(|p| p.exact.as_ref());
                    match (&rw.path, &rw.prefix, exact_match) {
                        (Some(_), Some(_), _) => self.err(
                            format!("spec.{field}.action.rewrite"),
                            "give path or prefix, not both".into(),
                        ),
                        (Some(_), None, None) => self.err(
                            format!("spec.{field}.action.rewrite.path"),
                            "needs match.path.exact: only an exact path is rewritten to another"
                                .into(),
                        ),
                        (Some(p), None, Some(_)) if !p.exact.starts_with('/') => self.err(
                            format!("spec.{field}.action.rewrite.path.exact"),
                            "must start with \"/\"".into(),
                        ),
                        _ => {}
                    }
                }
                let rewrite = h.action.rewrite.as_ref().and_then(|r| r.prefix.as_ref());
                if rewrite
                    .and_then(|p| p.value.as_ref())
                    .is_some_and(|v| !v.starts_with('/'))
                {
                    self.err(
                        format!("spec.{field}.action.rewrite.prefix.value"),
                        "must start with \"/\"".into(),
                    );
                }
                self.exists(
                    &format!("spec.{field}.action.target.virtualService.virtualServiceRef"),
                    Kind::VirtualService,
                    &h.action.target.virtual_service.virtual_service_ref,
                );
            }
        }
    }

    /// The gateway listener a gateway route is served on: the one its `match.port` names
    /// (required when its gateway has several), of the route's protocol — for each gateway
    /// serving it ([`gateway_serves`]).
    fn gateway_listener(&mut self, r: &GatewayRouteSpec, field: &str, protocol: &str) {
        let path = format!("spec.{field}.match.port");
        let port = r.match_port();
        let Some(route) = self.state.get(self.key) else {
            return;
        };
        let gateways: Vec<(&ResourceKey, &VirtualGatewaySpec)> = self
            .state
            .iter()
            .filter_map(|(k, res)| match &res.spec {
                Spec::VirtualGateway(g) => Some((k, &**g)),
                _ => None,
            })
            .filter(|&gw| gateway_serves(self.state, gw, route))
            .collect();
        for (key, g) in gateways {
            let listener = match port {
                Some(p) => g.listeners.iter().find(|l| l.port_mapping.port == p),
                None if g.listeners.len() > 1 => {
                    self.err(
                        &path,
                        format!("required: gateway {key} has several listeners, and a route names the one it is served on"),
                    );
                    continue;
                }
                None => g.listeners.first(),
            };
            match (listener, port) {
                (None, Some(p)) => self.err(
                    &path,
                    format!("{p} is not one of gateway {key}'s listener ports"),
                ),
                (Some(l), _) if l.port_mapping.protocol != protocol => self.err(
                    if port.is_some() { path.clone() } else { format!("spec.{field}") },
                    format!(
                        "gateway {key}'s listener {} is {}, not {protocol}: a {field} needs a {protocol} listener",
                        l.port_mapping.port, l.port_mapping.protocol
                    ),
                ),
                _ => {}
            }
        }
    }

    /// A gateway route's target: with a router providing the service, `target.port` names the
    /// router listener whose routes apply (required when it has several); with a node, the
    /// node listener the traffic goes to (unset: its first).
    fn gateway_target(&mut self, path: &str, target: &crate::model::GatewayTarget) {
        let vs_key = target
            .virtual_service
            .virtual_service_ref
            .key(Kind::VirtualService, &self.key.namespace);
        let Some(Spec::VirtualService(vs)) = self.state.get(&vs_key).map(|r| &r.spec) else {
            return;
        };
        let Some(provider) = vs.provider.as_ref() else {
            return;
        };
        let port_path = format!("{path}.port");
        if let Some(n) = &provider.virtual_node {
            if let Some(port) = target.port {
                // The node's namespace defaults to the service's, not the route's.
                let node = Ref {
                    namespace: Some(
                        n.virtual_node_ref
                            .namespace
                            .clone()
                            .unwrap_or_else(|| vs_key.namespace.clone()),
                    ),
                    ..n.virtual_node_ref.clone()
                };
                self.target_port(&port_path, &node, port, false);
            }
        } else if let Some(p) = &provider.virtual_router {
            let router_key = p
                .virtual_router_ref
                .key(Kind::VirtualRouter, &vs_key.namespace);
            let Some(Spec::VirtualRouter(vr)) = self.state.get(&router_key).map(|r| &r.spec) else {
                return;
            };
            let ports: Vec<String> = vr
                .listeners
                .iter()
                .map(|l| l.port_mapping.port.to_string())
                .collect();
            match target.port {
                Some(port) if !vr.listeners.iter().any(|l| l.port_mapping.port == port) => self
                    .err(
                        port_path,
                        format!(
                            "{port} is not a listener port of {router_key}, which provides {vs_key} (it listens on {})",
                            ports.join(", ")
                        ),
                    ),
                None if vr.listeners.len() > 1 => self.err(
                    port_path,
                    format!(
                        "required: {router_key}, which provides {vs_key}, has several listeners ({}); name the one whose routes apply",
                        ports.join(", ")
                    ),
                ),
                _ => {}
            }
        }
    }

    /// A client policy's TLS: one source for its certificate and its trust, ports in range.
    fn client_policy_tls(&mut self, path: &str, policy: Option<&crate::model::ClientPolicy>) {
        let Some(t) = policy.and_then(|p| p.tls.as_ref()) else {
            return;
        };
        if let Some(c) = &t.certificate {
            self.certificate(&format!("{path}.tls.certificate"), c);
        }
        for (i, port) in t.ports.iter().enumerate() {
            if !(1..=65535).contains(port) {
                self.err(format!("{path}.tls.ports[{i}]"), "must be 1..=65535".into());
            }
        }
        self.tls_validation(&format!("{path}.tls.validation"), &t.validation);
    }

    /// A certificate names one source: `file` or `sds` (`acm` is refused by the compatibility
    /// check).
    fn certificate(&mut self, path: &str, c: &crate::model::TlsCertificate) {
        match (&c.acm, &c.file, &c.sds) {
            (None, Some(f), None) if f.private_key.is_none() => {
                self.err(format!("{path}.file.privateKey"), "required".into())
            }
            (None, Some(_), None) | (None, None, Some(_)) | (Some(_), None, None) => {}
            _ => self.err(path, "give exactly one of file or sds".into()),
        }
    }

    fn tls_validation(&mut self, path: &str, v: &crate::model::TlsValidation) {
        match (&v.trust.acm, &v.trust.file, &v.trust.sds) {
            (None, Some(_), None) | (None, None, Some(_)) | (Some(_), None, None) => {}
            _ => self.err(
                format!("{path}.trust"),
                "give exactly one of file or sds".into(),
            ),
        }
        for (i, name) in v.names().iter().enumerate() {
            if name.is_empty() || name.contains(char::is_whitespace) {
                self.err(
                    format!("{path}.subjectAlternativeNames.match.exact[{i}]"),
                    format!("{name:?} is not a name"),
                );
            }
        }
    }

    fn http_match(&mut self, path: &str, m: &HttpMatch) {
        match (&m.prefix, &m.path) {
            (Some(p), None) if !p.starts_with('/') => {
                self.err(format!("{path}.prefix"), "must start with \"/\"".into())
            }
            (Some(_), Some(_)) => self.err(path, "give prefix or path, not both".into()),
            (None, None) => self.err(path, "give prefix or path".into()),
            (None, Some(pm)) => self.path_match(&format!("{path}.path"), pm),
            _ => {}
        }
        self.headers(&format!("{path}.headers"), &m.headers);
        if let Some(method) = &m.method
            && (http::Method::from_bytes(method.as_bytes()).is_err()
                || method.to_ascii_uppercase() != *method)
        {
            self.err(
                format!("{path}.method"),
                format!("{method:?} is not an HTTP method"),
            );
        }
        self.query_names(path, &m.query_parameters);
        self.match_port(&format!("{path}.port"), m.port);
    }

    /// A match's `path`: exactly one of `exact` (a path) and `regex` (one that compiles).
    fn path_match(&mut self, path: &str, pm: &crate::model::PathMatch) {
        match (&pm.exact, &pm.regex) {
            (Some(e), None) if !e.starts_with('/') => {
                self.err(format!("{path}.exact"), "must start with \"/\"".into())
            }
            (None, Some(re)) => self.regex(&format!("{path}.regex"), re),
            (Some(_), None) => {}
            _ => self.err(path, "give exact or regex".into()),
        }
    }

    /// A match's `queryParameters`: each names one.
    fn query_names(&mut self, path: &str, params: &[crate::model::QueryMatch]) {
        for (i, q) in params.iter().enumerate() {
            if q.name.is_empty() {
                self.err(
                    format!("{path}.queryParameters[{i}].name"),
                    "must not be empty".into(),
                );
            }
        }
    }

    /// A gateway route's HTTP match, past its prefix (checked with the rewrites): each rule
    /// says one thing, as a router route's do ([`Self::http_match`]).
    fn gateway_http_match(&mut self, path: &str, m: &crate::model::GatewayHttpMatch) {
        if let Some(pm) = &m.path {
            self.path_match(&format!("{path}.path"), pm);
        }
        self.hostname_match(&format!("{path}.hostname"), m.hostname.as_ref());
        self.headers(&format!("{path}.headers"), &m.headers);
        // `method` is one of the schema's (compat).
        self.query_names(path, &m.query_parameters);
        self.match_port(&format!("{path}.port"), m.port);
    }

    /// A gateway route's `hostname`: exactly one of `exact` and `suffix`, not empty.
    fn hostname_match(&mut self, path: &str, h: Option<&crate::model::HostnameMatch>) {
        let Some(h) = h else { return };
        match (&h.exact, &h.suffix) {
            (Some(v), None) | (None, Some(v)) if v.is_empty() => {
                let which = if h.exact.is_some() { "exact" } else { "suffix" };
                self.err(format!("{path}.{which}"), "must not be empty".into());
            }
            (Some(_), None) | (None, Some(_)) => {}
            _ => self.err(path, "give exact or suffix".into()),
        }
    }

    /// A route match's `port`: a port, when given (0 would match any).
    fn match_port(&mut self, path: &str, port: Option<i64>) {
        if let Some(port) = port
            && !(1..=65535).contains(&port)
        {
            self.err(path, "must be 1..=65535".into());
        }
    }

    fn headers(&mut self, path: &str, headers: &[HeaderMatch]) {
        for (i, h) in headers.iter().enumerate() {
            let hp = format!("{path}[{i}]");
            if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                self.err(
                    format!("{hp}.name"),
                    format!("{:?} is not a header name", h.name),
                );
            }
            if let Some(m) = &h.matcher {
                let rules = [
                    m.exact.is_some(),
                    m.prefix.is_some(),
                    m.suffix.is_some(),
                    m.regex.is_some(),
                    m.range.is_some(),
                ];
                if rules.iter().filter(|r| **r).count() != 1 {
                    self.err(
                        format!("{hp}.match"),
                        "give exactly one of exact, prefix, suffix, regex, range".into(),
                    );
                }
                if let Some(re) = &m.regex {
                    self.regex(&format!("{hp}.match.regex"), re);
                }
                if let Some(r) = &m.range
                    && r.start >= r.end
                {
                    self.err(
                        format!("{hp}.match.range"),
                        "start must be less than end".into(),
                    );
                }
            }
        }
    }

    fn regex(&mut self, path: &str, re: &str) {
        if let Err(e) = regex::Regex::new(re) {
            let reason = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            self.err(path, format!("invalid regex: {reason}"));
        }
    }

    fn action(&mut self, path: &str, action: &RouteAction, tcp: bool) {
        let targets = &action.weighted_targets;
        if targets.is_empty() || targets.len() > 10 {
            self.err(
                format!("{path}.weightedTargets"),
                "must list 1 to 10 targets".into(),
            );
        } else if targets.iter().all(|t| t.weight == 0) {
            self.err(
                format!("{path}.weightedTargets"),
                "the weights must not all be 0".into(),
            );
        }
        for (i, t) in targets.iter().enumerate() {
            let tp = format!("{path}.weightedTargets[{i}]");
            if !(0..=100).contains(&t.weight) {
                self.err(format!("{tp}.weight"), "must be 0..=100".into());
            }
            self.exists(
                &format!("{tp}.virtualNodeRef"),
                Kind::VirtualNode,
                &t.virtual_node_ref,
            );
            if let Some(port) = t.port {
                self.target_port(&format!("{tp}.port"), &t.virtual_node_ref, port, tcp);
            }
        }
    }

    /// A weighted or gateway target's `port`: one of the target node's listener ports. Through
    /// a sidecar a tcp listener is reached only when it is the node's one listener (its ingress
    /// then forwards bytes; with several listeners it is HTTP and chooses by the authority).
    fn target_port(&mut self, path: &str, node: &Ref, port: i64, tcp: bool) {
        let key = node.key(Kind::VirtualNode, &self.key.namespace);
        let Some(Spec::VirtualNode(n)) = self.state.get(&key).map(|r| &r.spec) else {
            return;
        };
        let ports: Vec<String> = n
            .listeners
            .iter()
            .map(|l| l.port_mapping.port.to_string())
            .collect();
        if !n.listeners.iter().any(|l| l.port_mapping.port == port) {
            self.err(
                path,
                format!(
                    "{port} is not a listener port of {key} (it listens on {})",
                    if ports.is_empty() {
                        "none".into()
                    } else {
                        ports.join(", ")
                    }
                ),
            );
            return;
        }
        let registry = n
            .service_discovery
            .as_ref()
            .is_some_and(|sd| sd.registry.is_some() || sd.aws_cloud_map.is_some());
        if tcp && registry && n.listeners.len() > 1 {
            self.err(
                path,
                format!("not supported by Trellis: {key} has several listeners, so its sidecar's ingress serves HTTP and cannot take a tcp route's bytes for listener {port}; give the tcp listener a node of its own"),
            );
        }
    }

    fn retry(&mut self, path: &str, retry: Option<&RetryPolicy>) {
        let Some(r) = retry else { return };
        let max = trellis_proxy::retry::MAX_RETRIES;
        if !(0..=i64::from(max)).contains(&r.max_retries) {
            self.err(format!("{path}.maxRetries"), format!("must be 0..={max}"));
        }
        self.duration(
            &format!("{path}.perRetryTimeout.value"),
            &r.per_retry_timeout,
            1,
        );
        for (i, e) in r.http_retry_events.iter().enumerate() {
            if !HTTP_EVENTS.contains(&e.as_str()) {
                self.err(
                    format!("{path}.httpRetryEvents[{i}]"),
                    format!("unknown event {e:?} (one of {})", HTTP_EVENTS.join(", ")),
                );
            }
        }
        for (i, e) in r.tcp_retry_events.iter().enumerate() {
            if e != "connection-error" {
                self.err(
                    format!("{path}.tcpRetryEvents[{i}]"),
                    format!("unknown event {e:?} (connection-error)"),
                );
            }
        }
        for (i, e) in r.grpc_retry_events.iter().enumerate() {
            if trellis_proxy::retry::grpc_event_code(e).is_none() {
                self.err(
                    format!("{path}.grpcRetryEvents[{i}]"),
                    format!(
                        "unknown event {e:?} (one of {})",
                        trellis_proxy::retry::grpc_event_names()
                    ),
                );
            }
        }
        for (i, c) in r.retriable_status_codes.iter().enumerate() {
            if !(100..=599).contains(c) {
                self.err(
                    format!("{path}.retriableStatusCodes[{i}]"),
                    "must be 100..=599".into(),
                );
            }
        }
        if let Some(b) = &r.budget {
            if b.retry_percent
                .is_some_and(|p| !(0.0..=1000.0).contains(&p))
            {
                self.err(
                    format!("{path}.budget.retryPercent"),
                    "must be 0..=1000".into(),
                );
            }
            if b.min_retries_per_second
                .is_some_and(|m| !(0..=100_000).contains(&m))
            {
                self.err(
                    format!("{path}.budget.minRetriesPerSecond"),
                    "must be 0..=100000".into(),
                );
            }
        }
        if let Some(b) = &r.backoff {
            for (field, d) in [
                ("baseInterval", &b.base_interval),
                ("maxInterval", &b.max_interval),
            ] {
                if let Some(d) = d {
                    self.duration(&format!("{path}.backoff.{field}.value"), d, 1);
                }
            }
        }
    }

    /// A route's fault: its header matches as any route's, the rest by the proxy's compiler.
    fn fault(&mut self, path: &str, fault: Option<&crate::model::Fault>) {
        let Some(f) = fault else { return };
        self.headers(&format!("{path}.headers"), &f.headers);
        let route = trellis_proto::v1::Route {
            fault: Some(f.to_proto(Vec::new())),
            ..Default::default()
        };
        self.route_part(path, &route, "fault");
    }

    /// A route's mirror: a VirtualNode of the mesh (and one of its listener ports), the share
    /// and the body bound as the proxy's compiler takes them.
    fn mirror(&mut self, path: &str, mirror: Option<&crate::model::Mirror>) {
        let Some(m) = mirror else { return };
        self.exists(
            &format!("{path}.virtualNodeRef"),
            Kind::VirtualNode,
            &m.virtual_node_ref,
        );
        if let Some(port) = m.port {
            self.target_port(&format!("{path}.port"), &m.virtual_node_ref, port, false);
        }
        // Copies are HTTP requests: the listener they reach must take them.
        let key = m
            .virtual_node_ref
            .key(Kind::VirtualNode, &self.key.namespace);
        if let Some(Spec::VirtualNode(n)) = self.state.get(&key).map(|r| &r.spec) {
            let listener = match m.port {
                Some(p) => n.listeners.iter().find(|l| l.port_mapping.port == p),
                None => n.listeners.first(),
            };
            if let Some(l) = listener.filter(|l| l.port_mapping.protocol == "tcp") {
                self.err(
                    format!("{path}.virtualNodeRef"),
                    format!(
                        "{key}'s listener {} is tcp: a mirror copies HTTP requests",
                        l.port_mapping.port
                    ),
                );
            }
        }
        let route = trellis_proto::v1::Route {
            mirror: Some(m.to_proto(String::new())),
            ..Default::default()
        };
        self.route_part(path, &route, "mirror");
    }

    /// A route's rewrite: one path rewrite at most (a prefix one needs the route's
    /// match.prefix), a hostname that is an authority; the rest by the proxy's compiler.
    fn rewrite(
        &mut self,
        path: &str,
        r: Option<&crate::model::RouteRewrite>,
        prefix: Option<&str>,
    ) {
        let Some(r) = r else { return };
        let paths = [r.prefix.is_some(), r.path.is_some(), r.regex.is_some()];
        match paths.iter().filter(|p| **p).count() {
            0 if r.hostname.is_none() => {
                self.err(path, "give prefix, path or regex, and/or hostname".into());
                return;
            }
            0 | 1 => {}
            _ => {
                self.err(path, "give at most one of prefix, path or regex".into());
                return;
            }
        }
        if r.prefix.is_some() && prefix.is_none() {
            self.err(
                format!("{path}.prefix"),
                "replaces the route's match.prefix: the route matches no prefix (use path or regex)".into(),
            );
            return;
        }
        let route = trellis_proto::v1::Route {
            action: Some(trellis_proto::v1::RouteAction {
                path_rewrite: r.path_proto(prefix),
                host_rewrite: r.hostname.clone().unwrap_or_default(),
                ..Default::default()
            }),
            ..Default::default()
        };
        for e in trellis_proxy::snapshot::check_route(&route) {
            let field = match e.path.as_str() {
                "action.pathRewrite.replacement" | "action.pathRewrite.prefix" => "prefix",
                "action.pathRewrite.exact" => "path",
                "action.pathRewrite.regex" => "regex.pattern",
                "action.pathRewrite.substitution" => "regex.substitution",
                "action.hostRewrite" => "hostname",
                _ => "",
            };
            let at = if field.is_empty() {
                path.to_string()
            } else {
                format!("{path}.{field}")
            };
            self.err(at, e.reason);
        }
    }

    /// A route's rate limit (or a node's: `at_node`), checked by the proxy's compiler.
    fn rate_limit(&mut self, path: &str, limit: Option<&crate::model::RateLimit>, at_node: bool) {
        let Some(l) = limit else { return };
        if !(1..=i64::from(u32::MAX)).contains(&l.requests) {
            self.err(
                format!("{path}.requests"),
                format!("must be 1..={}", u32::MAX),
            );
        }
        if let Some(b) = l.burst
            && !(1..=i64::from(u32::MAX)).contains(&b)
        {
            self.err(format!("{path}.burst"), format!("must be 1..={}", u32::MAX));
        }
        if !at_node
            && l.key
                .as_ref()
                .is_some_and(|k| k.peer_identity == Some(true))
        {
            self.err(
                format!("{path}.key.peerIdentity"),
                "a route's limit is kept at the caller's own sidecar, whose caller is its app (no identity): key by peerIdentity on the called VirtualNode's rateLimit".into(),
            );
        }
        if let Some(k) = &l.key
            && usize::from(k.header.is_some()) + usize::from(k.peer_identity == Some(true)) != 1
        {
            self.err(
                format!("{path}.key"),
                "give exactly one of header or peerIdentity: true".into(),
            );
        }
        let route = trellis_proto::v1::Route {
            rate_limit: Some(l.to_proto("")),
            ..Default::default()
        };
        self.route_part(path, &route, "rateLimit");
    }

    /// The proxy compiler's problems with `field` of a route holding only it, at `path`.
    fn route_part(&mut self, path: &str, route: &trellis_proto::v1::Route, field: &str) {
        for e in trellis_proxy::snapshot::check_route(route) {
            let under = e.path.strip_prefix(field).unwrap_or(&e.path);
            self.err(format!("{path}{under}"), e.reason);
        }
    }

    /// A router route's header rules: as a node's, but without `%PEER_IDENTITY%` — a route's
    /// rules run at the caller's own sidecar, whose caller is its app: it would always be
    /// empty.
    fn route_header_rules(&mut self, path: &str, rules: Option<&crate::model::HeaderRules>) {
        let Some(r) = rules else { return };
        for (list, values) in [("set", &r.set), ("add", &r.add)] {
            for (i, v) in values.iter().enumerate() {
                if v.value.contains("%PEER_IDENTITY%") {
                    self.err(
                        format!("{path}.{list}[{i}].value"),
                        "%PEER_IDENTITY% is the caller's identity at the called node's sidecar: a route's rules run at the caller's own sidecar, where it is always empty — use it in the VirtualNode's requestHeaders".into(),
                    );
                }
            }
        }
        self.header_rules(path, rules);
    }

    /// Header rules, checked by the proxy's own compiler (each problem at its field).
    fn header_rules(&mut self, path: &str, rules: Option<&crate::model::HeaderRules>) {
        let Some(rules) = rules else { return };
        if let Err(problems) =
            trellis_proxy::header_rules::HeaderRules::compile(&rules.to_proto(), "")
        {
            for (field, why) in problems {
                self.err(format!("{path}.{field}"), why);
            }
        }
    }

    fn timeouts(&mut self, path: &str, t: Option<&Timeouts>) {
        let Some(t) = t else { return };
        for (field, d) in [("perRequest", &t.per_request), ("idle", &t.idle)] {
            if let Some(d) = d {
                self.duration(&format!("{path}.{field}.value"), d, 0);
            }
        }
    }

    /// A duration of at least `min` and at most the proxy's longest (365 days).
    fn duration(&mut self, path: &str, d: &Duration, min: i64) {
        let max = trellis_proxy::snapshot::MAX_DURATION;
        if d.value < min {
            let reason = if min == 0 {
                "must not be negative"
            } else {
                "must be greater than 0"
            };
            self.err(path.to_string(), reason.into());
        } else if d.to_std().is_none_or(|d| d > max) {
            self.err(
                path.to_string(),
                format!("must be at most {}s (365 days)", max.as_secs()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_of(yaml: &str) -> Result<State, Vec<String>> {
        let docs = parse_documents(yaml)
            .map_err(|p| p.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        let mut state = State::new();
        let mut origin = HashMap::new();
        let mut problems = Vec::new();
        let mut refused = HashSet::new();
        for (i, m) in docs.into_iter().enumerate() {
            let key = manifest_key(&m);
            match admit(m, Some(i)) {
                Ok(r) => {
                    origin.insert(r.key.clone(), i);
                    state.insert(r.key.clone(), r.into());
                }
                Err(p) => {
                    refused.extend(key);
                    problems.extend(p);
                }
            }
        }
        problems.extend(check_apply(&state, &origin, &refused));
        if problems.is_empty() {
            Ok(state)
        } else {
            Err(problems.iter().map(ToString::to_string).collect())
        }
    }

    const GOOD: &str = "
apiVersion: mesh.trellis.dev/v1beta1
kind: Mesh
metadata: { name: m }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: { name: blue }
spec:
  listeners: [{ portMapping: { port: 9080, protocol: http } }]
  serviceDiscovery: { registry: { namespaceName: default, serviceName: colorteller, attributes: { version: blue } } }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualRouter
metadata: { name: ct }
spec:
  listeners: [{ portMapping: { port: 9080, protocol: http } }]
  routes:
    - name: r
      httpRoute:
        match: { prefix: / }
        action: { weightedTargets: [{ virtualNodeRef: { name: blue }, weight: 100 }] }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualService
metadata: { name: colorteller }
spec:
  provider: { virtualRouter: { virtualRouterRef: { name: ct } } }
";

    const GATEWAY: &str = "---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualGateway
metadata: { name: gw }
spec:
  listeners: [{ portMapping: { port: 8088, protocol: http } }]
---
apiVersion: mesh.trellis.dev/v1beta1
kind: GatewayRoute
metadata: { name: web }
spec:
  virtualGatewayRef: { name: gw }
  httpRoute:
    match: { prefix: /web/ }
    action:
      target: { virtualService: { virtualServiceRef: { name: colorteller } } }
      rewrite: { prefix: { value: /v2/ } }
";

    #[test]
    fn a_consistent_set_passes() {
        // TLS asked to be off is what runs: accepted.
        let plaintext = GOOD.replace(
            "protocol: http } }]\n  serviceDiscovery",
            "protocol: http }, tls: { mode: DISABLED } }]\n  serviceDiscovery",
        );
        assert!(state_of(&plaintext).is_ok());
        let state = state_of(GOOD).unwrap();
        assert_eq!(state.len(), 4);
        let vs = ResourceKey::new(Kind::VirtualService, "default", "colorteller");
        assert_eq!(state[&vs].metadata.namespace.as_deref(), Some("default"));
    }

    /// A grpc or tcp health check's path is accepted (App Mesh ignores it; its gRPC
    /// walkthroughs set one).
    #[test]
    fn a_grpc_health_check_path_is_accepted() {
        let grpc = GOOD.replace("mesh.trellis.dev/v1beta1", "appmesh.k8s.aws/v1beta2").replace(
            "protocol: http } }]\n  serviceDiscovery",
            "protocol: grpc }, healthCheck: { protocol: grpc, path: /ping, port: 9080, intervalMillis: 5000, timeoutMillis: 2000, healthyThreshold: 2, unhealthyThreshold: 3 } }]\n  serviceDiscovery",
        );
        let grpc = grpc.replace(
            "protocol: http } }]\n  routes:\n    - name: r\n      httpRoute:",
            "protocol: grpc } }]\n  routes:\n    - name: r\n      grpcRoute:",
        );
        let grpc = grpc.replace("match: { prefix: / }", "match: { serviceName: a.B }");
        let state = state_of(&grpc).unwrap();
        let Spec::VirtualNode(blue) =
            &state[&ResourceKey::new(Kind::VirtualNode, "default", "blue")].spec
        else {
            panic!("a node");
        };
        let hc = blue.listeners[0].health_check.as_ref().unwrap();
        assert_eq!(
            (hc.protocol.as_str(), hc.path.as_deref()),
            ("grpc", Some("/ping"))
        );
    }

    /// A resource refused on admission is not reported again as missing where it is referred
    /// to: only its own problem is.
    #[test]
    fn a_refused_resource_is_not_also_missing() {
        let tls = GOOD.replace(
            "protocol: http } }]\n  serviceDiscovery",
            "protocol: http }, tls: { mode: STRICT, certificate: { acm: { certificateARN: x } } } }]\n  serviceDiscovery",
        );
        let problems = state_of(&tls).unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("spec.listeners[0].tls")),
            "{problems:?}"
        );
        assert!(
            !problems.iter().any(|p| p.contains("not found")),
            "{problems:?}"
        );
        // A resource missing from the apply still is.
        let missing = GOOD.replace(
            "virtualNodeRef: { name: blue }",
            "virtualNodeRef: { name: teal }",
        );
        assert!(
            state_of(&missing)
                .unwrap_err()
                .iter()
                .any(|p| p.contains("VirtualNode default/teal not found"))
        );
    }

    /// App Mesh's API group is accepted and kept: the resource is served back with it.
    #[test]
    fn app_mesh_api_group_is_accepted_and_kept() {
        let appmesh = GOOD.replace("mesh.trellis.dev/v1beta1", "appmesh.k8s.aws/v1beta2");
        let state = state_of(&appmesh).unwrap();
        let vs = &state[&ResourceKey::new(Kind::VirtualService, "default", "colorteller")];
        assert_eq!(vs.api_version, ApiVersion::AppMesh);
        let json = serde_json::to_value(&**vs).unwrap();
        assert_eq!(json["apiVersion"], "appmesh.k8s.aws/v1beta2");
        // Re-applied under the other group, it is a change.
        let trellis = state_of(GOOD).unwrap();
        assert!(!trellis[&vs.key].same(vs));
    }

    /// Mesh membership by namespace labels: a resource without a meshRef belongs to the mesh
    /// whose namespaceSelector selects its namespace, and references stay inside a mesh.
    #[test]
    fn virtual_service_addresses_are_checked_and_unique() {
        let with = |annotation: &str, more: &str| {
            GOOD.replace(
                "metadata: { name: colorteller }",
                &format!("metadata: {{ name: colorteller, annotations: {{ trellis.dev/addresses: {annotation:?} }} }}"),
            ) + more
        };
        assert!(state_of(&with("10.96.0.10:80, [fd00::a]:80", "")).is_ok());
        let twin = "---\napiVersion: mesh.trellis.dev/v1beta1\nkind: VirtualService\nmetadata: { name: twin, annotations: { trellis.dev/addresses: '10.96.0.10:80' } }\nspec:\n  provider: { virtualRouter: { virtualRouterRef: { name: ct } } }\n";
        let problems = state_of(&with("10.96.0.10:80", twin)).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("VirtualService default/twin")
                    && p.contains(
                        "10.96.0.10:80 is already VirtualService default/colorteller's address"
                    )),
            "{problems:?}"
        );
        let problems = state_of(&with("10.96.0.10:80,10.96.0.10:80", "")).unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("listed twice")),
            "{problems:?}"
        );
        let problems = state_of(&with("10.96.0.10", "")).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("metadata.annotations.trellis.dev/addresses")
                    && p.contains("not an ip:port")),
            "{problems:?}"
        );
        let on_node = GOOD.replacen(
            "metadata: { name: blue",
            "metadata: { annotations: { trellis.dev/addresses: '10.0.0.1:80' }, name: blue",
            1,
        );
        let problems = state_of(&on_node).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("only a VirtualService has addresses")),
            "{problems:?}"
        );
    }

    #[test]
    fn namespace_selectors_decide_mesh_membership() {
        let two_meshes = |sel_a: &str, sel_b: &str, labels: &str| {
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{ name: default, labels: {{ {labels} }} }}\n---\n\
                 apiVersion: appmesh.k8s.aws/v1beta2\nkind: Mesh\nmetadata: {{ name: a }}\nspec: {{ namespaceSelector: {sel_a} }}\n---\n\
                 apiVersion: appmesh.k8s.aws/v1beta2\nkind: Mesh\nmetadata: {{ name: b }}\nspec: {{ namespaceSelector: {sel_b} }}\n---\n{}",
                GOOD.split_once("---\n").unwrap().1
            )
        };
        // Selected by a only: everything in "default" belongs to a.
        let yaml = two_meshes(
            "{ matchLabels: { mesh: a } }",
            "{ matchExpressions: [{ key: mesh, operator: In, values: [b] }] }",
            "mesh: a",
        );
        let state = state_of(&yaml).unwrap();
        let ns = ResourceKey::new(Kind::Namespace, "", "default");
        assert_eq!(state[&ns].api_version, ApiVersion::Kubernetes);
        let vs = &state[&ResourceKey::new(Kind::VirtualService, "default", "colorteller")];
        assert_eq!(mesh_of(&state, vs), Some("a"));
        // Selected by both: ambiguous.
        let both = two_meshes(
            "{ matchLabels: { mesh: a } }",
            "{ matchExpressions: [{ key: mesh, operator: Exists }] }",
            "mesh: a",
        );
        let problems = state_of(&both).unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("spec.meshRef: namespace \"default\" is selected by the namespaceSelector of meshes a, b")),
            "{problems:?}"
        );
        // Selected by neither: the resources must name their mesh.
        let neither = two_meshes(
            "{ matchLabels: { mesh: a } }",
            "{ matchLabels: { mesh: b } }",
            "mesh: c",
        );
        let problems = state_of(&neither).unwrap_err();
        assert!(
            problems.iter().any(|p| p
                .contains("namespace \"default\" is not selected by any mesh's namespaceSelector")),
            "{problems:?}"
        );
        // A mesh without a selector takes what no selector claims.
        let open = two_meshes(
            "{ matchLabels: { mesh: a } }",
            "{ matchLabels: { mesh: b } }",
            "mesh: c",
        )
        .replace(
            "metadata: { name: b }\nspec: { namespaceSelector: { matchLabels: { mesh: b } } }",
            "metadata: { name: b }",
        );
        let state = state_of(&open).unwrap();
        let vs = &state[&ResourceKey::new(Kind::VirtualService, "default", "colorteller")];
        assert_eq!(mesh_of(&state, vs), Some("b"));
        // A reference across meshes: the router names mesh b explicitly, its node is in a.
        let across = yaml.replace(
            "metadata: { name: ct }\nspec:",
            "metadata: { name: ct }\nspec:\n  meshRef: { name: b }",
        );
        let problems = state_of(&across).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("VirtualNode default/blue belongs to mesh \"a\", not \"b\"")),
            "{problems:?}"
        );
        // Operators are checked.
        let bad = two_meshes(
            "{ matchExpressions: [{ key: mesh, operator: Equals, values: [a] }] }",
            "{ matchLabels: { mesh: b } }",
            "mesh: a",
        );
        let problems = state_of(&bad).unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("spec.namespaceSelector.matchExpressions[0].operator: must be In, NotIn, Exists or DoesNotExist")),
            "{problems:?}"
        );
    }

    /// A Canary of GOOD's route `r` from blue to green, with `spec` lines replaced.
    fn canary(change: &[(&str, &str)]) -> String {
        let mut canary = "---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: { name: green }
spec:
  listeners: [{ portMapping: { port: 9080, protocol: http } }]
  serviceDiscovery: { registry: { namespaceName: default, serviceName: colorteller, attributes: { version: green } } }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: Canary
metadata: { name: c }
spec:
  virtualRouterRef: { name: ct }
  route: r
  stableRef: { name: blue }
  canaryRef: { name: green }
  steps: [{ weight: 10, duration: { unit: s, value: 60 } }, { weight: 50, duration: { unit: s, value: 60 } }]
  gates: { minRequests: 100, minSuccessRate: 99, maxLatencyP99: { unit: ms, value: 250 } }
"
        .to_string();
        for (from, to) in change {
            assert!(canary.contains(from), "{from}");
            canary = canary.replace(from, to);
        }
        format!("{GOOD}{canary}")
    }

    #[test]
    fn a_canary_names_a_route_its_nodes_rising_steps_and_gates() {
        assert!(
            state_of(&canary(&[])).is_ok(),
            "{:?}",
            state_of(&canary(&[])).err()
        );
        let cases: [(&[(&str, &str)], &str); 13] = [
            (
                &[("unit: ms, value: 250", "unit: s, value: 10")],
                "spec.gates.maxLatencyP99.value: must be more than 0 and less than 10 s",
            ),
            (
                &[(
                    "stableRef: { name: blue }",
                    "stableRef: { name: blue, uid: x }",
                )],
                "spec.stableRef.uid: unknown field",
            ),
            (
                &[(
                    "canaryRef: { name: green }\n",
                    "canaryRef: { name: green }\n  interval: { unit: ms, value: 10 }\n",
                )],
                "spec.interval: must be 1 s to 1 h, not 10 ms",
            ),
            (
                &[("route: r", "route: x")],
                "spec.route: VirtualRouter default/ct has no route \"x\" (its routes: r)",
            ),
            (
                &[("canaryRef: { name: green }", "canaryRef: { name: blue }")],
                "spec.canaryRef: VirtualNode default/blue is also the stableRef",
            ),
            (
                &[
                    ("stableRef: { name: blue }", "stableRef: { name: green }"),
                    ("canaryRef: { name: green }", "canaryRef: { name: blue }"),
                ],
                "spec.stableRef: VirtualNode default/green is not a target of route \"r\"",
            ),
            (
                &[(
                    "virtualRouterRef: { name: ct }",
                    "virtualRouterRef: { name: nope }",
                )],
                "spec.virtualRouterRef: VirtualRouter default/nope not found",
            ),
            (
                &[("weight: 50,", "weight: 10,")],
                "spec.steps[1].weight: must be 1..=100 and more than the step before's (10), not 10",
            ),
            (
                &[(
                    "steps: [",
                    "steps: [{ weight: 0, duration: { unit: s, value: 1 } }, ",
                )],
                "spec.steps[0].weight: must be 1..=100",
            ),
            (
                &[("minRequests: 100", "minRequests: 0")],
                "spec.gates.minRequests: must be at least 1",
            ),
            (
                &[("minSuccessRate: 99", "minSuccessRate: 101")],
                "spec.gates.minSuccessRate: must be 0..=100 (percent), not 101",
            ),
            (
                &[("minRequests: 100,", "minRequests: 100, maxErrors: 3,")],
                "spec.gates.maxErrors: unknown field",
            ),
            (
                &[(
                    "apiVersion: mesh.trellis.dev/v1beta1\nkind: Canary",
                    "apiVersion: appmesh.k8s.aws/v1beta2\nkind: Canary",
                )],
                "apiVersion: a Canary is Trellis's own kind",
            ),
        ];
        for (change, want) in cases {
            let problems = state_of(&canary(change)).unwrap_err();
            assert!(
                problems.iter().any(|p| p.contains(want)),
                "want {want:?} in {problems:?}"
            );
        }
        // Other targets of the route must be at weight 0.
        let three = canary(&[]).replace(
            "weightedTargets: [{ virtualNodeRef: { name: blue }, weight: 100 }]",
            "weightedTargets: [{ virtualNodeRef: { name: blue }, weight: 90 }, { virtualNodeRef: { name: red }, weight: 10 }]",
        ) + "---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: { name: red }
spec:
  listeners: [{ portMapping: { port: 9080, protocol: http } }]
  serviceDiscovery: { registry: { namespaceName: default, serviceName: colorteller, attributes: { version: red } } }
";
        let problems = state_of(&three).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("sends weight 10 to VirtualNode default/red")),
            "{problems:?}"
        );
        assert!(state_of(&three.replace("weight: 10 }]", "weight: 0 }]")).is_ok());
        // One canary per route.
        let twice = canary(&[])
            + &canary(&[])
                .split("kind: Canary")
                .nth(1)
                .map(|c| {
                    format!(
                        "---\napiVersion: mesh.trellis.dev/v1beta1\nkind: Canary{}",
                        c.replace("name: c }", "name: d }")
                    )
                })
                .unwrap();
        let problems = state_of(&twice).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("Canary default/c runs route \"r\" of VirtualRouter default/ct too: one canary per route")),
            "{problems:?}"
        );
        // gRPC routes: their errors travel in 200 responses, which the gates cannot see yet.
        let grpc = canary(&[]).replace(
            "httpRoute:\n        match: { prefix: / }",
            "grpcRoute:\n        match: { serviceName: s }",
        );
        let problems = state_of(&grpc).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("spec.route: not supported by Trellis: \"r\" is a grpcRoute")),
            "{problems:?}"
        );
        // The canary is added on the stable target's port: it must listen there.
        let ported = canary(&[]).replace(
            "{ virtualNodeRef: { name: blue }, weight: 100 }",
            "{ virtualNodeRef: { name: blue }, weight: 100, port: 9080 }",
        );
        assert!(state_of(&ported).is_ok(), "{:?}", state_of(&ported).err());
        let elsewhere = ported.replacen("portMapping: { port: 9080, protocol: http } }]\n  serviceDiscovery: { registry: { namespaceName: default, serviceName: colorteller, attributes: { version: green", "portMapping: { port: 9090, protocol: http } }]\n  serviceDiscovery: { registry: { namespaceName: default, serviceName: colorteller, attributes: { version: green", 1);
        let problems = state_of(&elsewhere).unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains(
                "spec.canaryRef: 9080 is not a listener port of VirtualNode default/green"
            )),
            "{problems:?}"
        );
        // A router change that removes the canary's route is refused while the canary exists.
        let gone = canary(&[]).replace("- name: r\n", "- name: other\n");
        let problems = state_of(&gone).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("(Canary default/c): spec.route")),
            "{problems:?}"
        );
    }

    #[test]
    fn problems_name_document_resource_and_field() {
        let cases = [
            (
                GOOD.replace("weight: 100", "weight: 101"),
                "document 2 (VirtualRouter default/ct): spec.routes[0].httpRoute.action.weightedTargets[0].weight: must be 0..=100",
            ),
            (
                GOOD.replace("name: blue }, weight", "name: green }, weight"),
                "document 2 (VirtualRouter default/ct): spec.routes[0].httpRoute.action.weightedTargets[0].virtualNodeRef: VirtualNode default/green not found",
            ),
            (
                GOOD.replace("prefix: /", "prefx: /"),
                "document 2 (VirtualRouter default/ct): spec.routes[0].httpRoute.match.prefx: unknown field",
            ),
            (
                GOOD.replace("kind: Mesh", "kind: Mash"),
                "document 0: kind: unknown kind \"Mash\"",
            ),
            (
                GOOD.replace(
                    "apiVersion: mesh.trellis.dev/v1beta1\nkind: Mesh",
                    "apiVersion: v2\nkind: Mesh",
                ),
                "document 0 (Mesh m): apiVersion: must be",
            ),
            (
                GOOD.replace(
                    "apiVersion: mesh.trellis.dev/v1beta1\nkind: Mesh",
                    "apiVersion: v1\nkind: Mesh",
                ),
                "document 0 (Mesh m): apiVersion: \"v1\" is only for Namespace documents",
            ),
            (
                GOOD.replace(
                    "protocol: http } }]\n  serviceDiscovery",
                    "protocol: htp } }]\n  serviceDiscovery",
                ),
                "document 1 (VirtualNode default/blue): spec.listeners[0].portMapping.protocol",
            ),
            (
                GOOD.replace(
                    "kind: Mesh\nmetadata: { name: m }",
                    "kind: VirtualNode\nmetadata: { name: x }",
                ),
                "spec.meshRef: no Mesh exists",
            ),
            (
                GOOD.replace(
                    "protocol: http } }]\n  serviceDiscovery",
                    "protocol: http }, connectionPool: { grpc: { maxRequests: 3 } } }]\n  serviceDiscovery",
                ),
                "document 1 (VirtualNode default/blue): spec.listeners[0].connectionPool.grpc: the listener's protocol is http: give connectionPool.http",
            ),
            (
                GOOD.replace(
                    "protocol: http } }]\n  serviceDiscovery",
                    "protocol: http }, outlierDetection: { maxServerErrors: 1, interval: { unit: s, value: 0 }, baseEjectionDuration: { unit: s, value: 1 }, maxEjectionPercent: 10 } }]\n  serviceDiscovery",
                ),
                "document 1 (VirtualNode default/blue): spec.listeners[0].outlierDetection.interval.value: must be greater than 0",
            ),
            (
                GOOD.replace(
                    "protocol: http } }]\n  serviceDiscovery",
                    "protocol: http }, healthCheck: { protocol: http, path: ping, intervalMillis: 5000, timeoutMillis: 2000, healthyThreshold: 2, unhealthyThreshold: 2 } }]\n  serviceDiscovery",
                ),
                "document 1 (VirtualNode default/blue): spec.listeners[0].healthCheck.path: must be a path starting with /",
            ),
            (
                // Two meshes: the router and service name "m"; blue moves to "other".
                format!("{GOOD}---\napiVersion: mesh.trellis.dev/v1beta1\nkind: Mesh\nmetadata: {{ name: other }}\n")
                    .replace("metadata: { name: blue }\nspec:", "metadata: { name: blue }\nspec:\n  meshRef: { name: other }")
                    .replace("metadata: { name: ct }\nspec:", "metadata: { name: ct }\nspec:\n  meshRef: { name: m }")
                    .replace("metadata: { name: colorteller }\nspec:", "metadata: { name: colorteller }\nspec:\n  meshRef: { name: m }"),
                "spec.routes[0].httpRoute.action.weightedTargets[0].virtualNodeRef: VirtualNode default/blue belongs to mesh \"other\", not \"m\"",
            ),
        ];
        let timeout = "action: { weightedTargets: [{ virtualNodeRef: { name: blue }, weight: 100 }] }\n        timeout: { idle: { unit: s, value: 31536001 } }";
        let cases = cases.into_iter().chain([(
            GOOD.replace(
                "action: { weightedTargets: [{ virtualNodeRef: { name: blue }, weight: 100 }] }",
                timeout,
            ),
            "spec.routes[0].httpRoute.timeout.idle.value: must be at most 31536000s (365 days)",
        ), (
            GOOD.replace(
                "protocol: http } }]\n  serviceDiscovery",
                "protocol: http }, tls: { mode: PERMISSIVE } }]\n  serviceDiscovery",
            ),
            "spec.listeners[0].tls.certificate: required",
        ), (
            GOOD.replace(
                "protocol: http } }]\n  serviceDiscovery",
                "protocol: http }, tls: { mode: STRICT, certificate: { file: { certificateChain: /c, privateKey: /k }, sds: { secretName: x } } } }]\n  serviceDiscovery",
            ),
            "spec.listeners[0].tls.certificate: give exactly one of file or sds",
        ), (
            GOOD.replace(
                "serviceDiscovery: { registry: { namespaceName: default, serviceName: colorteller, attributes: { version: blue } } }",
                "serviceDiscovery: { dns: { hostname: 'red_svc!.local' } }\n  backends: [{ virtualService: { virtualServiceRef: { name: colorteller }, clientPolicy: { tls: { enforce: true } } } }]",
            ),
            "spec.backends[0].virtualService.clientPolicy.tls.validation: required",
        ), (
            GOOD.replace(
                "serviceDiscovery: { registry: { namespaceName: default, serviceName: colorteller, attributes: { version: blue } } }",
                "serviceDiscovery: { dns: { hostname: blue.local } }\n  backends: [{ virtualService: { virtualServiceRef: { name: colorteller }, clientPolicy: { tls: { ports: [0], validation: { trust: { sds: { secretName: x } } } } } } }]",
            ),
            "spec.backends[0].virtualService.clientPolicy.tls.ports[0]: must be 1..=65535",
        ), (
            GOOD.replace(
                "serviceDiscovery: { registry: { namespaceName: default, serviceName: colorteller, attributes: { version: blue } } }",
                "serviceDiscovery: { dns: { hostname: blue.local } }\n  allowedCallers: [{ spiffeId: 'spiffe://x' }]",
            ),
            "spec.allowedCallers[0].spiffeId: \"spiffe://x\" is not a SPIFFE ID",
        ), (
            GOOD.replace(
                "serviceDiscovery: { registry: { namespaceName: default, serviceName: colorteller, attributes: { version: blue } } }",
                "serviceDiscovery: { dns: { hostname: blue.local } }\n  allowedCallers: [{ virtualNodeRef: { name: teal } }]",
            ),
            "spec.allowedCallers[0].virtualNodeRef: VirtualNode default/teal not found",
        ), (
            GOOD.replace(
                "serviceDiscovery: { registry: { namespaceName: default, serviceName: colorteller, attributes: { version: blue } } }",
                "serviceDiscovery: { dns: { hostname: blue.local } }\n  allowedCallers: [{ spiffeId: 'spiffe://td/a', virtualGatewayRef: { name: gw } }]",
            ),
            "spec.allowedCallers[0]: give exactly one of virtualNodeRef, virtualGatewayRef or spiffeId",
        ), (
            GOOD.replace(
                "serviceDiscovery: { registry: { namespaceName: default, serviceName: colorteller, attributes: { version: blue } } }",
                "serviceDiscovery: { registry: { namespaceName: 'a/b', serviceName: colorteller } }",
            ),
            "spec.serviceDiscovery.registry.namespaceName: \"a/b\" is not a registry name",
        ), (
            GOOD.replace(
                "provider: { virtualRouter",
                "hostname: web.d%mo\n  provider: { virtualRouter",
            ),
            "spec.hostname: \"web.d%mo\" is not a hostname",
        ), (
            format!("{GOOD}{GATEWAY}").replace("prefix: /web/", "prefix: web/"),
            "(GatewayRoute default/web): spec.httpRoute.match.prefix: must start with \"/\"",
        ), (
            format!("{GOOD}{GATEWAY}").replace("value: /v2/", "value: v2/"),
            "spec.httpRoute.action.rewrite.prefix.value: must start with \"/\"",
        ), (
            // An ARN naming another mesh than the one the resource belongs to (the only mesh).
            GOOD.replace(
                "weightedTargets: [{ virtualNodeRef: { name: blue }, weight: 100 }]",
                "weightedTargets: [{ virtualNodeARN: 'arn:aws:appmesh:us-west-2:1:mesh/other/virtualNode/blue', weight: 100 }]",
            ),
            "spec.routes[0].httpRoute.action.weightedTargets[0].virtualNodeARN: names mesh \"other\", but the resource belongs to mesh \"m\"",
        ), (
            // A route of a several-listener router on a listener of another protocol.
            GOOD.replace(
                "listeners: [{ portMapping: { port: 9080, protocol: http } }]\n  routes:",
                "listeners: [{ portMapping: { port: 9080, protocol: http } }, { portMapping: { port: 9090, protocol: grpc } }]\n  routes:",
            )
            .replace("match: { prefix: / }", "match: { prefix: /, port: 9090 }"),
            "spec.routes[0].httpRoute.match.port: listener 9090 is grpc, not http",
        ), (
            // A weighted target's port names one of the node's listeners.
            GOOD.replace("virtualNodeRef: { name: blue }, weight: 100", "virtualNodeRef: { name: blue }, weight: 100, port: 9081"),
            "(VirtualRouter default/ct): spec.routes[0].httpRoute.action.weightedTargets[0].port: 9081 is not a listener port of VirtualNode default/blue (it listens on 9080)",
        ), (
            // A gateway with several listeners: each route names its listener...
            format!("{GOOD}{GATEWAY}").replace(
                "listeners: [{ portMapping: { port: 8088, protocol: http } }]\n---\napiVersion: mesh.trellis.dev/v1beta1\nkind: GatewayRoute",
                "listeners: [{ portMapping: { port: 8088, protocol: http } }, { portMapping: { port: 8089, protocol: http2 } }]\n---\napiVersion: mesh.trellis.dev/v1beta1\nkind: GatewayRoute",
            ),
            "(GatewayRoute default/web): spec.httpRoute.match.port: required: gateway VirtualGateway default/gw has several listeners",
        ), (
            // ... one of its own...
            format!("{GOOD}{GATEWAY}").replace("match: { prefix: /web/ }", "match: { prefix: /web/, port: 8089 }"),
            "(GatewayRoute default/web): spec.httpRoute.match.port: 8089 is not one of gateway VirtualGateway default/gw's listener ports",
        ), (
            // ... of the route's protocol.
            format!("{GOOD}{GATEWAY}").replace("port: 8088, protocol: http }", "port: 8088, protocol: grpc }"),
            "(GatewayRoute default/web): spec.httpRoute: gateway VirtualGateway default/gw's listener 8088 is grpc, not http",
        ), (
            // A gateway route's target.port names one of the service's router's listeners...
            format!("{GOOD}{GATEWAY}").replace("target: { virtualService: { virtualServiceRef: { name: colorteller } } }", "target: { port: 9090, virtualService: { virtualServiceRef: { name: colorteller } } }"),
            "(GatewayRoute default/web): spec.httpRoute.action.target.port: 9090 is not a listener port of VirtualRouter default/ct",
        ), (
            // ... and is required when it has several.
            format!("{GOOD}{GATEWAY}").replace(
                "listeners: [{ portMapping: { port: 9080, protocol: http } }]\n  routes:",
                "listeners: [{ portMapping: { port: 9080, protocol: http } }, { portMapping: { port: 9090, protocol: http } }]\n  routes:",
            )
            .replace("match: { prefix: / }", "match: { prefix: /, port: 9090 }"),
            "(GatewayRoute default/web): spec.httpRoute.action.target.port: required: VirtualRouter default/ct, which provides VirtualService default/colorteller, has several listeners (9080, 9090)",
        ), (
            format!("{GOOD}{GATEWAY}").replace("match: { prefix: /web/ }", "match: { prefix: /web/, path: { exact: /web/x } }"),
            "spec.httpRoute.match: give prefix or path, not both",
        ), (
            // allowedCallers widens the mesh's STRICT authorization, which a listener's own tls
            // replaces.
            GOOD.replace(
                "listeners: [{ portMapping: { port: 9080, protocol: http } }]\n  serviceDiscovery",
                "listeners: [{ portMapping: { port: 9080, protocol: http }, tls: { mode: DISABLED } }]\n  allowedCallers: [{ spiffeId: spiffe://trellis.local/ns/ops/vn/debug }]\n  serviceDiscovery",
            ),
            "(VirtualNode default/blue): spec.allowedCallers: not supported with a listener's tls",
        ), (
            // A gateway route's match says one thing per rule, as a router route's does.
            format!("{GOOD}{GATEWAY}").replace("match: { prefix: /web/ }", "match: { path: { exact: /web/x, regex: /w.* } }")
                .replace("      rewrite: { prefix: { value: /v2/ } }\n", ""),
            "(GatewayRoute default/web): spec.httpRoute.match.path: give exact or regex",
        ), (
            format!("{GOOD}{GATEWAY}").replace("match: { prefix: /web/ }", "match: { path: {} }")
                .replace("      rewrite: { prefix: { value: /v2/ } }\n", ""),
            "(GatewayRoute default/web): spec.httpRoute.match.path: give exact or regex",
        ), (
            format!("{GOOD}{GATEWAY}").replace("match: { prefix: /web/ }", "match: { prefix: /web/, hostname: { exact: a.example, suffix: .example } }"),
            "(GatewayRoute default/web): spec.httpRoute.match.hostname: give exact or suffix",
        ), (
            format!("{GOOD}{GATEWAY}").replace("match: { prefix: /web/ }", "match: { prefix: /web/, hostname: {} }"),
            "(GatewayRoute default/web): spec.httpRoute.match.hostname: give exact or suffix",
        ), (
            format!("{GOOD}{GATEWAY}").replace("match: { prefix: /web/ }", "match: { prefix: /web/, headers: [{ name: x, match: { exact: a, prefix: b } }] }"),
            "(GatewayRoute default/web): spec.httpRoute.match.headers[0].match: give exactly one of exact, prefix, suffix, regex, range",
        ), (
            format!("{GOOD}{GATEWAY}").replace("match: { prefix: /web/ }", "match: { prefix: /web/, port: 0 }"),
            "(GatewayRoute default/web): spec.httpRoute.match.port: must be 1..=65535",
        ), (
            // A prefix rewrite without a matched prefix would rewrite nothing.
            format!("{GOOD}{GATEWAY}").replace("match: { prefix: /web/ }", "match: { path: { exact: /web/x } }"),
            "(GatewayRoute default/web): spec.httpRoute.action.rewrite.prefix.value: needs match.prefix: only a matched prefix is rewritten",
        ), (
            // A router's TCP and gRPC routes match a port (0 would match any).
            GOOD.replace("httpRoute:\n        match: { prefix: / }", "tcpRoute:\n        match: { port: 0 }"),
            "spec.routes[0].tcpRoute.match.port: must be 1..=65535",
        ), (
            GOOD.replace("httpRoute:\n        match: { prefix: / }", "grpcRoute:\n        match: { serviceName: s, port: 0 }"),
            "spec.routes[0].grpcRoute.match.port: must be 1..=65535",
        ), (
            format!("\"\": 1\n{GOOD}"),
            "document 0: \"\": unknown field",
        )]);
        assert!(state_of(&format!("{GOOD}{GATEWAY}")).is_ok());
        for (yaml, want) in cases {
            let problems = state_of(&yaml).unwrap_err();
            assert!(
                problems.iter().any(|p| p.contains(want)),
                "want {want}\ngot {problems:?}"
            );
        }
    }
}
