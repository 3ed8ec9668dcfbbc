//! Canaries: a `Canary` resource moves a VirtualRouter route's traffic from its stable
//! VirtualNode to a canary one step by step, judged by the callers' own proxies.
//!
//! **Measurements travel on the config stream** (see `measure`): the callers' proxies report
//! the canary's route every second; each control plane adds up what each proxy stream counted;
//! control planes sharing a store publish their totals of the canaries' routes
//! (`measurements/<replica>`, not under a lease: a control plane that is gone still counts in
//! the step it was part of; the leader forgets it an hour later), and the leader adds them up,
//! each control plane's change since the step started (an older reading counts as none).
//! Scraping was the other way: it needs every proxy's admin port reachable from the control
//! plane (a sidecar's is on loopback) and a second connection per proxy, where the stream is
//! already open, authenticated and names its node.
//!
//! **The router holds the weights.** Each step is one store transaction that rewrites the
//! route's two weights in the VirtualRouter (validated as an apply is, and pushed as any change)
//! and the canary's state (`canaries/<namespace>/<name>`: phase, step, when it started, the
//! totals it started from, every decision with its numbers). A rollback is one such write; a
//! control plane that restarts reads the state back and carries on from the step it was in.
//! Only the leader judges; `trellis canary promote|abort|pause|resume` may be run against any
//! control plane (each write expects the state it read).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

pub use crate::measure::{Counts, MEASURE_INTERVAL, Rate, Window, route_name};
use crate::{
    controller::{ControlError, Controller},
    measure::{RATE_SAMPLE, canary_routes},
    model::{self, CanarySpec, Kind, Ref, ResourceKey, Spec},
    store::{Expect, Op, StoreError},
    validate::Resource,
};

/// Where canaries' states are stored: `canaries/<namespace>/<name>`.
pub const STATE_PREFIX: &str = "canaries/";
/// Where control planes sharing a store publish their measurement totals.
pub const MEASUREMENTS_PREFIX: &str = "measurements/";
/// How often the leader looks at the canaries (each is judged every `spec.interval`).
const TICK: Duration = Duration::from_secs(1);
/// The default `spec.interval`.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// At most this many decisions are kept in a canary's history (the first and the latest).
const HISTORY: usize = 200;

/// Where a canary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// At a step, judged every interval.
    Progressing,
    /// Held at its weight (`trellis canary pause`, or its route changed under it).
    Paused,
    /// All traffic goes to the canary.
    Succeeded,
    /// A gate failed: all traffic back to the stable node.
    RolledBack,
    /// `trellis canary abort`: all traffic back to the stable node.
    Aborted,
}

impl Phase {
    fn done(self) -> bool {
        matches!(self, Self::Succeeded | Self::RolledBack | Self::Aborted)
    }
}

/// A canary's stored state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// The revision of the Canary resource this run follows: a changed spec starts over.
    pub spec_revision: u64,
    pub phase: Phase,
    /// The index of the step in `spec.steps`.
    pub step: usize,
    /// The canary's weight in the route now (the stable node has the rest of 100).
    pub weight: i64,
    /// When the step started (Unix milliseconds).
    pub step_started_ms: u64,
    /// The totals of the canary's and the stable node's pairs when the step started, by control
    /// plane.
    pub baseline: BTreeMap<String, Counts>,
    #[serde(default)]
    pub stable_baseline: BTreeMap<String, Counts>,
    /// Why it waits or is paused.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub history: Vec<Decision>,
    /// Whether its weights were ever set (a canary the router refused at its start was not).
    #[serde(default = "yes")]
    pub started: bool,
}

fn yes() -> bool {
    true
}

/// One decision, with the numbers it was taken on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// start, advance, promote, rollback, pause, resume, abort.
    pub action: String,
    /// The canary's weight after it.
    pub weight: i64,
    /// `controller`, or the operator who asked.
    pub by: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
}

impl Decision {
    /// A decision taken now.
    fn new(action: &str, weight: i64, by: &str, reason: String, window: Option<Window>) -> Self {
        Self {
            at_ms: now_ms(),
            action: action.to_string(),
            weight,
            by: by.to_string(),
            reason,
            window,
        }
    }
}

/// What the gates say about a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Wait(String),
    Advance,
    Promote,
    RollBack(String),
}

/// Judges a step that has run for `elapsed` with the canary's `window`: a gate failing (once
/// the minimum of requests is in) rolls back; the step's end (its duration, the minimum of
/// requests, every gate passing) advances, or promotes after the last step.
pub fn judge(spec: &CanarySpec, step: usize, elapsed: Duration, window: &Window) -> Verdict {
    let gates = &spec.gates;
    let min = u64::try_from(gates.min_requests).unwrap_or(u64::MAX);
    if window.requests < min {
        return Verdict::Wait(format!(
            "{} of the {min} canary requests a step needs",
            window.requests
        ));
    }
    if let (Some(min_rate), Some(rate)) = (gates.min_success_rate, window.success_rate)
        && rate < min_rate
    {
        return Verdict::RollBack(format!(
            "success rate {rate:.2}% is below {min_rate}% ({} of {} requests failed)",
            window.failures, window.requests
        ));
    }
    if let Some(max) = gates.max_latency_p99.and_then(model::Duration::to_std) {
        let max_ms = max.as_secs_f64() * 1000.0;
        match window.p99_ms {
            Some(p99) if window.p99_over_last_bucket => {
                return Verdict::RollBack(format!(
                    "p99 latency is above {p99:.0} ms (the largest latency bucket), over {max_ms} ms"
                ));
            }
            Some(p99) if p99 > max_ms => {
                return Verdict::RollBack(format!("p99 latency {p99:.1} ms is above {max_ms} ms"));
            }
            Some(_) => {}
            None => return Verdict::Wait("no latency buckets reported yet".into()),
        }
    }
    let duration = spec
        .steps
        .get(step)
        .and_then(|s| s.duration.to_std())
        .unwrap_or_default();
    if elapsed < duration {
        return Verdict::Wait(format!(
            "gates pass; the step lasts {}s more",
            (duration - elapsed).as_secs()
        ));
    }
    if step + 1 < spec.steps.len() {
        Verdict::Advance
    } else {
        Verdict::Promote
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn state_key(key: &ResourceKey) -> String {
    format!("{STATE_PREFIX}{}/{}", key.namespace, key.name)
}

/// The canary's nodes and router, resolved.
struct Parts {
    router: ResourceKey,
    stable: ResourceKey,
    canary: ResourceKey,
    route: String,
}

impl Parts {
    fn of(key: &ResourceKey, spec: &CanarySpec) -> Self {
        let ns = key.namespace.as_str();
        Self {
            router: spec.virtual_router_ref.key(Kind::VirtualRouter, ns),
            stable: spec.stable_ref.key(Kind::VirtualNode, ns),
            canary: spec.canary_ref.key(Kind::VirtualNode, ns),
            route: route_name(spec),
        }
    }

    fn node(key: &ResourceKey) -> String {
        format!("{}/{}", key.namespace, key.name)
    }
}

/// The route's weights of the stable and canary nodes now (absent targets weigh 0); None if
/// the router or route is gone.
fn route_weights(router: &Resource, parts: &Parts, spec: &CanarySpec) -> Option<(i64, i64)> {
    let Spec::VirtualRouter(vr) = &router.spec else {
        return None;
    };
    let route = vr.routes.iter().find(|r| r.name == spec.route)?;
    let action = route.action()?;
    let (mut stable, mut canary) = (0, 0);
    for t in &action.weighted_targets {
        let node = t
            .virtual_node_ref
            .key(Kind::VirtualNode, &parts.router.namespace);
        if node == parts.stable {
            stable += t.weight;
        } else if node == parts.canary {
            canary += t.weight;
        }
    }
    Some((stable, canary))
}

/// The router's manifest with the route giving `weight` to the canary and the rest of 100 to
/// the stable node (the canary added as a target, on the stable target's port, if it is not
/// one).
fn with_weight(
    router: &Resource,
    parts: &Parts,
    spec: &CanarySpec,
    weight: i64,
) -> Result<model::Manifest, String> {
    let mut router = router.clone();
    let Spec::VirtualRouter(vr) = &mut router.spec else {
        return Err(format!("{} is not a VirtualRouter", parts.router));
    };
    let route = vr
        .routes
        .iter_mut()
        .find(|r| r.name == spec.route)
        .ok_or_else(|| format!("{} has no route {:?}", parts.router, spec.route))?;
    let action = route
        .action_mut()
        .ok_or_else(|| format!("route {:?} is not an http, http2 or grpc route", spec.route))?;
    let ns = parts.router.namespace.clone();
    let mut port = None;
    let mut has_canary = false;
    for t in &mut action.weighted_targets {
        let node = t.virtual_node_ref.key(Kind::VirtualNode, &ns);
        if node == parts.stable {
            t.weight = 100 - weight;
            port = port.or(t.port);
        } else if node == parts.canary {
            t.weight = weight;
            has_canary = true;
        }
    }
    if !has_canary {
        action.weighted_targets.push(model::WeightedTarget {
            virtual_node_ref: Ref {
                name: parts.canary.name.clone(),
                namespace: (parts.canary.namespace != ns).then(|| parts.canary.namespace.clone()),
                uid: None,
            },
            weight,
            port,
        });
    }
    router.metadata.resource_version = None;
    serde_json::to_value(&router)
        .and_then(serde_json::from_value)
        .map_err(|e| e.to_string())
}

/// A command an operator gives a canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Promote,
    Abort,
    Pause,
    Resume,
}

impl Command {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "promote" => Self::Promote,
            "abort" => Self::Abort,
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            _ => return None,
        })
    }
}

/// A canary as `trellis canary status` and the dashboard show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub namespace: String,
    pub name: String,
    /// `NAMESPACE/NAME` of the router, and the route.
    pub router: String,
    pub route: String,
    pub stable: String,
    pub canary: String,
    /// Pending until the leader starts it.
    pub phase: String,
    pub step: usize,
    pub steps: usize,
    pub weight: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub gates: model::CanaryGates,
    /// The current step's measurements of the canary and of the stable node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_window: Option<Window>,
    pub history: Vec<Decision>,
}

impl Controller {
    /// The totals of a (route, node) pair by control plane: this one's, and what the others
    /// sharing the store published.
    pub async fn canary_totals(
        &self,
        route: &str,
        node: &str,
    ) -> Result<BTreeMap<String, Counts>, StoreError> {
        let mut totals = BTreeMap::new();
        if let Some(own) = self.measurements().total(route, node) {
            totals.insert(self.replica().to_string(), own);
        }
        let listing = self.store().list(MEASUREMENTS_PREFIX).await?;
        let pair = format!("{route}\t{node}");
        for kv in listing.items {
            let Some(replica) = kv.key.strip_prefix(MEASUREMENTS_PREFIX) else {
                continue;
            };
            if replica == self.replica() {
                continue;
            }
            match serde_json::from_slice::<Published>(&kv.value) {
                Ok(mut published) => {
                    if let Some(c) = published.totals.remove(&pair) {
                        totals.insert(replica.to_string(), c);
                    }
                }
                Err(e) => tracing::warn!(key = %kv.key, error = %e, "unreadable measurements"),
            }
        }
        Ok(totals)
    }

    /// The window since `baseline` of totals by control plane.
    fn window_since(
        totals: &BTreeMap<String, Counts>,
        baseline: &BTreeMap<String, Counts>,
    ) -> Counts {
        let mut sum = Counts::default();
        for (replica, now) in totals {
            let delta = match baseline.get(replica) {
                Some(before) => now.since(before),
                None => now.clone(),
            };
            sum.add(&delta);
        }
        sum
    }

    /// Every canary's status.
    pub async fn canaries(&self, namespace: Option<&str>) -> Result<Vec<Status>, StoreError> {
        let view = self.view();
        let mut out = Vec::new();
        for (key, r) in view
            .state
            .range(ResourceKey::new(Kind::Canary, "", "")..)
            .take_while(|(k, _)| k.kind == Kind::Canary)
            .filter(|(k, _)| namespace.is_none_or(|ns| k.namespace == ns))
        {
            if let Spec::Canary(spec) = &r.spec {
                out.push(self.canary_status(key, r.revision, spec).await?);
            }
        }
        Ok(out)
    }

    pub async fn canary(&self, key: &ResourceKey) -> Result<Status, ControlError> {
        let view = self.view();
        let Some(r) = view.state.get(key) else {
            return Err(ControlError::NotFound(key.to_string()));
        };
        let Spec::Canary(spec) = &r.spec else {
            return Err(ControlError::NotFound(key.to_string()));
        };
        Ok(self.canary_status(key, r.revision, spec).await?)
    }

    async fn canary_status(
        &self,
        key: &ResourceKey,
        revision: u64,
        spec: &CanarySpec,
    ) -> Result<Status, StoreError> {
        let parts = Parts::of(key, spec);
        let state = self
            .store()
            .get(&state_key(key))
            .await?
            .and_then(|kv| serde_json::from_slice::<State>(&kv.value).ok())
            .filter(|s| s.spec_revision == revision);
        let mut status = Status {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            router: Parts::node(&parts.router),
            route: spec.route.clone(),
            stable: Parts::node(&parts.stable),
            canary: Parts::node(&parts.canary),
            phase: "Pending".into(),
            step: 0,
            steps: spec.steps.len(),
            weight: 0,
            message: String::new(),
            gates: spec.gates.clone(),
            window: None,
            stable_window: None,
            history: Vec::new(),
        };
        if let Some(state) = state {
            if !state.phase.done() {
                let canary = self
                    .canary_totals(&parts.route, &Parts::node(&parts.canary))
                    .await?;
                let stable = self
                    .canary_totals(&parts.route, &Parts::node(&parts.stable))
                    .await?;
                let window = Self::window_since(&canary, &state.baseline).window();
                if state.phase == Phase::Progressing {
                    let elapsed =
                        Duration::from_millis(now_ms().saturating_sub(state.step_started_ms));
                    if let Verdict::Wait(why) = judge(spec, state.step, elapsed, &window) {
                        status.message = why;
                    }
                }
                status.window = Some(window);
                status.stable_window =
                    Some(Self::window_since(&stable, &state.stable_baseline).window());
            }
            status.phase = format!("{:?}", state.phase);
            status.step = state.step;
            status.weight = state.weight;
            if !state.message.is_empty() {
                status.message = state.message;
            }
            status.history = state.history;
        }
        Ok(status)
    }

    /// Carries out an operator's command on a canary (any control plane may).
    pub async fn canary_command(
        &self,
        key: &ResourceKey,
        command: Command,
        by: &str,
    ) -> Result<Status, ControlError> {
        let view = self.view();
        let Some(Spec::Canary(spec)) = view.state.get(key).map(|r| &r.spec) else {
            return Err(ControlError::NotFound(key.to_string()));
        };
        let revision = view.state.get(key).map_or(0, |r| r.revision);
        let (state, state_revision) = self.canary_state(key).await?;
        let Some(state) = state.filter(|s| s.spec_revision == revision) else {
            return Err(ControlError::Conflict(format!(
                "{key} has not started yet (the leading control plane starts it within a second)"
            )));
        };
        let parts = Parts::of(key, spec);
        let mut next = state.clone();
        let (action, weight) = match (command, state.phase) {
            (_, phase) if phase.done() => {
                return Err(ControlError::Conflict(format!(
                    "{key} is over ({phase:?}): change its spec to start it again"
                )));
            }
            (Command::Promote, _) if !state.started => {
                return Err(ControlError::Conflict(format!(
                    "{key} never started ({}): resume it once that is fixed, or abort it",
                    state.message
                )));
            }
            (Command::Promote, _) => {
                next.phase = Phase::Succeeded;
                ("promote", 100)
            }
            (Command::Abort, _) if !state.started => {
                // Its weights were never set: nothing to give back.
                next.phase = Phase::Aborted;
                next.history
                    .push(Decision::new("abort", 0, by, String::new(), None));
                self.write_state(key, state_revision, &next).await?;
                return self.canary(key).await;
            }
            (Command::Abort, _) => {
                next.phase = Phase::Aborted;
                ("abort", 0)
            }
            (Command::Pause, Phase::Paused) => return self.canary(key).await,
            (Command::Pause, _) => {
                next.phase = Phase::Paused;
                next.message = format!("paused by {by}");
                ("pause", state.weight)
            }
            (Command::Resume, Phase::Progressing) => return self.canary(key).await,
            (Command::Resume, _) => {
                next.phase = Phase::Progressing;
                next.message.clear();
                // The step is judged again from now (its requests and its duration), at its
                // weight (set again if the route was changed under it).
                self.restart_step(&mut next, &parts).await?;
                next.started = true;
                let weight = spec
                    .steps
                    .get(state.step)
                    .map_or(state.weight, |s| s.weight);
                ("resume", weight)
            }
        };
        self.canary_transition(
            key,
            spec,
            &parts,
            state_revision,
            next,
            Decision::new(action, weight, by, String::new(), None),
        )
        .await?;
        self.canary(key).await
    }

    async fn canary_state(
        &self,
        key: &ResourceKey,
    ) -> Result<(Option<State>, Option<u64>), StoreError> {
        let Some(kv) = self.store().get(&state_key(key)).await? else {
            return Ok((None, None));
        };
        let state = match serde_json::from_slice::<State>(&kv.value) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(canary = %key, error = %e, "unreadable canary state: starting over");
                None
            }
        };
        Ok((state, Some(kv.mod_revision)))
    }

    /// Writes a canary's state alone, expecting it at `revision` (absent if none).
    async fn write_state(
        &self,
        key: &ResourceKey,
        revision: Option<u64>,
        state: &State,
    ) -> Result<(), ControlError> {
        let value = serde_json::to_vec(state).map_err(|e| ControlError::Internal(e.to_string()))?;
        self.store()
            .apply(vec![Op::Put {
                key: state_key(key),
                value,
                expect: revision.map_or(Expect::Absent, Expect::Revision),
                lease: None,
            }])
            .await?;
        Ok(())
    }

    /// Starts the state's step now: its baselines the totals now.
    async fn restart_step(&self, state: &mut State, parts: &Parts) -> Result<(), StoreError> {
        state.step_started_ms = now_ms();
        state.baseline = self
            .canary_totals(&parts.route, &Parts::node(&parts.canary))
            .await?;
        state.stable_baseline = self
            .canary_totals(&parts.route, &Parts::node(&parts.stable))
            .await?;
        Ok(())
    }

    /// Writes `next` (expecting the state at `state_revision`) and, when it changes them, the
    /// route's weights, in one transaction; records the decision.
    async fn canary_transition(
        &self,
        key: &ResourceKey,
        spec: &CanarySpec,
        parts: &Parts,
        state_revision: Option<u64>,
        mut next: State,
        decision: Decision,
    ) -> Result<(), ControlError> {
        let (weight, action, by) = (
            decision.weight,
            decision.action.clone(),
            decision.by.clone(),
        );
        next.weight = weight;
        next.history.push(decision);
        if next.history.len() > HISTORY {
            next.history.remove(1);
        }
        let value = serde_json::to_vec(&next).map_err(|e| ControlError::Internal(e.to_string()))?;
        let op = Op::Put {
            key: state_key(key),
            value,
            expect: state_revision.map_or(Expect::Absent, Expect::Revision),
            lease: None,
        };
        // The weights are set on the router as it is when the write is checked (each attempt):
        // nothing else of it is changed, and a write racing ours is not overwritten.
        let make = |view: &crate::view::View| {
            let router = view
                .state
                .get(&parts.router)
                .ok_or_else(|| ControlError::NotFound(parts.router.to_string()))?;
            if route_weights(router, parts, spec) == Some((100 - weight, weight)) {
                return Ok(Some(Vec::new()));
            }
            let manifest =
                with_weight(router, parts, spec, weight).map_err(ControlError::Internal)?;
            Ok(Some(vec![manifest]))
        };
        tracing::info!(canary = %key, action, weight, by, "canary decision");
        self.apply_with(make, None, vec![op]).await.map(drop)
    }

    /// The leader's duty: starts, judges and finishes every canary, every `interval` each.
    /// (Every control plane samples its totals for the dashboard's rates.)
    pub fn run_canaries(self: &Arc<Self>) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RATE_SAMPLE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut samples = 0u32;
            loop {
                tick.tick().await;
                let Some(c) = this.upgrade() else { return };
                c.measurements().sample();
                samples = samples.wrapping_add(1);
                if samples.is_multiple_of(30) {
                    // Every minute: totals of routes and callers gone from the mesh (a canary's
                    // route is kept while the canary is).
                    let view = c.view();
                    let routes = crate::measure::route_names(&view.state);
                    c.measurements().prune(|caller, route| {
                        routes.contains(route)
                            && caller
                                .split_once('/')
                                .and_then(|(kind, rest)| {
                                    let (ns, name) = rest.split_once('/')?;
                                    Some(ResourceKey::new(Kind::parse(kind)?, ns, name))
                                })
                                .is_some_and(|k| view.state.contains_key(&k))
                    });
                }
            }
        });
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut judged: HashMap<ResourceKey, Instant> = HashMap::new();
            let mut housekeeping: Option<Instant> = None;
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(c) = this.upgrade() else { return };
                if !c.leads() {
                    judged.clear();
                    continue;
                }
                if let Err(e) = c.canaries_once(&mut judged, &mut housekeeping).await {
                    tracing::warn!(error = %e, "canaries not judged this time");
                }
            }
        });
    }

    async fn canaries_once(
        &self,
        judged: &mut HashMap<ResourceKey, Instant>,
        housekeeping: &mut Option<Instant>,
    ) -> Result<(), ControlError> {
        let view = self.view();
        let canaries: Vec<(ResourceKey, Arc<Resource>)> = view
            .state
            .range(ResourceKey::new(Kind::Canary, "", "")..)
            .take_while(|(k, _)| k.kind == Kind::Canary)
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        // Every minute: the states of canaries that are gone, the totals of control planes
        // that are.
        if housekeeping.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            *housekeeping = Some(Instant::now());
            self.forget_gone_canaries(&view).await?;
            self.forget_gone_replicas().await?;
        }
        judged.retain(|k, _| view.state.contains_key(k));
        for (key, resource) in canaries {
            let Spec::Canary(spec) = &resource.spec else {
                continue;
            };
            let interval = spec
                .interval
                .and_then(model::Duration::to_std)
                .unwrap_or(DEFAULT_INTERVAL);
            if judged.get(&key).is_some_and(|at| at.elapsed() < interval) {
                continue;
            }
            match self.judge_canary(&key).await {
                Ok(true) => {
                    judged.insert(key, Instant::now());
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(canary = %key, error = %e, "canary not judged"),
            }
        }
        Ok(())
    }

    /// Starts or judges one canary; whether it was judged (a start waits for the next tick).
    async fn judge_canary(&self, key: &ResourceKey) -> Result<bool, ControlError> {
        let (state, state_revision) = self.canary_state(key).await?;
        // The view holds at least what the state was written with (the weights it set).
        let view = match state_revision {
            Some(revision) => self.caught_up(revision).await?,
            None => self.view(),
        };
        // The Canary as that view has it: a new leader's view may have been behind the state.
        let Some((revision, spec)) = view.state.get(key).and_then(|r| match &r.spec {
            Spec::Canary(c) => Some((r.revision, c.as_ref())),
            _ => None,
        }) else {
            return Ok(false);
        };
        if state.as_ref().is_some_and(|s| s.spec_revision > revision) {
            return Ok(false);
        }
        let parts = Parts::of(key, spec);
        let Some(router) = view.state.get(&parts.router) else {
            return Ok(false);
        };
        let Some(mut state) = state.filter(|s| s.spec_revision == revision) else {
            // A new canary, or a changed spec: its first step.
            let first = spec.steps.first().map_or(100, |s| s.weight);
            let mut state = State {
                spec_revision: revision,
                phase: Phase::Progressing,
                step: 0,
                weight: 0,
                step_started_ms: 0,
                baseline: BTreeMap::new(),
                stable_baseline: BTreeMap::new(),
                message: String::new(),
                history: Vec::new(),
                started: true,
            };
            self.restart_step(&mut state, &parts).await?;
            let reason = format!("step 1 of {}", spec.steps.len());
            let started = self
                .canary_transition(
                    key,
                    spec,
                    &parts,
                    state_revision,
                    state.clone(),
                    Decision::new("start", first, "controller", reason, None),
                )
                .await;
            if let Err(ControlError::Invalid(problems)) = started {
                // The router refuses the first step's weights: said in the canary's status
                // (held, nothing changed) until it is resumed or its spec changes.
                let why = problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                state.phase = Phase::Paused;
                state.started = false;
                state.message = format!("cannot start: {why}");
                state.history.push(Decision::new(
                    "pause",
                    0,
                    "controller",
                    state.message.clone(),
                    None,
                ));
                self.write_state(key, state_revision, &state).await?;
                return Ok(true);
            }
            started?;
            return Ok(true);
        };
        if state.phase != Phase::Progressing {
            return Ok(true);
        }
        // The route must still send what the canary set: a change under it pauses it.
        if route_weights(router, &parts, spec) != Some((100 - state.weight, state.weight)) {
            state.phase = Phase::Paused;
            let found = route_weights(router, &parts, spec)
                .map_or("no such route".to_string(), |(s, c)| format!("{s}/{c}"));
            state.message = format!(
                "route {:?} was changed outside the canary (stable/canary weights {found}, not {}/{}): paused; `trellis canary resume` sets the canary's weights again",
                spec.route,
                100 - state.weight,
                state.weight
            );
            state.history.push(Decision::new(
                "pause",
                state.weight,
                "controller",
                state.message.clone(),
                None,
            ));
            // The route is left as it was found: the write is the state's alone.
            self.write_state(key, state_revision, &state).await?;
            return Ok(true);
        }
        let totals = self
            .canary_totals(&parts.route, &Parts::node(&parts.canary))
            .await?;
        let window = Self::window_since(&totals, &state.baseline).window();
        let elapsed = Duration::from_millis(now_ms().saturating_sub(state.step_started_ms));
        let verdict = judge(spec, state.step, elapsed, &window);
        let mut next = state.clone();
        match verdict {
            // Why it waits is worked out again by `status` (no write per check).
            Verdict::Wait(_) => Ok(true),
            Verdict::RollBack(reason) => {
                next.phase = Phase::RolledBack;
                next.message = reason.clone();
                self.canary_transition(
                    key,
                    spec,
                    &parts,
                    state_revision,
                    next,
                    Decision::new("rollback", 0, "controller", reason, Some(window)),
                )
                .await?;
                Ok(true)
            }
            Verdict::Advance => {
                next.step += 1;
                next.message.clear();
                self.restart_step(&mut next, &parts).await?;
                let weight = spec.steps.get(next.step).map_or(100, |s| s.weight);
                let reason = format!(
                    "step {} of {}: gates passed",
                    next.step + 1,
                    spec.steps.len()
                );
                self.canary_transition(
                    key,
                    spec,
                    &parts,
                    state_revision,
                    next,
                    Decision::new("advance", weight, "controller", reason, Some(window)),
                )
                .await?;
                Ok(true)
            }
            Verdict::Promote => {
                next.phase = Phase::Succeeded;
                next.message.clear();
                let reason = "every step's gates passed".to_string();
                self.canary_transition(
                    key,
                    spec,
                    &parts,
                    state_revision,
                    next,
                    Decision::new("promote", 100, "controller", reason, Some(window)),
                )
                .await?;
                Ok(true)
            }
        }
    }

    /// Publishes this control plane's measurement totals every `every` (when they changed),
    /// under a lease, for the leader among those sharing the store.
    pub fn publish_measurements(self: &Arc<Self>, every: Duration) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut written: Option<BTreeMap<String, Counts>> = None;
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(c) = this.upgrade() else { return };
                let routes = canary_routes(&c.view().state);
                let totals = c.measurements().published(&routes);
                if totals.is_empty() || written.as_ref() == Some(&totals) {
                    continue;
                }
                // Not under a lease: the totals of a control plane that is gone still count in
                // the steps they were part of (the leader forgets them an hour after).
                let published = Published {
                    published_ms: now_ms(),
                    totals,
                };
                let write = async {
                    let value = serde_json::to_vec(&published)
                        .map_err(|e| StoreError::Backend(e.to_string()))?;
                    c.store()
                        .apply(vec![Op::Put {
                            key: format!("{MEASUREMENTS_PREFIX}{}", c.replica()),
                            value,
                            expect: Expect::Any,
                            lease: None,
                        }])
                        .await
                };
                match write.await {
                    Ok(_) => written = Some(published.totals),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot publish this control plane's measurements")
                    }
                }
            }
        });
    }

    /// Deletes the states of canaries that are gone.
    async fn forget_gone_canaries(&self, view: &crate::view::View) -> Result<(), StoreError> {
        let stored = self.store().list(STATE_PREFIX).await?;
        for kv in stored.items {
            let Some((ns, name)) = kv
                .key
                .strip_prefix(STATE_PREFIX)
                .and_then(|k| k.split_once('/'))
            else {
                continue;
            };
            if !view
                .state
                .contains_key(&ResourceKey::new(Kind::Canary, ns, name))
            {
                let _ = self
                    .store()
                    .apply(vec![Op::Delete {
                        key: kv.key.clone(),
                        expect: Expect::Revision(kv.mod_revision),
                    }])
                    .await;
            }
        }
        Ok(())
    }

    /// Forgets the published totals of control planes gone for an hour (no longer publishing
    /// their proxies).
    async fn forget_gone_replicas(&self) -> Result<(), StoreError> {
        let published = self.store().list(MEASUREMENTS_PREFIX).await?;
        if published.items.is_empty() {
            return Ok(());
        }
        let alive = self.store().list(crate::controller::REPLICAS).await?;
        for kv in published.items {
            let Some(replica) = kv.key.strip_prefix(MEASUREMENTS_PREFIX) else {
                continue;
            };
            let live = replica == self.replica()
                || alive.items.iter().any(|a| {
                    a.key
                        .starts_with(&format!("{}{replica}/", crate::controller::REPLICAS))
                });
            let old = serde_json::from_slice::<Published>(&kv.value).map_or(true, |p| {
                now_ms().saturating_sub(p.published_ms) > 3_600_000
            });
            if !live && old {
                self.store()
                    .apply(vec![Op::Delete {
                        key: kv.key.clone(),
                        expect: Expect::Revision(kv.mod_revision),
                    }])
                    .await?;
            }
        }
        Ok(())
    }
}

/// What a control plane publishes of its totals (`measurements/<replica>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Published {
    published_ms: u64,
    /// `ROUTE\tNODE` -> counts.
    totals: BTreeMap<String, Counts>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, failures: u64, buckets: &[u64]) -> Counts {
        Counts {
            requests,
            failures,
            bounds: vec![0.01, 0.1, 1.0],
            buckets: buckets.to_vec(),
            bucketed: requests,
        }
    }

    fn spec(steps: &[(i64, u64)]) -> CanarySpec {
        CanarySpec {
            steps: steps
                .iter()
                .map(|&(weight, secs)| model::CanaryStep {
                    weight,
                    duration: model::Duration {
                        unit: model::DurationUnit::S,
                        value: i64::try_from(secs).unwrap(),
                    },
                })
                .collect(),
            gates: model::CanaryGates {
                min_requests: 100,
                min_success_rate: Some(99.0),
                max_latency_p99: Some(model::Duration {
                    unit: model::DurationUnit::Ms,
                    value: 200,
                }),
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_step_waits_for_its_requests_and_duration_and_rolls_back_on_a_failed_gate() {
        let spec = spec(&[(10, 30), (50, 30)]);
        let healthy = counts(150, 0, &[150, 150, 150]).window();
        let few = counts(99, 0, &[99, 99, 99]).window();
        let failing = counts(150, 3, &[150, 150, 150]).window();
        let slow = counts(150, 0, &[0, 0, 150]).window();
        let long = Duration::from_secs(31);
        assert!(matches!(judge(&spec, 0, long, &few), Verdict::Wait(_)));
        // Enough requests but not yet the step's duration.
        assert!(matches!(
            judge(&spec, 0, Duration::from_secs(5), &healthy),
            Verdict::Wait(_)
        ));
        assert_eq!(judge(&spec, 0, long, &healthy), Verdict::Advance);
        assert_eq!(judge(&spec, 1, long, &healthy), Verdict::Promote);
        // A gate fails as soon as the minimum of requests is in, whatever the duration.
        let Verdict::RollBack(why) = judge(&spec, 0, Duration::ZERO, &failing) else {
            panic!("a 98% success rate must roll back");
        };
        assert!(why.contains("98.00%"), "{why}");
        let Verdict::RollBack(why) = judge(&spec, 0, Duration::ZERO, &slow) else {
            panic!("a p99 above 200 ms must roll back");
        };
        assert!(why.contains("p99"), "{why}");
        // Failures below the minimum of requests do not decide yet.
        let early = counts(50, 50, &[50, 50, 50]).window();
        assert!(matches!(judge(&spec, 0, long, &early), Verdict::Wait(_)));
    }

    #[test]
    fn a_window_adds_each_control_planes_change_since_the_step_started() {
        let mut baseline = BTreeMap::new();
        baseline.insert("a".to_string(), counts(100, 1, &[100, 100, 100]));
        let mut now = BTreeMap::new();
        now.insert("a".to_string(), counts(150, 3, &[150, 150, 150]));
        // A control plane that came up after the step started: all of it is in the step.
        now.insert("b".to_string(), counts(10, 0, &[0, 10, 10]));
        // One whose reading is older than the baseline: nothing yet, not its whole history.
        baseline.insert("c".to_string(), counts(1000, 500, &[1000, 1000, 1000]));
        now.insert("c".to_string(), counts(990, 495, &[990, 990, 990]));
        let w = Controller::window_since(&now, &baseline);
        assert_eq!((w.requests, w.failures), (60, 2));
        assert_eq!(w.buckets, vec![50, 60, 60]);
    }
}
