//! Leadership among the control planes sharing a store, for the duties one of them does for
//! all: the audit log's retention today (and whatever must have one writer later). Everything
//! else needs none — every replica serves the API and the config streams, instance TTLs expire
//! in the store itself, statuses are aggregated by whichever replica is asked.
//!
//! One key, [`LEADER_KEY`], holds the leader's replica id under a lease the leader keeps alive
//! (every third of the lease). The others watch the key and campaign when it goes: when the
//! leader resigns (a clean stop revokes its lease) at once, when it died as soon as its lease
//! ends. A leader that cannot renew stops leading two thirds of the lease after the last
//! renewal it sent, on its own clock, so it has stopped before the store lets another take
//! over.

use std::{sync::Arc, time::Duration};

use parking_lot::Mutex;
use tokio::{sync::watch, time::Instant};

pub use crate::store::LEADER_KEY;
use crate::store::{EventKind, Expect, LeaseId, Op, Store, StoreError};

/// How long to wait before campaigning again after the store failed.
const RETRY: Duration = Duration::from_secs(1);

/// Who leads, as this control plane sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leader {
    /// The leader's replica id; None while no one holds the key (or the store does not answer).
    pub id: Option<String>,
    /// Whether this control plane leads (and may do the leader's duties now).
    pub me: bool,
}

/// This control plane's part in the election: it campaigns until [`Self::resign`].
#[derive(Debug, Clone)]
pub struct Leadership {
    leader: watch::Receiver<Leader>,
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    /// The lease of the key while this control plane holds it.
    lease: Mutex<Option<LeaseId>>,
    stop: watch::Sender<bool>,
}

impl Leadership {
    /// Starts campaigning as `replica` with a lease of `ttl` (at least 3 s; etcd rounds leases
    /// to whole seconds and has a minimum of about 2 s).
    pub fn campaign(store: Arc<dyn Store>, replica: String, ttl: Duration) -> Self {
        let ttl = ttl.max(Duration::from_secs(3));
        let (tx, leader) = watch::channel(Leader::default());
        let inner = Arc::new(Inner {
            store,
            lease: Mutex::new(None),
            stop: watch::Sender::new(false),
        });
        tokio::spawn(run(inner.clone(), replica, ttl, tx));
        Self { leader, inner }
    }

    /// Who leads now.
    pub fn current(&self) -> Leader {
        self.leader.borrow().clone()
    }

    /// Whether this control plane leads now.
    pub fn is_leader(&self) -> bool {
        self.leader.borrow().me
    }

    /// Changes of who leads.
    pub fn subscribe(&self) -> watch::Receiver<Leader> {
        self.leader.clone()
    }

    /// Stops campaigning and, when leading, gives the key up now (its lease revoked) so
    /// another control plane takes over without waiting for the lease to end.
    pub async fn resign(&self) {
        self.inner.stop.send_replace(true);
        // The campaign has ended (its sender gone) once this returns: nothing takes the key
        // again, and this control plane no longer says it leads.
        let mut ended = self.leader.clone();
        while ended.changed().await.is_ok() {}
        let lease = self.inner.lease.lock().take();
        if let Some(lease) = lease {
            match self.inner.store.revoke(lease).await {
                Ok(()) | Err(StoreError::LeaseNotFound(_)) => tracing::info!("leadership given up"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot give up leadership: the lease will end")
                }
            }
        }
    }
}

async fn run(inner: Arc<Inner>, replica: String, ttl: Duration, tx: watch::Sender<Leader>) {
    let mut stop = inner.stop.subscribe();
    loop {
        let step = async {
            match follow_or_lead(&inner, &replica, ttl, &tx).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: the store does not answer");
                    tx.send_if_modified(|l| {
                        let was = l.clone();
                        *l = Leader::default();
                        *l != was
                    });
                    tokio::time::sleep(RETRY).await;
                }
            }
        };
        tokio::select! {
            () = step => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    tx.send_replace(Leader::default());
}

/// One round: follow the leader until its key goes, or take the key and lead until it is lost.
async fn follow_or_lead(
    inner: &Inner,
    replica: &str,
    ttl: Duration,
    tx: &watch::Sender<Leader>,
) -> Result<(), StoreError> {
    let store = inner.store.as_ref();
    let listing = store.list(LEADER_KEY).await?;
    if let Some(held) = listing.items.iter().find(|kv| kv.key == LEADER_KEY) {
        let id = String::from_utf8_lossy(&held.value).into_owned();
        publish(tx, Some(id), false);
        return gone(store, listing.revision).await;
    }
    // The key's watch is open before the key is taken: once this control plane says it leads,
    // nothing it waits for is unbounded.
    let watch = tokio::time::timeout(ttl / 3, store.watch(LEADER_KEY, listing.revision))
        .await
        .map_err(|_| StoreError::Backend("the store did not open a watch in time".into()))??;
    // Granted before the write: the lease runs from before the key holds it. Recorded at
    // once, so a resignation revokes it whatever step the campaign was stopped at.
    let granted = Instant::now();
    let lease = store.grant_lease(ttl).await?;
    *inner.lease.lock() = Some(lease);
    let took = store
        .apply(vec![Op::Put {
            key: LEADER_KEY.into(),
            value: replica.as_bytes().to_vec(),
            expect: Expect::Absent,
            lease: Some(lease),
        }])
        .await;
    let why = match took {
        Ok(revision) => {
            tracing::info!(replica, "leading the control planes sharing the store");
            publish(tx, Some(replica.to_string()), true);
            let why = lead(store, lease, watch, revision, granted, ttl).await;
            publish(tx, None, false);
            tracing::warn!(replica, reason = %why, "no longer leading");
            Some(why)
        }
        // Another took it first: this lease holds nothing.
        Err(StoreError::Conflict { .. }) => None,
        Err(e) => {
            let _ = store.revoke(lease).await;
            inner.lease.lock().take();
            return Err(e);
        }
    };
    // Best effort: a key this control plane can no longer prove it holds is given up.
    let _ = store.revoke(lease).await;
    inner.lease.lock().take();
    if why.is_some() {
        // Not at once again: whatever ended the leadership may end the next one as fast.
        tokio::time::sleep(RETRY).await;
    }
    Ok(())
}

fn publish(tx: &watch::Sender<Leader>, id: Option<String>, me: bool) {
    let now = Leader { id, me };
    tx.send_if_modified(|l| {
        let changed = *l != now;
        *l = now;
        changed
    });
}

/// Waits until the leader's key is deleted (resigned, or its lease ended) after `revision`.
async fn gone(store: &dyn Store, revision: u64) -> Result<(), StoreError> {
    let mut watch = store.watch(LEADER_KEY, revision).await?;
    while let Some(change) = watch.recv().await {
        let change = change?;
        if change
            .events
            .iter()
            .any(|e| e.kv.key == LEADER_KEY && e.kind == EventKind::Delete)
        {
            return Ok(());
        }
    }
    Err(StoreError::Backend("the store's watch ended".into()))
}

/// Leads until the key is lost: renewing the lease every third of `ttl` (after a failed
/// renewal, every tenth, until it is too late); lost when the store says the lease is gone,
/// when the key changes after `taken` (the revision that took it), or when two thirds of `ttl`
/// passed since the last renewal that was answered was sent.
async fn lead(
    store: &dyn Store,
    lease: LeaseId,
    mut watch: crate::store::Watch,
    taken: u64,
    granted: Instant,
    ttl: Duration,
) -> String {
    let mut valid_until = granted + ttl * 2 / 3;
    let mut next_renewal = granted + ttl / 3;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next_renewal) => {
                let sent = Instant::now();
                match tokio::time::timeout_at(valid_until, store.keep_alive(lease)).await {
                    Ok(Ok(())) => {
                        valid_until = sent + ttl * 2 / 3;
                        next_renewal = sent + ttl / 3;
                    }
                    Ok(Err(StoreError::LeaseNotFound(_))) => return "the lease ended".into(),
                    Ok(Err(e)) if Instant::now() < valid_until => {
                        tracing::warn!(error = %e, "cannot renew leadership: trying again");
                        next_renewal = Instant::now() + ttl / 10;
                    }
                    Ok(Err(e)) => return format!("not renewed in time: {e}"),
                    Err(_) => return "not renewed in time: the store did not answer".into(),
                }
            }
            () = tokio::time::sleep_until(valid_until) => {
                return "not renewed in time".into();
            }
            change = watch.recv() => match change {
                Some(Ok(change)) => {
                    if change.revision > taken
                        && change.events.iter().any(|e| e.kv.key == LEADER_KEY)
                    {
                        return "the leader key was changed by someone else".into();
                    }
                }
                Some(Err(e)) => return format!("the leader key's watch failed: {e}"),
                None => return "the leader key's watch ended".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    async fn until(l: &Leadership, want: impl Fn(&Leader) -> bool) -> Leader {
        let mut rx = l.subscribe();
        let seen = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|x| want(x)))
            .await
            .expect("in time")
            .expect("campaigning");
        seen.clone()
    }

    /// Checks one store: one leader of two, both agree on it, and it keeps leading past its
    /// lease (renewed); when it dies (its task gone, its lease left to end) the other takes
    /// over, not before the lease ends; a leader that resigns hands over at once (with a lease
    /// far longer than the wait).
    pub(crate) async fn one_leader_at_a_time(store: Arc<dyn Store>) {
        let short = Duration::from_secs(3);
        let a = Leadership::campaign(store.clone(), "a".into(), short);
        let b = Leadership::campaign(store.clone(), "b".into(), short);
        let first = until(&a, |l| l.id.is_some()).await.id.unwrap();
        until(&b, |l| l.id.as_deref() == Some(&*first)).await;
        assert!(a.is_leader() != b.is_leader(), "exactly one leads");
        let (leader, follower) = if a.is_leader() { (a, b) } else { (b, a) };
        let mut changes = follower.subscribe();
        changes.borrow_and_update();
        // Twice the lease: without renewals the key would have gone and the follower seen it.
        tokio::time::sleep(short * 2).await;
        assert!(leader.is_leader());
        assert!(!changes.has_changed().unwrap(), "the leader never changed");

        // The leader dies: its campaign stops, its lease is left to end.
        let lease = leader.inner.lease.lock().expect("the leader's lease");
        leader.inner.stop.send_replace(true);
        // Renewed less than a third of the lease ago: its key stands for a while yet.
        let held = store
            .get(LEADER_KEY)
            .await
            .unwrap()
            .expect("the key stands");
        assert_eq!(held.value, first.as_bytes(), "until the lease ends");
        assert!(!follower.is_leader());
        let took = until(&follower, |l| l.me).await;
        assert_ne!(took.id.as_deref(), Some(&*first));
        assert!(matches!(
            store.keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        follower.resign().await;

        // A resignation hands over at once: the wait (30 s at most) is shorter than the lease.
        let long = Duration::from_secs(120);
        let c = Leadership::campaign(store.clone(), "c".into(), long);
        until(&c, |l| l.me).await;
        let d = Leadership::campaign(store.clone(), "d".into(), long);
        until(&d, |l| l.id.as_deref() == Some("c")).await;
        c.resign().await;
        assert!(!c.is_leader());
        until(&d, |l| l.me).await;
        d.resign().await;
        assert!(store.get(LEADER_KEY).await.unwrap().is_none(), "given up");
    }

    #[tokio::test]
    async fn one_leader_at_a_time_on_the_embedded_store() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        one_leader_at_a_time(store).await;
    }

    #[tokio::test]
    async fn one_leader_at_a_time_on_etcd() {
        let cluster = trellis_testkit::etcd::EtcdCluster::start(1).await;
        let mut options = crate::store::etcd::EtcdOptions::from_url(&cluster.url()).unwrap();
        options.prefix = "/leader-test/".into();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::etcd::EtcdStore::connect(&options)
                .await
                .unwrap(),
        );
        one_leader_at_a_time(store).await;
    }
}
