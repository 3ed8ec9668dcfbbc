//! The embedded store: one redb file in the data directory, no other process. Every transaction
//! is durable when `apply` returns. Recent changes are kept in a log so watches can resume from a
//! revision; leases live in the file too and, after a restart, get a fresh TTL before expiring.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Weak},
    time::Duration,
};

use parking_lot::Mutex;

use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use tokio::{
    sync::{broadcast, mpsc},
    // Tokio's clock, so that tests on paused time can run leases out.
    time::Instant,
};

use super::{
    BoxFuture, Change, Event, EventKind, Expect, KeyValue, LeaseId, Listing, Op, Store, StoreError,
    Watch,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");

/// redb's page cache. Its default (1 GiB) keeps the whole file in memory once read; the
/// controller holds the decoded view itself and reads the file back only at start and for
/// watch backlogs, so a small cache serves.
const CACHE_BYTES: usize = 8 << 20;

/// Changes kept for watches that resume from a revision.
const LOG_RETAIN: u64 = 10_000;
const REAP_EVERY: Duration = Duration::from_millis(200);

/// When a lease of `ttl` granted at `now` ends; a TTL too long for the clock never ends (no
/// overflow panic, whatever a caller or an old store file asks for).
fn expiry(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Database,
    live: broadcast::Sender<Change>,
    /// Lease deadlines (TTLs are in the file).
    deadlines: Mutex<HashMap<LeaseId, (Duration, Instant)>>,
    /// Serialises commits with their broadcast so watchers see revisions in order.
    writer: Mutex<()>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Stored value: mod_revision (8 bytes LE), lease (8 bytes LE, 0 = none), then the value.
fn encode_value(revision: u64, lease: Option<LeaseId>, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + value.len());
    out.extend_from_slice(&revision.to_le_bytes());
    out.extend_from_slice(&lease.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn decode_value(key: &str, raw: &[u8]) -> Result<KeyValue, StoreError> {
    let (rev, rest) = raw
        .split_at_checked(8)
        .ok_or_else(|| backend("corrupt value"))?;
    let (lease, value) = rest
        .split_at_checked(8)
        .ok_or_else(|| backend("corrupt value"))?;
    let rev = u64::from_le_bytes(rev.try_into().map_err(backend)?);
    let lease = u64::from_le_bytes(lease.try_into().map_err(backend)?);
    Ok(KeyValue {
        key: key.to_string(),
        value: value.to_vec(),
        mod_revision: rev,
        lease: (lease != 0).then_some(lease),
    })
}

/// Log entry: per event, kind (1 byte), key length (4), key, stored value length (4), stored value.
fn encode_change(change: &Change) -> Vec<u8> {
    let mut out = Vec::new();
    for e in &change.events {
        out.push(match e.kind {
            EventKind::Put => 1,
            EventKind::Delete => 2,
        });
        let value = encode_value(e.kv.mod_revision, e.kv.lease, &e.kv.value);
        for part in [e.kv.key.as_bytes(), &value] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
    }
    out
}

fn decode_change(revision: u64, mut raw: &[u8]) -> Result<Change, StoreError> {
    let corrupt = || backend("corrupt log entry");
    let mut take = |n: usize| -> Result<&[u8], StoreError> {
        let (head, rest) = raw.split_at_checked(n).ok_or_else(corrupt)?;
        raw = rest;
        Ok(head)
    };
    let mut events = Vec::new();
    while let Ok(kind) = take(1) {
        let kind = match kind.first() {
            Some(1) => EventKind::Put,
            Some(2) => EventKind::Delete,
            _ => return Err(corrupt()),
        };
        let mut part = || -> Result<Vec<u8>, StoreError> {
            let len = u32::from_le_bytes(take(4)?.try_into().map_err(|_| corrupt())?) as usize;
            Ok(take(len)?.to_vec())
        };
        let key = String::from_utf8(part()?).map_err(|_| corrupt())?;
        let kv = decode_value(&key, &part()?)?;
        events.push(Event { kind, kv });
    }
    Ok(Change { revision, events })
}

impl EmbeddedStore {
    /// Opens (or creates) `DIR/registry.redb`. Must be called inside a tokio runtime: a task
    /// expires leases.
    ///
    /// The directory is made readable by this user only (0700) and the file too (0600): it
    /// holds the mesh's CA key, tokens' hashes and the audit log. Looser modes found on an
    /// existing directory or file are tightened, and said so in the log.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let file = dir.join("registry.redb");
        private(dir, &file).map_err(backend)?;
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&file)
            .map_err(backend)?;
        // Make sure every table exists, and give persisted leases a fresh TTL.
        let txn = db.begin_write().map_err(backend)?;
        let mut deadlines = HashMap::new();
        {
            txn.open_table(KV).map_err(backend)?;
            txn.open_table(META).map_err(backend)?;
            txn.open_table(LOG).map_err(backend)?;
            let leases = txn.open_table(LEASES).map_err(backend)?;
            let now = Instant::now();
            for row in leases.iter().map_err(backend)? {
                let (id, ttl) = row.map_err(backend)?;
                let ttl = Duration::from_millis(ttl.value());
                deadlines.insert(id.value(), (ttl, expiry(now, ttl)));
            }
        }
        txn.commit().map_err(backend)?;
        let (live, _) = broadcast::channel(4096);
        let inner = Arc::new(Inner {
            db,
            live,
            deadlines: Mutex::new(deadlines),
            writer: Mutex::new(()),
        });
        tokio::spawn(reap(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }
}

/// Creates `dir` (0700) and `file` (0600, empty: redb initialises an empty file) unless they
/// exist, and tightens them when they do with looser modes.
fn private(dir: &Path, file: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(file)?;
    for (path, mode) in [(dir, 0o700), (file, 0o600)] {
        let found = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if found & !mode != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
            tracing::warn!(path = %path.display(), from = %format!("{found:o}"), to = %format!("{mode:o}"), "tightened the permissions of the store: it holds the CA's key");
        }
    }
    Ok(())
}

/// Revokes expired leases until the store is dropped.
async fn reap(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let expired: Vec<LeaseId> = inner
            .deadlines
            .lock()
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for lease in expired {
            let inner = inner.clone();
            let result = tokio::task::spawn_blocking(move || inner.revoke(lease)).await;
            if let Ok(Err(e)) = result {
                tracing::warn!(lease, error = %e, "cannot expire lease");
            }
        }
    }
}

impl Inner {
    fn revision(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let meta = txn.open_table(META).map_err(backend)?;
        Ok(meta
            .get("revision")
            .map_err(backend)?
            .map_or(0, |g| g.value()))
    }

    fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let meta = txn.open_table(META).map_err(backend)?;
        let revision = meta
            .get("revision")
            .map_err(backend)?
            .map_or(0, |g| g.value());
        let kv = txn.open_table(KV).map_err(backend)?;
        let mut items = Vec::new();
        for row in kv.range(prefix..).map_err(backend)? {
            let (k, v) = row.map_err(backend)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            items.push(decode_value(k.value(), v.value())?);
        }
        Ok(Listing { revision, items })
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let kv = txn.open_table(KV).map_err(backend)?;
        kv.get(key)
            .map_err(backend)?
            .map(|v| decode_value(key, v.value()))
            .transpose()
    }

    fn apply(&self, ops: Vec<Op>) -> Result<u64, StoreError> {
        let _writer = self.writer.lock();
        let txn = self.db.begin_write().map_err(backend)?;
        let change;
        {
            let mut kv = txn.open_table(KV).map_err(backend)?;
            let mut meta = txn.open_table(META).map_err(backend)?;
            let mut log = txn.open_table(LOG).map_err(backend)?;
            let leases = txn.open_table(LEASES).map_err(backend)?;
            let current = meta
                .get("revision")
                .map_err(backend)?
                .map_or(0, |g| g.value());
            let revision = current + 1;

            // Check every expectation before changing anything.
            for op in &ops {
                check(&kv, &leases, op)?;
            }
            let events = write(&mut kv, ops, revision)?;
            if events.is_empty() {
                return Ok(current);
            }
            change = Change { revision, events };
            meta.insert("revision", revision).map_err(backend)?;
            log.insert(revision, encode_change(&change).as_slice())
                .map_err(backend)?;
            if revision > LOG_RETAIN {
                let oldest = revision - LOG_RETAIN;
                log.remove(oldest).map_err(backend)?;
                meta.insert("oldest", oldest + 1).map_err(backend)?;
            }
        }
        txn.commit().map_err(backend)?;
        let revision = change.revision;
        let _ = self.live.send(change);
        Ok(revision)
    }

    /// Changes after `after` from the log.
    fn backlog(&self, prefix: &str, after: u64) -> Result<Vec<Change>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let meta = txn.open_table(META).map_err(backend)?;
        let oldest = meta
            .get("oldest")
            .map_err(backend)?
            .map_or(1, |g| g.value());
        if after + 1 < oldest {
            return Err(StoreError::Compacted {
                requested: after + 1,
                oldest,
            });
        }
        let log = txn.open_table(LOG).map_err(backend)?;
        let mut out = Vec::new();
        for row in log.range(after + 1..).map_err(backend)? {
            let (rev, raw) = row.map_err(backend)?;
            let mut change = decode_change(rev.value(), raw.value())?;
            change.events.retain(|e| e.kv.key.starts_with(prefix));
            if !change.events.is_empty() {
                out.push(change);
            }
        }
        Ok(out)
    }

    fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let id;
        {
            let mut meta = txn.open_table(META).map_err(backend)?;
            let mut leases = txn.open_table(LEASES).map_err(backend)?;
            id = meta
                .get("next_lease")
                .map_err(backend)?
                .map_or(1, |g| g.value());
            meta.insert("next_lease", id + 1).map_err(backend)?;
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            leases.insert(id, ms).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        self.deadlines
            .lock()
            .insert(id, (ttl, expiry(Instant::now(), ttl)));
        Ok(id)
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut deadlines = self.deadlines.lock();
        let now = Instant::now();
        match deadlines.get_mut(&lease) {
            // An expired lease is not renewed, even before the reaper has revoked it (as etcd).
            Some((ttl, deadline)) if *deadline > now => {
                *deadline = expiry(now, *ttl);
                Ok(())
            }
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let keys: Vec<String> = {
            let txn = self.db.begin_read().map_err(backend)?;
            let kv = txn.open_table(KV).map_err(backend)?;
            let mut keys = Vec::new();
            for row in kv.iter().map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                if decode_value(k.value(), v.value())?.lease == Some(lease) {
                    keys.push(k.value().to_string());
                }
            }
            keys
        };
        let ops = keys
            .into_iter()
            .map(|key| Op::Delete {
                key,
                expect: Expect::Any,
            })
            .collect();
        self.apply(ops)?;
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut leases = txn.open_table(LEASES).map_err(backend)?;
            leases.remove(lease).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        self.deadlines.lock().remove(&lease);
        Ok(())
    }
}

type KvTable<'txn> = redb::Table<'txn, &'static str, &'static [u8]>;

/// Fails unless `op`'s expectation holds (and its lease exists).
fn check(kv: &KvTable<'_>, leases: &redb::Table<'_, u64, u64>, op: &Op) -> Result<(), StoreError> {
    let key = op.key();
    let expect = match op {
        Op::Put { expect, lease, .. } => {
            if let Some(l) = lease
                && leases.get(*l).map_err(backend)?.is_none()
            {
                return Err(StoreError::LeaseNotFound(*l));
            }
            *expect
        }
        Op::Delete { expect, .. } => *expect,
    };
    let existing = kv
        .get(key)
        .map_err(backend)?
        .map(|v| decode_value(key, v.value()))
        .transpose()?;
    let conflict = match (expect, &existing) {
        (Expect::Any, _) => None,
        (Expect::Absent, Some(kv)) => Some(format!("exists at revision {}", kv.mod_revision)),
        (Expect::Absent, None) => None,
        (Expect::Revision(r), Some(kv)) if kv.mod_revision != r => {
            Some(format!("expected revision {r}, found {}", kv.mod_revision))
        }
        (Expect::Revision(_), Some(_)) => None,
        (Expect::Revision(r), None) => Some(format!("expected revision {r}, found none")),
    };
    match conflict {
        Some(reason) => Err(StoreError::Conflict {
            key: key.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Applies `ops` at `revision`; the events they make (deleting a missing key makes none).
fn write(kv: &mut KvTable<'_>, ops: Vec<Op>, revision: u64) -> Result<Vec<Event>, StoreError> {
    let mut events = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            Op::Put {
                key, value, lease, ..
            } => {
                kv.insert(
                    key.as_str(),
                    encode_value(revision, lease, &value).as_slice(),
                )
                .map_err(backend)?;
                events.push(Event {
                    kind: EventKind::Put,
                    kv: KeyValue {
                        key,
                        value,
                        mod_revision: revision,
                        lease,
                    },
                });
            }
            Op::Delete { key, .. } => {
                if kv.remove(key.as_str()).map_err(backend)?.is_some() {
                    events.push(Event {
                        kind: EventKind::Delete,
                        kv: KeyValue {
                            key,
                            value: Vec::new(),
                            mod_revision: revision,
                            lease: None,
                        },
                    });
                }
            }
        }
    }
    Ok(events)
}

/// Runs a blocking store call off the async workers.
async fn blocking<T: Send + 'static>(
    inner: &Arc<Inner>,
    f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let inner = inner.clone();
    tokio::task::spawn_blocking(move || f(&inner))
        .await
        .map_err(backend)?
}

impl Store for EmbeddedStore {
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, StoreError>> {
        Box::pin(async move { self.inner.list(prefix) })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>> {
        Box::pin(async move { self.inner.get(key) })
    }

    fn apply(&self, ops: Vec<Op>) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(blocking(&self.inner, move |i| i.apply(ops)))
    }

    fn watch<'a>(
        &'a self,
        prefix: &'a str,
        after: u64,
    ) -> BoxFuture<'a, Result<Watch, StoreError>> {
        Box::pin(async move {
            // Subscribe before reading the log so nothing falls between the two.
            let mut live = self.inner.live.subscribe();
            let backlog = self.inner.backlog(prefix, after)?;
            let (tx, rx) = mpsc::channel(1024);
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                let mut last = after;
                for change in backlog {
                    last = change.revision;
                    if tx.send(Ok(change)).await.is_err() {
                        return;
                    }
                }
                loop {
                    match live.recv().await {
                        Ok(mut change) => {
                            if change.revision <= last {
                                continue;
                            }
                            last = change.revision;
                            change.events.retain(|e| e.kv.key.starts_with(&prefix));
                            if !change.events.is_empty() && tx.send(Ok(change)).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            // The watcher fell behind: it must list again.
                            let _ = tx
                                .send(Err(StoreError::Compacted {
                                    requested: last + 1,
                                    oldest: last + 2,
                                }))
                                .await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
            Ok(rx)
        })
    }

    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>> {
        Box::pin(blocking(&self.inner, move |i| i.grant(ttl)))
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.inner.keep_alive(lease) })
    }

    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(blocking(&self.inner, move |i| i.revoke(lease)))
    }
}

impl EmbeddedStore {
    /// The store's current revision.
    pub fn revision(&self) -> Result<u64, StoreError> {
        self.inner.revision()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_too_long_for_the_clock_does_not_panic() {
        let now = Instant::now();
        assert!(expiry(now, Duration::from_secs(u64::MAX)) > now);
        assert_eq!(
            expiry(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
    }

    #[tokio::test]
    async fn passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        super::super::conformance::run(&store).await;
    }

    #[tokio::test]
    async fn data_and_leases_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let lease;
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
            let put = |k: &str, lease| Op::Put {
                key: k.into(),
                value: b"v".to_vec(),
                expect: Expect::Any,
                lease,
            };
            store
                .apply(vec![put("a", None), put("b", Some(lease))])
                .await
                .unwrap();
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let listing = store.list("").await.unwrap();
        assert_eq!(listing.items.len(), 2);
        assert_eq!(listing.revision, 1);
        store.keep_alive(lease).await.unwrap();
        // The log survives too: a watch from 0 replays the write.
        let mut w = store.watch("", 0).await.unwrap();
        assert_eq!(w.recv().await.unwrap().unwrap().revision, 1);
    }
}
