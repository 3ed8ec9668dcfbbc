//! The last step before a push: every translated snapshot is compiled with the proxy's own
//! compiler (`trellis_proxy::snapshot::check`, the code a proxy runs, not a copy). What would not
//! compile is left out — an endpoint, a route, a virtual host, a cluster's endpoints — and blamed
//! on the resource or instance that put it there, so one bad input degrades itself and never the
//! rest of a proxy's config. A problem that cannot be cut out this way withholds the snapshot: the
//! proxy keeps what it runs, and status says why.

use std::collections::BTreeSet;

use trellis_proto::v1 as pb;

use crate::{
    model::ResourceKey,
    translate::{Degraded, Source, Translated, version},
};

/// One piece to cut, by index in the snapshot being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cut {
    Endpoint {
        cluster: usize,
        endpoint: usize,
    },
    /// Keeps the cluster (routes name it) without endpoints: its requests get 503.
    Cluster(usize),
    /// Before `Route`: cuts are applied in reverse order, so routes go before their hosts.
    Host {
        listener: usize,
        host: usize,
    },
    Route {
        listener: usize,
        host: usize,
        route: usize,
    },
}

/// Cutting converges fast (each pass removes what the compiler named); this bounds a bug.
const MAX_PASSES: usize = 8;

/// Checks `t` with the proxy's compiler and cuts out what it rejects, recording each cut in
/// `t.problems`; `node` is blamed for what no resource or instance can be. Leaves `t.withheld`
/// set when the snapshot cannot be made valid by cutting.
pub fn verify(mut t: Translated, node: &ResourceKey) -> Translated {
    use prost::Message as _;
    let size = t.snapshot.encoded_len();
    if size > trellis_proxy::snapshot::MAX_SNAPSHOT_BYTES {
        t.withheld = Some(format!(
            "{node}: the snapshot is {size} bytes, more than the {} a proxy accepts",
            trellis_proxy::snapshot::MAX_SNAPSHOT_BYTES
        ));
        return t;
    }
    for _ in 0..MAX_PASSES {
        let errors = match trellis_proxy::snapshot::check(&t.snapshot) {
            Ok(()) => {
                if !t.problems.is_empty() {
                    t.problems.sort();
                    t.problems.dedup();
                    t.snapshot.version = version(&t.snapshot);
                }
                return t;
            }
            Err(e) => e.field_errors(),
        };
        // A cluster the compiler rejects is unknown to the routes naming it, so the routes
        // are reported too: cut clusters first, and look at the listeners on the next pass.
        let clusters_only = errors.iter().any(|e| e.path.starts_with("clusters["));
        let mut cuts = BTreeSet::new();
        for e in errors
            .iter()
            .filter(|e| !clusters_only || e.path.starts_with("clusters["))
        {
            let reason = e.to_string();
            let Some(cut) = locate(&e.path) else {
                t.withheld = Some(format!("{node}: {reason}"));
                return t;
            };
            let (effect, sources) = describe(&t, cut);
            let sources = if sources.is_empty() {
                vec![Source::Resource(node.clone())]
            } else {
                sources
            };
            for source in sources {
                t.problems.push(Degraded {
                    source: source.to_string(),
                    effect: effect.clone(),
                    reason: reason.clone(),
                });
            }
            cuts.insert(cut);
        }
        apply(&mut t.snapshot, &cuts);
    }
    t.withheld = Some(format!(
        "{node}: the snapshot still does not compile after {MAX_PASSES} passes"
    ));
    t
}

/// The piece a compiler field path points into, or None for what cannot be cut alone.
fn locate(path: &str) -> Option<Cut> {
    if let Some(rest) = path.strip_prefix("clusters[") {
        let (cluster, rest) = index(rest)?;
        if let Some(rest) = rest.strip_prefix(".endpoints[") {
            let (endpoint, _) = index(rest)?;
            return Some(Cut::Endpoint { cluster, endpoint });
        }
        // Routes find clusters by name: a bad name cannot be fixed by emptying the cluster.
        return (!rest.starts_with(".name")).then_some(Cut::Cluster(cluster));
    }
    let (listener, rest) = index(path.strip_prefix("listeners[")?)?;
    let (host, rest) = index(rest.strip_prefix(".virtualHosts[")?)?;
    match rest.strip_prefix(".routes[") {
        Some(rest) => {
            let (route, _) = index(rest)?;
            Some(Cut::Route {
                listener,
                host,
                route,
            })
        }
        None => Some(Cut::Host { listener, host }),
    }
}

/// `12].rest` → (12, ".rest").
fn index(s: &str) -> Option<(usize, &str)> {
    let (digits, rest) = s.split_once(']')?;
    Some((digits.parse().ok()?, rest))
}

fn describe(t: &Translated, cut: Cut) -> (String, Vec<Source>) {
    let s = &t.snapshot;
    let sources = |set: Option<&BTreeSet<Source>>| set.into_iter().flatten().cloned().collect();
    match cut {
        Cut::Endpoint { cluster, endpoint } => {
            let c = s.clusters.get(cluster);
            let name = c.map_or("", |c| c.name.as_str());
            let address = c
                .and_then(|c| c.endpoints.get(endpoint))
                .map_or("", |e| e.address.as_str());
            (
                format!("endpoint {address:?} of cluster {name:?} left out"),
                sources(
                    t.sources
                        .endpoints
                        .get(&(name.to_string(), address.to_string())),
                ),
            )
        }
        Cut::Cluster(cluster) => {
            let name = s.clusters.get(cluster).map_or("", |c| c.name.as_str());
            (
                format!("cluster {name:?} left without endpoints"),
                sources(t.sources.clusters.get(name)),
            )
        }
        Cut::Route {
            listener,
            host,
            route,
        } => {
            let l = s.listeners.get(listener);
            let h = l.and_then(|l| l.virtual_hosts.get(host));
            let r = h.and_then(|h| h.routes.get(route));
            let (l, h, r) = (
                l.map_or("", |l| l.name.as_str()),
                h.map_or("", |h| h.name.as_str()),
                r.map_or("", |r| r.name.as_str()),
            );
            (
                format!("route {r:?} of virtual host {h:?} left out"),
                sources(
                    t.sources
                        .routes
                        .get(&(l.to_string(), h.to_string(), r.to_string())),
                ),
            )
        }
        Cut::Host { listener, host } => {
            let l = s.listeners.get(listener);
            let h = l.and_then(|l| l.virtual_hosts.get(host));
            let (l, h) = (
                l.map_or("", |l| l.name.as_str()),
                h.map_or("", |h| h.name.as_str()),
            );
            (
                format!("virtual host {h:?} left out"),
                sources(t.sources.hosts.get(&(l.to_string(), h.to_string()))),
            )
        }
    }
}

/// Applies cuts in reverse order: removals go from the highest index down so the lower ones stay
/// valid, and routes before the hosts that hold them.
fn apply(s: &mut pb::Snapshot, cuts: &BTreeSet<Cut>) {
    let emptied: BTreeSet<usize> = cuts
        .iter()
        .filter_map(|c| match c {
            Cut::Cluster(i) => Some(*i),
            _ => None,
        })
        .collect();
    for cut in cuts.iter().rev() {
        match *cut {
            Cut::Endpoint { cluster, endpoint } if !emptied.contains(&cluster) => {
                if let Some(c) = s.clusters.get_mut(cluster)
                    && endpoint < c.endpoints.len()
                {
                    c.endpoints.remove(endpoint);
                }
            }
            Cut::Endpoint { .. } => {}
            Cut::Cluster(i) => {
                if let Some(c) = s.clusters.get_mut(i) {
                    *c = pb::Cluster {
                        name: std::mem::take(&mut c.name),
                        ..Default::default()
                    };
                }
            }
            Cut::Route {
                listener,
                host,
                route,
            } => {
                let removed_host = cuts.contains(&Cut::Host { listener, host });
                if let Some(h) = s
                    .listeners
                    .get_mut(listener)
                    .and_then(|l| l.virtual_hosts.get_mut(host))
                    .filter(|_| !removed_host)
                    && route < h.routes.len()
                {
                    h.routes.remove(route);
                }
            }
            Cut::Host { listener, host } => {
                if let Some(l) = s.listeners.get_mut(listener)
                    && host < l.virtual_hosts.len()
                {
                    l.virtual_hosts.remove(host);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::Kind,
        registry::{Instance, InstanceStatus},
        translate::{self, Sources},
        validate::{self, parse_documents},
    };

    const MESH: &str = include_str!("../../examples/colorapp/mesh.yaml");

    fn instance(id: &str, version: &str, address: &str) -> Instance {
        Instance {
            namespace: "demo".into(),
            service: "colorteller".into(),
            id: id.into(),
            address: address.into(),
            port: 9080,
            attributes: [("version".to_string(), version.to_string())].into(),
            status: InstanceStatus::Healthy,
            ttl_seconds: None,
            lease: None,
        }
    }

    fn front(instances: &[Instance]) -> Translated {
        let mut state = validate::State::new();
        // Without a CA here: the example in plaintext.
        let mesh = MESH.replace("  mtls: STRICT\n", "");
        for m in parse_documents(&mesh).unwrap() {
            let r = validate::admit(m, None).unwrap();
            state.insert(r.key.clone(), r.into());
        }
        let node = ResourceKey::new(Kind::VirtualNode, "default", "front");
        translate::sidecar(&state, instances, &node, Default::default()).unwrap()
    }

    #[test]
    fn a_valid_snapshot_passes_unchanged() {
        let t = front(&[instance("b1", "blue", "10.0.0.1")]);
        let node = ResourceKey::new(Kind::VirtualNode, "default", "front");
        let checked = verify(t.clone(), &node);
        assert_eq!(checked, t);
    }

    #[test]
    fn a_bad_instance_loses_its_endpoint_and_nothing_else() {
        let instances = [
            instance("b1", "blue", "10.0.0.1"),
            instance("b2", "blue", "a\r\nb"),
            instance("r1", "red", "bad!host"),
        ];
        let t = front(&instances);
        assert!(trellis_proxy::snapshot::check(&t.snapshot).is_err());
        let node = ResourceKey::new(Kind::VirtualNode, "default", "front");
        let before = t.snapshot.version.clone();
        let checked = verify(t, &node);
        assert_eq!(checked.withheld, None);
        trellis_proxy::snapshot::check(&checked.snapshot).unwrap();
        assert_ne!(
            checked.snapshot.version, before,
            "a new version for new content"
        );
        let sources: Vec<&str> = checked.problems.iter().map(|p| p.source.as_str()).collect();
        assert_eq!(
            sources,
            [
                "instance demo/colorteller/b2",
                "instance demo/colorteller/r1"
            ]
        );
        let cluster = |name: &str| {
            checked
                .snapshot
                .clusters
                .iter()
                .find(|c| c.name == name)
                .unwrap()
                .endpoints
                .iter()
                .map(|e| e.address.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(cluster("default/blue"), ["10.0.0.1:9080"]);
        assert!(cluster("default/red").is_empty());
        let egress = &checked.snapshot.listeners[1];
        assert_eq!(
            egress.virtual_hosts[0].routes.len(),
            1,
            "the route to red stays: its cluster has no endpoints"
        );
    }

    fn route(name: &str, cluster: &str, regex: Option<&str>) -> pb::Route {
        pb::Route {
            name: name.into(),
            r#match: regex.map(|r| pb::RouteMatch {
                path: Some(pb::route_match::Path::Regex(r.into())),
                ..Default::default()
            }),
            action: Some(pb::RouteAction {
                weighted_targets: vec![pb::WeightedTarget {
                    cluster: cluster.into(),
                    weight: 1,
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn host(name: &str, routes: Vec<pb::Route>) -> pb::VirtualHost {
        pb::VirtualHost {
            name: name.into(),
            domains: vec![name.into()],
            routes,
        }
    }

    #[test]
    fn bad_routes_and_hosts_are_cut_by_index_and_blamed_on_their_sources() {
        let router = ResourceKey::new(Kind::VirtualRouter, "default", "r");
        let service = ResourceKey::new(Kind::VirtualService, "default", "dup");
        let mut sources = Sources::default();
        sources.route("egress", "a", "bad", [Source::Resource(router.clone())]);
        sources.host("egress", "a", Source::Resource(service.clone()));
        sources.host("egress", "dup", Source::Resource(service.clone()));
        let mut duplicate = host("dup", vec![route("x", "c", None)]);
        duplicate.domains = vec!["a".into()];
        let snapshot = pb::Snapshot {
            revoked: Vec::new(),
            access_log: None,
            tracing: None,
            measure: None,
            version: "v".into(),
            listeners: vec![pb::Listener {
                name: "egress".into(),
                role: pb::listener::Role::Egress as i32,
                virtual_hosts: vec![
                    host(
                        "a",
                        vec![
                            route("ok", "c", None),
                            route("bad", "c", Some("([")),
                            route("ok2", "c", Some("/x")),
                        ],
                    ),
                    duplicate,
                    host(
                        "b",
                        vec![route("bad", "missing", None), route("ok", "c", None)],
                    ),
                ],
                ..Default::default()
            }],
            clusters: vec![pb::Cluster {
                name: "c".into(),
                ..Default::default()
            }],
        };
        let node = ResourceKey::new(Kind::VirtualNode, "default", "front");
        let t = Translated {
            snapshot,
            uses: Default::default(),
            sources,
            problems: Vec::new(),
            withheld: None,
        };
        let checked = verify(t, &node);
        assert_eq!(checked.withheld, None);
        let hosts: Vec<(&str, Vec<&str>)> = checked.snapshot.listeners[0]
            .virtual_hosts
            .iter()
            .map(|h| {
                (
                    h.name.as_str(),
                    h.routes.iter().map(|r| r.name.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(hosts, [("a", vec!["ok", "ok2"]), ("b", vec!["ok"])]);
        let blamed: Vec<(&str, &str)> = checked
            .problems
            .iter()
            .map(|p| (p.source.as_str(), p.effect.as_str()))
            .collect();
        assert_eq!(
            blamed,
            [
                (
                    "VirtualNode default/front",
                    "route \"bad\" of virtual host \"b\" left out"
                ),
                (
                    "VirtualRouter default/r",
                    "route \"bad\" of virtual host \"a\" left out"
                ),
                (
                    "VirtualService default/dup",
                    "virtual host \"dup\" left out"
                ),
            ]
        );
    }

    #[test]
    fn what_cannot_be_cut_withholds_the_snapshot() {
        let node = ResourceKey::new(Kind::VirtualNode, "default", "front");
        let t = Translated {
            snapshot: pb::Snapshot {
                revoked: Vec::new(),
                access_log: None,
                tracing: None,
                measure: None,
                version: "v".into(),
                listeners: vec![pb::Listener {
                    name: "x".into(),
                    ..Default::default()
                }],
                clusters: Vec::new(),
            },
            uses: Default::default(),
            sources: Sources::default(),
            problems: Vec::new(),
            withheld: None,
        };
        let checked = verify(t, &node);
        assert_eq!(
            checked.withheld.as_deref(),
            Some(
                "VirtualNode default/front: listeners[0].role: set a role (INGRESS or EGRESS), an address or a port"
            )
        );
    }
}
