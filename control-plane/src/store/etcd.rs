//! The etcd store (`trellis-control --store etcd://HOST:PORT[,HOST:PORT...]`): the [`Store`]
//! trait on etcd v3, under a key prefix. A transaction's expectations are etcd compares (absent:
//! create revision 0; at a revision: mod revision), so an apply is all or nothing with
//! optimistic concurrency; revisions are etcd's; watches resume from a revision and report a
//! compacted one as [`StoreError::Compacted`] (the caller lists again, never a silent gap);
//! leases are etcd leases (whole seconds, at least etcd's minimum).

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, TlsOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;

use super::{
    BoxFuture, Change, Event, EventKind, Expect, KeyValue, LeaseId, Listing, Op, Store, StoreError,
    Watch,
};

/// Where etcd is and how to reach it.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// `host:port` of each member (or `http(s)://host:port`).
    pub endpoints: Vec<String>,
    /// Prepended to every key (`/trellis`), so several meshes, or other users, share a cluster.
    pub prefix: String,
    /// PEM: the CA etcd's certificates chain to, and this client's certificate and key.
    pub ca: Option<String>,
    pub identity: Option<(String, String)>,
}

impl EtcdOptions {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...]` (or `etcds://` for TLS).
    pub fn from_url(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("etcd://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("etcds://") {
            (true, rest)
        } else {
            return Err(format!(
                "{url:?}: an etcd store is etcd://HOST:PORT[,HOST:PORT...]"
            ));
        };
        let scheme = if tls { "https" } else { "http" };
        let endpoints: Vec<String> = rest
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        if endpoints.is_empty() {
            return Err(format!("{url:?}: no etcd endpoint"));
        }
        Ok(Self {
            endpoints,
            ..Self::default()
        })
    }
}

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn backend(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

/// The largest answer read from etcd (a whole store listed at start, a watch catching up):
/// tonic's default, 4 MiB, is too small for a large mesh with its registry and audit log.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// How long one request may take: with no member answering (a quorum lost, all down), an
/// apply fails with a clear error instead of hanging. Watches are not bounded.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

async fn timed<T>(
    what: &str,
    request: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Backend(format!(
                "etcd: no answer to {what} within {REQUEST_TIMEOUT:?} (are a majority of members up?); a write may have been applied"
            )))
        })
}

/// etcd's "requested lease not found" (a put, a revoke), or the client's "lease not found" (a
/// keep-alive answered with TTL 0).
fn lease_missing(e: &etcd_client::Error) -> bool {
    e.to_string().contains("lease not found")
}

impl EtcdStore {
    /// Connects (to any member that answers; requests move to another when one fails).
    pub async fn connect(options: &EtcdOptions) -> Result<Self, StoreError> {
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            // A member that stops answering (paused, cut off) is noticed within seconds and
            // requests go to the others.
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            // A member cut off from the majority answers with an error, never a stalled watch.
            .with_require_leader(true);
        if options.ca.is_some() || options.identity.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &options.ca {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &options.identity {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(tls);
        }
        let client = Client::connect(&options.endpoints, Some(connect))
            .await
            .map_err(backend)?;
        Ok(Self {
            client,
            prefix: options.prefix.clone(),
        })
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn strip(&self, key: &[u8]) -> Option<String> {
        let key = std::str::from_utf8(key).ok()?;
        key.strip_prefix(&self.prefix).map(str::to_string)
    }

    fn key_value(&self, kv: &etcd_client::KeyValue) -> Option<KeyValue> {
        Some(KeyValue {
            key: self.strip(kv.key())?,
            value: kv.value().to_vec(),
            mod_revision: u64::try_from(kv.mod_revision()).ok()?,
            lease: (kv.lease() != 0).then(|| kv.lease().cast_unsigned()),
        })
    }

    /// Which expectation failed, from the keys as they are now (read in the failed
    /// transaction's else branch).
    fn conflict(ops: &[Op], response: &etcd_client::TxnResponse) -> StoreError {
        let mut found = response.op_responses().into_iter();
        for op in ops {
            let (Op::Put { key, expect, .. } | Op::Delete { key, expect }) = op;
            if *expect == Expect::Any {
                continue;
            }
            let now = match found.next() {
                Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.mod_revision()),
                _ => None,
            };
            let reason = match (expect, now) {
                (Expect::Absent, Some(r)) => format!("exists at revision {r}"),
                (Expect::Revision(r), Some(now)) if now.cast_unsigned() != *r => {
                    format!("expected revision {r}, found {now}")
                }
                (Expect::Revision(r), None) => format!("expected revision {r}, found none"),
                _ => continue,
            };
            return StoreError::Conflict {
                key: key.clone(),
                reason,
            };
        }
        StoreError::Conflict {
            key: ops.first().map(|o| o.key().to_string()).unwrap_or_default(),
            reason: "changed meanwhile".into(),
        }
    }
}

impl Store for EtcdStore {
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, StoreError>> {
        Box::pin(timed("a list", async move {
            let mut kv = self
                .client
                .kv_client()
                .max_decoding_message_size(MAX_MESSAGE);
            let r = kv
                .get(self.full(prefix), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(backend)?;
            let revision = r.header().map_or(0, |h| h.revision().cast_unsigned());
            let items = r.kvs().iter().filter_map(|kv| self.key_value(kv)).collect();
            Ok(Listing { revision, items })
        }))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>> {
        Box::pin(timed("a read", async move {
            let mut kv = self
                .client
                .kv_client()
                .max_decoding_message_size(MAX_MESSAGE);
            let r = kv.get(self.full(key), None).await.map_err(backend)?;
            Ok(r.kvs().first().and_then(|kv| self.key_value(kv)))
        }))
    }

    fn apply(&self, ops: Vec<Op>) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(timed("a transaction", async move {
            // etcd's compare would take a missing key as at revision 0; no key is.
            if let Some(op) = ops.iter().find(|o| {
                matches!(
                    o,
                    Op::Put {
                        expect: Expect::Revision(0),
                        ..
                    } | Op::Delete {
                        expect: Expect::Revision(0),
                        ..
                    }
                )
            }) {
                return Err(StoreError::Conflict {
                    key: op.key().to_string(),
                    reason: "expected revision 0, which no key has".into(),
                });
            }
            let mut compares = Vec::new();
            let mut reads = Vec::new();
            let mut writes = Vec::new();
            for op in &ops {
                let (key, expect) = match op {
                    Op::Put { key, expect, .. } | Op::Delete { key, expect } => (key, expect),
                };
                let full = self.full(key);
                match expect {
                    Expect::Any => {}
                    Expect::Absent => {
                        compares.push(Compare::create_revision(full.clone(), CompareOp::Equal, 0));
                    }
                    Expect::Revision(r) => compares.push(Compare::mod_revision(
                        full.clone(),
                        CompareOp::Equal,
                        r.cast_signed(),
                    )),
                }
                if *expect != Expect::Any {
                    reads.push(TxnOp::get(full.clone(), None));
                }
                writes.push(match op {
                    Op::Put { value, lease, .. } => {
                        let options = lease.map(|l| PutOptions::new().with_lease(l.cast_signed()));
                        TxnOp::put(full, value.clone(), options)
                    }
                    Op::Delete { .. } => TxnOp::delete(full, None),
                });
            }
            let txn = Txn::new().when(compares).and_then(writes).or_else(reads);
            let mut kv = self
                .client
                .kv_client()
                .max_decoding_message_size(MAX_MESSAGE);
            let response = match kv.txn(txn).await {
                Ok(r) => r,
                Err(e) if lease_missing(&e) => {
                    let lease = ops
                        .iter()
                        .find_map(|o| match o {
                            Op::Put { lease, .. } => *lease,
                            Op::Delete { .. } => None,
                        })
                        .unwrap_or_default();
                    return Err(StoreError::LeaseNotFound(lease));
                }
                Err(e) if e.to_string().contains("too many operations in txn request") => {
                    return Err(StoreError::Backend(format!(
                        "etcd: this change is {} operations in one transaction, more than the cluster's --max-txn-ops allows (default 128): raise it on every member",
                        ops.len()
                    )));
                }
                Err(e) => return Err(backend(e)),
            };
            if !response.succeeded() {
                return Err(Self::conflict(&ops, &response));
            }
            Ok(response
                .header()
                .map_or(0, |h| h.revision().cast_unsigned()))
        }))
    }

    fn watch<'a>(
        &'a self,
        prefix: &'a str,
        after: u64,
    ) -> BoxFuture<'a, Result<Watch, StoreError>> {
        Box::pin(async move {
            let mut client = self
                .client
                .watch_client()
                .max_decoding_message_size(MAX_MESSAGE);
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision((after + 1).cast_signed());
            let mut stream = client
                .watch(self.full(prefix), Some(options))
                .await
                .map_err(backend)?;
            let (tx, rx) = mpsc::channel(1024);
            let this = self.clone();
            tokio::spawn(async move {
                loop {
                    let response = match stream.message().await {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            let _ = tx
                                .send(Err(StoreError::Backend("etcd: the watch ended".into())))
                                .await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(backend(e))).await;
                            return;
                        }
                    };
                    if response.compact_revision() > 0 {
                        let _ = tx
                            .send(Err(StoreError::Compacted {
                                requested: after + 1,
                                oldest: response.compact_revision().cast_unsigned(),
                            }))
                            .await;
                        return;
                    }
                    if response.canceled() {
                        let why = format!(
                            "etcd: the watch was cancelled: {}",
                            response.cancel_reason()
                        );
                        let _ = tx.send(Err(StoreError::Backend(why))).await;
                        return;
                    }
                    // One change per revision (one transaction), in order.
                    let mut changes: Vec<Change> = Vec::new();
                    for e in response.events() {
                        let Some(kv) = e.kv() else { continue };
                        let Some(mut kv) = this.key_value(kv) else {
                            continue;
                        };
                        let kind = match e.event_type() {
                            EventType::Put => EventKind::Put,
                            EventType::Delete => {
                                kv.value.clear();
                                EventKind::Delete
                            }
                        };
                        let revision = kv.mod_revision;
                        match changes.last_mut() {
                            Some(c) if c.revision == revision => c.events.push(Event { kind, kv }),
                            _ => changes.push(Change {
                                revision,
                                events: vec![Event { kind, kv }],
                            }),
                        }
                    }
                    for change in changes {
                        if tx.send(Ok(change)).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Ok(rx)
        })
    }

    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>> {
        Box::pin(timed("a lease grant", async move {
            // Whole seconds, rounded up (etcd raises it to its minimum, about 2 s, itself).
            let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
            let mut lease = self.client.lease_client();
            let r = lease
                .grant(seconds.max(1).cast_signed(), None)
                .await
                .map_err(backend)?;
            Ok(r.id().cast_unsigned())
        }))
    }

    fn keep_alive(&self, id: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(timed("a lease keep-alive", async move {
            let err = |e: etcd_client::Error| {
                if lease_missing(&e) {
                    StoreError::LeaseNotFound(id)
                } else {
                    backend(e)
                }
            };
            let mut lease = self.client.lease_client();
            let (mut keeper, mut stream) = lease.keep_alive(id.cast_signed()).await.map_err(err)?;
            keeper.keep_alive().await.map_err(err)?;
            // An expired or revoked lease answers with TTL 0.
            match stream.message().await.map_err(err)? {
                Some(r) if r.ttl() > 0 => Ok(()),
                Some(_) => Err(StoreError::LeaseNotFound(id)),
                // The connection went, not the lease.
                None => Err(StoreError::Backend(
                    "etcd: the keep-alive stream closed before an answer".into(),
                )),
            }
        }))
    }

    fn revoke(&self, id: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(timed("a lease revocation", async move {
            let mut lease = self.client.lease_client();
            match lease.revoke(id.cast_signed()).await {
                Ok(_) => Ok(()),
                Err(e) if lease_missing(&e) => Err(StoreError::LeaseNotFound(id)),
                Err(e) => Err(backend(e)),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use trellis_testkit::etcd::EtcdCluster;

    use super::*;

    async fn store(cluster: &EtcdCluster, prefix: &str) -> EtcdStore {
        let mut options = EtcdOptions::from_url(&cluster.url()).unwrap();
        options.prefix = prefix.into();
        EtcdStore::connect(&options).await.unwrap()
    }

    #[tokio::test]
    async fn passes_the_conformance_suite_on_one_member() {
        let cluster = EtcdCluster::start(1).await;
        super::super::conformance::run(&store(&cluster, "/trellis/").await).await;
    }

    #[tokio::test]
    async fn passes_the_conformance_suite_on_three_members() {
        let cluster = EtcdCluster::start(3).await;
        super::super::conformance::run(&store(&cluster, "/mesh-a/").await).await;
        // Another prefix on the same cluster sees none of it.
        let other = store(&cluster, "/mesh-b/").await;
        assert!(other.list("").await.unwrap().items.is_empty());
    }

    /// A watch from a revision etcd compacted away says so (the caller lists again): never a
    /// silent gap.
    #[tokio::test]
    async fn a_compacted_revision_is_reported() {
        let cluster = EtcdCluster::start(1).await;
        let store = store(&cluster, "/t/").await;
        let put = |k: &str| Op::Put {
            key: k.into(),
            value: b"v".to_vec(),
            expect: Expect::Any,
            lease: None,
        };
        let first = store.apply(vec![put("a")]).await.unwrap();
        let last = store.apply(vec![put("b")]).await.unwrap();
        let mut kv = store.client.kv_client();
        kv.compact(last.cast_signed(), None).await.unwrap();
        let mut w = store.watch("", first - 1).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), w.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(got, Err(StoreError::Compacted { oldest, .. }) if oldest == last),
            "{got:?}"
        );
        // From the compaction on, watching works.
        let mut w = store.watch("", last).await.unwrap();
        let next = store.apply(vec![put("c")]).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), w.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.revision, next);
    }

    #[test]
    fn urls_name_the_members() {
        let o = EtcdOptions::from_url("etcd://10.0.0.1:2379, 10.0.0.2:2379").unwrap();
        assert_eq!(
            o.endpoints,
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        let o = EtcdOptions::from_url("etcds://e:2379").unwrap();
        assert_eq!(o.endpoints, ["https://e:2379"]);
        assert!(EtcdOptions::from_url("http://e:2379").is_err());
        assert!(EtcdOptions::from_url("etcd://").is_err());
    }
}
