//! The controller: keeps a view of the store (resources and instances), applies validated
//! changes to the store, translates snapshots per proxy, and holds the connected proxies'
//! status (`status.rs`).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    metrics::ControlMetrics,
    model::{Kind, Manifest, ResourceKey},
    registry::{self, Instance, InstanceStatus},
    status::{Proxies, Status},
    store::{Expect, Op, Store, StoreError},
    translate::{self, Translated},
    validate::{self, Problem, Resource, State},
    verify,
};

/// How long a burst of store changes is gathered before proxies are recomputed, at most.
const COALESCE_QUIET: Duration = Duration::from_millis(10);
const COALESCE_MAX: Duration = Duration::from_millis(100);

/// The state the control plane serves, as of one store revision.
#[derive(Debug, Default)]
pub struct View {
    pub revision: u64,
    pub state: State,
    /// Store revision of each resource.
    pub revisions: HashMap<ResourceKey, u64>,
    pub instances: Vec<Instance>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
    #[error("{0} not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `apply` or `delete` did to one resource.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Applied {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Configured,
    Unchanged,
    Deleted,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Configured => "configured",
            Self::Unchanged => "unchanged",
            Self::Deleted => "deleted",
        }
    }
}

/// Translated sidecar snapshots of one view revision, by node.
type SnapshotCache = (u64, HashMap<ResourceKey, Option<Arc<Translated>>>);

pub struct Controller {
    store: Arc<dyn Store>,
    view: watch::Sender<Arc<View>>,
    /// Serialises read-validate-write cycles.
    writer: tokio::sync::Mutex<()>,
    proxies: Proxies,
    cache: Mutex<SnapshotCache>,
    metrics: ControlMetrics,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Reads the whole view from the store.
async fn load(store: &dyn Store) -> Result<View, StoreError> {
    let resources = store.list("resources/").await?;
    let instances = store.list(registry::PREFIX).await?;
    let mut view = View {
        revision: resources.revision.max(instances.revision),
        ..View::default()
    };
    for kv in resources.items {
        let Some(key) = ResourceKey::from_store_key(&kv.key) else {
            continue;
        };
        let parsed = serde_json::from_slice::<Manifest>(&kv.value)
            .map_err(|e| e.to_string())
            .and_then(|m| validate::admit(m, None).map_err(|p| format!("{p:?}")));
        match parsed {
            Ok(r) => {
                view.revisions.insert(key.clone(), kv.mod_revision);
                view.state.insert(key, r);
            }
            Err(e) => tracing::warn!(key = %kv.key, error = %e, "skipping an unreadable resource"),
        }
    }
    for kv in instances.items {
        match serde_json::from_slice::<Instance>(&kv.value) {
            Ok(mut i) => {
                i.lease = kv.lease;
                view.instances.push(i);
            }
            Err(e) => tracing::warn!(key = %kv.key, error = %e, "skipping an unreadable instance"),
        }
    }
    Ok(view)
}

impl Controller {
    /// Loads the view and starts following the store.
    pub async fn start(store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let view = load(store.as_ref()).await?;
        let revision = view.revision;
        let (tx, _) = watch::channel(Arc::new(view));
        let metrics = ControlMetrics::new()
            .map_err(|e| StoreError::Backend(format!("cannot register metrics: {e}")))?;
        let this = Arc::new(Self {
            store,
            view: tx,
            writer: tokio::sync::Mutex::new(()),
            proxies: Proxies::default(),
            cache: Mutex::new((0, HashMap::new())),
            metrics,
        });
        tokio::spawn(follow(Arc::downgrade(&this), revision));
        Ok(this)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.view.subscribe()
    }

    /// Re-reads the store now (after a write, so callers see their own change).
    async fn refresh(&self) -> Result<(), StoreError> {
        let view = load(self.store.as_ref()).await?;
        self.view.send_if_modified(|current| {
            if view.revision > current.revision {
                *current = Arc::new(view);
                true
            } else {
                false
            }
        });
        Ok(())
    }

    /// Validates and applies manifests atomically: all of them, or nothing and every problem.
    pub async fn apply(&self, manifests: Vec<Manifest>) -> Result<Vec<Applied>, ControlError> {
        let started = std::time::Instant::now();
        let _writer = self.writer.lock().await;
        let view = load(self.store.as_ref()).await?;
        let mut problems = Vec::new();
        let mut incoming: Vec<Resource> = Vec::new();
        let mut origin = HashMap::new();
        for (i, m) in manifests.into_iter().enumerate() {
            match validate::admit(m, Some(i)) {
                Ok(r) => {
                    if let Some(first) = origin.insert(r.key.clone(), i) {
                        problems.push(Problem {
                            document: Some(i),
                            resource: Some(r.key.to_string()),
                            path: "metadata.name".into(),
                            reason: format!("also defined in document {first}"),
                        });
                    }
                    incoming.push(r);
                }
                Err(p) => problems.extend(p),
            }
        }
        let mut next = view.state.clone();
        for r in &incoming {
            next.insert(r.key.clone(), r.clone());
        }
        problems.extend(validate::check(&next, &origin));
        if !problems.is_empty() {
            problems.sort_by(|a, b| a.document.cmp(&b.document).then(a.path.cmp(&b.path)));
            return Err(ControlError::Invalid(problems));
        }
        let mut ops = Vec::new();
        let mut results = Vec::new();
        for r in incoming {
            let existing = view.state.get(&r.key);
            let action = match existing {
                None => Action::Created,
                Some(old) if same(&old.manifest, &r.manifest) => Action::Unchanged,
                Some(_) => Action::Configured,
            };
            results.push(Applied {
                kind: r.key.kind.to_string(),
                namespace: r.key.namespace.clone(),
                name: r.key.name.clone(),
                action,
            });
            if action == Action::Unchanged {
                continue;
            }
            let expect = view
                .revisions
                .get(&r.key)
                .map_or(Expect::Absent, |rev| Expect::Revision(*rev));
            let mut manifest = r.manifest;
            manifest.metadata.resource_version = None;
            manifest.metadata.creation_timestamp.get_or_insert_with(|| {
                humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
            });
            if let Some(old) = existing {
                manifest.metadata.creation_timestamp =
                    old.manifest.metadata.creation_timestamp.clone();
            }
            ops.push(Op::Put {
                key: r.key.store_key(),
                value: serde_json::to_vec(&manifest)
                    .map_err(|e| StoreError::Backend(e.to_string()))?,
                expect,
                lease: None,
            });
        }
        if !ops.is_empty() {
            self.store.apply(ops).await?;
            self.refresh().await?;
        }
        self.metrics
            .apply_latency
            .observe(started.elapsed().as_secs_f64());
        Ok(results)
    }

    /// Deletes resources if what remains is still valid (nothing else refers to them).
    pub async fn delete(&self, keys: Vec<ResourceKey>) -> Result<Vec<Applied>, ControlError> {
        let _writer = self.writer.lock().await;
        let view = load(self.store.as_ref()).await?;
        let mut next = view.state.clone();
        let mut ops = Vec::new();
        let mut results = Vec::new();
        for key in &keys {
            if next.remove(key).is_none() {
                return Err(ControlError::NotFound(key.to_string()));
            }
            let expect = view
                .revisions
                .get(key)
                .map_or(Expect::Any, |r| Expect::Revision(*r));
            ops.push(Op::Delete {
                key: key.store_key(),
                expect,
            });
            results.push(Applied {
                kind: key.kind.to_string(),
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                action: Action::Deleted,
            });
        }
        let problems = validate::check(&next, &HashMap::new());
        if !problems.is_empty() {
            return Err(ControlError::Invalid(problems));
        }
        self.store.apply(ops).await?;
        self.refresh().await?;
        Ok(results)
    }

    /// Registers (or replaces) an instance; with a TTL it lives while heartbeats come.
    pub async fn register(&self, mut instance: Instance) -> Result<Instance, ControlError> {
        instance.validate().map_err(|(path, reason)| {
            ControlError::Invalid(vec![Problem {
                document: None,
                resource: None,
                path,
                reason,
            }])
        })?;
        let lease = match instance.ttl_seconds {
            Some(ttl) => Some(self.store.grant_lease(Duration::from_secs(ttl)).await?),
            None => None,
        };
        instance.lease = None;
        let value =
            serde_json::to_vec(&instance).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.store
            .apply(vec![Op::Put {
                key: instance.store_key(),
                value,
                expect: Expect::Any,
                lease,
            }])
            .await?;
        self.refresh().await?;
        instance.lease = lease;
        Ok(instance)
    }

    async fn instance(
        &self,
        namespace: &str,
        service: &str,
        id: &str,
    ) -> Result<(Instance, u64), ControlError> {
        let key = registry::key(namespace, service, id);
        let kv = self.store.get(&key).await?.ok_or_else(|| {
            ControlError::NotFound(format!("instance {namespace}/{service}/{id}"))
        })?;
        let mut i: Instance =
            serde_json::from_slice(&kv.value).map_err(|e| StoreError::Backend(e.to_string()))?;
        i.lease = kv.lease;
        Ok((i, kv.mod_revision))
    }

    pub async fn heartbeat(
        &self,
        namespace: &str,
        service: &str,
        id: &str,
    ) -> Result<(), ControlError> {
        let (i, _) = self.instance(namespace, service, id).await?;
        match i.lease {
            Some(lease) => Ok(self.store.keep_alive(lease).await?),
            None => Ok(()),
        }
    }

    /// Marks an instance draining: no new requests go to it; in-flight ones finish.
    pub async fn drain(
        &self,
        namespace: &str,
        service: &str,
        id: &str,
    ) -> Result<Instance, ControlError> {
        let (mut i, revision) = self.instance(namespace, service, id).await?;
        i.status = InstanceStatus::Draining;
        let lease = i.lease.take();
        let value = serde_json::to_vec(&i).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.store
            .apply(vec![Op::Put {
                key: i.store_key(),
                value,
                expect: Expect::Revision(revision),
                lease,
            }])
            .await?;
        self.refresh().await?;
        i.lease = lease;
        Ok(i)
    }

    pub async fn deregister(
        &self,
        namespace: &str,
        service: &str,
        id: &str,
    ) -> Result<(), ControlError> {
        let (i, revision) = self.instance(namespace, service, id).await?;
        self.store
            .apply(vec![Op::Delete {
                key: i.store_key(),
                expect: Expect::Revision(revision),
            }])
            .await?;
        self.refresh().await?;
        Ok(())
    }

    /// The snapshot the proxy of `node` (a VirtualNode's sidecar or a VirtualGateway's gateway)
    /// should run now, cached per view revision.
    /// Translating and compiling is CPU work: call it off the async threads, and the cache is
    /// not locked while it runs (two proxies of one node may both compute it once).
    pub fn snapshot_for(&self, view: &View, node: &ResourceKey) -> Option<Arc<Translated>> {
        if let Some(cached) = self.cached_snapshot(view, node) {
            return cached;
        }
        let translated = match node.kind {
            Kind::VirtualNode => translate::sidecar(&view.state, &view.instances, node),
            Kind::VirtualGateway => translate::gateway(&view.state, &view.instances, node),
            _ => None,
        }
        .map(|t| Arc::new(verify::verify(t, node)));
        let mut cache = self.cache.lock();
        if cache.0 < view.revision {
            *cache = (view.revision, HashMap::new());
        }
        if cache.0 == view.revision {
            cache.1.insert(node.clone(), translated.clone());
        }
        translated
    }

    /// The snapshot of `node` at `view`'s revision, if it was already computed (cheap).
    pub fn cached_snapshot(
        &self,
        view: &View,
        node: &ResourceKey,
    ) -> Option<Option<Arc<Translated>>> {
        let cache = self.cache.lock();
        (cache.0 == view.revision)
            .then(|| cache.1.get(node).cloned())
            .flatten()
    }

    /// The connected proxies and what they run.
    pub fn proxies(&self) -> &Proxies {
        &self.proxies
    }

    pub fn metrics(&self) -> &ControlMetrics {
        &self.metrics
    }

    /// The metrics in the Prometheus text format, with the proxy gauges read now.
    pub fn encode_metrics(&self) -> Result<Vec<u8>, prometheus::Error> {
        let (connected, out_of_sync) = self.proxies.counts();
        self.metrics
            .connected
            .set(i64::try_from(connected).unwrap_or(i64::MAX));
        self.metrics
            .out_of_sync
            .set(i64::try_from(out_of_sync).unwrap_or(i64::MAX));
        self.metrics.encode()
    }

    pub fn status(&self) -> Status {
        let view = self.view();
        self.proxies.status(view.revision, view.state.keys())
    }

    /// The resources of `kind` (all namespaces when `namespace` is None), with status.
    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> Vec<Manifest> {
        let view = self.view();
        let status = self.status();
        view.state
            .iter()
            .filter(|(k, _)| {
                k.kind == kind && namespace.is_none_or(|ns| !kind.namespaced() || k.namespace == ns)
            })
            .map(|(k, r)| {
                let mut m = r.manifest.clone();
                m.metadata.resource_version = view.revisions.get(k).map(ToString::to_string);
                let s = status.resources.iter().find(|s| {
                    s.kind == k.kind.as_str() && s.namespace == k.namespace && s.name == k.name
                });
                if let Some(s) = s {
                    m.status =
                        Some(serde_json::json!({ "proxies": s.proxies, "applied": s.applied }));
                }
                m
            })
            .collect()
    }
}

/// Whether two manifests say the same thing (ignoring server-set metadata).
fn same(a: &Manifest, b: &Manifest) -> bool {
    a.spec == b.spec
        && a.metadata.labels == b.metadata.labels
        && a.metadata.annotations == b.metadata.annotations
}

/// Follows the store: bursts of changes are gathered (quiet 10 ms, at most 100 ms), then the view
/// is reloaded and published.
async fn follow(controller: std::sync::Weak<Controller>, mut revision: u64) {
    loop {
        let Some(store) = controller.upgrade().map(|c| c.store.clone()) else {
            return;
        };
        let mut watch = match store.watch("", revision).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "store watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Some(c) = controller.upgrade() {
                    let _ = c.refresh().await;
                    revision = c.view().revision;
                }
                continue;
            }
        };
        drop(store);
        while let Some(change) = watch.recv().await {
            let Ok(change) = change else { break };
            revision = revision.max(change.revision);
            let deadline = tokio::time::Instant::now() + COALESCE_MAX;
            loop {
                let quiet = tokio::time::sleep(COALESCE_QUIET);
                tokio::select! {
                    more = watch.recv() => match more {
                        Some(Ok(c)) => revision = revision.max(c.revision),
                        _ => break,
                    },
                    () = quiet => break,
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            let Some(c) = controller.upgrade() else {
                return;
            };
            if let Err(e) = c.refresh().await {
                tracing::warn!(error = %e, "cannot reload the view");
            }
        }
        if let Some(c) = controller.upgrade() {
            revision = c.view().revision;
        }
    }
}
