//! What every connected proxy runs, and the status `trellis status` and `describe` show: per
//! proxy (desired, sent, acknowledged versions, NACKs, problems), per resource (how many proxies
//! use and applied it), and every resource or instance left out of a snapshot.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::{model::ResourceKey, translate::Degraded};

/// One connected proxy, as `trellis status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub node: String,
    /// sidecar or gateway.
    pub kind: String,
    pub instance: String,
    pub proxy_version: String,
    pub connected_at: String,
    /// The version the control plane wants this proxy to run.
    pub desired_version: Option<String>,
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    pub nacked_version: Option<String>,
    pub nack_reason: Option<String>,
    /// Pieces left out of this proxy's snapshot because it would reject them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Degraded>,
    /// Why no snapshot is sent to this proxy, when one cannot be made valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withheld: Option<String>,
    /// The SPIFFE ID of the workload certificate last issued to it, and when that expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_expires: Option<String>,
    /// The fingerprint of the root its certificate chains to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_root: Option<String>,
    /// The roots of the trust bundle it acknowledged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_roots: Vec<String>,
    /// Shared with the snapshot's translation (one set for all proxies of a node).
    #[serde(skip)]
    pub uses: Arc<BTreeSet<ResourceKey>>,
}

impl ProxyStatus {
    /// A proxy that has just connected: who it is, nothing sent or answered yet.
    pub fn connected(node: String, kind: &str, instance: String, proxy_version: String) -> Self {
        Self {
            node,
            kind: kind.into(),
            instance,
            proxy_version,
            connected_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string(),
            desired_version: None,
            sent_version: None,
            acked_version: None,
            nacked_version: None,
            nack_reason: None,
            problems: Vec::new(),
            withheld: None,
            identity: None,
            certificate_expires: None,
            certificate_root: None,
            trust_roots: Vec::new(),
            uses: Default::default(),
        }
    }

    /// In sync: the proxy acknowledged what it should run.
    pub fn in_sync(&self) -> bool {
        self.desired_version.is_some() && self.desired_version == self.acked_version
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// Connected proxies whose snapshot uses the resource.
    pub proxies: usize,
    /// Of those, how many acknowledged their current snapshot.
    pub applied: usize,
    /// What of it was left out of proxies' snapshots, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// A proxy's status as its control plane publishes it in a shared store, with the resources
/// it uses (not part of the API's JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    pub status: ProxyStatus,
    pub uses: Vec<ResourceKey>,
}

/// A resource or instance that degraded itself: what was left out, why, and on which proxies.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceProblem {
    pub source: String,
    pub effect: String,
    pub reason: String,
    /// Nodes of the connected proxies whose snapshots it was left out of.
    pub proxies: BTreeSet<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub revision: u64,
    pub proxies: Vec<ProxyStatus>,
    pub resources: Vec<ResourceStatus>,
    /// Every problem of every connected proxy's snapshot, by source.
    pub problems: Vec<SourceProblem>,
    /// The control plane that answered (its replica id), and the one leading those sharing
    /// its store (see `leader`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

/// The connected proxies, by connection id.
#[derive(Debug, Default)]
pub struct Proxies {
    connected: Mutex<BTreeMap<u64, ProxyStatus>>,
    next: AtomicU64,
}

impl Proxies {
    /// Records a proxy that said hello; returns its connection id.
    pub fn connected(&self, status: ProxyStatus) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.connected.lock().insert(id, status);
        id
    }

    pub fn update(&self, id: u64, f: impl FnOnce(&mut ProxyStatus)) {
        if let Some(p) = self.connected.lock().get_mut(&id) {
            f(p);
        }
    }

    pub fn disconnected(&self, id: u64) {
        self.connected.lock().remove(&id);
    }

    /// (connected proxies, those of them not running what they should).
    pub fn counts(&self) -> (usize, usize) {
        let connected = self.connected.lock();
        let behind = connected.values().filter(|p| !p.in_sync()).count();
        (connected.len(), behind)
    }

    /// Every proxy, each resource of `keys` (at store `revision`) and every problem.
    pub fn status<'a>(
        &self,
        revision: u64,
        keys: impl IntoIterator<Item = &'a ResourceKey>,
    ) -> Status {
        self.status_with(revision, keys, Vec::new())
    }

    /// The connected proxies as other control planes see them: each with what it uses.
    pub fn published(&self) -> Vec<Published> {
        self.connected
            .lock()
            .values()
            .map(|p| Published {
                uses: p.uses.iter().cloned().collect(),
                status: p.clone(),
            })
            .collect()
    }

    /// [`Self::status`] counting `others` (proxies of other control planes on the same store)
    /// as well.
    pub fn status_with<'a>(
        &self,
        revision: u64,
        keys: impl IntoIterator<Item = &'a ResourceKey>,
        others: Vec<Published>,
    ) -> Status {
        let mut proxies: Vec<ProxyStatus> = self.connected.lock().values().cloned().collect();
        // A proxy that moved here from a control plane that died is still in what that one
        // published until its lease ends: each proxy (its instance) counts once, here first.
        let mut seen: BTreeSet<String> = proxies.iter().map(|p| p.instance.clone()).collect();
        proxies.extend(
            others
                .into_iter()
                .filter(|p| seen.insert(p.status.instance.clone()))
                .map(|p| {
                    let mut status = p.status;
                    status.uses = Arc::new(p.uses.into_iter().collect());
                    status
                }),
        );
        let mut problems: BTreeMap<(&str, &str, &str), BTreeSet<String>> = BTreeMap::new();
        for p in &proxies {
            for d in &p.problems {
                problems
                    .entry((&d.source, &d.effect, &d.reason))
                    .or_default()
                    .insert(p.node.clone());
            }
        }
        let mut resources = Vec::new();
        for key in keys {
            let users: Vec<&ProxyStatus> =
                proxies.iter().filter(|p| p.uses.contains(key)).collect();
            let source = key.to_string();
            resources.push(ResourceStatus {
                kind: key.kind.to_string(),
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                proxies: users.len(),
                applied: users.iter().filter(|p| p.in_sync()).count(),
                problems: problems
                    .keys()
                    .filter(|(s, _, _)| *s == source)
                    .map(|(_, effect, reason)| format!("{effect}: {reason}"))
                    .collect(),
            });
        }
        let problems = problems
            .into_iter()
            .map(|((source, effect, reason), proxies)| SourceProblem {
                source: source.to_string(),
                effect: effect.to_string(),
                reason: reason.to_string(),
                proxies,
            })
            .collect();
        Status {
            revision,
            proxies,
            resources,
            problems,
            replica: None,
            leader: None,
        }
    }
}
