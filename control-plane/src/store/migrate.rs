//! Moving a mesh between stores (`trellis-control migrate --from ... --to ...`): every key
//! (resources, instances, the CA, operators, the audit log) copied into an empty store, checked
//! by a content hash of both. Keys held by a lease (instances with a TTL) get a new lease of
//! their TTL in the target; revisions are the target's own.

use std::{collections::BTreeMap, time::Duration};

use super::{Expect, KeyValue, Listing, Op, Store, StoreError};

/// Keys per transaction (etcd's default limit is 128 operations).
const BATCH: usize = 100;

/// What a migration copied, and the content hash both stores have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub keys: usize,
    pub leased: usize,
    pub hash: u64,
}

/// A hash of every key and value (not revisions or leases, which differ between stores).
pub fn content_hash(listing: &Listing) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let sorted: BTreeMap<&str, &[u8]> = listing
        .items
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_slice()))
        .collect();
    for (k, v) in sorted {
        h.update(&(k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        h.update(&(v.len() as u64).to_le_bytes());
        h.update(v);
    }
    h.digest()
}

/// The TTL a leased key should get again: an instance's `ttlSeconds`.
fn ttl_of(kv: &KeyValue) -> Option<Duration> {
    let v: serde_json::Value = serde_json::from_slice(&kv.value).ok()?;
    v["ttlSeconds"].as_u64().map(Duration::from_secs)
}

/// Copies everything from `from` into `to`, which must be empty, and checks the copy.
pub async fn migrate(from: &dyn Store, to: &dyn Store) -> Result<Migrated, StoreError> {
    let source = from.list("").await?;
    let existing = to.list("").await?;
    if let Some(kv) = existing.items.first() {
        return Err(StoreError::Conflict {
            key: kv.key.clone(),
            reason: format!(
                "the target store is not empty ({} keys): migrate into an empty one",
                existing.items.len()
            ),
        });
    }
    let mut leases: BTreeMap<u64, u64> = BTreeMap::new();
    let mut leased = 0;
    let mut ops = Vec::with_capacity(BATCH);
    // What control planes publish of their proxies (`replicas/`) and who leads them live with
    // their processes, not the mesh: not copied.
    let source = Listing {
        revision: source.revision,
        items: source
            .items
            .into_iter()
            .filter(|kv| !kv.key.starts_with("replicas/") && kv.key != super::LEADER_KEY)
            .collect(),
    };
    for kv in &source.items {
        let lease = match (kv.lease, ttl_of(kv)) {
            (Some(old), Some(ttl)) => {
                leased += 1;
                Some(match leases.get(&old) {
                    Some(new) => *new,
                    None => {
                        let new = to.grant_lease(ttl).await?;
                        leases.insert(old, new);
                        new
                    }
                })
            }
            (Some(_), None) => {
                return Err(StoreError::Conflict {
                    key: kv.key.clone(),
                    reason: "held by a lease whose TTL is unknown: not copied for good".into(),
                });
            }
            (None, _) => None,
        };
        ops.push(Op::Put {
            key: kv.key.clone(),
            value: kv.value.clone(),
            expect: Expect::Absent,
            lease,
        });
        if ops.len() == BATCH {
            to.apply(std::mem::take(&mut ops)).await?;
        }
    }
    if !ops.is_empty() {
        to.apply(ops).await?;
    }
    let (want, got) = (content_hash(&source), content_hash(&to.list("").await?));
    if want != got {
        return Err(StoreError::Backend(format!(
            "the copy differs from the source (content hash {got:016x}, source {want:016x})"
        )));
    }
    Ok(Migrated {
        keys: source.items.len(),
        leased,
        hash: want,
    })
}

#[cfg(test)]
mod tests {
    use trellis_testkit::etcd::EtcdCluster;

    use super::*;
    use crate::store::{embedded::EmbeddedStore, etcd};

    async fn fill(store: &dyn Store) {
        let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        let mut ops: Vec<Op> = (0..250)
            .map(|i| Op::Put {
                key: format!("resources/virtualnode/default/n{i:03}"),
                value: format!("{{\"n\":{i}}}").into_bytes(),
                expect: Expect::Any,
                lease: None,
            })
            .collect();
        ops.push(Op::Put {
            key: "instances/test/svc/i1".into(),
            value: br#"{"ttlSeconds":60}"#.to_vec(),
            expect: Expect::Any,
            lease: Some(lease),
        });
        // What a control plane publishes of its proxies: not part of the mesh.
        ops.push(Op::Put {
            key: "replicas/0123/000000".into(),
            value: b"[]".to_vec(),
            expect: Expect::Any,
            lease: Some(lease),
        });
        // Who leads the control planes: theirs, not the mesh's.
        ops.push(Op::Put {
            key: crate::store::LEADER_KEY.into(),
            value: b"0123".to_vec(),
            expect: Expect::Any,
            lease: Some(lease),
        });
        for chunk in ops.chunks(BATCH) {
            store.apply(chunk.to_vec()).await.unwrap();
        }
    }

    /// Embedded → etcd → embedded: the same content each way (hash checked), leases given
    /// again; a target that is not empty is refused.
    #[tokio::test]
    async fn a_mesh_moves_to_etcd_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let embedded = EmbeddedStore::open(&dir.path().join("a")).unwrap();
        fill(&embedded).await;
        let cluster = EtcdCluster::start(1).await;
        let mut options = etcd::EtcdOptions::from_url(&cluster.url()).unwrap();
        options.prefix = "/m/".into();
        let etcd = etcd::EtcdStore::connect(&options).await.unwrap();
        let there = migrate(&embedded, &etcd).await.unwrap();
        assert_eq!((there.keys, there.leased), (251, 1));
        let instance = etcd.get("instances/test/svc/i1").await.unwrap().unwrap();
        assert!(instance.lease.is_some(), "a new lease in etcd");
        etcd.keep_alive(instance.lease.unwrap()).await.unwrap();

        let back = EmbeddedStore::open(&dir.path().join("b")).unwrap();
        let again = migrate(&etcd, &back).await.unwrap();
        assert_eq!(again.hash, there.hash);
        assert_eq!(content_hash(&back.list("").await.unwrap()), there.hash);

        assert!(
            etcd.get("replicas/0123/000000").await.unwrap().is_none(),
            "not copied"
        );
        assert!(
            etcd.get(crate::store::LEADER_KEY).await.unwrap().is_none(),
            "not copied"
        );
        let err = migrate(&embedded, &etcd).await.unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");

        // A leased key whose TTL is unknown is refused, not copied for good.
        let odd = EmbeddedStore::open(&dir.path().join("c")).unwrap();
        let lease = odd.grant_lease(Duration::from_secs(60)).await.unwrap();
        let put = Op::Put {
            key: "tokens/x".into(),
            value: b"{}".to_vec(),
            expect: Expect::Any,
            lease: Some(lease),
        };
        odd.apply(vec![put]).await.unwrap();
        let empty = EmbeddedStore::open(&dir.path().join("d")).unwrap();
        let err = migrate(&odd, &empty).await.unwrap_err();
        assert!(err.to_string().contains("TTL is unknown"), "{err}");
    }
}
