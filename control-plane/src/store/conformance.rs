//! The behaviour every [`Store`] implementation must show. Implementations call [`run`] from a
//! test with a fresh, empty store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use super::{Change, EventKind, Expect, Op, Store, StoreError};

fn put(key: &str, value: &str, expect: Expect) -> Op {
    Op::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        expect,
        lease: None,
    }
}

async fn next(w: &mut super::Watch) -> Change {
    tokio::time::timeout(Duration::from_secs(10), w.recv())
        .await
        .expect("a watch event in time")
        .expect("watch open")
        .expect("no watch error")
}

/// Runs every check against `store`, which must start empty.
pub async fn run(store: &dyn Store) {
    crud_and_revisions(store).await;
    optimistic_concurrency_is_atomic(store).await;
    watches_resume_from_a_revision(store).await;
    leases_expire_their_keys(store).await;
}

async fn crud_and_revisions(store: &dyn Store) {
    let empty = store.list("c/").await.unwrap();
    assert!(empty.items.is_empty());
    let r1 = store
        .apply(vec![put("c/a", "1", Expect::Absent)])
        .await
        .unwrap();
    let r2 = store
        .apply(vec![
            put("c/b", "2", Expect::Any),
            put("other/x", "x", Expect::Any),
        ])
        .await
        .unwrap();
    assert!(r2 > r1, "revisions increase");
    let a = store.get("c/a").await.unwrap().unwrap();
    assert_eq!((a.value.as_slice(), a.mod_revision), (b"1".as_slice(), r1));
    let listing = store.list("c/").await.unwrap();
    let keys: Vec<_> = listing.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["c/a", "c/b"], "prefix listing, in key order");
    assert!(listing.revision >= r2);
    let r3 = store
        .apply(vec![put("c/a", "1b", Expect::Revision(r1))])
        .await
        .unwrap();
    assert_eq!(store.get("c/a").await.unwrap().unwrap().mod_revision, r3);
    store
        .apply(vec![Op::Delete {
            key: "c/a".into(),
            expect: Expect::Revision(r3),
        }])
        .await
        .unwrap();
    assert!(store.get("c/a").await.unwrap().is_none());
}

async fn optimistic_concurrency_is_atomic(store: &dyn Store) {
    let r = store
        .apply(vec![put("o/a", "1", Expect::Absent)])
        .await
        .unwrap();
    let err = store
        .apply(vec![put("o/a", "2", Expect::Absent)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { ref key, .. } if key == "o/a"),
        "{err}"
    );
    let err = store
        .apply(vec![put("o/a", "2", Expect::Revision(r + 100))])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    // One failing expectation: nothing of the transaction happens.
    let err = store
        .apply(vec![
            put("o/new", "n", Expect::Any),
            put("o/a", "3", Expect::Revision(r + 100)),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }));
    assert!(
        store.get("o/new").await.unwrap().is_none(),
        "the transaction was all or nothing"
    );
    assert_eq!(store.get("o/a").await.unwrap().unwrap().value, b"1");
    let err = store
        .apply(vec![Op::Delete {
            key: "o/missing".into(),
            expect: Expect::Revision(1),
        }])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }));
    // No key is at revision 0: expecting it of a missing key is a conflict too.
    let err = store
        .apply(vec![put("o/missing", "x", Expect::Revision(0))])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
}

async fn watches_resume_from_a_revision(store: &dyn Store) {
    let start = store
        .apply(vec![put("w/a", "1", Expect::Any)])
        .await
        .unwrap();
    let r2 = store
        .apply(vec![
            put("w/b", "2", Expect::Any),
            put("elsewhere", "x", Expect::Any),
        ])
        .await
        .unwrap();
    // From `start`: the backlog after it (r2), then live changes; other prefixes are filtered.
    let mut w = store.watch("w/", start).await.unwrap();
    let c = next(&mut w).await;
    assert_eq!(c.revision, r2);
    assert_eq!(c.events.len(), 1);
    assert_eq!(c.events[0].kv.key, "w/b");
    store
        .apply(vec![put("not-w", "x", Expect::Any)])
        .await
        .unwrap();
    let r4 = store
        .apply(vec![Op::Delete {
            key: "w/a".into(),
            expect: Expect::Any,
        }])
        .await
        .unwrap();
    let c = next(&mut w).await;
    assert_eq!(c.revision, r4, "unrelated changes are skipped");
    assert_eq!(c.events[0].kind, EventKind::Delete);
    assert_eq!(c.events[0].kv.key, "w/a");
    // One transaction is one change, with all its events.
    let r5 = store
        .apply(vec![
            put("w/c", "3", Expect::Any),
            put("w/d", "4", Expect::Absent),
        ])
        .await
        .unwrap();
    let c = next(&mut w).await;
    assert_eq!(c.revision, r5);
    let keys: Vec<&str> = c.events.iter().map(|e| e.kv.key.as_str()).collect();
    assert_eq!(keys, ["w/c", "w/d"]);
}

async fn leases_expire_their_keys(store: &dyn Store) {
    let err = store
        .apply(vec![Op::Put {
            key: "l/x".into(),
            value: vec![],
            expect: Expect::Any,
            lease: Some(999_999),
        }])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::LeaseNotFound(999_999)), "{err}");

    let short = store.grant_lease(Duration::from_millis(600)).await.unwrap();
    let kept = store.grant_lease(Duration::from_millis(600)).await.unwrap();
    let after = store
        .apply(vec![
            Op::Put {
                key: "l/short".into(),
                value: b"s".to_vec(),
                expect: Expect::Any,
                lease: Some(short),
            },
            Op::Put {
                key: "l/kept".into(),
                value: b"k".to_vec(),
                expect: Expect::Any,
                lease: Some(kept),
            },
        ])
        .await
        .unwrap();
    assert_eq!(
        store.get("l/short").await.unwrap().unwrap().lease,
        Some(short)
    );
    let mut w = store.watch("l/", after).await.unwrap();
    // Keep one lease alive across several TTLs while the other lapses.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        store.keep_alive(kept).await.unwrap();
        if store.get("l/short").await.unwrap().is_none() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lease did not expire"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = next(&mut w).await;
    assert_eq!(c.events[0].kind, EventKind::Delete);
    assert_eq!(c.events[0].kv.key, "l/short");
    assert!(store.get("l/kept").await.unwrap().is_some(), "kept alive");
    assert!(matches!(
        store.keep_alive(short).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    store.revoke(kept).await.unwrap();
    assert!(
        store.get("l/kept").await.unwrap().is_none(),
        "revoke deletes at once"
    );
}
