//! The registry store: a versioned key-value store with optimistic concurrency, watches from a
//! revision, and TTL leases. The embedded implementation keeps it in one durable file; etcd and
//! Kubernetes implement the same trait, and every implementation passes the conformance suite
//! (`conformance`, compiled for tests only: it is not part of the shipped library).

#[cfg(test)]
pub mod conformance;
pub mod embedded;
pub mod etcd;
pub mod migrate;

use std::{future::Future, pin::Pin, time::Duration};

use tokio::sync::mpsc;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The key naming the leader of the control planes sharing a store (see `leader`): theirs,
/// not the mesh's (a migration leaves it).
pub const LEADER_KEY: &str = "leader";

/// A lease: keys attached to it disappear when it is not kept alive for its TTL.
pub type LeaseId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last change to this key.
    pub mod_revision: u64,
    pub lease: Option<LeaseId>,
}

/// What a transaction expects of a key before it changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Any,
    /// The key must not exist.
    Absent,
    /// The key must exist at exactly this revision.
    Revision(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
        expect: Expect,
    },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Self::Put { key, .. } | Self::Delete { key, .. } => key,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// For a delete, the key with an empty value.
    pub kv: KeyValue,
}

/// All events of one revision (one transaction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub revision: u64,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The store's revision the listing reflects.
    pub revision: u64,
    pub items: Vec<KeyValue>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("conflict on {key:?}: {reason}")]
    Conflict { key: String, reason: String },
    #[error("lease {0} not found or expired")]
    LeaseNotFound(LeaseId),
    #[error("revision {requested} was compacted; the oldest available is {oldest}")]
    Compacted { requested: u64, oldest: u64 },
    #[error("store backend: {0}")]
    Backend(String),
}

/// Changes after a revision, in order; ends if the store stops.
pub type Watch = mpsc::Receiver<Result<Change, StoreError>>;

pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Every key under `prefix`, with the revision the listing reflects.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, StoreError>>;

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>>;

    /// Applies every op or none; returns the new revision. Fails with `Conflict` when an
    /// expectation does not hold.
    fn apply(&self, ops: Vec<Op>) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Changes under `prefix` with revisions above `after`, then live ones.
    fn watch<'a>(&'a self, prefix: &'a str, after: u64)
    -> BoxFuture<'a, Result<Watch, StoreError>>;

    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>>;

    /// Restarts the lease's TTL.
    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Ends the lease now, deleting its keys.
    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// A store whose every call is timed, and counted when the store fails (a backend error), by
/// operation (the control
/// plane's `trellis_control_store_seconds` and `trellis_control_store_errors_total`).
#[derive(Debug)]
pub struct Timed {
    inner: std::sync::Arc<dyn Store>,
    latency: prometheus::HistogramVec,
    errors: prometheus::IntCounterVec,
}

impl Timed {
    pub fn new(
        inner: std::sync::Arc<dyn Store>,
        latency: prometheus::HistogramVec,
        errors: prometheus::IntCounterVec,
    ) -> Self {
        Self {
            inner,
            latency,
            errors,
        }
    }

    fn timed<'a, T: Send + 'a>(
        &'a self,
        op: &'static str,
        call: BoxFuture<'a, Result<T, StoreError>>,
    ) -> BoxFuture<'a, Result<T, StoreError>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let result = call.await;
            self.latency
                .with_label_values(&[op])
                .observe(started.elapsed().as_secs_f64());
            // Failures of the store itself; a conflict, a lease gone or a compacted revision
            // is an answer the caller handles.
            if let Err(StoreError::Backend(_)) = &result {
                self.errors.with_label_values(&[op]).inc();
            }
            result
        })
    }
}

impl Store for Timed {
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, StoreError>> {
        self.timed("list", self.inner.list(prefix))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>> {
        self.timed("get", self.inner.get(key))
    }

    fn apply(&self, ops: Vec<Op>) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.timed("apply", self.inner.apply(ops))
    }

    fn watch<'a>(
        &'a self,
        prefix: &'a str,
        after: u64,
    ) -> BoxFuture<'a, Result<Watch, StoreError>> {
        self.timed("watch", self.inner.watch(prefix, after))
    }

    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>> {
        self.timed("grant_lease", self.inner.grant_lease(ttl))
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        self.timed("keep_alive", self.inner.keep_alive(lease))
    }

    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        self.timed("revoke", self.inner.revoke(lease))
    }
}
