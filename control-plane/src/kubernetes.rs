//! The Kubernetes source (`trellis-control --source kubernetes`): the mesh resources come from
//! the cluster's custom resources (both API groups), Namespaces give `namespaceSelector`s their
//! labels, the registry comes from the Pods each VirtualNode's `podSelector` selects, and a
//! VirtualService reached at a Service's cluster IP gets those addresses. The control plane's
//! store is then a copy the source keeps equal to the cluster (relisted whole after any gap),
//! so nothing else writes it: the API refuses writes (`kubectl apply` is how).
//!
//! Each resource's `status` says whether it was accepted (condition `Valid`, with the problems
//! found) and how far it has converged (`convergence: N/M`, condition `Converged` with NACK
//! reasons) — what `trellis status` shows. With several replicas, only the holder of a Lease
//! writes statuses.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use futures_util::{StreamExt as _, stream::BoxStream};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::{Value, json};

use crate::{
    controller::Controller,
    model::{self, ApiVersion, Kind, Manifest, Metadata, ResourceKey, Spec},
    registry::{Instance, InstanceStatus},
    validate::Problem,
};

/// How long changes are gathered before the store is brought in line (a `kubectl apply` of a
/// file arrives as one event per object).
const SETTLE: Duration = Duration::from_millis(100);
/// How often statuses are compared with what the cluster shows (they change with proxies'
/// acknowledgements, not only with resources).
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// How soon a failed sync is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// How long a status the API server refused is left before it is tried again.
const STATUS_BACKOFF: Duration = Duration::from_secs(30);
/// An annotation too large and too private to copy into the store.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Where the source runs and who it is.
#[derive(Debug, Clone)]
pub struct Options {
    /// The namespace of the leader-election Lease (the control plane's own).
    pub lease_namespace: String,
    /// This replica's name in the Lease (its pod's name).
    pub identity: String,
    /// How long the Lease is held after each renewal (renewed three times as often): how long
    /// statuses may go unwritten after the leader dies.
    pub lease_duration: Duration,
}

/// A client from `kubeconfig`, else in-cluster configuration (or the usual kubeconfig).
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// One of the two API groups the mesh kinds are served in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Group {
    Trellis,
    AppMesh,
}

impl Group {
    fn api_version(self) -> ApiVersion {
        match self {
            Self::Trellis => ApiVersion::Trellis,
            Self::AppMesh => ApiVersion::AppMesh,
        }
    }
}

/// What the source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Watched {
    Mesh(Group, Kind),
    Namespaces,
    Pods,
    Services,
}

impl Watched {
    fn all() -> Vec<Self> {
        let mut all = vec![Self::Namespaces, Self::Pods, Self::Services];
        for group in [Group::Trellis, Group::AppMesh] {
            // App Mesh's kinds: a Canary rewrites its router's weights in the store, which
            // on Kubernetes is the API server's (not supported there yet: no CRD is served).
            for kind in Kind::ALL.into_iter().filter(|k| k.is_appmesh()) {
                all.push(Self::Mesh(group, kind));
            }
        }
        all
    }

    fn resource(self) -> ApiResource {
        let core = |kind: &str, plural: &str| ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        match self {
            Self::Namespaces => core("Namespace", "namespaces"),
            Self::Pods => core("Pod", "pods"),
            Self::Services => core("Service", "services"),
            Self::Mesh(group, kind) => {
                let api_version = group.api_version().as_str();
                let (g, v) = api_version.split_once('/').unwrap_or(("", api_version));
                ApiResource {
                    group: g.into(),
                    version: v.into(),
                    api_version: api_version.into(),
                    kind: kind.as_str().into(),
                    plural: crate::compat::crd::plural(kind),
                }
            }
        }
    }
}

/// What a Pod contributes: where it is and whether it takes requests.
#[derive(Debug, Clone, PartialEq)]
struct PodInfo {
    labels: BTreeMap<String, String>,
    ip: Option<String>,
    ready: bool,
    terminating: bool,
}

/// What a Service contributes: its cluster IPs and ports.
#[derive(Debug, Clone, PartialEq)]
struct ServiceInfo {
    addresses: Vec<String>,
}

/// The objects seen, per watch: mesh objects whole, pods and services by what matters.
#[derive(Debug, Default)]
struct Cache {
    objects: HashMap<Watched, BTreeMap<(String, String), DynamicObject>>,
    pods: BTreeMap<(String, String), PodInfo>,
    services: BTreeMap<(String, String), ServiceInfo>,
    /// Watches whose first listing is complete (or whose kind the cluster does not serve).
    listed: HashSet<Watched>,
    /// Objects of a listing in progress, replacing the watch's when it completes.
    listing: HashMap<Watched, Vec<DynamicObject>>,
}

fn object_key(o: &DynamicObject) -> (String, String) {
    (
        o.metadata.namespace.clone().unwrap_or_default(),
        o.metadata.name.clone().unwrap_or_default(),
    )
}

impl Cache {
    fn apply(&mut self, w: Watched, event: watcher::Event<DynamicObject>) {
        match event {
            watcher::Event::Init => {
                self.listing.insert(w, Vec::new());
            }
            watcher::Event::InitApply(o) => self.listing.entry(w).or_default().push(o),
            watcher::Event::InitDone => {
                let objects = self.listing.remove(&w).unwrap_or_default();
                self.replace(w, objects);
                self.listed.insert(w);
            }
            watcher::Event::Apply(o) => self.put(w, o),
            watcher::Event::Delete(o) => self.remove(w, &object_key(&o)),
        }
    }

    /// The kind is not served (its CRDs are not installed): none of it, and the watch retries.
    fn absent(&mut self, w: Watched) {
        self.replace(w, Vec::new());
        self.listed.insert(w);
    }

    fn replace(&mut self, w: Watched, objects: Vec<DynamicObject>) {
        match w {
            Watched::Pods => self.pods.clear(),
            Watched::Services => self.services.clear(),
            _ => {
                self.objects.remove(&w);
            }
        }
        for o in objects {
            self.put(w, o);
        }
    }

    fn put(&mut self, w: Watched, o: DynamicObject) {
        let key = object_key(&o);
        match w {
            Watched::Pods => {
                self.pods.insert(key, pod_info(&o));
            }
            Watched::Services => {
                self.services.insert(key, service_info(&o));
            }
            _ => {
                self.objects.entry(w).or_default().insert(key, o);
            }
        }
    }

    fn remove(&mut self, w: Watched, key: &(String, String)) {
        match w {
            Watched::Pods => {
                self.pods.remove(key);
            }
            Watched::Services => {
                self.services.remove(key);
            }
            _ => {
                if let Some(objects) = self.objects.get_mut(&w) {
                    objects.remove(key);
                }
            }
        }
    }

    fn mesh_objects(&self) -> impl Iterator<Item = (Group, Kind, &DynamicObject)> {
        self.objects.iter().flat_map(|(w, objects)| {
            let (group, kind) = match w {
                Watched::Mesh(g, k) => (Some(*g), Some(*k)),
                _ => (None, None),
            };
            objects
                .values()
                .filter_map(move |o| Some((group?, kind?, o)))
        })
    }
}

fn pod_info(o: &DynamicObject) -> PodInfo {
    let status = o.data.get("status");
    let ready = status
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .is_some_and(|conditions| {
            conditions
                .iter()
                // ContainersReady, as App Mesh's controller (a readiness gate waiting for the
                // registration would otherwise never open); Ready implies it.
                .any(|c| {
                    (c["type"] == "ContainersReady" || c["type"] == "Ready")
                        && c["status"] == "True"
                })
        });
    PodInfo {
        labels: o.metadata.labels.clone().unwrap_or_default(),
        ip: status
            .and_then(|s| s.get("podIP"))
            .and_then(Value::as_str)
            .map(str::to_string),
        ready,
        terminating: o.metadata.deletion_timestamp.is_some(),
    }
}

fn service_info(o: &DynamicObject) -> ServiceInfo {
    let spec = o.data.get("spec");
    let mut ips: Vec<&str> = spec
        .and_then(|s| s.get("clusterIPs"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if ips.is_empty() {
        ips.extend(
            spec.and_then(|s| s.get("clusterIP"))
                .and_then(Value::as_str),
        );
    }
    let ports: Vec<u64> = spec
        .and_then(|s| s.get("ports"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|p| p["port"].as_u64()).collect())
        .unwrap_or_default();
    let mut addresses = Vec::new();
    for ip in ips
        .into_iter()
        .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
    {
        for port in &ports {
            if let Ok(port) = u16::try_from(*port) {
                addresses.push(std::net::SocketAddr::new(ip, port).to_string());
            }
        }
    }
    ServiceInfo { addresses }
}

/// The Kubernetes Service a virtual service's hostname names (`svc.ns.svc.<domain>`,
/// `svc.ns.svc`, `svc.ns`), as (namespace, name).
fn service_of(hostname: &str) -> Option<(String, String)> {
    let mut labels = hostname.split('.');
    let (name, namespace) = (labels.next()?, labels.next()?);
    match labels.next() {
        None | Some("svc") => Some((namespace.to_string(), name.to_string())),
        Some(_) => None,
    }
}

/// What the cluster says, as the control plane's store should hold it.
struct Desired {
    manifests: Vec<Manifest>,
    /// Objects left out before validation (another group holds the same resource), with why.
    shadowed: BTreeMap<(Group, ResourceKey), String>,
}

fn desired(cache: &Cache) -> Desired {
    let mut manifests = Vec::new();
    let mut shadowed = BTreeMap::new();
    let mut seen: HashMap<ResourceKey, Group> = HashMap::new();
    let mut objects: Vec<(Group, Kind, &DynamicObject)> = cache.mesh_objects().collect();
    // Trellis's group first: where both groups hold a resource, Trellis's is the one run.
    objects.sort_by_key(|(g, k, o)| (*g, *k, object_key(o)));
    for (group, kind, o) in &objects {
        // Being deleted (held by a finalizer): gone for the mesh already.
        if o.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let (namespace, name) = object_key(o);
        let key = ResourceKey::new(*kind, &namespace, &name);
        if let Some(first) = seen.get(&key) {
            shadowed.insert(
                (*group, key.clone()),
                format!(
                    "the same {kind} exists in API group {}: that one is run",
                    first.api_version().as_str()
                ),
            );
            continue;
        }
        seen.insert(key.clone(), *group);
        let mut annotations = o.metadata.annotations.clone().unwrap_or_default();
        annotations.remove(LAST_APPLIED);
        let spec = o.data.get("spec").cloned().unwrap_or(Value::Null);
        if *kind == Kind::VirtualService {
            add_service_addresses(cache, &key, &spec, &mut annotations);
        }
        manifests.push(Manifest {
            api_version: group.api_version().as_str().into(),
            kind: kind.as_str().into(),
            metadata: Metadata {
                name,
                namespace: kind.namespaced().then_some(namespace),
                labels: o.metadata.labels.clone().unwrap_or_default(),
                annotations,
                generation: o.metadata.generation.and_then(|g| u64::try_from(g).ok()),
                uid: o.metadata.uid.clone(),
                ..Metadata::default()
            },
            spec,
            status: None,
        });
    }
    if let Some(namespaces) = cache.objects.get(&Watched::Namespaces) {
        for o in namespaces.values() {
            manifests.push(Manifest {
                api_version: "v1".into(),
                kind: "Namespace".into(),
                metadata: Metadata {
                    name: o.metadata.name.clone().unwrap_or_default(),
                    labels: o.metadata.labels.clone().unwrap_or_default(),
                    ..Metadata::default()
                },
                spec: Value::Null,
                status: None,
            });
        }
    }
    Desired {
        manifests,
        shadowed,
    }
}

/// A VirtualService whose hostname names a Service is reached at its cluster IPs as well.
fn add_service_addresses(
    cache: &Cache,
    key: &ResourceKey,
    spec: &Value,
    annotations: &mut BTreeMap<String, String>,
) {
    let Ok(Spec::VirtualService(vs)) = model::parse_spec(Kind::VirtualService, spec.clone()) else {
        return;
    };
    let hostname = crate::translate::hostname(key, &vs);
    let Some(service) = service_of(&hostname).and_then(|s| cache.services.get(&s)) else {
        return;
    };
    if service.addresses.is_empty() {
        return;
    }
    let mut all: Vec<String> = annotations
        .get(model::ADDRESSES_ANNOTATION)
        .map(|a| a.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_default();
    all.retain(|a| !a.is_empty());
    for a in &service.addresses {
        if !all.contains(a) {
            all.push(a.clone());
        }
    }
    annotations.insert(model::ADDRESSES_ANNOTATION.into(), all.join(","));
}

/// The registry from Pods: each VirtualNode with a `podSelector` and a registry (or Cloud Map)
/// service discovery has its namespace's matching pods as instances at their pod IP and the
/// node's listener port — ready ones healthy, terminating ones draining, others left out.
fn instances(
    cache: &Cache,
    manifests: &[Manifest],
    state: &crate::validate::State,
) -> Vec<Instance> {
    let mut out = Vec::new();
    for m in manifests.iter().filter(|m| m.kind == "VirtualNode") {
        // Admitted as an apply would (App Mesh's ARNs made references); a node that is not
        // (invalid elsewhere) still registers its pods when its spec parses.
        let spec = crate::validate::admit(m.clone(), None)
            .map(|r| r.spec)
            .or_else(|_| model::parse_spec(Kind::VirtualNode, m.spec.clone()));
        let Ok(Spec::VirtualNode(node)) = spec else {
            continue;
        };
        let (Some(selector), Some(sd)) = (&node.pod_selector, &node.service_discovery) else {
            continue;
        };
        let Some(reg) = sd.registry.as_ref().or(sd.aws_cloud_map.as_ref()) else {
            continue;
        };
        let Some(port) = node
            .listeners
            .first()
            .and_then(|l| u16::try_from(l.port_mapping.port).ok())
        else {
            continue;
        };
        let namespace = m.metadata.namespace.clone().unwrap_or_default();
        for ((pod_ns, pod), info) in &cache.pods {
            if *pod_ns != namespace || !selector.matches(&info.labels) {
                continue;
            }
            let (Some(ip), true) = (&info.ip, info.ready || info.terminating) else {
                continue;
            };
            // As App Mesh's controller registered them (later ones win): the pod's labels, the
            // node's own attributes (so its selection finds them), the address and port, where
            // the pod is, and the mesh and node.
            let mut fixed: Vec<(String, String)> = reg
                .attributes
                .pairs()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let family = if ip.contains(':') {
                "AWS_INSTANCE_IPV6"
            } else {
                "AWS_INSTANCE_IPV4"
            };
            fixed.extend([
                (family.to_string(), ip.clone()),
                ("AWS_INSTANCE_PORT".into(), port.to_string()),
                ("k8s.io/pod".into(), pod.clone()),
                ("k8s.io/namespace".into(), pod_ns.clone()),
                (
                    "appmesh.k8s.aws/virtualNode".into(),
                    m.metadata.name.clone(),
                ),
            ]);
            let key = ResourceKey::new(Kind::VirtualNode, &namespace, &m.metadata.name);
            if let Some(mesh) = state
                .get(&key)
                .and_then(|r| crate::validate::mesh_of(state, r))
            {
                fixed.push(("appmesh.k8s.aws/mesh".into(), mesh.to_string()));
            }
            let room = crate::registry::MAX_ATTRIBUTES.saturating_sub(fixed.len());
            let labels = info
                .labels
                .iter()
                .filter(|(k, _)| !fixed.iter().any(|(f, _)| f == *k));
            if labels.clone().count() > room {
                tracing::warn!(pod = %pod, namespace = %pod_ns, labels = info.labels.len(), "more labels than an instance has attributes: the first {room} by name are kept");
            }
            let mut attributes: BTreeMap<String, String> = labels
                .take(room)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            attributes.extend(fixed);
            // Unique within a registry service, which nodes of several namespaces may share.
            let id = format!("{pod}.{pod_ns}");
            if out.iter().any(|i: &Instance| {
                i.id == id && i.namespace == reg.namespace_name && i.service == reg.service_name
            }) {
                tracing::warn!(pod = %pod, namespace = %pod_ns, node = %m.metadata.name, "the pod is selected by several nodes registering it in one service: registered once");
                continue;
            }
            out.push(Instance {
                namespace: reg.namespace_name.clone(),
                service: reg.service_name.clone(),
                id,
                address: ip.clone(),
                port,
                attributes,
                status: if info.terminating {
                    InstanceStatus::Draining
                } else {
                    InstanceStatus::Healthy
                },
                ttl_seconds: None,
                lease: None,
            });
        }
    }
    out
}

/// One event of one watch.
type WatchEvent = (
    Watched,
    Result<watcher::Event<DynamicObject>, watcher::Error>,
);

/// Starts the source: watches, keeps the store equal to the cluster, writes statuses while it
/// holds the Lease.
pub fn spawn(
    client: Client,
    controller: Arc<Controller>,
    options: Options,
) -> tokio::task::JoinHandle<()> {
    controller.set_external_source("kubernetes");
    controller.set_token_reviewer(Arc::new(Reviewer {
        client: client.clone(),
    }));
    let leader = Arc::new(Leadership::default());
    tokio::spawn(lead(client.clone(), options, leader.clone()));
    tokio::spawn(run(client, controller, leader))
}

async fn run(client: Client, controller: Arc<Controller>, leader: Arc<Leadership>) {
    let watched = Watched::all();
    let streams: Vec<BoxStream<'static, WatchEvent>> = watched
        .iter()
        .map(|&w| {
            let resource = w.resource();
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
            watcher(api, watcher::Config::default())
                .default_backoff()
                .map(move |e| (w, e))
                .boxed()
        })
        .collect();
    let mut events = futures_util::stream::select_all(streams);
    let mut cache = Cache::default();
    let mut problems: BTreeMap<ResourceKey, Vec<Problem>> = BTreeMap::new();
    let mut shadowed = BTreeMap::new();
    // When the store is to be brought in line: set by the first change after a sync, never
    // pushed back by later ones (a busy cluster's pods change all the time).
    let mut due: Option<Instant> = None;
    let mut statuses = tokio::time::interval(STATUS_EVERY);
    statuses.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut writer = StatusWriter::default();
    loop {
        let settle = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let listed = cache.listed.len() == watched.len();
        tokio::select! {
            event = events.next() => {
                let Some((w, event)) = event else { break };
                match event {
                    Ok(e) => {
                        cache.apply(w, e);
                        due.get_or_insert_with(|| Instant::now() + SETTLE);
                    }
                    Err(e) if not_served(&e) => {
                        if !cache.listed.contains(&w) {
                            tracing::info!(kind = ?w, "not served by this cluster (its CRD is not installed)");
                            cache.absent(w);
                            due.get_or_insert_with(|| Instant::now() + SETTLE);
                        }
                    }
                    Err(e) => tracing::warn!(kind = ?w, error = %e, "watch failed; retrying"),
                }
            }
            () = settle, if listed => {
                due = None;
                let d = desired(&cache);
                // The registry from the manifests (the nodes' selectors and attributes, valid or
                // not: other nodes may call their pods) and the stored state (their meshes).
                let registry = |state: &crate::validate::State| instances(&cache, &d.manifests, state);
                match controller.sync_resources(d.manifests.clone()).await {
                    Ok(p) => problems = p,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot bring the store in line with the cluster; retrying");
                        due = Some(Instant::now() + RETRY);
                        continue;
                    }
                }
                shadowed = d.shadowed;
                let wanted = registry(&controller.view().state);
                match controller.sync_instances(wanted).await {
                    Ok(refused) => {
                        for (i, why) in refused {
                            tracing::warn!(pod = %i.id, namespace = %i.namespace, reason = %why, "pod left out of the registry");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot bring the registry in line with the pods; retrying");
                        due = Some(Instant::now() + RETRY);
                    }
                }
            }
            // Not while a sync is due: the problems and the store would be older than the
            // objects.
            _ = statuses.tick(), if listed && due.is_none() => {
                if leader.holds() {
                    writer.write(&client, &controller, &cache, &problems, &shadowed).await;
                } else {
                    writer.written.clear();
                }
            }
        }
    }
}

/// Whether a watch failed because the cluster does not serve the kind (404).
fn not_served(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 404,
        _ => false,
    }
}

/// Writes statuses: what was written (so it is not written again), and when a refused one may
/// be tried again.
#[derive(Default)]
struct StatusWriter {
    written: HashMap<(Group, ResourceKey), Value>,
    refused: HashMap<(Group, ResourceKey), Instant>,
}

impl StatusWriter {
    /// The status each mesh object should show, written where it differs from what it shows.
    async fn write(
        &mut self,
        client: &Client,
        controller: &Controller,
        cache: &Cache,
        problems: &BTreeMap<ResourceKey, Vec<Problem>>,
        shadowed: &BTreeMap<(Group, ResourceKey), String>,
    ) {
        // Every control plane's proxies where several share a store (etcd).
        let status = controller.status_all().await;
        let usage: HashMap<(String, String, String), (usize, usize)> = status
            .resources
            .iter()
            .map(|r| {
                (
                    (r.kind.clone(), r.namespace.clone(), r.name.clone()),
                    (r.proxies, r.applied),
                )
            })
            .collect();
        let view = controller.view();
        let now = Instant::now();
        for (group, kind, o) in cache.mesh_objects() {
            if o.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let (namespace, name) = object_key(o);
            let key = ResourceKey::new(kind, &namespace, &name);
            let id = (group, key.clone());
            if self.refused.get(&id).is_some_and(|until| now < *until) {
                continue;
            }
            let stored = view.state.get(&key);
            let invalid: Option<(&str, String)> = if let Some(why) = shadowed.get(&id) {
                Some(("Shadowed", why.clone()))
            } else if let Some(p) = problems.get(&key) {
                let text = p
                    .iter()
                    .map(|p| format!("{}: {}", p.path, p.reason))
                    .collect::<Vec<_>>()
                    .join("; ");
                Some(("Invalid", text))
            } else if stored.is_none() {
                // Not in the store yet (a sync is due): nothing to say until it is.
                continue;
            } else {
                None
            };
            let mut conditions = Vec::new();
            // A merge patch leaves out what it does not name: null removes.
            let mut convergence = Value::Null;
            match &invalid {
                Some((reason, message)) => {
                    conditions.push(condition("Valid", "False", reason, message));
                }
                None => {
                    conditions.push(condition(
                        "Valid",
                        "True",
                        "Accepted",
                        "accepted by the control plane",
                    ));
                    let (proxies, applied) = usage
                        .get(&(
                            kind.as_str().to_string(),
                            key.namespace.clone(),
                            name.clone(),
                        ))
                        .copied()
                        .unwrap_or((0, 0));
                    convergence = json!(format!("{applied}/{proxies}"));
                    let nacks: Vec<String> = status
                        .proxies
                        .iter()
                        .filter(|p| p.uses.contains(&key))
                        .filter_map(|p| {
                            Some(format!("{}: {}", p.instance, p.nack_reason.as_ref()?))
                        })
                        .collect();
                    conditions.push(if proxies == 0 {
                        condition(
                            "Converged",
                            "Unknown",
                            "NoProxies",
                            "no connected proxy uses it",
                        )
                    } else if applied == proxies {
                        condition(
                            "Converged",
                            "True",
                            "Applied",
                            &format!("applied by {applied} of {proxies} proxies"),
                        )
                    } else if !nacks.is_empty() {
                        condition("Converged", "False", "Rejected", &nacks.join("; "))
                    } else {
                        condition(
                            "Converged",
                            "False",
                            "Pending",
                            &format!("applied by {applied} of {proxies} proxies"),
                        )
                    });
                }
            }
            // The generation the store runs (checked, when it is invalid).
            let generation = stored
                .and_then(|r| r.metadata.generation)
                .or_else(|| o.metadata.generation.and_then(|g| u64::try_from(g).ok()));
            let mut desired = json!({ "conditions": conditions, "convergence": convergence });
            if let Some(g) = generation {
                desired["observedGeneration"] = json!(g);
            }
            let current = o.data.get("status");
            if same_status(current, &desired) || self.written.get(&id) == Some(&desired) {
                continue;
            }
            // A condition whose status stays keeps the time it last changed.
            let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
            let mut patch = desired.clone();
            if let Some(conds) = patch["conditions"].as_array_mut() {
                for c in conds {
                    let before = current
                        .and_then(|s| s["conditions"].as_array())
                        .and_then(|cs| cs.iter().find(|b| b["type"] == c["type"]));
                    c["lastTransitionTime"] = match before {
                        Some(b) if b["status"] == c["status"] => b["lastTransitionTime"].clone(),
                        _ => json!(stamp),
                    };
                }
            }
            let resource = Watched::Mesh(group, kind).resource();
            let api: Api<DynamicObject> = if kind.namespaced() {
                Api::namespaced_with(client.clone(), &namespace, &resource)
            } else {
                Api::all_with(client.clone(), &resource)
            };
            let patch = Patch::Merge(json!({ "status": patch }));
            match api
                .patch_status(&name, &PatchParams::default(), &patch)
                .await
            {
                Ok(_) => {
                    self.refused.remove(&id);
                    self.written.insert(id, desired);
                }
                Err(e) => {
                    tracing::warn!(resource = %key, error = %e, retry_in = ?STATUS_BACKOFF, "the API server refused its status");
                    self.refused.insert(id, now + STATUS_BACKOFF);
                }
            }
        }
    }
}

fn condition(kind: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({ "type": kind, "status": status, "reason": reason, "message": message })
}

fn strip_times(status: &mut Value) {
    if let Some(conds) = status["conditions"].as_array_mut() {
        for c in conds {
            if let Some(c) = c.as_object_mut() {
                c.remove("lastTransitionTime");
            }
        }
    }
}

/// Whether the object already shows `desired` (times aside; a null field is one it lacks).
fn same_status(current: Option<&Value>, desired: &Value) -> bool {
    let Some(current) = current else { return false };
    let mut current = current.clone();
    strip_times(&mut current);
    let mut desired = desired.clone();
    if let Some(d) = desired.as_object_mut() {
        d.retain(|_, v| !v.is_null());
    }
    current == desired
}

/// Whether this replica holds the Lease: until a deadline short of the Lease's end, moved on
/// by each renewal, so a replica that cannot renew stops writing before another may take over.
#[derive(Debug, Default)]
struct Leadership {
    until: parking_lot::Mutex<Option<Instant>>,
}

impl Leadership {
    fn holds(&self) -> bool {
        self.until
            .lock()
            .is_some_and(|until| Instant::now() < until)
    }
}

/// Leader election on a `coordination.k8s.io/v1` Lease named `trellis-control`: taken when
/// free, or when its holder has not renewed it for its duration as this replica observed it
/// (its own clock, not the holder's timestamps: clocks may differ); renewed while held.
async fn lead(client: Client, options: Options, leader: Arc<Leadership>) {
    let resource = ApiResource {
        group: "coordination.k8s.io".into(),
        version: "v1".into(),
        api_version: "coordination.k8s.io/v1".into(),
        kind: "Lease".into(),
        plural: "leases".into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client, &options.lease_namespace, &resource);
    let renew = options.lease_duration / 3;
    let mut seen: Option<(String, Instant)> = None;
    let mut held = false;
    loop {
        let started = Instant::now();
        let attempt = try_lease(&api, &resource, &options, &mut seen);
        let now_held = match tokio::time::timeout(renew, attempt).await {
            Ok(Ok(held)) => held,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "leader election: the Lease cannot be read or written");
                false
            }
            Err(_) => {
                tracing::warn!("leader election: the API server did not answer in time");
                false
            }
        };
        // Held until two thirds of the duration from when the renewal was sent.
        *leader.until.lock() = now_held.then(|| started + options.lease_duration * 2 / 3);
        if now_held != held {
            tracing::info!(identity = %options.identity, leader = now_held, "leader election");
            held = now_held;
        }
        tokio::time::sleep_until(started + renew).await;
    }
}

const LEASE_NAME: &str = "trellis-control";

async fn try_lease(
    api: &Api<DynamicObject>,
    resource: &ApiResource,
    options: &Options,
    seen: &mut Option<(String, Instant)>,
) -> Result<bool, kube::Error> {
    let me = options.identity.as_str();
    let stamp = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    let duration = options.lease_duration.as_secs().max(1);
    let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
        let mut lease = DynamicObject::new(LEASE_NAME, resource);
        lease.data = json!({ "spec": {
            "holderIdentity": me, "leaseDurationSeconds": duration,
            "acquireTime": stamp, "renewTime": stamp, "leaseTransitions": 0,
        }});
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.data.get("spec").cloned().unwrap_or(Value::Null);
    let holder = spec["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let held_for = Duration::from_secs(spec["leaseDurationSeconds"].as_u64().unwrap_or(duration));
    // Expired when the Lease has not changed for its duration since this replica first saw
    // it as it is.
    let version = lease.metadata.resource_version.clone().unwrap_or_default();
    let now = Instant::now();
    let since = match seen {
        Some((v, at)) if *v == version => *at,
        _ => {
            *seen = Some((version, now));
            now
        }
    };
    let expired = now.duration_since(since) >= held_for;
    if holder != me && !holder.is_empty() && !expired {
        return Ok(false);
    }
    let mut spec = spec;
    if holder != me {
        spec["acquireTime"] = json!(stamp);
        spec["leaseTransitions"] = json!(spec["leaseTransitions"].as_u64().unwrap_or(0) + 1);
    }
    spec["holderIdentity"] = json!(me);
    spec["leaseDurationSeconds"] = json!(duration);
    spec["renewTime"] = json!(stamp);
    lease.data["spec"] = spec;
    // The resourceVersion read makes the replace conditional: two replicas cannot both win.
    match api
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Service-account tokens, reviewed by the API server (TokenReview, audience `trellis`): the
/// token must be bound to a pod (projected tokens are) of the node's namespace, still there
/// with the token's uid, whose labels the node's `podSelector` selects.
struct Reviewer {
    client: Client,
}

impl std::fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reviewer").finish_non_exhaustive()
    }
}

impl crate::controller::TokenReviewer for Reviewer {
    fn recognizes(&self, token: &str) -> bool {
        // A JWT: three base64url parts, a JSON header.
        token.starts_with("eyJ") && token.split('.').count() == 3
    }

    fn review<'a>(
        &'a self,
        token: &'a str,
        node: &'a ResourceKey,
        view: Arc<crate::view::View>,
    ) -> crate::store::BoxFuture<'a, Result<(), crate::controller::TokenRefused>> {
        Box::pin(self.check(token, node, view))
    }
}

impl Reviewer {
    async fn check(
        &self,
        token: &str,
        node: &ResourceKey,
        view: Arc<crate::view::View>,
    ) -> Result<(), crate::controller::TokenRefused> {
        use crate::controller::TokenRefused::{Denied, Unauthenticated, Unavailable};
        let resource = ApiResource {
            group: "authentication.k8s.io".into(),
            version: "v1".into(),
            api_version: "authentication.k8s.io/v1".into(),
            kind: "TokenReview".into(),
            plural: "tokenreviews".into(),
        };
        let mut review = DynamicObject::new("", &resource);
        review.metadata.name = None;
        review.data =
            json!({ "spec": { "token": token, "audiences": [crate::inject::TOKEN_AUDIENCE] } });
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Unavailable(format!("the Kubernetes API cannot review the token: {e}")))?;
        let status = reviewed.data.get("status").cloned().unwrap_or(Value::Null);
        if status["authenticated"] != true {
            let why = status["error"].as_str().unwrap_or("not authenticated");
            return Err(Unauthenticated(format!(
                "the Kubernetes API does not accept the service-account token: {why}"
            )));
        }
        // The audiences the review vouches for must include ours (an API server that ignores
        // the requested ones answers with its own).
        let audiences = status["audiences"].as_array();
        if !audiences.is_some_and(|a| a.iter().any(|a| a == crate::inject::TOKEN_AUDIENCE)) {
            return Err(Unauthenticated(format!(
                "the service-account token is not for audience {:?}",
                crate::inject::TOKEN_AUDIENCE
            )));
        }
        let user = &status["user"];
        let username = user["username"].as_str().unwrap_or_default();
        let Some(account) = username.strip_prefix("system:serviceaccount:") else {
            return Err(Denied(format!("{username:?} is not a service account")));
        };
        let (namespace, _) = account.split_once(':').unwrap_or((account, ""));
        let first = |k: &str| user["extra"][k][0].as_str().map(str::to_string);
        let (Some(pod), Some(pod_uid)) = (
            first("authentication.kubernetes.io/pod-name"),
            first("authentication.kubernetes.io/pod-uid"),
        ) else {
            return Err(Denied(
                "the token is not bound to a pod: mount a projected service-account token (audience trellis)".into(),
            ));
        };
        if namespace != node.namespace {
            return Err(Denied(format!(
                "the token is for pod {namespace}/{pod}, not of {node}'s namespace"
            )));
        }
        let Some(Spec::VirtualNode(spec)) = view.state.get(node).map(|r| &r.spec) else {
            return Err(Denied(format!(
                "{node} is not a VirtualNode of the mesh (gateways join with a join token)"
            )));
        };
        let Some(selector) = &spec.pod_selector else {
            return Err(Denied(format!(
                "{node} has no podSelector: no pod's token names it"
            )));
        };
        let pods: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &Watched::Pods.resource());
        let found = pods
            .get_opt(&pod)
            .await
            .map_err(|e| {
                Unavailable(format!(
                    "the Kubernetes API cannot say where pod {pod} is: {e}"
                ))
            })?
            .ok_or_else(|| Denied(format!("pod {namespace}/{pod} of the token is gone")))?;
        if found.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(Denied(format!(
                "pod {namespace}/{pod} of the token is gone (another has its name)"
            )));
        }
        let labels = found.metadata.labels.unwrap_or_default();
        if !selector.matches(&labels) {
            return Err(Denied(format!(
                "pod {namespace}/{pod} is not selected by {node}'s podSelector"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_found_from_hostnames() {
        assert_eq!(
            service_of("reviews.shop.svc.cluster.local"),
            Some(("shop".into(), "reviews".into()))
        );
        assert_eq!(
            service_of("reviews.shop"),
            Some(("shop".into(), "reviews".into()))
        );
        assert_eq!(service_of("reviews.example.com"), None);
        assert_eq!(service_of("reviews"), None);
    }
}
