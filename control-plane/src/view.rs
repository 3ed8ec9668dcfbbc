//! The control plane's view of the store: every resource, parsed once and kept typed, and every
//! registered instance, as of one store revision. It is read whole once at start (or after the
//! store's watch was lost) and from then on changed in place by each revision's events: a write's
//! own events come from the writer (no decoding), others' from the store's watch.

use std::sync::Arc;

use crate::{
    model::{Manifest, ResourceKey},
    registry::{self, Instance},
    store::{Change, EventKind, KeyValue, Store, StoreError},
    validate::{self, Resource, State},
};

/// The key whose revision guards resource writes. Every apply and delete of resources rewrites
/// it, expecting the revision its view holds, so a write validated against a view the store has
/// moved past fails with a conflict instead of landing; instance writes leave it alone.
pub const GUARD_KEY: &str = "meta/resources";

const RESOURCES: &str = "resources/";

/// The state the control plane serves, as of one store revision. Cloning is cheap: a change
/// copies only the half (resources or instances) it touches, and only when an older view is
/// still held.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub revision: u64,
    pub state: Arc<State>,
    /// In store key order.
    pub instances: Arc<Vec<Instance>>,
    /// The revision of [`GUARD_KEY`]; none before the first resource write.
    pub guard: Option<u64>,
    /// Revoked identities (`trellis identity revoke`): the node or gateway, and until when
    /// (Unix seconds) its certificates were issued.
    pub revocations: Arc<std::collections::BTreeMap<ResourceKey, u64>>,
    /// The revision of the last change to what snapshots are made of (resources, instances,
    /// revocations): other writes (the audit log, tokens, what control planes publish of
    /// their proxies) leave snapshots as they are.
    pub content_revision: u64,
}

/// One key's change, decoded.
#[derive(Debug, Clone)]
pub enum Update {
    /// A resource's new version, or its removal.
    Resource(ResourceKey, Option<Arc<Resource>>),
    /// An instance by store key: its new version, or its removal.
    Instance(String, Option<Instance>),
    /// The guard key's new revision, or its removal.
    Guard(Option<u64>),
    /// A node's identity revoked (until when its certificates were issued), or no longer.
    Revocation(ResourceKey, Option<u64>),
}

impl View {
    /// Reads the whole view from the store, in one listing (one revision).
    pub async fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let listing = store.list("").await?;
        let mut view = View {
            revision: listing.revision,
            content_revision: listing.revision,
            ..View::default()
        };
        for kv in listing.items {
            if let Some(update) = decode(kv, EventKind::Put) {
                view.update(update);
            }
        }
        Ok(view)
    }

    /// Applies one key's change.
    pub fn update(&mut self, update: Update) {
        if !matches!(update, Update::Guard(_)) {
            self.content_revision = self.revision;
        }
        match update {
            Update::Resource(key, Some(r)) => {
                Arc::make_mut(&mut self.state).insert(key, r);
            }
            Update::Resource(key, None) => {
                if self.state.contains_key(&key) {
                    Arc::make_mut(&mut self.state).remove(&key);
                }
            }
            Update::Instance(key, instance) => {
                let at = self
                    .instances
                    .binary_search_by(|i| i.store_key().as_str().cmp(key.as_str()));
                match (at, instance) {
                    (Ok(at), Some(i)) => {
                        if let Some(slot) = Arc::make_mut(&mut self.instances).get_mut(at) {
                            *slot = i;
                        }
                    }
                    (Err(at), Some(i)) => Arc::make_mut(&mut self.instances).insert(at, i),
                    (Ok(at), None) => {
                        Arc::make_mut(&mut self.instances).remove(at);
                    }
                    (Err(_), None) => {}
                }
            }
            Update::Guard(revision) => self.guard = revision,
            Update::Revocation(key, Some(until)) => {
                Arc::make_mut(&mut self.revocations).insert(key, until);
            }
            Update::Revocation(key, None) => {
                Arc::make_mut(&mut self.revocations).remove(&key);
            }
        }
    }
}

/// The updates of one store revision, decoded (keys the view does not hold are left out).
pub fn decode_change(change: Change) -> (u64, Vec<Update>) {
    let updates = change
        .events
        .into_iter()
        .filter_map(|e| decode(e.kv, e.kind))
        .collect();
    (change.revision, updates)
}

/// One key's change as an update. A value that cannot be read is logged and leaves the view
/// without that key, as if it were absent (a full reload would skip it too).
fn decode(kv: KeyValue, kind: EventKind) -> Option<Update> {
    let put = kind == EventKind::Put;
    if kv.key == GUARD_KEY {
        return Some(Update::Guard(put.then_some(kv.mod_revision)));
    }
    if kv.key.starts_with(RESOURCES) {
        let key = ResourceKey::from_store_key(&kv.key)?;
        let resource = put.then(|| decode_resource(&kv)).flatten();
        return Some(Update::Resource(key, resource.map(Arc::new)));
    }
    if let Some(rest) = kv.key.strip_prefix(crate::identity::REVOKED_PREFIX) {
        let mut parts = rest.split('/');
        let (Some(ns), Some(segment), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let kind = match segment {
            "vg" => crate::model::Kind::VirtualGateway,
            _ => crate::model::Kind::VirtualNode,
        };
        let until = put
            .then(|| serde_json::from_slice::<crate::identity::Revocation>(&kv.value).ok())
            .flatten()
            .map(|r| r.revoked_ms / 1000);
        return Some(Update::Revocation(ResourceKey::new(kind, ns, name), until));
    }
    if kv.key.starts_with(registry::PREFIX) {
        let instance = put.then(|| decode_instance(&kv)).flatten();
        return Some(Update::Instance(kv.key, instance));
    }
    None
}

fn decode_resource(kv: &KeyValue) -> Option<Resource> {
    match read_resource(&kv.value) {
        Ok(mut r) => {
            r.revision = kv.mod_revision;
            Some(r)
        }
        Err(e) => {
            tracing::warn!(key = %kv.key, error = %e, "skipping an unreadable resource");
            None
        }
    }
}

/// A stored resource's value (a [`Resource`] as JSON) read back: parsed and admitted again.
/// Whatever `apply` admits must read back the same (the `manifest` fuzz target checks it): the
/// view takes a write's own typed copy, but the store's watch and a reload (or a restart) read
/// it back, and a resource that did not read back would vanish from the mesh.
pub fn read_resource(value: &[u8]) -> Result<Resource, String> {
    let mut manifest = serde_json::from_slice::<Manifest>(value).map_err(|e| e.to_string())?;
    if manifest.kind == "VirtualGateway" {
        unset_zero_thresholds(&mut manifest.spec);
    }
    validate::admit(manifest, None).map_err(|problems| {
        problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// A gateway listener's `healthCheck` given without `healthyThreshold` was stored with 0 before
/// 0 was left out (and 0 is refused as out of 2..=10): read as not given, as it was applied.
fn unset_zero_thresholds(spec: &mut serde_json::Value) {
    let Some(listeners) = spec
        .get_mut("listeners")
        .and_then(serde_json::Value::as_array_mut)
    else {
        return;
    };
    for listener in listeners {
        if let Some(check) = listener
            .get_mut("healthCheck")
            .and_then(serde_json::Value::as_object_mut)
            && check.get("healthyThreshold") == Some(&serde_json::Value::from(0))
        {
            check.remove("healthyThreshold");
        }
    }
}

fn decode_instance(kv: &KeyValue) -> Option<Instance> {
    match serde_json::from_slice::<Instance>(&kv.value) {
        Ok(mut i) => {
            i.lease = kv.lease;
            Some(i)
        }
        Err(e) => {
            tracing::warn!(key = %kv.key, error = %e, "skipping an unreadable instance");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every mesh resource of the examples (Trellis's API and App Mesh's) reads back from the
    /// store as it was applied; the `manifest` fuzz target checks the same of its corpus and
    /// mutants.
    #[test]
    fn the_examples_read_back_as_they_were_applied() {
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut checked = 0;
        for dir in std::fs::read_dir(&examples).unwrap() {
            for file in std::fs::read_dir(dir.unwrap().path()).unwrap() {
                let path = file.unwrap().path();
                // The quickstart's is a proxy snapshot, not manifests.
                if path.extension().is_none_or(|e| e != "yaml") || path.ends_with("snapshot.yaml") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let manifests = validate::parse_documents(&text).unwrap();
                for m in manifests.into_iter().filter(validate::is_mesh) {
                    let applied = validate::admit(m, None).unwrap();
                    let stored = serde_json::to_vec(&applied).unwrap();
                    let back = read_resource(&stored)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    assert_eq!(back.key, applied.key);
                    assert!(back.same(&applied), "{}: {back:?}", path.display());
                    checked += 1;
                }
            }
        }
        assert!(checked > 50, "{checked} resources");
    }

    /// What a control plane stored before a gateway's unset `healthyThreshold` was left out
    /// (`0`) reads back as unset; a 0 applied is still refused.
    #[test]
    fn a_gateway_stored_with_a_zero_healthy_threshold_reads_back() {
        let stored = br#"{"apiVersion":"mesh.trellis.dev/v1beta1","kind":"VirtualGateway","metadata":{"name":"gw","namespace":"default"},"spec":{"listeners":[{"portMapping":{"port":8088,"protocol":"http"},"healthCheck":{"protocol":"http","path":"/healthz","intervalMillis":5000,"timeoutMillis":2000,"healthyThreshold":0,"unhealthyThreshold":2}}]}}"#;
        let r = read_resource(stored).unwrap();
        let crate::model::Spec::VirtualGateway(gw) = &r.spec else {
            panic!("{r:?}")
        };
        let check = gw.listeners[0].health_check.as_ref().unwrap();
        assert_eq!((check.healthy_threshold, check.unhealthy_threshold), (0, 2));
        let again = serde_json::to_string(&r).unwrap();
        assert!(!again.contains(r#""healthyThreshold""#), "{again}");

        let applied = "apiVersion: mesh.trellis.dev/v1beta1\nkind: VirtualGateway\nmetadata: { name: gw }\nspec:\n  listeners:\n    - portMapping: { port: 8088, protocol: http }\n      healthCheck: { protocol: http, path: /healthz, intervalMillis: 5000, timeoutMillis: 2000, healthyThreshold: 0, unhealthyThreshold: 2 }\n";
        let m = validate::parse_documents(applied).unwrap().remove(0);
        let refused = validate::admit(m, None).unwrap_err();
        assert!(
            refused
                .iter()
                .any(|p| p.path == "spec.listeners[0].healthCheck.healthyThreshold"),
            "{refused:?}"
        );
    }
}
