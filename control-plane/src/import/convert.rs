//! App Mesh API resources → App Mesh-shaped Trellis manifests, and the report.
//!
//! The API and the Kubernetes CRDs share almost every field; they differ in how references are
//! spelled (`virtualNodeName: blue` → `virtualNodeRef: { name: blue }`), where a Route lives (a
//! resource of its own → an entry of its router's `routes[]`), and a few names (the Mesh's
//! `serviceDiscovery` → `meshServiceDiscovery`). Everything else is copied, then checked with
//! `compat::check` — the one field table: a field Trellis refuses, or the CRDs do not have, is
//! dropped into the report with the reason the check gives.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use super::{ApiKind, ApiResource, EcsTask, Note, Read};
use crate::model::{APPMESH_API_VERSION, Kind};

/// The manifests (`appmesh.k8s.aws/v1beta2` documents, meshes first), what was not carried
/// over, and the trellis-proxy containers replacing ECS tasks' Envoy.
#[derive(Debug, Default)]
pub struct Converted {
    pub manifests: Vec<Value>,
    pub notes: Vec<Note>,
    pub ecs: Vec<EcsReplacement>,
    /// Each manifest's source, while converting.
    sources: Vec<String>,
}

/// An ECS task's App Mesh Envoy container and the trellis-proxy container that replaces it.
#[derive(Debug, Clone, PartialEq)]
pub struct EcsReplacement {
    pub source: String,
    /// The Envoy container's name, kept: `proxyConfiguration.containerName` and `dependsOn`
    /// still name it.
    pub container: String,
    /// What the proxy runs as: `--node NS/NAME` or `--gateway NS/NAME`.
    pub runs_as: String,
    pub container_definition: Value,
}

/// How replacements for ECS tasks' Envoy are written.
#[derive(Debug, Clone)]
pub struct EcsOptions {
    /// The trellis-proxy image.
    pub image: String,
    /// The control plane URL the proxies connect to.
    pub control_plane: String,
}

/// Converts what was read into manifests of `namespace`.
pub fn convert(mut read: Read, namespace: &str, ecs: &EcsOptions) -> Converted {
    let mut out = Converted {
        notes: std::mem::take(&mut read.notes),
        ..Converted::default()
    };
    // A resource defined twice (two exports, overlapping paths): the last definition is kept.
    let mut last: HashMap<(String, ApiKind, String, Option<String>), usize> = HashMap::new();
    for (i, r) in read.resources.iter().enumerate() {
        let key = (r.mesh.clone(), r.kind, r.name.clone(), r.parent.clone());
        if let Some(earlier) = last.insert(key, i) {
            out.notes.push(Note {
                source: read.resources[earlier].source.clone(),
                field: String::new(),
                reason: format!(
                    "{} {} is defined again in {}: the later definition is kept",
                    r.kind, r.name, r.source
                ),
            });
        }
    }
    let kept: std::collections::HashSet<usize> = last.into_values().collect();
    let mut i = 0;
    read.resources.retain(|_| {
        i += 1;
        kept.contains(&(i - 1))
    });
    let names = Names::new(&read.resources);
    let mut meshes: Vec<&str> = read.resources.iter().map(|r| r.mesh.as_str()).collect();
    meshes.sort_unstable();
    meshes.dedup();
    for mesh in meshes {
        if !read
            .resources
            .iter()
            .any(|r| r.kind == ApiKind::Mesh && r.mesh == mesh)
        {
            let source = format!("mesh {mesh}");
            out.notes.push(Note {
                source: source.clone(),
                field: String::new(),
                reason: "no Mesh resource in the input: an empty Mesh is written".into(),
            });
            let empty = ApiResource {
                kind: ApiKind::Mesh,
                mesh: mesh.to_string(),
                name: mesh.to_string(),
                parent: None,
                spec: Value::Null,
                source,
            };
            out.push(manifest(&empty, namespace, &names, &[]), &empty.source);
        }
    }
    let mut ordered: Vec<&ApiResource> = read
        .resources
        .iter()
        .filter(|r| r.kind != ApiKind::Route)
        .collect();
    ordered.sort_by_key(|r| r.kind);
    for r in ordered {
        let routes: Vec<&ApiResource> = read
            .resources
            .iter()
            .filter(|x| {
                r.kind == ApiKind::VirtualRouter
                    && x.kind == ApiKind::Route
                    && x.mesh == r.mesh
                    && x.parent.as_deref() == Some(r.name.as_str())
            })
            .collect();
        out.push(manifest(r, namespace, &names, &routes), &r.source);
    }
    for route in read.resources.iter().filter(|r| r.kind == ApiKind::Route) {
        let has_router = read.resources.iter().any(|x| {
            x.kind == ApiKind::VirtualRouter
                && x.mesh == route.mesh
                && Some(&x.name) == route.parent.as_ref()
        });
        if !has_router {
            out.notes.push(Note {
                source: route.source.clone(),
                field: String::new(),
                reason: format!(
                    "its VirtualRouter {:?} is not in the input: the route is not carried over",
                    route.parent.as_deref().unwrap_or_default()
                ),
            });
        }
    }
    out.validate();
    for task in &read.tasks {
        out.ecs_task(task, namespace, &names, ecs);
    }
    out.notes.sort();
    out.notes.dedup();
    out.sources.clear();
    out
}

impl Converted {
    fn push(&mut self, (manifest, notes): (Value, Vec<Note>), source: &str) {
        self.manifests.push(manifest);
        self.sources.push(source.to_string());
        self.notes.extend(notes);
    }

    /// Validates the manifests as a set, as `trellis apply` would, and mends what it refuses:
    /// the field a problem names is dropped; a resource whose problem no drop mends (a router
    /// without a listener, an invalid name) is dropped whole — each noted with the problem. The
    /// output then applies.
    fn validate(&mut self) {
        for _ in 0..32 {
            let problems = self.problems();
            if problems.is_empty() {
                return;
            }
            let mut whole = std::collections::BTreeSet::new();
            for (i, path, reason) in problems {
                let source = self.sources.get(i).cloned().unwrap_or_default();
                let dropped = path.starts_with("spec.")
                    && self
                        .manifests
                        .get_mut(i)
                        .is_some_and(|m| m.get_mut("spec").is_some_and(|spec| remove(spec, &path)));
                if dropped {
                    self.notes.push(Note {
                        source,
                        field: path,
                        reason: format!("not carried over: {reason}"),
                    });
                } else {
                    whole.insert(i);
                    self.notes.push(Note {
                        source,
                        field: String::new(),
                        reason: format!("not carried over: {path}: {reason}"),
                    });
                }
            }
            for i in whole.into_iter().rev() {
                self.manifests.remove(i);
                self.sources.remove(i);
            }
        }
        // Not mended in as many passes: nothing is written rather than manifests that fail.
        if !self.problems().is_empty() {
            self.notes.push(Note {
                source: "import".into(),
                field: String::new(),
                reason: "the manifests could not be made to validate: none written".into(),
            });
            self.manifests.clear();
        }
    }

    /// What validating the manifests as a set finds: (manifest index, field path, reason).
    fn problems(&self) -> Vec<(usize, String, String)> {
        let mut state = crate::validate::State::new();
        let mut origin = HashMap::new();
        let mut out = Vec::new();
        for (i, m) in self.manifests.iter().enumerate() {
            let manifest = match serde_json::from_value::<crate::model::Manifest>(m.clone()) {
                Ok(manifest) => manifest,
                Err(e) => {
                    out.push((i, String::new(), e.to_string()));
                    continue;
                }
            };
            match crate::validate::admit(manifest, Some(i)) {
                Ok(r) => {
                    origin.insert(r.key.clone(), i);
                    state.insert(r.key.clone(), std::sync::Arc::new(r));
                }
                Err(problems) => {
                    out.extend(problems.into_iter().map(|p| (i, p.path, p.reason)));
                }
            }
        }
        for p in crate::validate::check(&state, &origin) {
            if let Some(i) = p.document {
                out.push((i, p.path, p.reason));
            }
        }
        out
    }
}

/// Kubernetes names for App Mesh names, per (mesh, kind, name): lowercase letters, digits, '-'
/// and '.', unique per kind.
struct Names {
    map: HashMap<(String, ApiKind, String), String>,
}

impl Names {
    fn new(resources: &[ApiResource]) -> Self {
        let mut map = HashMap::new();
        let mut taken: std::collections::HashSet<(ApiKind, String)> =
            std::collections::HashSet::new();
        for r in resources {
            // Routes are entries of their router, named there.
            let key = (r.mesh.clone(), r.kind, r.name.clone());
            if r.kind == ApiKind::Route || map.contains_key(&key) {
                continue;
            }
            let name = unique(&k8s_name(&r.name), |n| {
                taken.contains(&(r.kind, n.to_string()))
            });
            taken.insert((r.kind, name.clone()));
            map.insert(key, name);
        }
        Self { map }
    }

    /// Whether App Mesh resource `name` of `kind` in `mesh` is in the input.
    fn has(&self, mesh: &str, kind: ApiKind, name: &str) -> bool {
        self.map
            .contains_key(&(mesh.to_string(), kind, name.to_string()))
    }

    /// The Kubernetes name of App Mesh resource `name` of `kind` in `mesh`; one not in the
    /// input keeps its name, made valid.
    fn get(&self, mesh: &str, kind: ApiKind, name: &str) -> String {
        self.map
            .get(&(mesh.to_string(), kind, name.to_string()))
            .cloned()
            .unwrap_or_else(|| k8s_name(name))
    }
}

/// A valid Kubernetes resource name for `name` (RFC 1123 subdomain): labels of lowercase
/// letters, digits and '-', starting and ending with a letter or digit, joined by '.'.
fn k8s_name(name: &str) -> String {
    let labels: Vec<String> = name
        .split('.')
        .map(|label| {
            let lowered: String = label
                .chars()
                .map(|c| match c.to_ascii_lowercase() {
                    c @ ('a'..='z' | '0'..='9' | '-') => c,
                    _ => '-',
                })
                .collect();
            lowered
                .trim_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .filter(|l| !l.is_empty())
        .collect();
    let mut out = labels.join(".");
    // Room for a `-N` that makes it unique.
    out.truncate(240);
    let out = out.trim_end_matches(['-', '.']).to_string();
    if out.is_empty() {
        "unnamed".into()
    } else {
        out
    }
}

/// `base`, or `base-2`, `base-3`, ... : the first that `taken` does not hold.
fn unique(base: &str, taken: impl Fn(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_string();
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|n| !taken(n))
        .unwrap_or_else(|| base.to_string())
}

fn kind_of(kind: ApiKind) -> Kind {
    match kind {
        ApiKind::Mesh => Kind::Mesh,
        ApiKind::VirtualService => Kind::VirtualService,
        ApiKind::VirtualRouter | ApiKind::Route => Kind::VirtualRouter,
        ApiKind::VirtualNode => Kind::VirtualNode,
        ApiKind::VirtualGateway => Kind::VirtualGateway,
        ApiKind::GatewayRoute => Kind::GatewayRoute,
    }
}

/// References: App Mesh names (`virtualNodeName: blue`) into the CRDs' `…Ref: { name }`.
struct Refs<'a> {
    names: &'a Names,
    mesh: &'a str,
    /// Names referred to that are not in the input, as found by the last `rename`s.
    missing: std::cell::RefCell<Vec<String>>,
}

impl Refs<'_> {
    /// In the object at `pointer` under `map`, replaces `field` (a name of `kind`) by `to`;
    /// false when the object is there without the name (the source could not give it).
    fn rename(&self, map: &mut Map<String, Value>, reference: Reference) -> bool {
        let (pointer, field, kind, to) = reference;
        let mut at = Some(map);
        for segment in pointer.split('/').filter(|s| !s.is_empty()) {
            at = at
                .and_then(|m| m.get_mut(segment))
                .and_then(Value::as_object_mut);
        }
        let Some(obj) = at else { return true };
        match obj.remove(field) {
            Some(Value::String(name)) if self.names.has(self.mesh, kind, &name) => {
                let name = self.names.get(self.mesh, kind, &name);
                obj.insert(to.into(), json!({ "name": name }));
                true
            }
            Some(Value::String(name)) => {
                self.missing.borrow_mut().push(name);
                false
            }
            _ => false,
        }
    }

    /// A list's entries with their reference rewritten; an entry without the name is dropped
    /// and noted as (`list[i]`, why).
    fn rename_all(
        &self,
        items: &mut Vec<Value>,
        reference: Reference,
        list: &str,
        notes: &mut Vec<(String, String)>,
    ) {
        let mut i = 0;
        items.retain_mut(|item| {
            let keep = item
                .as_object_mut()
                .is_some_and(|m| self.rename(m, reference));
            if !keep {
                notes.push((format!("{list}[{i}]"), self.why(reference)));
            }
            i += 1;
            keep
        });
    }

    /// A route's weighted targets: `virtualNode: NAME` → `virtualNodeRef: { name }`.
    fn targets(&self, route: &mut Map<String, Value>, notes: &mut Vec<(String, String)>) {
        for protocol in ["httpRoute", "http2Route", "grpcRoute", "tcpRoute"] {
            let targets = route
                .get_mut(protocol)
                .and_then(|r| r.pointer_mut("/action/weightedTargets"))
                .and_then(Value::as_array_mut);
            if let Some(targets) = targets {
                let list = format!("spec.{protocol}.action.weightedTargets");
                let reference = ("", "virtualNode", ApiKind::VirtualNode, "virtualNodeRef");
                self.rename_all(targets, reference, &list, notes);
            }
        }
    }
}

/// A reference: (where its object is, the API's name field, what it names, the CRDs' field).
type Reference = (&'static str, &'static str, ApiKind, &'static str);

fn unnamed((_, field, kind, _): Reference) -> String {
    format!("not carried over: it names no {kind} ({field} missing in the input)")
}

impl Refs<'_> {
    /// Why the last reference found unusable is: a name not in the input, or none.
    fn why(&self, reference: Reference) -> String {
        match self.missing.borrow_mut().pop() {
            Some(name) => format!(
                "not carried over: {} {name:?} is not in the input (import the files that define it together)",
                reference.2
            ),
            None => unnamed(reference),
        }
    }
}

/// One resource's manifest (a router with its `routes`), checked against the field table, and
/// the notes on what it lost.
fn manifest(
    r: &ApiResource,
    namespace: &str,
    names: &Names,
    routes: &[&ApiResource],
) -> (Value, Vec<Note>) {
    let mut notes = Vec::new();
    let name = names.get(&r.mesh, r.kind, &r.name);
    let mut spec = match &r.spec {
        Value::Object(m) => m.clone(),
        Value::Null => Map::new(),
        other => {
            notes.push(Note {
                source: r.source.clone(),
                field: "spec".into(),
                reason: format!("not an object ({other}): left out"),
            });
            Map::new()
        }
    };
    let refs = Refs {
        names,
        mesh: &r.mesh,
        missing: Default::default(),
    };
    // (field, why) of references the source could not name; a route's by its index.
    let mut lost: Vec<(String, String)> = Vec::new();
    let mut route_lost: Vec<(usize, String, String)> = Vec::new();
    match r.kind {
        ApiKind::Mesh => {
            if let Some(sd) = spec.remove("serviceDiscovery") {
                spec.insert("meshServiceDiscovery".into(), sd);
            }
        }
        ApiKind::VirtualService => {
            for (key, reference) in [
                (
                    "virtualNode",
                    (
                        "/provider/virtualNode",
                        "virtualNodeName",
                        ApiKind::VirtualNode,
                        "virtualNodeRef",
                    ),
                ),
                (
                    "virtualRouter",
                    (
                        "/provider/virtualRouter",
                        "virtualRouterName",
                        ApiKind::VirtualRouter,
                        "virtualRouterRef",
                    ),
                ),
            ] {
                if !refs.rename(&mut spec, reference) {
                    if let Some(p) = spec.get_mut("provider").and_then(Value::as_object_mut) {
                        p.remove(key);
                    }
                    lost.push((format!("spec.provider.{key}"), refs.why(reference)));
                }
            }
        }
        ApiKind::VirtualNode => {
            if let Some(backends) = spec.get_mut("backends").and_then(Value::as_array_mut) {
                let reference = (
                    "/virtualService",
                    "virtualServiceName",
                    ApiKind::VirtualService,
                    "virtualServiceRef",
                );
                refs.rename_all(backends, reference, "spec.backends", &mut lost);
            }
        }
        ApiKind::VirtualRouter => {
            let mut entries = Vec::new();
            for (i, route) in routes.iter().enumerate() {
                let mut entry = match &route.spec {
                    Value::Object(m) => m.clone(),
                    _ => Map::new(),
                };
                let name = unique(&k8s_name(&route.name), |n| {
                    entries.iter().any(|e: &Value| e["name"] == n)
                });
                if name != route.name {
                    route_lost.push((
                        i,
                        "routeName".into(),
                        format!("renamed {name:?}: a route's name is a Kubernetes name"),
                    ));
                }
                entry.insert("name".into(), json!(name));
                let mut why = Vec::new();
                refs.targets(&mut entry, &mut why);
                route_lost.extend(why.into_iter().map(|(f, w)| (i, f, w)));
                let targets_left = ["httpRoute", "http2Route", "grpcRoute", "tcpRoute"]
                    .iter()
                    .filter_map(|p| {
                        entry
                            .get(*p)?
                            .pointer("/action/weightedTargets")?
                            .as_array()
                    })
                    .all(|t| !t.is_empty());
                if !targets_left {
                    route_lost.push((
                        i,
                        String::new(),
                        "not carried over: none of its weighted targets is in the input".into(),
                    ));
                    continue;
                }
                entries.push(Value::Object(entry));
            }
            if !entries.is_empty() {
                spec.insert("routes".into(), Value::Array(entries));
            }
        }
        ApiKind::GatewayRoute => {
            if let Some(gateway) = &r.parent {
                let gateway = names.get(&r.mesh, ApiKind::VirtualGateway, gateway);
                spec.insert("virtualGatewayRef".into(), json!({ "name": gateway }));
            }
            for protocol in ["httpRoute", "http2Route", "grpcRoute"] {
                let reference = (
                    "/action/target/virtualService",
                    "virtualServiceName",
                    ApiKind::VirtualService,
                    "virtualServiceRef",
                );
                let named = match spec.get_mut(protocol).and_then(Value::as_object_mut) {
                    Some(route) => refs.rename(route, reference),
                    None => true,
                };
                if !named {
                    spec.remove(protocol);
                    lost.push((format!("spec.{protocol}"), refs.why(reference)));
                }
            }
        }
        ApiKind::VirtualGateway | ApiKind::Route => {}
    }
    for (field, reason) in lost {
        notes.push(Note {
            source: r.source.clone(),
            field,
            reason,
        });
    }
    for (i, field, reason) in route_lost {
        notes.push(Note {
            source: routes
                .get(i)
                .map_or_else(|| r.source.clone(), |x| x.source.clone()),
            field,
            reason,
        });
    }
    // A VirtualService's App Mesh name is the hostname its clients call; other renamed
    // resources keep their App Mesh name too.
    if r.kind == ApiKind::VirtualService || name != r.name {
        spec.insert("awsName".into(), json!(r.name));
    }
    if r.kind != ApiKind::Mesh {
        let mesh = names.get(&r.mesh, ApiKind::Mesh, &r.mesh);
        spec.insert("meshRef".into(), json!({ "name": mesh }));
    }
    // Client policies that say nothing (`ClientPolicy: {}`) hold no TLS to refuse.
    if spec.get("backendDefaults").is_some_and(empty_tree) {
        spec.remove("backendDefaults");
    }
    for b in spec
        .get_mut("backends")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if let Some(vs) = b.get_mut("virtualService").and_then(Value::as_object_mut)
            && vs.get("clientPolicy").is_some_and(empty_tree)
        {
            vs.remove("clientPolicy");
        }
    }
    let mut spec = Value::Object(spec);
    notes.extend(keep_what_trellis_takes(
        kind_of(r.kind),
        &mut spec,
        &r.source,
        routes,
    ));
    let metadata = if r.kind == ApiKind::Mesh {
        json!({ "name": name })
    } else {
        json!({ "name": name, "namespace": namespace })
    };
    let manifest = json!({
        "apiVersion": APPMESH_API_VERSION,
        "kind": kind_of(r.kind).as_str(),
        "metadata": metadata,
        "spec": spec,
    });
    (manifest, notes)
}

/// Whether `v` holds nothing: null, or objects and lists of nothing.
fn empty_tree(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.values().all(empty_tree),
        Value::Array(a) => a.iter().all(empty_tree),
        _ => false,
    }
}

/// Drops from `spec` what the field table refuses or the CRDs do not have (an enum value or
/// range they do not allow included), noting each with the check's reason; a problem that
/// dropping cannot mend (a required field missing) is noted too.
fn keep_what_trellis_takes(
    kind: Kind,
    spec: &mut Value,
    source: &str,
    routes: &[&ApiResource],
) -> Vec<Note> {
    let mut notes = Vec::new();
    // Each pass drops the fields found; a field inside a dropped one is not found again.
    for _ in 0..8 {
        let mut checked = spec.clone();
        let problems = crate::compat::check(kind, &mut checked).problems;
        let mut dropped = false;
        for (path, reason) in problems {
            let (source, field) = route_source(source, &path, routes);
            if reason == "required" {
                // The object that lacks it cannot stand: it goes, with the field named.
                let Some((parent, _)) = path.rsplit_once('.').filter(|(p, _)| *p != "spec") else {
                    notes.push(Note {
                        source,
                        field,
                        reason: "required by App Mesh's Kubernetes CRD and missing in the input"
                            .into(),
                    });
                    continue;
                };
                if remove(spec, parent) {
                    dropped = true;
                    let (_, parent_field) = route_source("", parent, routes);
                    notes.push(Note {
                        source,
                        field: parent_field,
                        reason: format!(
                            "not carried over: its {} is required and missing in the input",
                            path.rsplit('.').next().unwrap_or_default()
                        ),
                    });
                }
                continue;
            }
            if remove(spec, &path) {
                dropped = true;
                let reason = if reason == "unknown field" {
                    "App Mesh's Kubernetes CRDs (the shape Trellis reads) have no such field"
                        .to_string()
                } else {
                    reason
                };
                notes.push(Note {
                    source,
                    field,
                    reason: format!("not carried over: {reason}"),
                });
            }
        }
        if !dropped {
            break;
        }
    }
    notes
}

/// A problem of a router's `spec.routes[i]…` is the Route's: its source, and the field path in
/// it (`spec.httpRoute…`).
fn route_source(source: &str, path: &str, routes: &[&ApiResource]) -> (String, String) {
    let parsed = path.strip_prefix("spec.routes[").and_then(|rest| {
        let (i, rest) = rest.split_once(']')?;
        let route = routes.get(i.parse::<usize>().ok()?)?;
        Some((route.source.clone(), format!("spec{rest}")))
    });
    parsed.unwrap_or_else(|| (source.to_string(), path.to_string()))
}

/// Removes the field at `path` (`spec.a.b[2].c`) from `spec`; false when it is not there.
fn remove(spec: &mut Value, path: &str) -> bool {
    let Some(rest) = path.strip_prefix("spec.") else {
        return false;
    };
    let mut steps: Vec<Step> = Vec::new();
    for segment in rest.split('.') {
        let (key, indexes) = match segment.find('[') {
            Some(i) => (&segment[..i], &segment[i..]),
            None => (segment, ""),
        };
        steps.push(Step::Key(key.to_string()));
        for index in indexes.split('[').filter(|s| !s.is_empty()) {
            match index.trim_end_matches(']').parse() {
                Ok(i) => steps.push(Step::Index(i)),
                Err(_) => return false,
            }
        }
    }
    let Some((last, parents)) = steps.split_last() else {
        return false;
    };
    let mut at = &mut *spec;
    for step in parents {
        let next = match step {
            Step::Key(k) => at.get_mut(k.as_str()),
            Step::Index(i) => at.get_mut(*i),
        };
        match next {
            Some(v) => at = v,
            None => return false,
        }
    }
    let removed = match (last, at) {
        (Step::Key(k), Value::Object(m)) => m.remove(k.as_str()).is_some(),
        (Step::Index(i), Value::Array(a)) if *i < a.len() => {
            a.remove(*i);
            true
        }
        _ => false,
    };
    // An object emptied by the removal (`serviceDiscovery: {}`) goes too: left empty it would
    // say something else (here: a node discovered by nothing named).
    if removed && let Some((parent, _)) = path.rsplit_once('.').filter(|(p, _)| *p != "spec") {
        let empty = pointer(spec, parent).is_some_and(|v| v.as_object().is_some_and(Map::is_empty));
        if empty {
            remove(spec, parent);
        }
    }
    removed
}

/// The value at `path` (`spec.a.b[2]`), if there is one.
fn pointer<'a>(spec: &'a Value, path: &str) -> Option<&'a Value> {
    let rest = path.strip_prefix("spec.")?;
    let mut at = spec;
    for segment in rest.split('.') {
        let (key, indexes) = match segment.find('[') {
            Some(i) => (&segment[..i], &segment[i..]),
            None => (segment, ""),
        };
        at = at.get(key)?;
        for index in indexes.split('[').filter(|s| !s.is_empty()) {
            at = at.get(index.trim_end_matches(']').parse::<usize>().ok()?)?;
        }
    }
    Some(at)
}

enum Step {
    Key(String),
    Index(usize),
}

/// Environment variables of App Mesh's Envoy image that trellis-proxy has no use for, and why.
fn envoy_variable(name: &str) -> Option<&'static str> {
    Some(match name {
        "APPMESH_RESOURCE_ARN" | "APPMESH_VIRTUAL_NODE_NAME" | "APPMESH_RESOURCE_CLUSTER" => {
            "the node or gateway is the proxy's --node or --gateway"
        }
        "ENVOY_LOG_LEVEL" => "trellis-proxy's log level is --log (RUST_LOG-style filter)",
        "ENABLE_ENVOY_XRAY_TRACING"
        | "XRAY_DAEMON_PORT"
        | "XRAY_SAMPLING_RATE"
        | "ENABLE_ENVOY_DATADOG_TRACING"
        | "ENABLE_ENVOY_JAEGER_TRACING" => "tracing is not in trellis-proxy yet (issue 16)",
        "ENABLE_ENVOY_STATS_TAGS"
        | "ENABLE_ENVOY_DOG_STATSD"
        | "STATSD_PORT"
        | "STATSD_ADDRESS" => {
            "trellis-proxy serves Prometheus metrics on its admin port (/metrics)"
        }
        "APPMESH_PREVIEW"
        | "APPMESH_DUALSTACK_ENDPOINT"
        | "APPMESH_FIPS_ENDPOINT"
        | "AWS_REGION"
        | "AWS_DEFAULT_REGION" => "there is no App Mesh endpoint to reach",
        _ if name.starts_with("ENVOY_") || name.starts_with("APPMESH_") => {
            "an App Mesh Envoy image setting with no trellis-proxy equivalent"
        }
        _ => return None,
    })
}

impl Converted {
    /// The container of `task` running App Mesh's Envoy, if any, and what replaces it.
    fn ecs_task(&mut self, task: &EcsTask, namespace: &str, names: &Names, ecs: &EcsOptions) {
        let containers = task
            .task
            .get("containerDefinitions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for c in &containers {
            let env: Vec<(String, String)> = c
                .get("environment")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    Some((
                        e.get("name")?.as_str()?.to_string(),
                        e.get("value")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                    ))
                })
                .collect();
            let resource = env.iter().find_map(|(k, v)| match k.as_str() {
                "APPMESH_RESOURCE_ARN" | "APPMESH_VIRTUAL_NODE_NAME" => {
                    Some((k.clone(), v.clone()))
                }
                _ => None,
            });
            let Some((variable, resource)) = resource else {
                continue;
            };
            let container = c
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("envoy")
                .to_string();
            let source = format!("{}: container {container}", task.source);
            // `…mesh/MESH/virtualNode/NAME` (an ARN, or APPMESH_VIRTUAL_NODE_NAME's form).
            let parts: Vec<&str> = resource
                .rsplit(':')
                .next()
                .unwrap_or("")
                .split('/')
                .collect();
            let (flag, kind, name, mesh) = match parts.as_slice() {
                [.., "mesh", mesh, "virtualNode", name] => {
                    ("--node", ApiKind::VirtualNode, *name, *mesh)
                }
                [.., "mesh", mesh, "virtualGateway", name] => {
                    ("--gateway", ApiKind::VirtualGateway, *name, *mesh)
                }
                _ => {
                    self.notes.push(Note {
                        source,
                        field: format!("environment.{variable}"),
                        reason: format!(
                            "{resource:?} names no virtual node or gateway (a value that could not be resolved is left empty): no replacement written"
                        ),
                    });
                    continue;
                }
            };
            let runs_as = format!("{namespace}/{}", names.get(mesh, kind, name));
            for (k, _) in &env {
                if let Some(why) = envoy_variable(k) {
                    self.notes.push(Note {
                        source: source.clone(),
                        field: format!("environment.{k}"),
                        reason: format!("not carried over: {why}"),
                    });
                }
            }
            // The ports the task's APPMESH proxy configuration captures traffic to.
            let property = |name: &str| {
                task.task
                    .pointer("/proxyConfiguration/properties")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
                    .and_then(|p| p.get("value"))
                    .and_then(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .or_else(|| v.as_u64().map(|n| n.to_string()))
                    })
            };
            let ingress = property("ProxyIngressPort").unwrap_or_else(|| "15000".into());
            let egress = property("ProxyEgressPort").unwrap_or_else(|| "15001".into());
            let mut def = Map::new();
            def.insert("name".into(), json!(container));
            def.insert("image".into(), json!(ecs.image));
            def.insert(
                "command".into(),
                json!([
                    flag,
                    runs_as,
                    "--control-plane",
                    ecs.control_plane,
                    "--ingress-addr",
                    format!("0.0.0.0:{ingress}"),
                    "--egress-addr",
                    format!("0.0.0.0:{egress}"),
                    "--admin-addr",
                    "0.0.0.0:9901"
                ]),
            );
            // Kept as Envoy had them: the user App Mesh's proxyConfiguration ignores (so the
            // proxy's own traffic is not captured), ports, resources, mounts, secrets, labels,
            // limits, logging, ordering; the environment without Envoy's own settings.
            let env_kept: Vec<&Value> = c
                .get("environment")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|e| {
                    e.get("name")
                        .and_then(Value::as_str)
                        .is_some_and(|n| envoy_variable(n).is_none())
                })
                .collect();
            if !env_kept.is_empty() {
                def.insert("environment".into(), json!(env_kept));
            }
            const KEPT: [&str; 18] = [
                "user",
                "essential",
                "portMappings",
                "cpu",
                "memory",
                "memoryReservation",
                "ulimits",
                "logConfiguration",
                "secrets",
                "mountPoints",
                "volumesFrom",
                "dockerLabels",
                "readonlyRootFilesystem",
                "dependsOn",
                "linuxParameters",
                "startTimeout",
                "stopTimeout",
                "systemControls",
            ];
            const REPLACED: [&str; 6] = [
                "name",
                "image",
                "environment",
                "healthCheck",
                "command",
                "entryPoint",
            ];
            for (key, v) in c.as_object().into_iter().flatten() {
                if KEPT.contains(&key.as_str()) {
                    def.insert(key.clone(), v.clone());
                } else if !REPLACED.contains(&key.as_str())
                    || matches!(key.as_str(), "healthCheck" | "command" | "entryPoint")
                {
                    let why = match key.as_str() {
                        "healthCheck" => "replaced by a check of trellis-proxy's /ready",
                        "command" | "entryPoint" => "replaced by trellis-proxy's command",
                        _ => {
                            "no equivalent for trellis-proxy is written: add it by hand if it still applies"
                        }
                    };
                    self.notes.push(Note {
                        source: source.clone(),
                        field: key.clone(),
                        reason: format!("not carried over: {why}"),
                    });
                }
            }
            if let (Some(ignored), Some(user)) = (
                property("IgnoredUID"),
                c.get("user").and_then(Value::as_str),
            ) && ignored != user
            {
                self.notes.push(Note {
                        source: source.clone(),
                        field: "user".into(),
                        reason: format!("the proxy configuration ignores UID {ignored} but the container runs as {user}: the proxy's own traffic would be captured"),
                    });
            }
            def.insert(
                "healthCheck".into(),
                json!({
                    "command": ["CMD-SHELL", "curl -fs http://127.0.0.1:9901/ready || exit 1"],
                    "interval": 5,
                    "timeout": 2,
                    "retries": 3,
                    "startPeriod": 10
                }),
            );
            self.ecs.push(EcsReplacement {
                source,
                container,
                runs_as: format!("{flag} {runs_as}"),
                container_definition: Value::Object(def),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> EcsOptions {
        EcsOptions {
            image: "trellis-proxy:test".into(),
            control_plane: "http://control:7070".into(),
        }
    }

    fn resource(kind: ApiKind, name: &str, parent: Option<&str>, spec: Value) -> ApiResource {
        ApiResource {
            kind,
            mesh: "shop".into(),
            name: name.into(),
            parent: parent.map(Into::into),
            spec,
            source: format!("test: {name}"),
        }
    }

    fn find<'a>(c: &'a Converted, kind: &str, name: &str) -> &'a Value {
        c.manifests
            .iter()
            .find(|m| m["kind"] == kind && m["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name} in {:#?}", c.manifests))
    }

    #[test]
    fn references_routes_and_names_take_the_crds_shape() {
        let read = Read {
            resources: vec![
                resource(
                    ApiKind::Route,
                    "to-blue",
                    Some("Color_Router"),
                    json!({
                        "httpRoute": {
                            "match": { "prefix": "/" },
                            "action": { "weightedTargets": [{ "virtualNode": "Blue_Node", "weight": 1 }] },
                            "retryPolicy": { "maxRetries": 2, "perRetryTimeout": { "unit": "ms", "value": 500 }, "httpRetryEvents": ["server-error"] }
                        },
                        "priority": 1
                    }),
                ),
                resource(
                    ApiKind::Mesh,
                    "shop",
                    None,
                    json!({ "egressFilter": { "type": "ALLOW_ALL" }, "serviceDiscovery": { "ipPreference": "IPv4_ONLY" } }),
                ),
                resource(
                    ApiKind::VirtualRouter,
                    "Color_Router",
                    None,
                    json!({ "listeners": [{ "portMapping": { "port": 8080, "protocol": "http" } }] }),
                ),
                resource(
                    ApiKind::VirtualNode,
                    "Blue_Node",
                    None,
                    json!({
                        "listeners": [{ "portMapping": { "port": 8080, "protocol": "http" } }],
                        "serviceDiscovery": { "awsCloudMap": { "namespaceName": "shop.local", "serviceName": "blue", "attributes": [{ "key": "v", "value": "1" }] } },
                        "backends": [{ "virtualService": { "virtualServiceName": "color.shop.local" } }]
                    }),
                ),
                resource(
                    ApiKind::VirtualService,
                    "color.shop.local",
                    None,
                    json!({ "provider": { "virtualRouter": { "virtualRouterName": "Color_Router" } } }),
                ),
            ],
            ..Read::default()
        };
        let c = convert(read, "shop", &options());
        assert_eq!(c.manifests[0]["kind"], "Mesh", "meshes first");
        let mesh = find(&c, "Mesh", "shop");
        assert_eq!(
            mesh["spec"]["meshServiceDiscovery"]["ipPreference"],
            "IPv4_ONLY"
        );
        let router = find(&c, "VirtualRouter", "color-router");
        assert_eq!(router["metadata"]["namespace"], "shop");
        assert_eq!(router["spec"]["awsName"], "Color_Router");
        assert_eq!(router["spec"]["meshRef"]["name"], "shop");
        let route = &router["spec"]["routes"][0];
        assert_eq!(route["name"], "to-blue");
        assert_eq!(
            route["httpRoute"]["action"]["weightedTargets"][0]["virtualNodeRef"]["name"],
            "blue-node"
        );
        assert_eq!(
            route["httpRoute"]["retryPolicy"]["perRetryTimeout"]["value"],
            500
        );
        let node = find(&c, "VirtualNode", "blue-node");
        assert_eq!(
            node["spec"]["backends"][0]["virtualService"]["virtualServiceRef"]["name"],
            "color.shop.local"
        );
        let vs = find(&c, "VirtualService", "color.shop.local");
        assert_eq!(vs["spec"]["awsName"], "color.shop.local");
        assert_eq!(
            vs["spec"]["provider"]["virtualRouter"]["virtualRouterRef"]["name"],
            "color-router"
        );
        assert!(c.notes.is_empty(), "{:#?}", c.notes);
    }

    #[test]
    fn what_trellis_refuses_or_the_crds_lack_is_dropped_and_reported() {
        let read = Read {
            resources: vec![
                resource(
                    ApiKind::Mesh,
                    "shop",
                    None,
                    json!({ "serviceDiscovery": { "ipPreference": "IPv6_PREFERRED" } }),
                ),
                resource(
                    ApiKind::VirtualNode,
                    "blue",
                    None,
                    json!({
                        "listeners": [{
                            "portMapping": { "port": 8080, "protocol": "http" },
                            "tls": { "mode": "STRICT", "certificate": { "acm": { "certificateARN": "arn:aws:acm:us-west-2:1:certificate/x" } } }
                        }],
                        "serviceDiscovery": { "dns": { "hostname": "blue.shop", "ipPreference": "IPv4_ONLY" } }
                    }),
                ),
            ],
            ..Read::default()
        };
        let c = convert(read, "default", &options());
        let node = find(&c, "VirtualNode", "blue");
        assert!(node["spec"]["listeners"][0].get("tls").is_none());
        assert_eq!(node["spec"]["listeners"][0]["portMapping"]["port"], 8080);
        assert!(
            node["spec"]["serviceDiscovery"]["dns"]
                .get("ipPreference")
                .is_none()
        );
        let fields: Vec<(&str, &str)> = c
            .notes
            .iter()
            .map(|n| (n.source.as_str(), n.field.as_str()))
            .collect();
        assert!(
            fields.contains(&("test: blue", "spec.listeners[0].tls")),
            "{:#?}",
            c.notes
        );
        assert!(
            fields.contains(&("test: blue", "spec.serviceDiscovery.dns.ipPreference")),
            "{:#?}",
            c.notes
        );
        assert!(
            fields.contains(&("test: shop", "spec.meshServiceDiscovery.ipPreference")),
            "{:#?}",
            c.notes
        );
        assert!(
            c.notes
                .iter()
                .any(|n| n.field.starts_with("spec.listeners[0].tls")
                    && n.reason.contains("AWS Certificate Manager")),
            "{:#?}",
            c.notes
        );
    }

    #[test]
    fn an_ecs_envoy_container_gets_its_trellis_proxy_replacement() {
        let read = Read {
            resources: vec![resource(ApiKind::VirtualNode, "Front", None, json!({}))],
            tasks: vec![EcsTask {
                source: "task.json".into(),
                task: json!({ "proxyConfiguration": { "type": "APPMESH", "properties": [{ "name": "ProxyIngressPort", "value": "16000" }] },
                  "containerDefinitions": [
                    { "name": "app", "image": "app:1" },
                    { "name": "envoy", "image": "public.ecr.aws/appmesh/aws-appmesh-envoy:v1.27", "user": "1337", "essential": true,
                      "portMappings": [{ "containerPort": 9901 }, { "containerPort": 15000 }, { "containerPort": 15001 }],
                      "environment": [{ "name": "APPMESH_RESOURCE_ARN", "value": "arn:aws:appmesh:us-west-2:111122223333:mesh/shop/virtualNode/Front" },
                                      { "name": "ENABLE_ENVOY_XRAY_TRACING", "value": "1" }, { "name": "MY_SETTING", "value": "x" }],
                      "mountPoints": [{ "sourceVolume": "certs", "containerPath": "/certs" }],
                      "healthCheck": { "command": ["CMD-SHELL", "curl -s http://localhost:9901/server_info"] } }
                ] }),
            }],
            ..Read::default()
        };
        let c = convert(read, "shop", &options());
        assert_eq!(c.ecs.len(), 1);
        let r = &c.ecs[0];
        assert_eq!(
            (r.container.as_str(), r.runs_as.as_str()),
            ("envoy", "--node shop/front")
        );
        let def = &r.container_definition;
        assert_eq!(def["user"], "1337");
        assert_eq!(def["image"], "trellis-proxy:test");
        assert_eq!(def["command"][1], "shop/front");
        assert_eq!(def["portMappings"][1]["containerPort"], 15000);
        assert!(
            c.notes
                .iter()
                .any(|n| n.field == "environment.ENABLE_ENVOY_XRAY_TRACING"),
            "{:#?}",
            c.notes
        );
        assert_eq!(
            def["command"][5], "0.0.0.0:16000",
            "the task's ProxyIngressPort"
        );
        assert_eq!(
            def["environment"],
            json!([{ "name": "MY_SETTING", "value": "x" }])
        );
        assert_eq!(def["mountPoints"][0]["containerPath"], "/certs");
        assert!(
            c.notes.iter().any(|n| n.field == "healthCheck"),
            "{:#?}",
            c.notes
        );
    }

    /// Names that collide once made Kubernetes names stay apart; a resource defined twice is
    /// written once (the later), noted; a renamed Mesh keeps its name as awsName; routes of
    /// one router get distinct names.
    #[test]
    fn names_stay_distinct_and_duplicates_are_one() {
        let node = |name: &str| resource(ApiKind::VirtualNode, name, None, json!({}));
        let route = |name: &str| {
            resource(
                ApiKind::Route,
                name,
                Some("r"),
                json!({ "httpRoute": {
                "match": { "prefix": "/" },
                "action": { "weightedTargets": [{ "virtualNode": "blue", "weight": 1 }] } } }),
            )
        };
        let mut again = node("blue");
        again.source = "again".into();
        let mut read = Read {
            resources: vec![
                node("Blue"),
                node("blue"),
                node("blue-2"),
                resource(
                    ApiKind::VirtualRouter,
                    "r",
                    None,
                    json!({ "listeners": [{ "portMapping": { "port": 80, "protocol": "http" } }] }),
                ),
                route("Route_A"),
                route("route-a"),
                again,
                resource(ApiKind::Mesh, "Shop_1", None, json!({})),
            ],
            ..Read::default()
        };
        for r in &mut read.resources {
            r.mesh = "Shop_1".into();
        }
        let c = convert(read, "default", &options());
        let mut nodes: Vec<&str> = c
            .manifests
            .iter()
            .filter(|m| m["kind"] == "VirtualNode")
            .map(|m| m["metadata"]["name"].as_str().unwrap())
            .collect();
        nodes.sort_unstable();
        assert_eq!(nodes, ["blue", "blue-2", "blue-3"], "{:#?}", c.manifests);
        assert!(
            c.notes
                .iter()
                .any(|n| n.reason.contains("is defined again in again")),
            "{:#?}",
            c.notes
        );
        let mesh = find(&c, "Mesh", "shop-1");
        assert_eq!(mesh["spec"]["awsName"], "Shop_1");
        let router = find(&c, "VirtualRouter", "r");
        let routes: Vec<&str> = router["spec"]["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(routes, ["route-a", "route-a-2"]);
    }

    #[test]
    fn kubernetes_names_are_rfc_1123() {
        assert_eq!(k8s_name("A..B"), "a.b");
        assert_eq!(k8s_name("x.-y_"), "x.y");
        assert_eq!(k8s_name("__"), "unnamed");
        assert_eq!(k8s_name(&"a".repeat(300)).len(), 240);
    }

    #[test]
    fn paths_are_removed_where_they_point() {
        let mut spec = json!({ "a": [{ "b": 1, "c": 2 }, { "b": 3 }] });
        assert!(remove(&mut spec, "spec.a[0].c"));
        assert!(!remove(&mut spec, "spec.a[0].c"));
        assert!(remove(&mut spec, "spec.a[1]"));
        assert_eq!(spec, json!({ "a": [{ "b": 1 }] }));
        // An object left empty goes too.
        let mut spec = json!({ "sd": { "dns": { "type": "x" } }, "keep": {} });
        assert!(remove(&mut spec, "spec.sd.dns"));
        assert_eq!(spec, json!({ "keep": {} }));
    }

    /// A required field the input lacks takes its object with it, named in the report: the
    /// output still validates.
    #[test]
    fn an_object_missing_a_required_field_is_dropped_whole() {
        let read = Read {
            resources: vec![resource(
                ApiKind::VirtualNode,
                "front",
                None,
                json!({
                    "listeners": [{ "portMapping": { "port": 8080, "protocol": "http" } }],
                    "serviceDiscovery": { "dns": { "responseType": "LOADBALANCER" } }
                }),
            )],
            ..Read::default()
        };
        let c = convert(read, "default", &options());
        let node = find(&c, "VirtualNode", "front");
        assert!(node["spec"].get("serviceDiscovery").is_none(), "{node:#}");
        let note = c
            .notes
            .iter()
            .find(|n| n.field == "spec.serviceDiscovery.dns")
            .unwrap();
        assert!(note.reason.contains("its hostname is required"), "{note}");
    }
}
