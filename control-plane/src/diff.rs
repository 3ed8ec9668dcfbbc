//! How two snapshots of one proxy differ, field by field, for `trellis diff`: both in the
//! protobuf JSON mapping, lists of named things (listeners, virtual hosts, routes, clusters,
//! endpoints, weighted targets) matched by name rather than by position, so a change reads as
//! `clusters[default/blue].endpoints[10.0.0.7:8080]: added`, not as a shifted list.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;
use trellis_proto::v1 as pb;

/// One difference: where (a path of field names and list keys) and what.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Change {
    pub path: String,
    /// Absent when the change adds the field or item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    /// Absent when the change removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
}

/// The fields list items are matched by, first found wins.
const KEYS: [&str; 3] = ["name", "address", "cluster"];

/// The differences from `before` to `after` (None: the proxy gets no snapshot), its version
/// (a content hash) apart.
pub fn snapshots(before: Option<&pb::Snapshot>, after: Option<&pb::Snapshot>) -> Vec<Change> {
    let json = |s: Option<&pb::Snapshot>| {
        s.map(|s| {
            let mut s = s.clone();
            s.version.clear();
            serde_json::to_value(&s).unwrap_or(Value::Null)
        })
    };
    let mut out = Vec::new();
    match (json(before), json(after)) {
        (Some(a), Some(b)) => values("", &a, &b, &mut out),
        (None, None) => {}
        (a, b) => out.push(Change {
            path: String::new(),
            before: a,
            after: b,
        }),
    }
    out
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn values(path: &str, a: &Value, b: &Value, out: &mut Vec<Change>) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let mut fields: Vec<&String> = a.keys().chain(b.keys()).collect();
            fields.sort();
            fields.dedup();
            for f in fields {
                let p = join(path, f);
                match (a.get(f), b.get(f)) {
                    (Some(x), Some(y)) => values(&p, x, y, out),
                    (x, y) => out.push(Change {
                        path: p,
                        before: x.cloned(),
                        after: y.cloned(),
                    }),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => match (keyed(a), keyed(b)) {
            (Some((oa, ka)), Some((ob, kb))) => {
                let mut keys: Vec<&String> = ka.keys().chain(kb.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let p = format!("{path}[{k}]");
                    match (ka.get(k), kb.get(k)) {
                        (Some(x), Some(y)) => values(&p, x, y, out),
                        (x, y) => out.push(Change {
                            path: p,
                            before: x.map(|v| (*v).clone()),
                            after: y.map(|v| (*v).clone()),
                        }),
                    }
                }
                // Order matters where items are tried in turn (routes of one priority): the
                // items both sides have, in another order, are a change too.
                let common = |order: &[String], other: &HashMap<String, &Value>| -> Vec<Value> {
                    order
                        .iter()
                        .filter(|k| other.contains_key(*k))
                        .map(|k| Value::String(k.clone()))
                        .collect()
                };
                let (before, after) = (common(&oa, &kb), common(&ob, &ka));
                if before != after {
                    out.push(Change {
                        path: format!("{path} (order)"),
                        before: Some(Value::Array(before)),
                        after: Some(Value::Array(after)),
                    });
                }
            }
            _ if a != b => out.push(Change {
                path: path.to_string(),
                before: Some(Value::Array(a.clone())),
                after: Some(Value::Array(b.clone())),
            }),
            _ => {}
        },
        _ if a != b => out.push(Change {
            path: path.to_string(),
            before: Some(a.clone()),
            after: Some(b.clone()),
        }),
        _ => {}
    }
}

/// A list's items by their key field, and the keys in order, when every item is an object
/// with one and no key repeats.
fn keyed(items: &[Value]) -> Option<(Vec<String>, HashMap<String, &Value>)> {
    let field = KEYS
        .iter()
        .find(|k| items.first().and_then(|i| i.get(**k)).is_some())?;
    let mut order = Vec::with_capacity(items.len());
    let mut by_key = HashMap::with_capacity(items.len());
    for item in items {
        let key = item.get(*field)?.as_str()?.to_string();
        if by_key.insert(key.clone(), item).is_some() {
            return None;
        }
        order.push(key);
    }
    Some((order, by_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(weights: &[(&str, u32)], endpoints: &[&str]) -> pb::Snapshot {
        pb::Snapshot {
            version: format!("{weights:?}"),
            listeners: vec![pb::Listener {
                name: "egress".into(),
                virtual_hosts: vec![pb::VirtualHost {
                    name: "blue".into(),
                    routes: vec![pb::Route {
                        name: "blue/r".into(),
                        action: Some(pb::RouteAction {
                            weighted_targets: weights
                                .iter()
                                .map(|(c, w)| pb::WeightedTarget {
                                    cluster: (*c).into(),
                                    weight: *w,
                                })
                                .collect(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            clusters: vec![pb::Cluster {
                name: "default/blue".into(),
                endpoints: endpoints
                    .iter()
                    .map(|a| pb::Endpoint {
                        address: (*a).into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Lists of named things are matched by name: a weight change, an endpoint added and one
    /// removed read as such; the version (a hash) is no change.
    #[test]
    fn named_items_are_matched_by_name() {
        let a = snapshot(
            &[("default/blue", 90), ("default/green", 10)],
            &["10.0.0.1:80", "10.0.0.2:80"],
        );
        let b = snapshot(
            &[("default/blue", 50), ("default/green", 50)],
            &["10.0.0.2:80", "10.0.0.3:80"],
        );
        let changes = snapshots(Some(&a), Some(&b));
        let paths: Vec<(&str, Option<&Value>, Option<&Value>)> = changes
            .iter()
            .map(|c| (c.path.as_str(), c.before.as_ref(), c.after.as_ref()))
            .collect();
        let route = "listeners[egress].virtualHosts[blue].routes[blue/r].action.weightedTargets";
        let weight = format!("{route}[default/blue].weight");
        assert!(
            paths.contains(&(
                weight.as_str(),
                Some(&Value::from(90)),
                Some(&Value::from(50))
            )),
            "{changes:#?}"
        );
        assert!(
            paths.iter().any(
                |(p, b, a)| *p == "clusters[default/blue].endpoints[10.0.0.1:80]"
                    && b.is_some()
                    && a.is_none()
            ),
            "{changes:#?}"
        );
        assert!(
            paths.iter().any(
                |(p, b, a)| *p == "clusters[default/blue].endpoints[10.0.0.3:80]"
                    && b.is_none()
                    && a.is_some()
            ),
            "{changes:#?}"
        );
        assert!(
            !paths.iter().any(|(p, _, _)| p.contains("10.0.0.2")),
            "{changes:#?}"
        );
        assert_eq!(changes.len(), 4, "{changes:#?}");
        assert!(snapshots(Some(&a), Some(&a)).is_empty());
        // The same targets in another order: an order change.
        let swapped = snapshot(
            &[("default/green", 10), ("default/blue", 90)],
            &["10.0.0.1:80", "10.0.0.2:80"],
        );
        let changes = snapshots(Some(&a), Some(&swapped));
        assert_eq!(changes.len(), 1, "{changes:#?}");
        assert_eq!(changes[0].path, format!("{route} (order)"));
        let gone = snapshots(Some(&a), None);
        assert_eq!(gone.len(), 1);
        assert!(gone[0].after.is_none());
    }
}
