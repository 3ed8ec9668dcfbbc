//! Circuit breaking: a cluster's connection pool limits (App Mesh's listener `connectionPool`,
//! Envoy's circuit breakers). The state is the cluster's, shared by every snapshot that keeps
//! the cluster with the same limits, so a config push neither resets nor doubles the counts.

use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Limits of one cluster; 0 is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolLimits {
    /// Upstream connections open at once (HTTP/1.1 connections, pooled ones included; TCP
    /// connections of a TCP cluster).
    pub max_connections: u32,
    /// Requests waiting for an HTTP/1.1 connection while `max_connections` are busy.
    pub max_pending_requests: u32,
    /// Requests in flight at once.
    pub max_requests: u32,
}

/// The counts behind a cluster's limits.
#[derive(Debug)]
pub struct ClusterLimits {
    pub config: PoolLimits,
    connections: Option<Arc<Semaphore>>,
    pending: AtomicUsize,
    requests: AtomicUsize,
    /// Woken when an HTTP/1.1 connection goes back to an idle pool of the cluster.
    pub(crate) released: Notify,
}

/// The cluster is at a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// One open upstream connection, counted until dropped (it lives in the connection).
#[derive(Debug)]
pub struct ConnPermit {
    _permit: OwnedSemaphorePermit,
    limits: Arc<ClusterLimits>,
}

impl ConnPermit {
    /// The limits the connection counts against.
    pub fn limits(&self) -> &Arc<ClusterLimits> {
        &self.limits
    }
}

/// One request in flight, counted until dropped.
#[derive(Debug)]
pub struct RequestPermit(Arc<ClusterLimits>);

impl Drop for RequestPermit {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One request waiting for a connection, counted until dropped.
#[derive(Debug)]
pub struct Pending<'a>(&'a ClusterLimits);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ClusterLimits {
    pub fn new(config: PoolLimits) -> Self {
        let connections = (config.max_connections > 0).then(|| {
            Arc::new(Semaphore::new(
                usize::try_from(config.max_connections).unwrap_or(Semaphore::MAX_PERMITS),
            ))
        });
        Self {
            config,
            connections,
            pending: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            released: Notify::new(),
        }
    }

    /// A request slot, `None` without a request limit.
    pub fn try_request(self: &Arc<Self>) -> Result<Option<RequestPermit>, Full> {
        let max = self.config.max_requests as usize;
        if max == 0 {
            return Ok(None);
        }
        if self.requests.fetch_add(1, Ordering::Relaxed) >= max {
            self.requests.fetch_sub(1, Ordering::Relaxed);
            return Err(Full);
        }
        Ok(Some(RequestPermit(self.clone())))
    }

    /// A connection slot if one is free, `None` without a connection limit.
    pub fn try_connection(self: &Arc<Self>) -> Result<Option<ConnPermit>, Full> {
        let Some(sem) = &self.connections else {
            return Ok(None);
        };
        match sem.clone().try_acquire_owned() {
            Ok(permit) => Ok(Some(ConnPermit {
                _permit: permit,
                limits: self.clone(),
            })),
            Err(_) => Err(Full),
        }
    }

    /// Waits for a connection slot (FIFO among waiters).
    pub async fn connection(self: &Arc<Self>) -> Result<Option<ConnPermit>, Full> {
        let Some(sem) = &self.connections else {
            return Ok(None);
        };
        match sem.clone().acquire_owned().await {
            Ok(permit) => Ok(Some(ConnPermit {
                _permit: permit,
                limits: self.clone(),
            })),
            Err(_) => Err(Full),
        }
    }

    /// Counts a request waiting for a connection, unless `max_pending_requests` already are.
    pub fn begin_pending(&self) -> Result<Pending<'_>, Full> {
        let max = match self.config.max_pending_requests {
            0 => usize::MAX,
            n => n as usize,
        };
        if self.pending.fetch_add(1, Ordering::Relaxed) >= max {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            return Err(Full);
        }
        Ok(Pending(self))
    }

    /// Open connections counted against the limit.
    pub fn open_connections(&self) -> usize {
        self.connections.as_ref().map_or(0, |s| {
            (self.config.max_connections as usize).saturating_sub(s.available_permits())
        })
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

// ---- Request mirroring's budget (a proxy's, across snapshots) ----

/// Copies in flight at a proxy at most (every route's, across snapshots); beyond, requests are
/// not copied (`busy`): a slow mirror target holds memory and tasks, never the route's
/// requests.
pub const MAX_IN_FLIGHT: usize = 1024;

/// Body bytes copies hold at a proxy at most; a body that would go beyond is not copied
/// (`busy`).
pub const MAX_HELD_BYTES: u64 = 64 * 1024 * 1024;

/// The most frames a body kept for a copy or a retry may have, for a `limit` of `limit` bytes:
/// a kept frame costs its bookkeeping (about 100 bytes) and may keep its whole read buffer, so a
/// body of 1-byte chunks within the byte limit would hold a hundred times it. A body of more
/// frames than this is not kept (as one over the limit): legitimate ones average 512 bytes or
/// more a frame, or are small.
pub(crate) fn max_kept_frames(limit: u64) -> usize {
    usize::try_from(limit / 512)
        .unwrap_or(usize::MAX)
        .saturating_add(1024)
}

/// A frame kept for a copy or a retry: a small one copied out of its read buffer, which it would
/// otherwise keep whole (a 1-byte chunk behind 4 KiB of chunk extensions would hold those too).
pub(crate) fn kept(data: &bytes::Bytes) -> bytes::Bytes {
    if data.len() < crate::chunked::MAX_CHUNK_LINE {
        bytes::Bytes::copy_from_slice(data)
    } else {
        data.clone()
    }
}

/// What every mirror of a proxy shares, across snapshots: the copies in flight and the body
/// bytes they hold.
#[derive(Debug, Default)]
pub struct MirrorBudget {
    copies: AtomicUsize,
    pub(crate) bytes: AtomicU64,
}

/// Body bytes reserved from the budget, given back when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) budget: Arc<MirrorBudget>,
    pub(crate) bytes: u64,
}

impl Held {
    /// Reserves `n` more; false (nothing reserved) beyond the budget.
    pub(crate) fn reserve(&mut self, n: u64) -> bool {
        let ok = self
            .budget
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                b.checked_add(n).filter(|t| *t <= MAX_HELD_BYTES)
            })
            .is_ok();
        if ok {
            self.bytes += n;
        }
        ok
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// One of the proxy's [`MAX_IN_FLIGHT`] copies, given back when the copy is over.
#[derive(Debug)]
pub(crate) struct Slot(Arc<MirrorBudget>);

impl Slot {
    pub(crate) fn take(budget: &Arc<MirrorBudget>) -> Option<Self> {
        budget
            .copies
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_IN_FLIGHT).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(budget.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.copies.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_bounded_and_released_on_drop() {
        let l = Arc::new(ClusterLimits::new(PoolLimits {
            max_connections: 2,
            max_pending_requests: 1,
            max_requests: 1,
        }));
        let a = l.try_connection().unwrap();
        let _b = l.try_connection().unwrap();
        assert_eq!(l.try_connection().unwrap_err(), Full);
        assert_eq!(l.open_connections(), 2);
        drop(a);
        assert!(l.try_connection().unwrap().is_some());
        let p = l.begin_pending().unwrap();
        assert!(l.begin_pending().is_err());
        drop(p);
        assert!(l.begin_pending().is_ok());
        let r = l.try_request().unwrap();
        assert!(l.try_request().is_err());
        drop(r);
        assert!(l.try_request().unwrap().is_some());
        let none = Arc::new(ClusterLimits::new(PoolLimits::default()));
        assert!(none.try_connection().unwrap().is_none());
        assert!(none.try_request().unwrap().is_none());
    }
}
