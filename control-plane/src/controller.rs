//! The controller: keeps a view of the store (resources and instances), applies validated
//! changes to the store, translates snapshots per proxy, and holds the connected proxies'
//! status (`status.rs`).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
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
    store::{Change, Expect, Op, Store, StoreError},
    translate::{self, Translated},
    validate::{self, Problem, Resource, State},
    verify,
    view::{GUARD_KEY, Update, View, decode_change},
};

/// How long a burst of store changes is gathered before proxies are recomputed, at most.
const COALESCE_QUIET: Duration = Duration::from_millis(10);
const COALESCE_MAX: Duration = Duration::from_millis(100);
/// How long a write waits for the watch to bring the view up to the store before reading the
/// store again.
const CATCH_UP: Duration = Duration::from_secs(2);
/// How often an apply or a delete is checked again when another write got in first.
const WRITE_ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
    #[error("{0} not found")]
    NotFound(String),
    /// The resources and the registry come from a source that owns them (Kubernetes).
    #[error(
        "the mesh comes from {0} (trellis-control --source {0}): change it there, e.g. with kubectl apply"
    )]
    ReadOnly(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The write raced another one it cannot be checked again against (a canary's state).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
}

/// What an apply would do (`trellis diff`, `trellis apply --dry-run`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Preview {
    /// Each document's action.
    pub results: Vec<Applied>,
    /// The VirtualNodes and VirtualGateways whose proxies' snapshot would change, by name.
    pub proxies: Vec<ProxyPreview>,
}

/// How one node's (or gateway's) proxies' snapshot would change.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ProxyPreview {
    /// `VirtualNode NAMESPACE/NAME` or `VirtualGateway NAMESPACE/NAME`.
    pub node: String,
    /// Its proxies connected to the control planes now.
    pub connected: usize,
    pub changes: Vec<crate::diff::Change>,
    /// Set when the new snapshot could not be made valid: it would not be pushed (the
    /// proxies keep theirs), for this reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withheld: Option<String>,
    /// Pieces the new snapshot would leave out, because the proxies would reject them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<String>,
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
    /// Not a mesh resource (a Kubernetes Deployment, Service, ... in the same file).
    Skipped,
}

impl Applied {
    fn new(key: &ResourceKey, action: Action) -> Self {
        Self {
            kind: key.kind.to_string(),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            action,
        }
    }
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Configured => "configured",
            Self::Unchanged => "unchanged",
            Self::Deleted => "deleted",
            Self::Skipped => "skipped (not a mesh resource)",
        }
    }
}

/// Translated sidecar snapshots of one view revision, by node.
/// Snapshots by node, for one (content revision, CA generation): a write that changes neither
/// (the audit log, a status publish) keeps them.
type SnapshotCache = ((u64, u64), HashMap<ResourceKey, Option<Arc<Translated>>>);

pub struct Controller {
    store: Arc<dyn Store>,
    view: watch::Sender<Arc<View>>,
    /// Serialises read-validate-write cycles.
    writer: tokio::sync::Mutex<()>,
    proxies: Proxies,
    cache: Mutex<SnapshotCache>,
    metrics: ControlMetrics,
    /// The CA issuing workload certificates, once set, and whether a proxy must present a join
    /// token to get its snapshot.
    identity: std::sync::OnceLock<(Arc<crate::identity::Ca>, bool)>,
    /// The sidecar injector's settings, when this control plane serves the webhook.
    injector: std::sync::OnceLock<crate::inject::Injector>,
    /// Whether the API requires an operator's bearer token.
    auth: std::sync::OnceLock<bool>,
    /// Which addresses instances may be registered at, once set; unset, the rule as it is.
    registration_policy: std::sync::OnceLock<registry::AddressPolicy>,
    /// The source that owns resources and instances, when it is not the API (Kubernetes).
    external_source: std::sync::OnceLock<&'static str>,
    /// Checks the platform tokens proxies present (Kubernetes service-account tokens).
    token_reviewer: std::sync::OnceLock<Arc<dyn TokenReviewer>>,
    /// This control plane among those sharing the store (random, per process).
    replica: String,
    /// Its part in the election of a leader among them, once started.
    leadership: std::sync::OnceLock<crate::leader::Leadership>,
    /// Previews (`trellis diff`) run one at a time.
    previews: tokio::sync::Semaphore,
    /// What this control plane's proxies measured of the routes canaries judge.
    measurements: crate::measure::Measurements,
}

/// Where control planes sharing a store publish their proxies: `replicas/<replica>/<chunk>`.
pub(crate) const REPLICAS: &str = "replicas/";
/// Proxies per published key (each written alone: etcd takes requests up to 1.5 MiB).
const PUBLISHED_CHUNK: usize = 500;

/// Checks a platform's token that a proxy presents for its node in place of a join token (on
/// Kubernetes: its pod's service-account token, reviewed by the API server and bound to the
/// pod, whose labels must select the node).
pub trait TokenReviewer: Send + Sync + std::fmt::Debug {
    /// Whether `token` is one this reviewer judges (else it is taken for a join token).
    fn recognizes(&self, token: &str) -> bool;

    fn review<'a>(
        &'a self,
        token: &'a str,
        node: &'a ResourceKey,
        view: Arc<View>,
    ) -> crate::store::BoxFuture<'a, Result<(), TokenRefused>>;
}

/// Why a platform token did not admit a proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRefused {
    /// The platform does not vouch for it.
    Unauthenticated(String),
    /// It does, for a workload that is not this node's.
    Denied(String),
    /// The platform could not be asked.
    Unavailable(String),
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// Loads the view and starts following the store.
    pub async fn start(store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let view = View::load(store.as_ref()).await?;
        let revision = view.revision;
        let (tx, _) = watch::channel(Arc::new(view));
        let metrics = ControlMetrics::new()
            .map_err(|e| StoreError::Backend(format!("cannot register metrics: {e}")))?;
        let store: Arc<dyn Store> = Arc::new(crate::store::Timed::new(
            store,
            metrics.store_latency.clone(),
            metrics.store_errors.clone(),
        ));
        let this = Arc::new(Self {
            store,
            view: tx,
            writer: tokio::sync::Mutex::new(()),
            proxies: Proxies::default(),
            cache: Mutex::new(((0, 0), HashMap::new())),
            metrics,
            identity: std::sync::OnceLock::new(),
            injector: std::sync::OnceLock::new(),
            auth: std::sync::OnceLock::new(),
            registration_policy: std::sync::OnceLock::new(),
            external_source: std::sync::OnceLock::new(),
            token_reviewer: std::sync::OnceLock::new(),
            replica: format!("{:016x}", fastrand::u64(..)),
            previews: tokio::sync::Semaphore::new(1),
            leadership: std::sync::OnceLock::new(),
            measurements: crate::measure::Measurements::default(),
        });
        tokio::spawn(follow(Arc::downgrade(&this), revision));
        Ok(this)
    }

    /// From now on, resources and instances come from `source` only: API writes are refused.
    pub fn set_external_source(&self, source: &'static str) {
        let _ = self.external_source.set(source);
    }

    /// The source that owns resources and instances, when it is not the API.
    pub fn external_source(&self) -> Option<&'static str> {
        self.external_source.get().copied()
    }

    /// Proxies may present tokens `reviewer` checks in place of join tokens.
    pub fn set_token_reviewer(&self, reviewer: Arc<dyn TokenReviewer>) {
        let _ = self.token_reviewer.set(reviewer);
    }

    pub fn token_reviewer(&self) -> Option<&Arc<dyn TokenReviewer>> {
        self.token_reviewer.get()
    }

    fn writable(&self) -> Result<(), ControlError> {
        match self.external_source() {
            Some(source) => Err(ControlError::ReadOnly(source)),
            None => Ok(()),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// This control plane among those sharing the store.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// What its proxies measured of the routes canaries judge.
    pub fn measurements(&self) -> &crate::measure::Measurements {
        &self.measurements
    }

    /// Issues workload certificates with `ca` from now on; with `required`, a proxy without an
    /// admitted join token gets nothing.
    /// Serves the sidecar injection webhook with these settings.
    pub fn set_injector(&self, injector: crate::inject::Injector) {
        let _ = self.injector.set(injector);
    }

    pub fn injector(&self) -> Option<&crate::inject::Injector> {
        self.injector.get()
    }

    pub fn set_identity(&self, ca: Arc<crate::identity::Ca>, required: bool) {
        let _ = self.identity.set((ca, required));
    }

    /// Requires an operator's token on the API from now on.
    pub fn require_auth(&self) {
        let _ = self.auth.set(true);
    }

    pub fn auth_required(&self) -> bool {
        self.auth.get().copied().unwrap_or(false)
    }

    /// Checks the addresses of registrations with `policy` from now on (once; later calls are
    /// ignored).
    pub fn set_registration_policy(&self, policy: registry::AddressPolicy) {
        let _ = self.registration_policy.set(policy);
    }

    /// The policy registrations' addresses are checked with: the one set, else the rule with
    /// nothing allowed despite it.
    pub fn registration_policy(&self) -> &registry::AddressPolicy {
        static RULE: registry::AddressPolicy = registry::AddressPolicy::RULE;
        self.registration_policy.get().unwrap_or(&RULE)
    }

    /// The CA, and whether identity is required.
    pub fn identity(&self) -> Option<(&Arc<crate::identity::Ca>, bool)> {
        self.identity.get().map(|(ca, required)| (ca, *required))
    }

    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.view.subscribe()
    }

    /// Re-reads the whole store: at start, and when the view cannot follow it change by change
    /// (the watch was lost, or the view does not catch up).
    async fn reload(&self) -> Result<(), StoreError> {
        let view = View::load(self.store.as_ref()).await?;
        self.view.send_if_modified(|current| {
            if view.revision >= current.revision {
                *current = Arc::new(view);
                true
            } else {
                false
            }
        });
        Ok(())
    }

    /// Applies the decoded changes the view does not have yet, in order.
    fn follow_changes(&self, changes: Vec<(u64, Vec<Update>)>) {
        self.view.send_if_modified(|current| {
            let mut modified = false;
            for (revision, updates) in changes {
                if revision <= current.revision {
                    continue;
                }
                let view = Arc::make_mut(current);
                view.revision = revision;
                for u in updates {
                    view.update(u);
                }
                modified = true;
            }
            modified
        });
    }

    /// The view, once it reflects at least the store's current revision: what a write is
    /// checked against. Waits for the watch to bring in others' changes; reloads if it does not.
    async fn current(&self) -> Result<Arc<View>, StoreError> {
        let head = self.store.list(GUARD_KEY).await?.revision;
        self.caught_up(head).await
    }

    /// The view once its revision is `revision` or later: what the watch brings in within
    /// [`CATCH_UP`], else the store read again.
    pub(crate) async fn caught_up(&self, revision: u64) -> Result<Arc<View>, StoreError> {
        let mut views = self.view.subscribe();
        let waited = tokio::time::timeout(CATCH_UP, views.wait_for(|v| v.revision >= revision))
            .await
            .map(|r| r.map(|v| v.clone()));
        match waited {
            Ok(Ok(view)) => Ok(view),
            _ => {
                tracing::warn!(
                    revision,
                    "the view did not catch up with the store; reloading"
                );
                self.reload().await?;
                Ok(self.view())
            }
        }
    }

    /// Brings this process's own write (committed at `revision`) into the view without reading
    /// it back: at once when the view holds every earlier revision, else once the watch has
    /// brought in the writes before it (then the watch's copy of ours may come first).
    async fn publish_own(&self, revision: u64, updates: Vec<Update>) -> Result<(), StoreError> {
        let mut updates = Some(updates);
        // Ours goes in (once) when the view holds every revision before it, unless the watch
        // brought it in first.
        let mut insert = || {
            let mut done = false;
            self.view.send_if_modified(|current| {
                if current.revision >= revision {
                    done = true;
                    return false;
                }
                if current.revision + 1 != revision {
                    return false;
                }
                let view = Arc::make_mut(current);
                view.revision = revision;
                for u in updates.take().into_iter().flatten() {
                    view.update(u);
                }
                done = true;
                true
            });
            done
        };
        if insert() {
            return Ok(());
        }
        let view = self.caught_up(revision.saturating_sub(1)).await?;
        if view.revision < revision && !insert() {
            // The store's revisions skipped one (a backend whose revisions are not
            // consecutive): read ours back.
            self.caught_up(revision).await?;
        }
        Ok(())
    }

    /// [`Self::publish_own`] for a write the store has accepted: it has happened whatever
    /// follows, so a failure to bring it into the view is logged (the watch brings it in), not
    /// reported as the write's.
    async fn publish_committed(&self, revision: u64, updates: Vec<Update>) {
        if let Err(e) = self.publish_own(revision, updates).await {
            tracing::warn!(revision, error = %e, "a committed write is not in the view yet; the store's watch will bring it");
        }
    }

    /// Waits before checking a write again that raced another (`attempt` 1-based): jittered and
    /// growing, so two control planes writing at once do not keep colliding.
    async fn after_conflict(attempt: u32) {
        let wait = trellis_proxy::retry::backoff(
            Duration::from_millis(10),
            Duration::from_millis(200),
            attempt,
            trellis_proxy::retry::Jitter::Full,
        );
        tokio::time::sleep(wait).await;
    }

    /// Validates and applies manifests atomically: all of them, or nothing and every problem.
    /// They are checked against the view at the store's current revision and written only if
    /// no other resource write came in between (else checked again on the newer view).
    pub async fn apply(&self, manifests: Vec<Manifest>) -> Result<Vec<Applied>, ControlError> {
        let admitted = Admitted::new(manifests);
        self.apply_with(|_| Ok(None), Some(admitted), Vec::new())
            .await
    }

    /// [`Self::apply`] of the manifests `make` derives from the view each attempt is checked
    /// against (a canary's change to a router: made on the router as it is then), with more
    /// writes in the same transaction (the canary's state). A conflict on one of those is not
    /// checked again: it fails the apply.
    pub(crate) async fn apply_with(
        &self,
        make: impl Fn(&View) -> Result<Option<Vec<Manifest>>, ControlError>,
        mut admitted: Option<Admitted>,
        extra: Vec<Op>,
    ) -> Result<Vec<Applied>, ControlError> {
        self.writable()?;
        let started = std::time::Instant::now();
        let _writer = self.writer.lock().await;
        let mut attempt = 1;
        let results = loop {
            let view = self.current().await?;
            if let Some(manifests) = make(&view)? {
                admitted = Some(Admitted::new(manifests));
            }
            let Some(admitted) = admitted.as_ref() else {
                return Err(ControlError::Internal("nothing to apply".into()));
            };
            let plan = admitted.plan(&view)?;
            if plan.writes.is_empty() && extra.is_empty() {
                break plan.results;
            }
            // With only the extra writes, the guard too: they were decided on this view (a
            // canary's state on the router's weights), which no resource write may have
            // changed meanwhile.
            let (mut ops, mut stored) = plan.ops(&view)?;
            ops.extend(extra.iter().cloned());
            match self.store.apply(ops).await {
                Ok(revision) => {
                    for r in &mut stored {
                        r.revision = revision;
                    }
                    let updates = stored
                        .into_iter()
                        .map(|r| Update::Resource(r.key.clone(), Some(Arc::new(r))))
                        .chain([Update::Guard(Some(revision))])
                        .collect();
                    self.publish_committed(revision, updates).await;
                    break plan.results;
                }
                Err(StoreError::Conflict { key, reason })
                    if extra.iter().any(|o| o.key() == key) =>
                {
                    return Err(ControlError::Conflict(format!(
                        "{key} changed meanwhile ({reason}): try again"
                    )));
                }
                Err(StoreError::Conflict { key, reason }) if attempt < WRITE_ATTEMPTS => {
                    tracing::debug!(%key, %reason, attempt, "apply raced another write; checking again");
                    Self::after_conflict(attempt).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.metrics
            .apply_latency
            .observe(started.elapsed().as_secs_f64());
        let mut results = results;
        if let Some(admitted) = &admitted {
            results.extend(admitted.skipped.iter().cloned());
        }
        Ok(results)
    }

    /// Deletes resources if what remains is still valid (nothing else refers to them).
    pub async fn delete(&self, keys: Vec<ResourceKey>) -> Result<Vec<Applied>, ControlError> {
        self.writable()?;
        let _writer = self.writer.lock().await;
        let mut attempt = 1;
        loop {
            let view = self.current().await?;
            let mut next = State::clone(&view.state);
            let mut ops = Vec::new();
            let mut results = Vec::new();
            for key in &keys {
                let Some(old) = next.remove(key) else {
                    return Err(ControlError::NotFound(key.to_string()));
                };
                ops.push(Op::Delete {
                    key: key.store_key(),
                    expect: Expect::Revision(old.revision),
                });
                results.push(Applied::new(key, Action::Deleted));
            }
            let problems = validate::check(&next, &HashMap::new());
            if !problems.is_empty() {
                return Err(ControlError::Invalid(problems));
            }
            drop(next);
            ops.push(guard_op(&view));
            match self.store.apply(ops).await {
                Ok(revision) => {
                    let updates = keys
                        .iter()
                        .map(|k| Update::Resource(k.clone(), None))
                        .chain([Update::Guard(Some(revision))])
                        .collect();
                    self.publish_committed(revision, updates).await;
                    return Ok(results);
                }
                Err(StoreError::Conflict { key, reason }) if attempt < WRITE_ATTEMPTS => {
                    tracing::debug!(%key, %reason, attempt, "delete raced another write; checking again");
                    Self::after_conflict(attempt).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Replaces every resource with `manifests`, for a source that owns them all (Kubernetes).
    /// Each manifest is admitted on its own; those refused, and then every resource that does
    /// not check with the rest (repeatedly, as leaving one out may break those that refer to
    /// it), are left out and their problems returned by resource; the others are stored in one
    /// transaction, in place of what the store held. One bad resource degrades itself only.
    pub async fn sync_resources(
        &self,
        manifests: Vec<Manifest>,
    ) -> Result<BTreeMap<ResourceKey, Vec<Problem>>, ControlError> {
        let mut problems: BTreeMap<ResourceKey, Vec<Problem>> = BTreeMap::new();
        let mut next = State::new();
        for m in manifests {
            let key = validate::manifest_key(&m);
            match validate::admit(m, None) {
                Ok(r) => {
                    next.insert(r.key.clone(), Arc::new(r));
                }
                Err(p) => {
                    if let Some(key) = key {
                        problems.entry(key).or_default().extend(p);
                    }
                }
            }
        }
        loop {
            let found = validate::check(&next, &HashMap::new());
            if found.is_empty() {
                break;
            }
            let names: HashMap<String, ResourceKey> =
                next.keys().map(|k| (k.to_string(), k.clone())).collect();
            for p in found {
                let Some(key) = p.resource.as_ref().and_then(|r| names.get(r)) else {
                    continue;
                };
                next.remove(key);
                problems.entry(key.clone()).or_default().push(p);
            }
        }
        let _writer = self.writer.lock().await;
        let mut attempt = 1;
        loop {
            let view = self.current().await?;
            let mut ops = Vec::new();
            let mut updates = Vec::new();
            for (key, r) in next.iter() {
                let existing = view.state.get(key);
                if existing.is_some_and(|old| old.same(r)) {
                    continue;
                }
                let mut r = Resource::clone(r);
                r.metadata.resource_version = None;
                r.metadata.creation_timestamp = existing
                    .and_then(|old| old.metadata.creation_timestamp.clone())
                    .or(r.metadata.creation_timestamp.take())
                    .or_else(|| {
                        Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string())
                    });
                ops.push(Op::Put {
                    key: key.store_key(),
                    value: serde_json::to_vec(&r)
                        .map_err(|e| StoreError::Backend(e.to_string()))?,
                    expect: existing.map_or(Expect::Absent, |old| Expect::Revision(old.revision)),
                    lease: None,
                });
                updates.push((key.clone(), Some(r)));
            }
            for (key, old) in view.state.iter().filter(|(k, _)| !next.contains_key(*k)) {
                ops.push(Op::Delete {
                    key: key.store_key(),
                    expect: Expect::Revision(old.revision),
                });
                updates.push((key.clone(), None));
            }
            if ops.is_empty() {
                return Ok(problems);
            }
            ops.push(guard_op(&view));
            match self.store.apply(ops).await {
                Ok(revision) => {
                    let updates = updates
                        .into_iter()
                        .map(|(k, r)| {
                            let r = r.map(|mut r| {
                                r.revision = revision;
                                Arc::new(r)
                            });
                            Update::Resource(k, r)
                        })
                        .chain([Update::Guard(Some(revision))])
                        .collect();
                    self.publish_committed(revision, updates).await;
                    return Ok(problems);
                }
                Err(StoreError::Conflict { key, reason }) if attempt < WRITE_ATTEMPTS => {
                    tracing::debug!(%key, %reason, attempt, "sync raced another write; again");
                    Self::after_conflict(attempt).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Replaces every registered instance with `instances`, for a source that owns the registry
    /// (Kubernetes: pods). Invalid ones are left out and returned with their problem.
    pub async fn sync_instances(
        &self,
        instances: Vec<Instance>,
    ) -> Result<Vec<(Instance, String)>, ControlError> {
        let mut refused = Vec::new();
        let mut wanted: BTreeMap<String, Instance> = BTreeMap::new();
        for i in instances {
            match i.validate() {
                Ok(()) => {
                    wanted.insert(i.store_key(), i);
                }
                Err((path, reason)) => refused.push((i, format!("{path}: {reason}"))),
            }
        }
        let listing = self.store.list(registry::PREFIX).await?;
        let mut ops = Vec::new();
        let mut updates = Vec::new();
        for kv in &listing.items {
            if !wanted.contains_key(&kv.key) {
                ops.push(Op::Delete {
                    key: kv.key.clone(),
                    expect: Expect::Revision(kv.mod_revision),
                });
                updates.push(Update::Instance(kv.key.clone(), None));
            }
        }
        for (key, i) in wanted {
            let value = serde_json::to_vec(&i).map_err(|e| StoreError::Backend(e.to_string()))?;
            let existing = listing.items.iter().find(|kv| kv.key == key);
            if existing.is_some_and(|kv| kv.value == value && kv.lease.is_none()) {
                continue;
            }
            ops.push(Op::Put {
                key: key.clone(),
                value,
                expect: existing.map_or(Expect::Absent, |kv| Expect::Revision(kv.mod_revision)),
                lease: None,
            });
            updates.push(Update::Instance(key, Some(i)));
        }
        if !ops.is_empty() {
            let revision = self.store.apply(ops).await?;
            self.publish_committed(revision, updates).await;
        }
        Ok(refused)
    }

    /// Registers (or replaces) an instance; with a TTL it lives while heartbeats come.
    pub async fn register(&self, mut instance: Instance) -> Result<Instance, ControlError> {
        self.writable()?;
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
        let key = instance.store_key();
        let revision = self
            .store
            .apply(vec![Op::Put {
                key: key.clone(),
                value,
                expect: Expect::Any,
                lease,
            }])
            .await?;
        instance.lease = lease;
        self.publish_committed(
            revision,
            vec![Update::Instance(key, Some(instance.clone()))],
        )
        .await;
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
        self.writable()?;
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
        self.writable()?;
        let (mut i, revision) = self.instance(namespace, service, id).await?;
        i.status = InstanceStatus::Draining;
        let lease = i.lease.take();
        let value = serde_json::to_vec(&i).map_err(|e| StoreError::Backend(e.to_string()))?;
        let key = i.store_key();
        let revision = self
            .store
            .apply(vec![Op::Put {
                key: key.clone(),
                value,
                expect: Expect::Revision(revision),
                lease,
            }])
            .await?;
        i.lease = lease;
        self.publish_committed(revision, vec![Update::Instance(key, Some(i.clone()))])
            .await;
        Ok(i)
    }

    pub async fn deregister(
        &self,
        namespace: &str,
        service: &str,
        id: &str,
    ) -> Result<(), ControlError> {
        self.writable()?;
        let (i, revision) = self.instance(namespace, service, id).await?;
        let key = i.store_key();
        let revision = self
            .store
            .apply(vec![Op::Delete {
                key: key.clone(),
                expect: Expect::Revision(revision),
            }])
            .await?;
        self.publish_committed(revision, vec![Update::Instance(key, None)])
            .await;
        Ok(())
    }

    /// What applying `manifests` would do, storing nothing: each document's action (or every
    /// problem, as an apply), and for each VirtualNode and VirtualGateway whose proxies'
    /// snapshot it would change, how — through the same validation, translation and
    /// proxy-compiler check as an apply and its pushes. The translations run off the async
    /// threads.
    pub async fn preview(
        self: &Arc<Self>,
        manifests: Vec<Manifest>,
    ) -> Result<Preview, ControlError> {
        // One preview at a time: each translates every node twice, uncached.
        let _one = self.previews.acquire().await;
        let view = self.current().await?;
        let admitted = Admitted::new(manifests);
        let plan = admitted.plan(&view)?;
        let mut results = plan.results;
        results.extend(admitted.skipped.iter().cloned());
        let mut next = State::clone(&view.state);
        for (r, _) in &plan.writes {
            next.insert(r.key.clone(), r.clone());
        }
        let after = View {
            state: Arc::new(next),
            ..View::clone(&view)
        };
        let status = self.status_all().await;
        let this = self.clone();
        let proxies = tokio::task::spawn_blocking(move || {
            let mut keys: Vec<ResourceKey> = view
                .state
                .keys()
                .chain(after.state.keys())
                .filter(|k| matches!(k.kind, Kind::VirtualNode | Kind::VirtualGateway))
                .cloned()
                .collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .filter_map(|key| {
                    let before = this.translate(&view, &key);
                    let next = this.translate(&after, &key);
                    let changes = crate::diff::snapshots(
                        before.as_ref().map(|t| &t.snapshot),
                        next.as_ref().map(|t| &t.snapshot),
                    );
                    let name = format!("{}/{}", key.namespace, key.name);
                    let kind = match key.kind {
                        Kind::VirtualGateway => "gateway",
                        _ => "sidecar",
                    };
                    let connected = status
                        .proxies
                        .iter()
                        .filter(|p| p.node == name && p.kind == kind)
                        .count();
                    let withheld = next.as_ref().and_then(|t| t.withheld.clone());
                    let left_out: Vec<String> = next
                        .as_ref()
                        .map(|t| {
                            t.problems
                                .iter()
                                .map(|p| format!("{} ({}): {}", p.effect, p.source, p.reason))
                                .collect()
                        })
                        .unwrap_or_default();
                    (!changes.is_empty() || withheld.is_some()).then_some(ProxyPreview {
                        node: key.to_string(),
                        connected,
                        changes,
                        withheld,
                        left_out,
                    })
                })
                .collect()
        })
        .await
        .map_err(|e| ControlError::Internal(format!("the preview failed: {e}")))?;
        Ok(Preview { results, proxies })
    }

    /// The snapshot the proxy of `node` would run at `view`, computed (not cached): CPU work.
    fn translate(&self, view: &View, node: &ResourceKey) -> Option<Translated> {
        let security = crate::policy::Security {
            ca: self.identity().map(|(ca, _)| &**ca),
            default_mode: match self.identity() {
                Some((_, true)) => crate::model::Mtls::Strict,
                _ => crate::model::Mtls::Disabled,
            },
            revoked: Some(&view.revocations),
        };
        match node.kind {
            Kind::VirtualNode => translate::sidecar(&view.state, &view.instances, node, security),
            Kind::VirtualGateway => {
                translate::gateway(&view.state, &view.instances, node, security)
            }
            _ => None,
        }
        .map(|t| verify::verify(t, node))
    }

    /// The snapshot the proxy of `node` (a VirtualNode's sidecar or a VirtualGateway's gateway)
    /// should run now, cached per content revision and CA generation.
    /// Translating and compiling is CPU work: call it off the async threads, and the cache is
    /// not locked while it runs (two proxies of one node may both compute it once).
    pub fn snapshot_for(&self, view: &View, node: &ResourceKey) -> Option<Arc<Translated>> {
        if let Some(cached) = self.cached_snapshot(view, node) {
            return cached;
        }
        // The key first: a CA rotation while translating must not file the snapshot (made
        // with the old roots) under the new generation.
        let key = self.cache_key(view);
        let translated = self.translate(view, node).map(Arc::new);
        let mut cache = self.cache.lock();
        if cache.0 < key {
            *cache = (key, HashMap::new());
        }
        if cache.0 == key {
            cache.1.insert(node.clone(), translated.clone());
        }
        translated
    }

    /// What a cached snapshot was made from: the view's content and the CA's roots.
    pub(crate) fn cache_key(&self, view: &View) -> (u64, u64) {
        let ca = self.identity().map_or(0, |(ca, _)| ca.generation());
        (view.content_revision, ca)
    }

    /// The snapshot of `node` at `view`'s revision, if it was already computed (cheap).
    pub fn cached_snapshot(
        &self,
        view: &View,
        node: &ResourceKey,
    ) -> Option<Option<Arc<Translated>>> {
        let key = self.cache_key(view);
        let cache = self.cache.lock();
        (cache.0 == key)
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
        let expiry = self.identity().and_then(|(ca, _)| ca.root_not_after());
        self.metrics.ca_expiry.set(expiry.unwrap_or(0));
        self.metrics.encode()
    }

    pub fn status(&self) -> Status {
        let view = self.view();
        self.who(self.proxies.status(view.revision, view.state.keys()))
    }

    /// The status with this control plane's replica id and the leader it knows of.
    fn who(&self, mut status: Status) -> Status {
        status.replica = Some(self.replica.clone());
        status.leader = self.leadership.get().and_then(|l| l.current().id);
        status
    }

    /// Campaigns for leadership of the control planes sharing the store (with a lease of
    /// `ttl`); the duties only one of them does check [`Self::leads`].
    pub fn campaign(&self, ttl: Duration) -> crate::leader::Leadership {
        self.leadership
            .get_or_init(|| {
                crate::leader::Leadership::campaign(self.store.clone(), self.replica.clone(), ttl)
            })
            .clone()
    }

    /// Whether this control plane leads those sharing its store (true when it does not
    /// campaign: it is alone).
    pub fn leads(&self) -> bool {
        self.leadership
            .get()
            .is_none_or(crate::leader::Leadership::is_leader)
    }

    /// [`Self::status`] with the proxies of the other control planes sharing the store (what
    /// they published; a control plane gone stops counting when its lease ends).
    pub async fn status_all(&self) -> Status {
        let view = self.view();
        let mut others = Vec::new();
        match self.store.list(REPLICAS).await {
            Ok(listing) => {
                let own = format!("{REPLICAS}{}/", self.replica);
                for kv in listing.items.iter().filter(|kv| !kv.key.starts_with(&own)) {
                    match serde_json::from_slice::<Vec<crate::status::Published>>(&kv.value) {
                        Ok(p) => others.extend(p),
                        Err(e) => {
                            tracing::warn!(key = %kv.key, error = %e, "unreadable published status")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "other control planes' proxies not counted: the store does not answer")
            }
        }
        self.who(
            self.proxies
                .status_with(view.revision, view.state.keys(), others),
        )
    }

    /// [`Self::status_all`], failing when the store does not answer (what a root rotation's
    /// steps need: every proxy, or none).
    pub async fn status_all_checked(&self) -> Result<Status, StoreError> {
        self.store.list(REPLICAS).await?;
        Ok(self.status_all().await)
    }

    /// Publishes this control plane's proxies in the store every `every` (when they changed),
    /// under a lease, for the other control planes sharing it (`status_all`).
    pub fn publish_status(self: &Arc<Self>, every: Duration) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let ttl = every * 5;
            let mut lease: Option<crate::store::LeaseId> = None;
            let mut written: Option<(u64, usize)> = None;
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(c) = this.upgrade() else { return };
                if let Err(e) = c.publish_once(ttl, &mut lease, &mut written).await {
                    tracing::warn!(error = %e, "cannot publish this control plane's proxies");
                    lease = None;
                    written = None;
                }
            }
        });
    }

    async fn publish_once(
        &self,
        ttl: Duration,
        lease: &mut Option<crate::store::LeaseId>,
        written: &mut Option<(u64, usize)>,
    ) -> Result<(), StoreError> {
        let id = match *lease {
            Some(id) => match self.store.keep_alive(id).await {
                Ok(()) => id,
                Err(StoreError::LeaseNotFound(_)) => {
                    *written = None;
                    self.store.grant_lease(ttl).await?
                }
                Err(e) => return Err(e),
            },
            None => self.store.grant_lease(ttl).await?,
        };
        *lease = Some(id);
        let mut published = self.proxies.published();
        published.sort_by(|a, b| a.status.instance.cmp(&b.status.instance));
        let chunks: Vec<Vec<u8>> = published
            .chunks(PUBLISHED_CHUNK)
            .map(serde_json::to_vec)
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let hash = chunks.iter().fold(0u64, |h, c| {
            h.rotate_left(7) ^ xxhash_rust::xxh3::xxh3_64(c)
        });
        if written.is_some_and(|(h, n)| h == hash && n == chunks.len()) {
            return Ok(());
        }
        let key = |i: usize| format!("{REPLICAS}{}/{i:06}", self.replica);
        let mut ops: Vec<Op> = chunks
            .iter()
            .enumerate()
            .map(|(i, value)| Op::Put {
                key: key(i),
                value: value.clone(),
                expect: Expect::Any,
                lease: Some(id),
            })
            .collect();
        let before = written.map_or(0, |(_, n)| n);
        ops.extend((chunks.len()..before).map(|i| Op::Delete {
            key: key(i),
            expect: Expect::Any,
        }));
        // One write per chunk: a request stays far below etcd's size limit (1.5 MiB).
        for op in ops {
            self.store.apply(vec![op]).await?;
        }
        *written = Some((hash, chunks.len()));
        Ok(())
    }

    /// One resource, with status.
    pub fn get(&self, key: &ResourceKey) -> Option<Listed> {
        let view = self.view();
        let resource = view.state.get(key)?.clone();
        let status = self.proxies.status(view.revision, [key]);
        Some(Listed {
            resource,
            status: status.resources.first().map(|s| Usage {
                proxies: s.proxies,
                applied: s.applied,
            }),
        })
    }

    /// The resources of `kind` (all namespaces when `namespace` is None), with status.
    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> Vec<Listed> {
        let view = self.view();
        let resources: Vec<&Arc<Resource>> = view
            .state
            .iter()
            .filter(|(k, _)| {
                k.kind == kind && namespace.is_none_or(|ns| !kind.namespaced() || k.namespace == ns)
            })
            .map(|(_, r)| r)
            .collect();
        let status = self
            .proxies
            .status(view.revision, resources.iter().map(|r| &r.key));
        resources
            .into_iter()
            .zip(status.resources)
            .map(|(r, s)| Listed {
                resource: r.clone(),
                status: Some(Usage {
                    proxies: s.proxies,
                    applied: s.applied,
                }),
            })
            .collect()
    }
}

/// A resource as the API serves it: the manifest as stored, with its `resourceVersion` (the
/// store revision of its last change) and how many proxies use and applied it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub resource: Arc<Resource>,
    pub status: Option<Usage>,
}

/// How many connected proxies use a resource, and how many of them applied their snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Usage {
    pub proxies: usize,
    pub applied: usize,
}

impl Serialize for Listed {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let r = &self.resource;
        let mut metadata = r.metadata.clone();
        metadata.resource_version = Some(r.revision.to_string());
        let mut m = serializer.serialize_struct("Manifest", 5)?;
        m.serialize_field("apiVersion", r.api_version.as_str())?;
        m.serialize_field("kind", r.key.kind.as_str())?;
        m.serialize_field("metadata", &metadata)?;
        m.serialize_field("spec", &r.spec)?;
        if let Some(status) = &self.status {
            m.serialize_field("status", status)?;
        }
        m.end()
    }
}

/// An apply's manifests, each checked on its own (once, however often the write is retried).
pub(crate) struct Admitted {
    resources: Vec<Arc<Resource>>,
    /// The document each resource came from.
    origin: HashMap<ResourceKey, usize>,
    problems: Vec<Problem>,
    /// Kubernetes documents that are not mesh resources, reported as skipped.
    skipped: Vec<Applied>,
    /// Mesh resources refused on admission (references to them are not reported as missing).
    refused: HashSet<ResourceKey>,
}

/// What an apply would do to a view: per manifest, its action; the resources to write, each with
/// the version it replaces.
struct Plan {
    results: Vec<Applied>,
    writes: Vec<(Arc<Resource>, Option<Arc<Resource>>)>,
}

impl Admitted {
    fn new(manifests: Vec<Manifest>) -> Self {
        let mut this = Self {
            resources: Vec::new(),
            origin: HashMap::new(),
            problems: Vec::new(),
            skipped: Vec::new(),
            refused: HashSet::new(),
        };
        for (i, m) in manifests.into_iter().enumerate() {
            if !validate::is_mesh(&m) {
                this.skipped.push(Applied {
                    kind: m.kind,
                    namespace: m.metadata.namespace.unwrap_or_default(),
                    name: m.metadata.name,
                    action: Action::Skipped,
                });
                continue;
            }
            let key = validate::manifest_key(&m);
            match validate::admit(m, Some(i)) {
                Ok(r) => {
                    if let Some(first) = this.origin.insert(r.key.clone(), i) {
                        this.problems.push(Problem {
                            document: Some(i),
                            resource: Some(r.key.to_string()),
                            path: "metadata.name".into(),
                            reason: format!("also defined in document {first}"),
                        });
                    }
                    this.resources.push(Arc::new(r));
                }
                Err(p) => {
                    this.refused.extend(key);
                    this.problems.extend(p);
                }
            }
        }
        this
    }

    /// Checks the state applying these to `view` would leave; says what would change.
    fn plan(&self, view: &View) -> Result<Plan, ControlError> {
        let mut problems = self.problems.clone();
        {
            let mut next = State::clone(&view.state);
            for r in &self.resources {
                next.insert(r.key.clone(), r.clone());
            }
            problems.extend(validate::check_apply(&next, &self.origin, &self.refused));
        }
        if !problems.is_empty() {
            problems.sort_by(|a, b| a.document.cmp(&b.document).then(a.path.cmp(&b.path)));
            return Err(ControlError::Invalid(problems));
        }
        let mut plan = Plan {
            results: Vec::new(),
            writes: Vec::new(),
        };
        for r in &self.resources {
            let existing = view.state.get(&r.key);
            let action = match existing {
                None => Action::Created,
                Some(old) if old.same(r) => Action::Unchanged,
                Some(_) => Action::Configured,
            };
            plan.results.push(Applied::new(&r.key, action));
            if action != Action::Unchanged {
                plan.writes.push((r.clone(), existing.cloned()));
            }
        }
        Ok(plan)
    }
}

impl Plan {
    /// The store transaction (each write expecting the version it replaces, and the guard) and
    /// the resources as it stores them.
    fn ops(&self, view: &View) -> Result<(Vec<Op>, Vec<Resource>), StoreError> {
        let mut ops = Vec::with_capacity(self.writes.len() + 1);
        let mut stored = Vec::with_capacity(self.writes.len());
        for (r, existing) in &self.writes {
            let mut r = Resource::clone(r);
            r.metadata.resource_version = None;
            match existing {
                Some(old) => {
                    r.metadata.creation_timestamp = old.metadata.creation_timestamp.clone();
                }
                None => {
                    r.metadata.creation_timestamp.get_or_insert_with(|| {
                        humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
                    });
                }
            }
            ops.push(Op::Put {
                key: r.key.store_key(),
                value: serde_json::to_vec(&r).map_err(|e| StoreError::Backend(e.to_string()))?,
                expect: existing
                    .as_ref()
                    .map_or(Expect::Absent, |old| Expect::Revision(old.revision)),
                lease: None,
            });
            stored.push(r);
        }
        ops.push(guard_op(view));
        Ok((ops, stored))
    }
}

/// Rewrites the guard key, expecting the revision `view` holds.
fn guard_op(view: &View) -> Op {
    Op::Put {
        key: GUARD_KEY.to_string(),
        value: Vec::new(),
        expect: view.guard.map_or(Expect::Absent, Expect::Revision),
        lease: None,
    }
}

/// Follows the store: bursts of changes are gathered (quiet 10 ms, at most 100 ms), decoded, and
/// applied to the view, which is published once per burst. If the watch is lost, it resumes from
/// the view's revision; if the store cannot replay from there, the view is read again whole.
async fn follow(controller: std::sync::Weak<Controller>, mut revision: u64) {
    loop {
        let Some(store) = controller.upgrade().map(|c| c.store.clone()) else {
            return;
        };
        let mut watch = match store.watch("", revision).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "store watch failed; reading the store again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Some(c) = controller.upgrade() {
                    if let Err(e) = c.reload().await {
                        tracing::warn!(error = %e, "cannot reload the view");
                    }
                    revision = c.view().revision;
                }
                continue;
            }
        };
        drop(store);
        let mut delivered = false;
        let ended = loop {
            let first = match watch.recv().await {
                Some(Ok(first)) => first,
                Some(Err(e)) => break Some(e),
                None => break None,
            };
            delivered = true;
            let mut burst = vec![first];
            let lost = gather(&mut watch, &mut burst).await;
            let Some(c) = controller.upgrade() else {
                return;
            };
            // Own writes are in the view already: only others' are decoded.
            let have = c.view().revision;
            let changes = burst
                .into_iter()
                .filter(|change| change.revision > have)
                .map(decode_change)
                .collect();
            c.follow_changes(changes);
            if lost {
                break None;
            }
        };
        let Some(c) = controller.upgrade() else {
            return;
        };
        if let Some(e) = ended {
            tracing::warn!(error = %e, "store watch failed");
            if matches!(e, StoreError::Compacted { .. }) {
                // The store cannot replay what was missed: read it again whole.
                if let Err(e) = c.reload().await {
                    tracing::warn!(error = %e, "cannot reload the view");
                }
            }
        }
        revision = c.view().revision;
        drop(c);
        if !delivered {
            // A watch that ends at once is not reopened in a tight loop.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Adds to `burst` the changes that follow within the coalescing window; true if the watch
/// ended or failed meanwhile.
async fn gather(watch: &mut crate::store::Watch, burst: &mut Vec<Change>) -> bool {
    let deadline = tokio::time::Instant::now() + COALESCE_MAX;
    loop {
        tokio::select! {
            more = watch.recv() => match more {
                Some(Ok(change)) => burst.push(change),
                _ => return true,
            },
            () = tokio::time::sleep(COALESCE_QUIET) => return false,
            () = tokio::time::sleep_until(deadline) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::{
        store::{BoxFuture, KeyValue, LeaseId, Listing, Watch, embedded::EmbeddedStore},
        validate::parse_documents,
    };

    const MESH: &str = "
apiVersion: mesh.trellis.dev/v1beta1
kind: Mesh
metadata: { name: m }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: { name: blue }
spec:
  listeners: [{ portMapping: { port: 9080, protocol: http } }]
  serviceDiscovery: { registry: { namespaceName: demo, serviceName: colorteller } }
";

    const ROUTER: &str = "
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
";

    fn docs(yaml: &str) -> Vec<Manifest> {
        parse_documents(yaml).unwrap()
    }

    fn node(name: &str) -> String {
        format!(
            "apiVersion: mesh.trellis.dev/v1beta1\nkind: VirtualNode\nmetadata: {{ name: {name} }}\n\
             spec: {{ listeners: [{{ portMapping: {{ port: 80, protocol: http }} }}], \
             serviceDiscovery: {{ dns: {{ hostname: {name}.local }} }} }}\n"
        )
    }

    fn key(kind: Kind, name: &str) -> ResourceKey {
        ResourceKey::new(kind, "default", name)
    }

    fn instance(id: &str, ttl: Option<u64>) -> Instance {
        Instance {
            namespace: "demo".into(),
            service: "colorteller".into(),
            id: id.into(),
            address: "10.0.0.1".into(),
            port: 9080,
            attributes: Default::default(),
            status: InstanceStatus::Healthy,
            ttl_seconds: ttl,
            lease: None,
        }
    }

    async fn open() -> (tempfile::TempDir, Arc<EmbeddedStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        (dir, store)
    }

    /// Waits (on tokio's clock) until the view satisfies `f`.
    async fn view_where(c: &Controller, f: impl FnMut(&Arc<View>) -> bool) -> Arc<View> {
        let mut views = c.subscribe();
        tokio::time::timeout(Duration::from_secs(10), views.wait_for(f))
            .await
            .expect("the view in time")
            .unwrap()
            .clone()
    }

    /// A store write that changes no resource, instance or revocation (the audit log, what a
    /// control plane publishes of its proxies) keeps the translated snapshots; a resource
    /// write does not.
    #[tokio::test]
    async fn snapshots_are_kept_across_writes_they_are_not_made_of() {
        let (_dir, store) = open().await;
        let c = Controller::start(store.clone()).await.unwrap();
        c.apply(docs(MESH)).await.unwrap();
        let node = key(Kind::VirtualNode, "blue");
        let before = c.view();
        assert!(c.snapshot_for(&before, &node).is_some());
        let put = |k: &str| Op::Put {
            key: k.into(),
            value: b"{}".to_vec(),
            expect: Expect::Any,
            lease: None,
        };
        let revision = store.apply(vec![put("replicas/x/000000")]).await.unwrap();
        let after = c.caught_up(revision).await.unwrap();
        assert!(after.revision > before.revision);
        assert!(
            c.cached_snapshot(&after, &node).is_some(),
            "still cached after a write of something else"
        );
        c.apply(docs(&MESH.replace("port: 9080", "port: 9081")))
            .await
            .unwrap();
        let changed = c.view();
        assert!(changed.content_revision > after.content_revision);
        assert!(
            c.cached_snapshot(&changed, &node).is_none(),
            "a resource write translates again"
        );
    }

    #[tokio::test]
    async fn own_writes_are_in_the_view_when_they_return_typed_and_once() {
        let (_dir, store) = open().await;
        let c = Controller::start(store.clone()).await.unwrap();
        let applied = c.apply(docs(MESH)).await.unwrap();
        assert!(applied.iter().all(|a| a.action == Action::Created));
        let view = c.view();
        let blue = &view.state[&key(Kind::VirtualNode, "blue")];
        assert_eq!(
            blue.revision, view.revision,
            "the store revision of the write"
        );
        assert_eq!(view.guard, Some(view.revision));
        assert!(matches!(blue.spec, crate::model::Spec::VirtualNode(_)));
        assert!(blue.metadata.creation_timestamp.is_some());

        // The same again changes nothing and writes nothing.
        let again = c.apply(docs(MESH)).await.unwrap();
        assert!(again.iter().all(|a| a.action == Action::Unchanged));
        assert_eq!(c.view().revision, view.revision);

        // What is stored reads back as what the view holds (a restart's view).
        let reloaded = View::load(store.as_ref()).await.unwrap();
        assert_eq!(reloaded.revision, view.revision);
        assert_eq!(reloaded.state, view.state);
        assert_eq!(reloaded.guard, view.guard);

        // Instances too, with their leases.
        let i = c.register(instance("a", Some(60))).await.unwrap();
        assert_eq!(c.view().instances.as_slice(), [i]);
        let reloaded = View::load(store.as_ref()).await.unwrap();
        assert_eq!(reloaded.instances, c.view().instances);
        c.deregister("demo", "colorteller", "a").await.unwrap();
        assert!(c.view().instances.is_empty());
    }

    #[tokio::test]
    async fn a_write_checked_against_a_view_the_store_moved_past_is_checked_again() {
        let (_dir, store) = open().await;
        // A second control plane on the same store.
        let other = Controller::start(store.clone()).await.unwrap();
        other.apply(docs(MESH)).await.unwrap();
        let c = Controller::start(store.clone()).await.unwrap();
        assert!(c.view().state.contains_key(&key(Kind::VirtualNode, "blue")));

        // The other deletes blue; an apply here that refers to blue sees it gone (the view
        // catches up with the store before checking), and nothing is written.
        other
            .delete(vec![key(Kind::VirtualNode, "blue")])
            .await
            .unwrap();
        let err = c.apply(docs(ROUTER)).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("VirtualNode default/blue not found"),
            "{err}"
        );
        assert!(
            store
                .get("resources/virtualrouter/default/ct")
                .await
                .unwrap()
                .is_none()
        );
    }

    /// A store that lets another writer in between a controller's check and its write, once:
    /// just before the first transaction that carries the guard, `race` is applied.
    #[derive(Debug)]
    struct Racing {
        inner: Arc<EmbeddedStore>,
        race: Mutex<Option<Vec<Op>>>,
        raced: AtomicBool,
    }

    impl Store for Racing {
        fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, StoreError>> {
            self.inner.list(prefix)
        }
        fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>> {
            self.inner.get(key)
        }
        fn apply(&self, ops: Vec<Op>) -> BoxFuture<'_, Result<u64, StoreError>> {
            Box::pin(async move {
                let guarded = ops.iter().any(|op| op.key() == GUARD_KEY);
                let race = if guarded {
                    self.race.lock().take()
                } else {
                    None
                };
                if let Some(race) = race {
                    self.inner.apply(race).await?;
                    self.raced.store(true, Ordering::SeqCst);
                }
                self.inner.apply(ops).await
            })
        }
        fn watch<'a>(
            &'a self,
            prefix: &'a str,
            after: u64,
        ) -> BoxFuture<'a, Result<Watch, StoreError>> {
            self.inner.watch(prefix, after)
        }
        fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>> {
            self.inner.grant_lease(ttl)
        }
        fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
            self.inner.keep_alive(lease)
        }
        fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
            self.inner.revoke(lease)
        }
    }

    #[tokio::test]
    async fn a_resource_write_between_check_and_commit_is_not_overwritten_by_a_stale_check() {
        let (_dir, inner) = open().await;
        let setup = Controller::start(inner.clone()).await.unwrap();
        setup.apply(docs(MESH)).await.unwrap();
        let guard = setup.view().guard;
        // Another replica deletes blue (rewriting the guard, as every resource write does)
        // after this controller checked the router against a view with blue, before it writes.
        let racing = Arc::new(Racing {
            inner: inner.clone(),
            race: Mutex::new(Some(vec![
                Op::Delete {
                    key: key(Kind::VirtualNode, "blue").store_key(),
                    expect: Expect::Any,
                },
                Op::Put {
                    key: GUARD_KEY.into(),
                    value: Vec::new(),
                    expect: guard.map_or(Expect::Absent, Expect::Revision),
                    lease: None,
                },
            ])),
            raced: AtomicBool::new(false),
        });
        let c = Controller::start(racing.clone()).await.unwrap();
        let err = c.apply(docs(ROUTER)).await.unwrap_err();
        assert!(racing.raced.load(Ordering::SeqCst), "the race ran");
        assert!(
            err.to_string()
                .contains("VirtualNode default/blue not found"),
            "checked again on the newer view: {err}"
        );
        assert!(
            inner
                .get("resources/virtualrouter/default/ct")
                .await
                .unwrap()
                .is_none()
        );
        assert!(!c.view().state.contains_key(&key(Kind::VirtualNode, "blue")));
    }

    #[tokio::test]
    async fn concurrent_applies_from_two_control_planes_all_land() {
        let (_dir, store) = open().await;
        let a = Controller::start(store.clone()).await.unwrap();
        a.apply(docs(MESH)).await.unwrap();
        let b = Controller::start(store.clone()).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..10 {
            let (a, b) = (a.clone(), b.clone());
            tasks.push(tokio::spawn(async move {
                a.apply(docs(&node(&format!("a{i}")))).await.unwrap();
                b.apply(docs(&node(&format!("b{i}")))).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let head = store.list(GUARD_KEY).await.unwrap().revision;
        for c in [&a, &b] {
            let view = view_where(c, |v| v.revision >= head).await;
            for i in 0..10 {
                for n in [format!("a{i}"), format!("b{i}")] {
                    assert!(view.state.contains_key(&key(Kind::VirtualNode, &n)), "{n}");
                }
            }
            assert_eq!(View::load(store.as_ref()).await.unwrap().state, view.state);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_lives_while_heartbeats_come_and_goes_a_ttl_after_the_last() {
        let (_dir, store) = open().await;
        let c = Controller::start(store).await.unwrap();
        let ttl = Duration::from_secs(5);
        c.register(instance("a", Some(ttl.as_secs())))
            .await
            .unwrap();
        // Heartbeats every 3 s keep it well past its TTL.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert_eq!(c.view().instances.len(), 1, "alive while heartbeats come");
            c.heartbeat("demo", "colorteller", "a").await.unwrap();
        }
        let last = tokio::time::Instant::now();
        tokio::time::sleep(ttl - Duration::from_millis(300)).await;
        assert_eq!(c.view().instances.len(), 1, "alive until its TTL runs out");
        view_where(&c, |v| v.instances.is_empty()).await;
        let gone = last.elapsed();
        assert!(
            gone >= ttl && gone <= ttl + Duration::from_millis(500),
            "gone {gone:?} after the last heartbeat (TTL {ttl:?}, reaped every 200 ms)"
        );
        let err = c.heartbeat("demo", "colorteller", "a").await.unwrap_err();
        assert!(matches!(err, ControlError::NotFound(_)), "{err}");
    }

    /// A write from elsewhere (another control plane), straight to the store.
    async fn external_put(store: &EmbeddedStore, id: &str) -> u64 {
        let value = serde_json::to_vec(&instance(id, None)).unwrap();
        store
            .apply(vec![Op::Put {
                key: registry::key("demo", "colorteller", id),
                value,
                expect: Expect::Any,
                lease: None,
            }])
            .await
            .unwrap()
    }

    /// A store whose first watch is lost at once, and which cannot replay changes from before
    /// revision `oldest` (they were compacted).
    #[derive(Debug)]
    struct Forgetful {
        inner: Arc<EmbeddedStore>,
        oldest: u64,
        watches: std::sync::atomic::AtomicU32,
    }

    impl Store for Forgetful {
        fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, StoreError>> {
            self.inner.list(prefix)
        }
        fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>> {
            self.inner.get(key)
        }
        fn apply(&self, ops: Vec<Op>) -> BoxFuture<'_, Result<u64, StoreError>> {
            self.inner.apply(ops)
        }
        fn watch<'a>(
            &'a self,
            prefix: &'a str,
            after: u64,
        ) -> BoxFuture<'a, Result<Watch, StoreError>> {
            Box::pin(async move {
                let compacted = StoreError::Compacted {
                    requested: after + 1,
                    oldest: self.oldest,
                };
                if self.watches.fetch_add(1, Ordering::SeqCst) == 0 {
                    let (tx, rx) = tokio::sync::mpsc::channel(1);
                    tx.send(Err(compacted)).await.unwrap();
                    return Ok(rx);
                }
                if after + 1 < self.oldest {
                    return Err(compacted);
                }
                self.inner.watch(prefix, after).await
            })
        }
        fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>> {
            self.inner.grant_lease(ttl)
        }
        fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
            self.inner.keep_alive(lease)
        }
        fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
            self.inner.revoke(lease)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_watch_resumes_and_what_cannot_be_replayed_is_read_again() {
        let (_dir, inner) = open().await;
        external_put(&inner, "i1").await;
        let store = Arc::new(Forgetful {
            inner: inner.clone(),
            oldest: 4,
            watches: Default::default(),
        });
        let c = Controller::start(store.clone()).await.unwrap();
        // Written while the watch is lost, then not replayable: the store is read again.
        external_put(&inner, "i2").await;
        external_put(&inner, "i3").await;
        let view = view_where(&c, |v| v.instances.len() == 3).await;
        assert_eq!(view.revision, 3);
        // Then followed change by change again.
        let last = external_put(&inner, "i4").await;
        let view = view_where(&c, |v| v.revision == last).await;
        assert_eq!(view.instances.len(), 4);
        assert!(store.watches.load(Ordering::SeqCst) >= 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_published_once_when_it_goes_quiet() {
        let (_dir, store) = open().await;
        let c = Controller::start(store.clone()).await.unwrap();
        let mut views = c.subscribe();
        let start = c.view().revision;
        // Five writes 5 ms apart (under the 10 ms quiet time): nothing is published meanwhile.
        let mut last = start;
        for i in 0..5 {
            last = external_put(&store, &format!("i{i}")).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(!views.has_changed().unwrap(), "published during the burst");
        }
        // Quiet: one view with all five.
        tokio::time::sleep(COALESCE_QUIET).await;
        assert!(views.has_changed().unwrap());
        let view = views.borrow_and_update().clone();
        assert_eq!((view.revision, view.instances.len()), (last, 5));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!views.has_changed().unwrap(), "published once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_that_never_goes_quiet_is_published_within_the_longest_wait() {
        let (_dir, store) = open().await;
        let c = Controller::start(store.clone()).await.unwrap();
        let mut views = c.subscribe();
        let first = tokio::time::Instant::now();
        let mut published = None;
        for i in 0..60 {
            external_put(&store, &format!("i{i}")).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            if views.has_changed().unwrap() {
                published = Some(first.elapsed());
                break;
            }
        }
        let published = published.expect("published while the writes went on");
        assert!(
            published >= COALESCE_MAX && published <= COALESCE_MAX + Duration::from_millis(10),
            "published after {published:?}"
        );
        let view = views.borrow_and_update().clone();
        assert!(view.instances.len() >= 20, "{}", view.instances.len());
    }
}
