//! Translation: the mesh state and the registry → one snapshot per proxy. Pure and
//! deterministic; the version is a hash of the content.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::Arc,
};

use serde::Serialize;

use trellis_proto::{Duration as PbDuration, v1 as pb};

use crate::{
    model::{
        self, HeaderMatch, HttpMatch, Kind, Mtls, ResourceKey, RetryPolicy, Spec, Timeouts,
        VirtualNodeSpec,
    },
    policy::Security,
    registry::{Instance, InstanceStatus},
    validate::State,
};

/// A snapshot with the resources it was built from (for per-resource status).
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    pub snapshot: pb::Snapshot,
    /// Shared with the status of every proxy running it.
    pub uses: Arc<BTreeSet<ResourceKey>>,
    /// Where each piece came from, to blame what the proxy's compiler rejects.
    pub sources: Sources,
    /// Pieces left out because a proxy would reject them (see `verify`).
    pub problems: Vec<Degraded>,
    /// Set when the snapshot cannot be made valid: it is not pushed, and this says why.
    pub withheld: Option<String>,
}

/// What put a piece of a snapshot there.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Resource(ResourceKey),
    /// A registered instance, by its store key.
    Instance(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Resource(key) => key.fmt(f),
            Self::Instance(key) => write!(
                f,
                "instance {}",
                key.strip_prefix(crate::registry::PREFIX).unwrap_or(key)
            ),
        }
    }
}

/// Where each piece of a snapshot came from, by name (indices shift as pieces are cut).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sources {
    pub(crate) clusters: BTreeMap<String, BTreeSet<Source>>,
    /// (cluster, endpoint address).
    pub(crate) endpoints: BTreeMap<(String, String), BTreeSet<Source>>,
    /// (listener, virtual host).
    pub(crate) hosts: BTreeMap<(String, String), BTreeSet<Source>>,
    /// (listener, virtual host, route).
    pub(crate) routes: BTreeMap<(String, String, String), BTreeSet<Source>>,
}

impl Sources {
    pub fn cluster(&mut self, cluster: &str, source: Source) {
        self.clusters
            .entry(cluster.to_string())
            .or_default()
            .insert(source);
    }

    pub fn endpoint(
        &mut self,
        cluster: &str,
        address: &str,
        sources: impl IntoIterator<Item = Source>,
    ) {
        self.endpoints
            .entry((cluster.to_string(), address.to_string()))
            .or_default()
            .extend(sources);
    }

    pub fn host(&mut self, listener: &str, host: &str, source: Source) {
        self.hosts
            .entry((listener.to_string(), host.to_string()))
            .or_default()
            .insert(source);
    }

    pub fn route(
        &mut self,
        listener: &str,
        host: &str,
        route: &str,
        sources: impl IntoIterator<Item = Source>,
    ) {
        self.routes
            .entry((listener.to_string(), host.to_string(), route.to_string()))
            .or_default()
            .extend(sources);
    }
}

/// A piece left out of a proxy's snapshot, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub struct Degraded {
    /// The resource or instance to blame, e.g. `instance demo/colorteller/blue-1`.
    pub source: String,
    /// What was left out, e.g. `endpoint "a\r\nb:8080" of cluster "demo/blue"`.
    pub effect: String,
    /// The proxy compiler's field path and reason.
    pub reason: String,
}

fn duration(d: std::time::Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A route's fault as the proxy takes it.
fn fault(f: &model::Fault) -> pb::Fault {
    f.to_proto(f.headers.iter().map(header_match).collect())
}

fn app_duration(d: Option<&model::Duration>) -> Option<PbDuration> {
    d.and_then(|d| d.to_proto())
}

fn cluster_protocol(protocol: &str) -> pb::cluster::Protocol {
    match protocol {
        "http2" => pb::cluster::Protocol::Http2,
        "grpc" => pb::cluster::Protocol::Grpc,
        "tcp" => pb::cluster::Protocol::TcpOnly,
        _ => pb::cluster::Protocol::Http1,
    }
}

/// A node listener's outlier detection and connection pool, for the clusters that call it
/// (validation has checked their shape; the pool is the listener protocol's).
fn listener_resilience(
    l: &model::Listener,
) -> (Option<pb::OutlierDetection>, Option<pb::ConnectionPool>) {
    let count = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    let outlier = l.outlier_detection.as_ref().map(|o| pb::OutlierDetection {
        max_server_errors: count(o.max_server_errors),
        interval: app_duration(Some(&o.interval)),
        base_ejection_duration: app_duration(Some(&o.base_ejection_duration)),
        max_ejection_percent: count(o.max_ejection_percent),
    });
    let pool = l.connection_pool.as_ref().map(|p| {
        let mut pool = pb::ConnectionPool::default();
        if let Some(h) = &p.http {
            pool.max_connections = count(h.max_connections);
            pool.max_pending_requests = h.max_pending_requests.map_or(0, count);
        }
        if let Some(r) = p.http2.as_ref().or(p.grpc.as_ref()) {
            pool.max_requests = count(r.max_requests);
        }
        if let Some(t) = &p.tcp {
            pool.max_connections = count(t.max_connections);
        }
        pool
    });
    (outlier, pool)
}

/// A node listener's health check, for the clusters that call it (validation has checked its
/// shape, and that a path comes only with http and http2).
fn listener_health_check(l: &model::Listener) -> Option<pb::HealthCheck> {
    use pb::health_check::Protocol;
    let h = l.health_check.as_ref()?;
    let count = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    let millis = |v: i64| {
        duration(std::time::Duration::from_millis(
            u64::try_from(v).unwrap_or(0),
        ))
    };
    let protocol = match h.protocol.as_str() {
        "http2" => Protocol::Http2,
        "grpc" => Protocol::Grpc,
        "tcp" => Protocol::Tcp,
        _ => Protocol::Http,
    };
    Some(pb::HealthCheck {
        protocol: protocol as i32,
        // App Mesh uses the path only with http and http2.
        path: match protocol {
            Protocol::Http | Protocol::Http2 => h.path.clone().unwrap_or_default(),
            _ => String::new(),
        },
        port: h.port.map_or(0, count),
        interval: Some(millis(h.interval_millis)),
        timeout: Some(millis(h.timeout_millis)),
        healthy_threshold: count(h.healthy_threshold),
        unhealthy_threshold: count(h.unhealthy_threshold),
    })
}

/// The hostname a VirtualService is reached at.
pub fn hostname(key: &ResourceKey, spec: &model::VirtualServiceSpec) -> String {
    spec.hostname
        .clone()
        .or_else(|| spec.aws_name.clone())
        .unwrap_or_else(|| format!("{}.{}", key.name, key.namespace))
}

/// The address a registry instance is dialled at within a mesh's IP family: its address of that
/// family (`AWS_INSTANCE_IPV4` / `AWS_INSTANCE_IPV6` as Cloud Map records them, else the
/// registered address if it is one; a DNS name is resolved within the family when dialled), or
/// None when it has none.
fn instance_address(i: &Instance, family: pb::cluster::IpFamily) -> Option<String> {
    use std::net::IpAddr;
    let (attribute, wanted): (&str, fn(&IpAddr) -> bool) = match family {
        pb::cluster::IpFamily::Any => return Some(i.endpoint()),
        pb::cluster::IpFamily::V4Only => ("AWS_INSTANCE_IPV4", IpAddr::is_ipv4),
        pb::cluster::IpFamily::V6Only => ("AWS_INSTANCE_IPV6", IpAddr::is_ipv6),
    };
    let of_family = |a: &str| {
        a.parse::<IpAddr>()
            .ok()
            .filter(wanted)
            .map(|_| a.to_owned())
    };
    let host = i
        .attributes
        .get(attribute)
        .and_then(|a| of_family(a))
        .or_else(|| match i.address.parse::<IpAddr>() {
            Ok(ip) => wanted(&ip).then(|| i.address.clone()),
            Err(_) => Some(i.address.clone()),
        })?;
    Some(trellis_proxy::snapshot::host_port(&host, i.port))
}

struct Builder<'a> {
    state: &'a State,
    instances: &'a [Instance],
    uses: BTreeSet<ResourceKey>,
    clusters: BTreeMap<String, pb::Cluster>,
    sources: Sources,
    /// While a gateway listener with a connectionPool is built: its name and pool, which the
    /// clusters its routes use take instead of their node listener's (those clusters are its
    /// own: `CLUSTER@LISTENER`).
    gateway_pool: Option<(String, pb::ConnectionPool)>,
    security: Security<'a>,
    /// While the clusters of one backend are built: the App Mesh client policy in effect (the
    /// backend's own, else the backend defaults), and the backend's name when the policy is its
    /// own (its clusters are then its own: `CLUSTER@BACKEND`).
    client_policy: Option<(model::ClientTls, Option<String>)>,
    /// Why the snapshot cannot be made (a mesh asks for mTLS and there is no CA to name
    /// identities): it is withheld rather than sent in plaintext.
    withheld: Option<String>,
}

impl Builder<'_> {
    /// The snapshot of `listeners`, the clusters they use and the proxy's access log (from the
    /// node's or gateway's `logging`), versioned by its content.
    fn finish(
        self,
        listeners: Vec<pb::Listener>,
        logging: Option<&model::Logging>,
        node: &ResourceKey,
    ) -> Translated {
        let tracing = self
            .mesh(node)
            .and_then(|m| m.tracing.as_ref())
            .map(|t| t.to_proto(node));
        // Certificates issued before `SKEW` ahead of their notBefore (the CA backdates them).
        let revoked = match (self.security.ca, self.security.revoked) {
            (Some(ca), Some(revoked)) => revoked
                .iter()
                .map(|(key, until)| pb::RevokedIdentity {
                    identity: ca.spiffe_id(key),
                    not_before_until: i64::try_from(
                        until.saturating_sub(crate::identity::SKEW.as_secs()),
                    )
                    .unwrap_or(i64::MAX),
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut snapshot = pb::Snapshot {
            version: String::new(),
            revoked,
            listeners,
            clusters: self.clusters.into_values().collect(),
            access_log: logging
                .and_then(|l| l.access_log.as_ref())
                .and_then(|a| a.file.as_ref())
                .map(model::FileAccessLog::to_proto),
            tracing,
            measure: None,
        };
        snapshot.measure = crate::measure::measure(self.state, &snapshot);
        snapshot.version = version(&snapshot);
        Translated {
            snapshot,
            uses: Arc::new(self.uses),
            sources: self.sources,
            problems: Vec::new(),
            withheld: self.withheld,
        }
    }

    /// The mTLS mode of the mesh `key` belongs to.
    fn mtls(&self, key: &ResourceKey) -> Mtls {
        self.security.mode(self.mesh(key))
    }

    /// The SPIFFE ID of a node or gateway; None (and the snapshot withheld) without a CA.
    fn spiffe_id(&mut self, key: &ResourceKey) -> Option<String> {
        match self.security.ca {
            Some(ca) => Some(ca.spiffe_id(key)),
            None => {
                self.withheld = Some(format!(
                    "the mesh of {key} asks for mTLS (spec.mtls) and the control plane has no CA"
                ));
                None
            }
        }
    }

    /// TLS toward `node`'s listener on `port`: an App Mesh client policy in effect that applies
    /// to the port, else mTLS under the mesh's mode unless the node's listeners have TLS
    /// settings of their own (App Mesh's: callers then need a client policy).
    fn upstream_tls(&mut self, node: &ResourceKey, port: Option<i64>) -> Option<pb::UpstreamTls> {
        if let Some((policy, _)) = &self.client_policy {
            let applies = policy.enforce != Some(false)
                && (policy.ports.is_empty() || port.is_some_and(|p| policy.ports.contains(&p)));
            if applies {
                return Some(client_policy_tls(policy));
            }
        }
        if self
            .node(node)
            .is_some_and(|n| n.listeners.iter().any(|l| l.tls.is_some()))
        {
            return None;
        }
        let mode = self.mtls(node);
        if mode == Mtls::Disabled {
            return None;
        }
        let id = self.spiffe_id(node)?;
        Some(pb::UpstreamTls {
            identities: vec![id],
            plaintext_without_identity: mode == Mtls::Permissive,
            ..Default::default()
        })
    }

    fn node(&mut self, key: &ResourceKey) -> Option<&VirtualNodeSpec> {
        match self.state.get(key).map(|r| &r.spec) {
            Some(Spec::VirtualNode(n)) => {
                self.uses.insert(key.clone());
                Some(n)
            }
            _ => None,
        }
    }

    /// The cluster for a target VirtualNode, reaching it on its listener of `port` (a weighted
    /// target's or gateway target's `port`; unset: its first listener); returns its name. A node
    /// with several listeners gets a cluster per port named: `NAMESPACE/NAME:PORT`.
    fn cluster(&mut self, key: &ResourceKey, port: Option<i64>) -> String {
        let several = self.node(key).is_some_and(|n| n.listeners.len() > 1);
        let port = port.filter(|_| several);
        let mut name = match port {
            Some(p) => format!("{}/{}:{p}", key.namespace, key.name),
            None => format!("{}/{}", key.namespace, key.name),
        };
        if let Some((listener, _)) = &self.gateway_pool {
            name = format!("{name}@{listener}");
        }
        if let Some((_, Some(backend))) = &self.client_policy {
            name = format!("{name}@{backend}");
        }
        if self.clusters.contains_key(&name) {
            return name;
        }
        let instances = self.instances;
        self.sources.cluster(&name, Source::Resource(key.clone()));
        let Some(node) = self.node(key).cloned() else {
            // Validation keeps references whole; an unknown node gets an empty cluster.
            self.clusters.insert(
                name.clone(),
                pb::Cluster {
                    name: name.clone(),
                    ..Default::default()
                },
            );
            return name;
        };
        // Validation has checked that a port names one of the node's listeners.
        let listener = match port {
            Some(p) => node.listeners.iter().find(|l| l.port_mapping.port == p),
            None => node.listeners.first(),
        };
        // Registered instances are their sidecars' ingresses, which forward to the listener the
        // request's authority names: requests to a chosen listener carry its port.
        let mut authority_port = 0;
        let protocol = listener.map_or(pb::cluster::Protocol::Http1, |l| {
            cluster_protocol(&l.port_mapping.protocol)
        });
        let lb = node.load_balancer.as_ref().map_or(
            pb::cluster::LbPolicy::RoundRobin,
            model::LoadBalancer::policy_proto,
        );
        // The mesh's ipPreference.
        let family = match self.mesh(key).and_then(model::MeshSpec::ip_preference) {
            Some("IPv4_ONLY") => pb::cluster::IpFamily::V4Only,
            Some("IPv6_ONLY") => pb::cluster::IpFamily::V6Only,
            _ => pb::cluster::IpFamily::Any,
        };
        let mut endpoints = Vec::new();
        // DNS discovery's responseType: ENDPOINTS (each address an endpoint), else the name
        // resolved per connection (LOADBALANCER, App Mesh's default).
        let dns_mode = match node
            .service_discovery
            .as_ref()
            .and_then(|sd| sd.dns.as_ref())
        {
            Some(d) if d.response_type.as_deref() == Some("ENDPOINTS") => {
                pb::cluster::Dns::Endpoints
            }
            _ => pb::cluster::Dns::PerConnection,
        };
        if let Some(sd) = &node.service_discovery {
            if let Some(reg) = sd.registry.as_ref().or(sd.aws_cloud_map.as_ref()) {
                if protocol != pb::cluster::Protocol::TcpOnly {
                    authority_port = port.and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
                }
                let selector = reg.attributes.pairs();
                // Registrations of one address are one endpoint (a restarted instance may
                // re-register under a new id before its old lease ends): healthy while any of
                // them is, draining only when all are.
                let mut merged: BTreeMap<String, (bool, Vec<String>, String)> = BTreeMap::new();
                for (i, address) in instances
                    .iter()
                    .filter(|i| i.matches(&reg.namespace_name, &reg.service_name, &selector))
                    .filter_map(|i| Some((i, instance_address(i, family)?)))
                {
                    let (healthy, ids, zone) = merged.entry(address).or_default();
                    *healthy |= i.status == InstanceStatus::Healthy;
                    ids.push(i.store_key());
                    if zone.is_empty() {
                        zone.push_str(i.zone().unwrap_or_default());
                    }
                }
                for (address, (healthy, ids, zone)) in merged {
                    self.sources
                        .endpoint(&name, &address, ids.into_iter().map(Source::Instance));
                    endpoints.push(pb::Endpoint {
                        address,
                        health: if healthy {
                            pb::endpoint::Health::Healthy
                        } else {
                            pb::endpoint::Health::Draining
                        } as i32,
                        zone,
                    });
                }
            } else if let (Some(dns), Some(l)) = (&sd.dns, listener) {
                let port = u16::try_from(l.port_mapping.port).unwrap_or_default();
                let address = trellis_proxy::snapshot::host_port(&dns.hostname, port);
                self.sources
                    .endpoint(&name, &address, [Source::Resource(key.clone())]);
                endpoints.push(pb::Endpoint {
                    address,
                    health: pb::endpoint::Health::Healthy as i32,
                    ..Default::default()
                });
            }
        }
        // The settings of the listener the cluster reaches the node on.
        let (outlier_detection, mut connection_pool) =
            listener.map_or((None, None), listener_resilience);
        if let Some((_, pool)) = &self.gateway_pool {
            connection_pool = Some(*pool);
        }
        let health_check = listener.and_then(listener_health_check);
        let tls = self.upstream_tls(key, listener.map(|l| l.port_mapping.port));
        self.clusters.insert(
            name.clone(),
            pb::Cluster {
                name: name.clone(),
                protocol: protocol as i32,
                lb_policy: lb as i32,
                slow_start: node
                    .load_balancer
                    .as_ref()
                    .and_then(|l| l.slow_start.as_ref())
                    .map(model::SlowStart::to_proto),
                hash_key: node
                    .load_balancer
                    .as_ref()
                    .and_then(model::LoadBalancer::hash_key_proto),
                zone_aware: node
                    .load_balancer
                    .as_ref()
                    .and_then(model::LoadBalancer::zone_aware_proto),
                endpoints,
                outlier_detection,
                connection_pool,
                health_check,
                authority_port,
                ip_family: family as i32,
                dns: dns_mode as i32,
                tls,
                ..Default::default()
            },
        );
        name
    }

    /// The cluster a route's mirror copies go to: the node's, under a name of its own
    /// (`…#mirror`), so that at the caller copies have their own connections, request limits
    /// and outlier state and never queue or eject for the node's real traffic. Without a
    /// health check (it would probe the instances a second time from every caller): a copy may
    /// reach an instance failing the node's checks, and fail alone.
    fn mirror_cluster(&mut self, key: &ResourceKey, port: Option<i64>) -> String {
        let name = self.cluster(key, port);
        let mirror = format!("{name}#mirror");
        if self.clusters.contains_key(&mirror) {
            return mirror;
        }
        let Some(mut cluster) = self.clusters.get(&name).cloned() else {
            return name;
        };
        cluster.name.clone_from(&mirror);
        cluster.health_check = None;
        self.clusters.insert(mirror.clone(), cluster);
        let sources = self
            .sources
            .clusters
            .get(&name)
            .cloned()
            .unwrap_or_default();
        for s in sources {
            self.sources.cluster(&mirror, s);
        }
        let endpoints: Vec<_> = self
            .sources
            .endpoints
            .iter()
            .filter(|((c, _), _)| *c == name)
            .map(|((_, a), s)| (a.clone(), s.clone()))
            .collect();
        for (address, sources) in endpoints {
            self.sources.endpoint(&mirror, &address, sources);
        }
        mirror
    }

    fn targets(&mut self, ns: &str, action: &model::RouteAction) -> Vec<pb::WeightedTarget> {
        action
            .weighted_targets
            .iter()
            .map(|t| {
                let key = t.virtual_node_ref.key(Kind::VirtualNode, ns);
                pb::WeightedTarget {
                    cluster: self.cluster(&key, t.port),
                    weight: u32::try_from(t.weight).unwrap_or(0),
                }
            })
            .collect()
    }

    /// The egress virtual host for one backend VirtualService.
    fn virtual_service(&mut self, key: &ResourceKey) -> Option<pb::VirtualHost> {
        let Some(Spec::VirtualService(vs)) = self.state.get(key).map(|r| &r.spec) else {
            return None;
        };
        self.uses.insert(key.clone());
        let host = hostname(key, vs);
        let provider = vs.provider.as_ref()?;
        let (ports, routes, route_source) = if let Some(p) = &provider.virtual_node {
            let node_key = p.virtual_node_ref.key(Kind::VirtualNode, &key.namespace);
            let ports: Vec<i64> = self
                .node(&node_key)?
                .listeners
                .first()
                .map(|l| l.port_mapping.port)
                .into_iter()
                .collect();
            let cluster = self.cluster(&node_key, None);
            // A tcp node's service is reached by CONNECT: no HTTP retries there.
            let http = self
                .node(&node_key)
                .and_then(|n| n.listeners.first())
                .is_none_or(|l| l.port_mapping.protocol != "tcp");
            let route = pb::Route {
                name: format!("{}/default", key.name),
                action: Some(pb::RouteAction {
                    weighted_targets: vec![pb::WeightedTarget { cluster, weight: 1 }],
                    ..Default::default()
                }),
                retry_policy: if http { self.default_retry(key) } else { None },
                ..Default::default()
            };
            (ports, vec![route], key.clone())
        } else if let Some(p) = &provider.virtual_router {
            let router_key = p
                .virtual_router_ref
                .key(Kind::VirtualRouter, &key.namespace);
            let Some(Spec::VirtualRouter(router)) = self.state.get(&router_key).map(|r| &r.spec)
            else {
                return None;
            };
            self.uses.insert(router_key.clone());
            // Reached on each of the router's listener ports; with several, routes choose by
            // `match.port`.
            let ports: Vec<i64> = router
                .listeners
                .iter()
                .map(|l| l.port_mapping.port)
                .collect();
            let mut routes = Vec::new();
            for route in &router.routes {
                routes.push(self.route(&router_key, route));
            }
            (ports, routes, router_key)
        } else {
            return None;
        };
        // Only sidecar egress listeners hold virtual services.
        self.sources
            .host("egress", &host, Source::Resource(key.clone()));
        for r in &routes {
            self.sources.route(
                "egress",
                &host,
                &r.name,
                [Source::Resource(route_source.clone())],
            );
        }
        let mut domains: Vec<String> = ports.iter().map(|p| format!("{host}:{p}")).collect();
        domains.push(host.clone());
        // Where captured connections to it were sent (its cluster IPs on Kubernetes).
        if let Some(r) = self.state.get(key) {
            let addresses = model::annotated_addresses(&r.metadata.annotations);
            domains.extend(
                addresses
                    .unwrap_or_default()
                    .iter()
                    .map(ToString::to_string),
            );
        }
        Some(pb::VirtualHost {
            name: host,
            domains,
            routes,
        })
    }

    /// App Mesh's default retry policy, for HTTP, HTTP/2 and gRPC requests whose route sets
    /// none, when what routes them (a router, a VirtualService provided by a node) was applied
    /// with App Mesh's API group, unless its mesh turned App Mesh's defaults off: 2 retries on
    /// 503, gRPC UNAVAILABLE, connect failure, refused stream, reset.
    /// The Mesh `source` belongs to.
    fn mesh(&self, source: &ResourceKey) -> Option<&model::MeshSpec> {
        let r = self.state.get(source)?;
        let mesh = crate::validate::mesh_of(self.state, r)?;
        match &self
            .state
            .get(&ResourceKey::new(Kind::Mesh, "", mesh))?
            .spec
        {
            Spec::Mesh(m) => Some(m),
            _ => None,
        }
    }

    fn default_retry(&self, source: &ResourceKey) -> Option<pb::RetryPolicy> {
        let r = self.state.get(source)?;
        if r.api_version != model::ApiVersion::AppMesh {
            return None;
        }
        if self.mesh(source).is_some_and(|m| !m.app_mesh_defaults()) {
            return None;
        }
        Some(pb::RetryPolicy {
            max_retries: 2,
            http_retry_events: [
                "connect-failure",
                "refused-stream",
                "reset",
                "retriable-status-codes",
            ]
            .map(String::from)
            .to_vec(),
            retriable_status_codes: vec![503],
            grpc_retry_events: vec!["unavailable".to_string()],
            ..Default::default()
        })
    }

    /// The fields an httpRoute (or http2Route) and a grpcRoute share, set on `out`.
    fn shared_fields(
        &mut self,
        out: &mut pb::Route,
        router: &ResourceKey,
        route: &str,
        shared: Shared<'_>,
    ) {
        let ns = router.namespace.as_str();
        out.retry_policy = shared
            .retry_policy
            .map(retry)
            .or_else(|| self.default_retry(router));
        out.timeout = shared.timeout.map(timeouts);
        out.request_headers = shared.request_headers.map(model::HeaderRules::to_proto);
        out.response_headers = shared.response_headers.map(model::HeaderRules::to_proto);
        out.fault = shared.fault.map(fault);
        out.mirror = shared.mirror.map(|m| {
            let key = m.virtual_node_ref.key(Kind::VirtualNode, ns);
            m.to_proto(self.mirror_cluster(&key, m.port))
        });
        // One bucket per router route at a proxy, whichever virtual hosts (services, gateway
        // hostnames) carry a copy of it.
        out.rate_limit = shared
            .rate_limit
            .map(|r| r.to_proto(&format!("{ns}/{}/{route}", router.name)));
    }

    fn route(&mut self, router: &ResourceKey, route: &model::Route) -> pb::Route {
        let ns = router.namespace.as_str();
        let mut out = pb::Route {
            name: format!("{}/{}", router.name, route.name),
            // App Mesh: lower first; routes without a priority come after those with one.
            priority: route
                .priority
                .map_or(1001, |p| i32::try_from(p).unwrap_or(1001)),
            ..Default::default()
        };
        if let Some(h) = route.http_route.as_ref().or(route.http2_route.as_ref()) {
            out.r#match = Some(http_match(&h.matcher));
            let rewrite = h.rewrite.as_ref();
            out.action = Some(pb::RouteAction {
                weighted_targets: self.targets(ns, &h.action),
                path_rewrite: rewrite.and_then(|r| r.path_proto(h.matcher.prefix.as_deref())),
                host_rewrite: rewrite.and_then(|r| r.hostname.clone()).unwrap_or_default(),
                ..Default::default()
            });
            let shared = Shared {
                retry_policy: h.retry_policy.as_ref(),
                timeout: h.timeout.as_ref(),
                request_headers: h.request_headers.as_ref(),
                response_headers: h.response_headers.as_ref(),
                fault: h.fault.as_ref(),
                mirror: h.mirror.as_ref(),
                rate_limit: h.rate_limit.as_ref(),
            };
            self.shared_fields(&mut out, router, &route.name, shared);
        } else if let Some(g) = &route.grpc_route {
            out.r#match = Some(pb::RouteMatch {
                grpc: g.matcher.service_name.as_ref().map(|s| pb::GrpcMatch {
                    service_name: s.clone(),
                    method_name: g.matcher.method_name.clone().unwrap_or_default(),
                }),
                headers: g.matcher.metadata.iter().map(header_match).collect(),
                port: g
                    .matcher
                    .port
                    .and_then(|p| u32::try_from(p).ok())
                    .unwrap_or(0),
                ..Default::default()
            });
            out.action = Some(pb::RouteAction {
                weighted_targets: self.targets(ns, &g.action),
                ..Default::default()
            });
            let shared = Shared {
                retry_policy: g.retry_policy.as_ref(),
                timeout: g.timeout.as_ref(),
                request_headers: g.request_headers.as_ref(),
                response_headers: g.response_headers.as_ref(),
                fault: g.fault.as_ref(),
                mirror: g.mirror.as_ref(),
                rate_limit: g.rate_limit.as_ref(),
            };
            self.shared_fields(&mut out, router, &route.name, shared);
        } else if let Some(t) = &route.tcp_route {
            // Reached through the egress with CONNECT; `match.port` against its authority's.
            let port = t
                .matcher
                .as_ref()
                .and_then(|m| m.get("port"))
                .and_then(serde_json::Value::as_u64)
                .and_then(|p| u32::try_from(p).ok());
            out.r#match = port.map(|port| pb::RouteMatch {
                port,
                ..Default::default()
            });
            out.action = Some(pb::RouteAction {
                weighted_targets: self.targets(ns, &t.action),
                ..Default::default()
            });
            out.timeout = t.timeout.as_ref().map(timeouts);
        }
        out
    }
}

/// What an httpRoute and a grpcRoute have alike (their own fields, borrowed).
struct Shared<'a> {
    retry_policy: Option<&'a RetryPolicy>,
    timeout: Option<&'a Timeouts>,
    request_headers: Option<&'a model::HeaderRules>,
    response_headers: Option<&'a model::HeaderRules>,
    fault: Option<&'a model::Fault>,
    mirror: Option<&'a model::Mirror>,
    rate_limit: Option<&'a model::RateLimit>,
}

fn http_match(m: &HttpMatch) -> pb::RouteMatch {
    use pb::route_match::Path;
    let path = match (&m.prefix, &m.path) {
        (Some(p), _) => Some(Path::Prefix(p.clone())),
        (None, Some(pm)) => pm
            .exact
            .clone()
            .map(Path::Exact)
            .or_else(|| pm.regex.clone().map(Path::Regex)),
        (None, None) => None,
    };
    pb::RouteMatch {
        path,
        headers: m.headers.iter().map(header_match).collect(),
        method: m.method.clone().unwrap_or_default(),
        query_parameters: m
            .query_parameters
            .iter()
            .map(|q| pb::QueryParameterMatch {
                name: q.name.clone(),
                rule: Some(match &q.matcher {
                    Some(e) => pb::query_parameter_match::Rule::Exact(e.exact.clone()),
                    None => pb::query_parameter_match::Rule::Present(true),
                }),
            })
            .collect(),
        port: m.port.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
        grpc: None,
        scheme: m.scheme.clone().unwrap_or_default(),
    }
}

fn header_match(h: &HeaderMatch) -> pb::HeaderMatch {
    use pb::header_match::Rule;
    let rule = h.matcher.as_ref().and_then(|m| {
        m.exact
            .clone()
            .map(Rule::Exact)
            .or_else(|| m.prefix.clone().map(Rule::Prefix))
            .or_else(|| m.suffix.clone().map(Rule::Suffix))
            .or_else(|| m.regex.clone().map(Rule::Regex))
            .or_else(|| {
                m.range.as_ref().map(|r| {
                    Rule::Range(pb::Range {
                        start: r.start,
                        end: r.end,
                    })
                })
            })
    });
    pb::HeaderMatch {
        name: h.name.clone(),
        invert: h.invert.unwrap_or(false),
        rule: Some(rule.unwrap_or(Rule::Present(true))),
    }
}

fn retry(r: &RetryPolicy) -> pb::RetryPolicy {
    let mut events = Vec::new();
    let mut codes: Vec<u32> = r
        .retriable_status_codes
        .iter()
        .filter_map(|c| u32::try_from(*c).ok())
        .collect();
    for e in &r.http_retry_events {
        match e.as_str() {
            // Envoy's retriable-4xx: 409 Conflict.
            "client-error" => codes.push(409),
            // App Mesh: "retry on refused stream".
            "stream-error" => events.push("refused-stream".to_string()),
            other => events.push(other.to_string()),
        }
    }
    if r.tcp_retry_events.iter().any(|e| e == "connection-error") {
        events.push("connect-failure".to_string());
    }
    events.sort();
    events.dedup();
    codes.sort_unstable();
    codes.dedup();
    pb::RetryPolicy {
        max_retries: u32::try_from(r.max_retries).unwrap_or(0),
        per_try_timeout: app_duration(Some(&r.per_retry_timeout)),
        http_retry_events: events,
        retriable_status_codes: codes,
        grpc_retry_events: r.grpc_retry_events.clone(),
        backoff: r.backoff.as_ref().map(|b| pb::Backoff {
            base_interval: app_duration(b.base_interval.as_ref()),
            max_interval: app_duration(b.max_interval.as_ref()),
        }),
        budget: r.budget.as_ref().map(|b| pb::RetryBudget {
            retry_ratio: b.retry_percent.map(|p| p / 100.0),
            min_retries_per_second: b.min_retries_per_second.and_then(|m| u32::try_from(m).ok()),
        }),
        buffer_limit_bytes: 0,
        hedge_on_per_try_timeout: r.hedge_on_per_retry_timeout.unwrap_or(false),
    }
}

fn timeouts(t: &Timeouts) -> pb::Timeouts {
    pb::Timeouts {
        per_request: app_duration(t.per_request.as_ref()),
        idle: app_duration(t.idle.as_ref()),
    }
}

/// All traffic to the local app's cluster for `port`.
fn to_local(port: i64) -> Vec<pb::WeightedTarget> {
    vec![pb::WeightedTarget {
        cluster: format!("local:{port}"),
        weight: 1,
    }]
}

/// The snapshot for the sidecar of VirtualNode `node`, or None if the node does not exist.
pub fn sidecar(
    state: &State,
    instances: &[Instance],
    node: &ResourceKey,
    security: Security<'_>,
) -> Option<Translated> {
    let mut b = Builder {
        state,
        instances,
        uses: BTreeSet::new(),
        clusters: BTreeMap::new(),
        sources: Sources::default(),
        gateway_pool: None,
        security,
        client_policy: None,
        withheld: None,
    };
    let spec = b.node(node)?.clone();
    for mesh in state.keys().filter(|k| k.kind == Kind::Mesh) {
        b.uses.insert(mesh.clone());
    }
    let mut listeners = Vec::new();
    listeners.extend(ingress(&mut b, &spec, node));
    listeners.push(egress(&mut b, &spec, node));
    Some(b.finish(listeners, spec.logging.as_ref(), node))
}

/// Ingress: to the local app on 127.0.0.1:<port> of each listener, as App Mesh's Envoy did (one
/// `local:<port>` cluster each); None for a node without listeners.
fn ingress(
    b: &mut Builder<'_>,
    spec: &VirtualNodeSpec,
    node: &ResourceKey,
) -> Option<pb::Listener> {
    let (tls, authorization) = ingress_security(b, node, spec);
    let locals: Vec<(i64, &str)> = spec
        .listeners
        .iter()
        .map(|l| (l.port_mapping.port, l.port_mapping.protocol.as_str()))
        .collect();
    // A listener's inbound timeouts (App Mesh: the one of its protocol), on its ingress route.
    let inbound = |port: i64| {
        spec.listeners
            .iter()
            .find(|l| l.port_mapping.port == port)
            .and_then(|l| {
                let t = l.timeout.as_ref()?;
                t.for_protocol(&l.port_mapping.protocol)
            })
    };
    for (port, protocol) in &locals {
        b.clusters.insert(
            format!("local:{port}"),
            pb::Cluster {
                name: format!("local:{port}"),
                protocol: cluster_protocol(protocol) as i32,
                endpoints: vec![pb::Endpoint {
                    address: format!("127.0.0.1:{port}"),
                    health: pb::endpoint::Health::Healthy as i32,
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
    }
    if let [(port, "tcp")] = locals.as_slice() {
        return Some(pb::Listener {
            name: "ingress".into(),
            role: pb::listener::Role::Ingress as i32,
            protocol: pb::listener::Protocol::Tcp as i32,
            tcp: Some(pb::TcpRoute {
                weighted_targets: to_local(*port),
                idle: inbound(*port).and_then(|t| app_duration(t.idle.as_ref())),
            }),
            tls,
            authorization,
            ..Default::default()
        });
    }
    let (first, _) = locals.first()?;
    let many = locals.len() > 1;
    // The node's header rules, on every route to its app.
    let request_headers = spec
        .request_headers
        .as_ref()
        .map(model::HeaderRules::to_proto);
    let response_headers = spec
        .response_headers
        .as_ref()
        .map(model::HeaderRules::to_proto);
    // One bucket for the node over every route to its app.
    let rate_limit = spec.rate_limit.as_ref().map(|r| r.to_proto("node"));
    let mut routes: Vec<pb::Route> = locals
        .iter()
        .map(|(port, _)| pb::Route {
            name: format!("inbound:{port}"),
            r#match: many.then(|| pb::RouteMatch {
                port: u32::try_from(*port).unwrap_or(0),
                ..Default::default()
            }),
            action: Some(pb::RouteAction {
                weighted_targets: to_local(*port),
                ..Default::default()
            }),
            timeout: inbound(*port).map(timeouts),
            request_headers: request_headers.clone(),
            response_headers: response_headers.clone(),
            rate_limit: rate_limit.clone(),
            ..Default::default()
        })
        .collect();
    if rate_limit.is_some() {
        // Callers' health checks of the node are never rate limited: a probe answered 429
        // would take a busy node's instances out of every caller's balancer.
        for l in &spec.listeners {
            let Some(hc) = &l.health_check else { continue };
            let path = match hc.protocol.as_str() {
                "grpc" => "/grpc.health.v1.Health/Check",
                "http" | "http2" => hc.path.as_deref().unwrap_or("/"),
                _ => continue,
            };
            let port = l.port_mapping.port;
            routes.push(pb::Route {
                name: format!("health:{port}"),
                priority: -1,
                r#match: Some(pb::RouteMatch {
                    path: Some(pb::route_match::Path::Exact(path.into())),
                    port: if many {
                        u32::try_from(port).unwrap_or(0)
                    } else {
                        0
                    },
                    ..Default::default()
                }),
                action: Some(pb::RouteAction {
                    weighted_targets: to_local(port),
                    ..Default::default()
                }),
                timeout: inbound(port).map(timeouts),
                request_headers: request_headers.clone(),
                response_headers: response_headers.clone(),
                ..Default::default()
            });
        }
    }
    if many {
        // Requests whose authority names no listener port go to the first listener.
        routes.push(pb::Route {
            name: "inbound:default".into(),
            priority: 1,
            action: Some(pb::RouteAction {
                weighted_targets: to_local(*first),
                ..Default::default()
            }),
            timeout: inbound(*first).map(timeouts),
            request_headers,
            response_headers,
            rate_limit,
            ..Default::default()
        });
    }
    Some(pb::Listener {
        name: "ingress".into(),
        role: pb::listener::Role::Ingress as i32,
        virtual_hosts: vec![pb::VirtualHost {
            name: "inbound".into(),
            domains: vec!["*".into()],
            routes,
        }],
        tls,
        authorization,
        ..Default::default()
    })
}

/// A sidecar ingress's TLS: its listeners' own (App Mesh's `tls`; validation has made them one),
/// else its mesh's mode — and under STRICT who may call it: the nodes and gateways the mesh graph
/// sends to it.
fn ingress_security(
    b: &mut Builder<'_>,
    node: &ResourceKey,
    spec: &VirtualNodeSpec,
) -> (Option<pb::ServerTls>, Option<pb::Authorization>) {
    if let Some(t) = spec.listeners.iter().find_map(|l| l.tls.as_ref()) {
        return (listener_tls(t), None);
    }
    let mode = match b.mtls(node) {
        Mtls::Disabled => return (None, None),
        Mtls::Permissive => pb::server_tls::Mode::Permissive,
        Mtls::Strict => pb::server_tls::Mode::Strict,
    };
    let tls = Some(pb::ServerTls {
        mode: mode as i32,
        client_validation: Some(pb::PeerValidation::default()),
        ..Default::default()
    });
    if mode != pb::server_tls::Mode::Strict {
        return (tls, None);
    }
    let mut identities = Vec::new();
    let mut callers = crate::policy::callers(b.state, node);
    // And the ones the node allows outside the graph.
    for a in &spec.allowed_callers {
        if let Some(r) = &a.virtual_node_ref {
            callers.insert(r.key(Kind::VirtualNode, &node.namespace));
        } else if let Some(r) = &a.virtual_gateway_ref {
            callers.insert(r.key(Kind::VirtualGateway, &node.namespace));
        } else if let Some(id) = &a.spiffe_id {
            identities.push(id.clone());
        }
    }
    for caller in callers {
        let Some(id) = b.spiffe_id(&caller) else {
            return (tls, None);
        };
        identities.push(id);
    }
    identities.sort();
    identities.dedup();
    (tls, Some(pb::Authorization { identities }))
}

/// Egress: the backends the node declares, and only those.
fn egress(b: &mut Builder<'_>, spec: &VirtualNodeSpec, node: &ResourceKey) -> pb::Listener {
    let keys = crate::policy::backend_services(b.state, node, spec);
    let defaults = spec
        .backend_defaults
        .as_ref()
        .and_then(|d| d.client_policy.as_ref())
        .and_then(|p| p.tls.clone());
    let mut hosts = Vec::new();
    for key in &keys {
        // The backend's own client policy, else the defaults.
        let own = spec.backends.iter().find_map(|backend| {
            let vs = &backend.virtual_service;
            (vs.virtual_service_ref
                .key(Kind::VirtualService, &node.namespace)
                == *key)
                .then(|| vs.client_policy.as_ref()?.tls.clone())
                .flatten()
        });
        b.client_policy = match own {
            Some(policy) => Some((policy, Some(format!("{}/{}", key.namespace, key.name)))),
            None => defaults.clone().map(|p| (p, None)),
        };
        if let Some(vh) = b.virtual_service(key) {
            hosts.push(vh);
        }
        b.client_policy = None;
    }
    // The mesh's egressFilter: DROP_ALL (App Mesh's default, also when unset) refuses what the
    // node does not declare as egress the mesh does not allow; ALLOW_ALL forwards it to the host
    // it names.
    let allow_all = b
        .mesh(node)
        .and_then(|m| m.egress_filter.as_ref())
        .is_some_and(|f| f.kind == "ALLOW_ALL");
    let unmatched = if allow_all {
        pb::listener::Unmatched::Passthrough
    } else {
        pb::listener::Unmatched::Deny
    };
    pb::Listener {
        name: "egress".into(),
        role: pb::listener::Role::Egress as i32,
        virtual_hosts: hosts,
        unmatched: unmatched as i32,
        ..Default::default()
    }
}

/// Joins a gateway prefix and the rest of a path without doubling or dropping the slash.
fn join_path(prefix: &str, rest: &str) -> String {
    if prefix.ends_with('/') && rest.starts_with('/') {
        format!("{prefix}{}", &rest[1..])
    } else if prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/') {
        format!("{prefix}{rest}")
    } else {
        format!("{prefix}/{rest}")
    }
}

/// A gateway grpcRoute as the equivalent HTTP route: the service's path prefix, metadata as
/// headers, and no path rewrite (gRPC paths are service/method names).
fn gateway_grpc_as_http(g: &model::GatewayGrpcRoute) -> model::GatewayHttpRoute {
    let mut action = g.action.clone();
    let mut rewrite = action.rewrite.take().unwrap_or_default();
    rewrite.prefix = Some(model::PrefixRewrite {
        default_prefix: Some("DISABLED".into()),
        value: None,
    });
    action.rewrite = Some(rewrite);
    model::GatewayHttpRoute {
        matcher: model::GatewayHttpMatch {
            prefix: Some(
                g.matcher
                    .service_name
                    .as_ref()
                    .map_or_else(|| "/".into(), |s| format!("/{s}/")),
            ),
            hostname: g.matcher.hostname.clone(),
            headers: g.matcher.metadata.clone(),
            port: g.matcher.port,
            ..Default::default()
        },
        action,
    }
}

/// A router grpcRoute's match as the equivalent HTTP match (path /service/method).
fn grpc_as_http_match(m: &model::GrpcMatch) -> HttpMatch {
    let (prefix, path) = match (&m.service_name, &m.method_name) {
        (Some(s), Some(method)) => (
            None,
            Some(model::PathMatch {
                exact: Some(format!("/{s}/{method}")),
                regex: None,
            }),
        ),
        (Some(s), None) => (Some(format!("/{s}/")), None),
        _ => (Some("/".into()), None),
    };
    HttpMatch {
        prefix,
        path,
        headers: m.metadata.clone(),
        port: m.port,
        ..Default::default()
    }
}

/// A gateway route's match combined with one of the target router's routes, on the path the
/// client sends. `rewrite` is (gateway prefix, what the router sees instead) — with no rewrite the
/// router sees the gateway prefix itself. None when the two can never match together.
fn combine(
    gw: &model::GatewayHttpMatch,
    rewrite: Option<(&str, &str)>,
    route: &HttpMatch,
) -> Option<pb::RouteMatch> {
    use pb::route_match::Path;
    let path = match (&gw.prefix, rewrite) {
        (Some(pg), Some((_, seen))) => {
            // The router sees `seen` + rest for a client path `pg` + rest.
            match (&route.prefix, &route.path) {
                (Some(pr), _) if pr.starts_with(seen) => {
                    Some(Path::Prefix(join_path(pg, &pr[seen.len()..])))
                }
                (Some(pr), _) if seen.starts_with(pr.as_str()) => Some(Path::Prefix(pg.clone())),
                (Some(_), _) => return None,
                (None, Some(pm)) => match (&pm.exact, &pm.regex) {
                    (Some(e), _) if e.starts_with(seen) => {
                        Some(Path::Exact(join_path(pg, &e[seen.len()..])))
                    }
                    (None, Some(re)) if seen == "/" => Some(Path::Regex(format!(
                        "{}(?:{re})",
                        regex::escape(pg.trim_end_matches('/'))
                    ))),
                    _ => return None,
                },
                (None, None) => Some(Path::Prefix(pg.clone())),
            }
        }
        (Some(pg), None) => Some(Path::Prefix(pg.clone())),
        // An exact gateway path rewritten to `seen`: the router's route applies when it matches
        // that path (known here); the client's path stays the match.
        (None, Some((_, seen))) => {
            let exact = gw.path.as_ref()?.exact.clone()?;
            let takes = match (&route.prefix, &route.path) {
                (Some(pr), _) => seen.starts_with(pr.as_str()),
                (None, Some(pm)) => {
                    pm.exact.as_deref() == Some(seen)
                        || pm.regex.as_ref().is_some_and(|re| {
                            regex::Regex::new(&format!("^(?:{re})$"))
                                .is_ok_and(|r| r.is_match(seen))
                        })
                }
                (None, None) => true,
            };
            if !takes {
                return None;
            }
            Some(Path::Exact(exact))
        }
        (None, _) => {
            // A gateway path match combines only with routes that take any path.
            if route.prefix.as_deref() != Some("/") {
                return None;
            }
            gw.path.as_ref().and_then(|pm| {
                pm.exact
                    .clone()
                    .map(Path::Exact)
                    .or_else(|| pm.regex.clone().map(Path::Regex))
            })
        }
    };
    let method = match (&gw.method, &route.method) {
        (Some(a), Some(b)) if a != b => return None,
        (a, b) => a.clone().or_else(|| b.clone()).unwrap_or_default(),
    };
    let mut m = http_match(route);
    m.path = path;
    m.method = method;
    m.headers = gw
        .headers
        .iter()
        .map(header_match)
        .chain(m.headers)
        .collect();
    let gw_query = http_match(&HttpMatch {
        query_parameters: gw.query_parameters.clone(),
        ..Default::default()
    })
    .query_parameters;
    m.query_parameters = gw_query.into_iter().chain(m.query_parameters).collect();
    // A gateway route's `match.port` chose the gateway listener it is served on, and the router
    // route's is not matched at a gateway (its requests carry the gateway's port).
    m.port = 0;
    Some(m)
}

/// The snapshot for a gateway of VirtualGateway `key`: its ingress routes the GatewayRoutes that
/// name it (or, without `virtualGatewayRef`, those of its namespace) to their virtual services,
/// through the services' routers, with App Mesh's default rewrites (matched prefix → "/", Host →
/// the service's hostname).
pub fn gateway(
    state: &State,
    instances: &[Instance],
    key: &ResourceKey,
    security: Security<'_>,
) -> Option<Translated> {
    let Some(Spec::VirtualGateway(gw)) = state.get(key).map(|r| &r.spec) else {
        return None;
    };
    let mut b = Builder {
        state,
        instances,
        uses: BTreeSet::new(),
        clusters: BTreeMap::new(),
        sources: Sources::default(),
        gateway_pool: None,
        security,
        client_policy: None,
        withheld: None,
    };
    b.uses.insert(key.clone());
    for mesh in state.keys().filter(|k| k.kind == Kind::Mesh) {
        b.uses.insert(mesh.clone());
    }
    // Its backend defaults' client policy, toward every target.
    b.client_policy = gw
        .backend_defaults
        .as_ref()
        .and_then(|d| d.client_policy.as_ref())
        .and_then(|p| p.tls.clone())
        .map(|p| (p, None));
    // The gateway routes it serves: those naming it, else those its selectors (or, without a
    // namespaceSelector, its namespace) take.
    let mut routes: Vec<(&ResourceKey, &model::GatewayRouteSpec)> = state
        .iter()
        .filter(|(_, r)| crate::validate::gateway_serves(state, (key, gw), r))
        .filter_map(|(k, r)| match &r.spec {
            Spec::GatewayRoute(g) => Some((k, &**g)),
            _ => None,
        })
        .collect();
    // A namespace's labels decide which gateways select its routes.
    if gw.namespace_selector.is_some() {
        for (k, _) in &routes {
            let ns = ResourceKey::new(Kind::Namespace, "", &k.namespace);
            if state.contains_key(&ns) {
                b.uses.insert(ns);
            }
        }
    }
    routes.sort_by_key(|(k, g)| (g.priority.unwrap_or(1001), k.name.clone()));

    // One listener per VirtualGateway listener port, each bound by the gateway proxy on the IP
    // of its --ingress-addr, serving the routes whose `match.port` names it (validation requires
    // one with several listeners; with one, a route without it is that listener's).
    let several = gw.listeners.len() > 1;
    let mut listeners = Vec::new();
    for l in &gw.listeners {
        let port = l.port_mapping.port;
        let on_listener = routes
            .iter()
            .filter(|(_, g)| g.match_port().map_or(!several, |p| p == port));
        // The listener's connectionPool limits the gateway's traffic from it to each cluster.
        b.gateway_pool = listener_resilience(l)
            .1
            .map(|pool| (format!("gateway:{port}"), pool));
        listeners.push(gateway_listener(&mut b, l, on_listener));
        b.gateway_pool = None;
    }
    Some(b.finish(listeners, gw.logging.as_ref(), key))
}

/// The route answering a gateway listener's `healthCheck` (an external load balancer's probe):
/// the gateway's own readiness, before any gateway route. http/http2: a request for the path
/// (default "/"); grpc: grpc.health.v1.Health/Check.
fn gateway_health_route(h: &model::HealthCheck) -> pb::Route {
    use pb::direct_response::Kind;
    let (path, kind) = match h.protocol.as_str() {
        "grpc" => ("/grpc.health.v1.Health/Check", Kind::GrpcHealth),
        _ => (h.path.as_deref().unwrap_or("/"), Kind::Readiness),
    };
    pb::Route {
        name: "healthCheck".into(),
        priority: i32::MIN,
        r#match: Some(pb::RouteMatch {
            path: Some(pb::route_match::Path::Exact(path.into())),
            ..Default::default()
        }),
        action: Some(pb::RouteAction {
            direct_response: Some(pb::DirectResponse {
                kind: kind as i32,
                body: "ready\n".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The gateway's listener `l`, with the gateway routes served there (in priority order), after
/// the route answering its health check.
fn gateway_listener<'r>(
    b: &mut Builder<'_>,
    l: &model::Listener,
    routes: impl Iterator<Item = &'r (&'r ResourceKey, &'r model::GatewayRouteSpec)>,
) -> pb::Listener {
    let port = l.port_mapping.port;
    let name = format!("gateway:{port}");
    // Routes per hostname match ("" = any host), in priority order.
    let mut by_host: BTreeMap<String, Vec<pb::Route>> = BTreeMap::new();
    let mut route_sources: BTreeMap<String, Vec<Source>> = BTreeMap::new();
    for (rank, (gr_key, gr)) in routes.enumerate() {
        let Some((host, out)) = gateway_route(b, rank, gr_key, gr, &mut route_sources) else {
            continue;
        };
        by_host.entry(host).or_default().extend(out);
    }
    let generic = by_host.remove("").unwrap_or_default();
    let mut hosts: Vec<pb::VirtualHost> = by_host
        .into_iter()
        .map(|(domain, mut routes)| {
            // Routes for any host apply here too (a request matches only one virtual host).
            routes.extend(generic.iter().cloned());
            routes.sort_by_key(|r| r.priority);
            pb::VirtualHost {
                name: domain.clone(),
                domains: vec![domain],
                routes,
            }
        })
        .collect();
    hosts.push(pb::VirtualHost {
        name: "any".into(),
        domains: vec!["*".into()],
        routes: generic,
    });
    if let Some(h) = &l.health_check {
        // A request matches one virtual host: each answers the probe.
        let health = gateway_health_route(h);
        for host in &mut hosts {
            host.routes.insert(0, health.clone());
        }
    }
    for host in &hosts {
        for r in &host.routes {
            let sources = route_sources.get(&r.name).into_iter().flatten().cloned();
            b.sources.route(&name, &host.name, &r.name, sources);
        }
    }
    pb::Listener {
        name,
        port: u32::try_from(port).unwrap_or(0),
        virtual_hosts: hosts,
        tls: l.tls.as_ref().and_then(listener_tls),
        ..Default::default()
    }
}

/// App Mesh's listener `tls` as the proxy's: None for DISABLED; `file` certificates and trust
/// by path, `sds` ones the workload certificate and the mesh's trust bundle.
fn listener_tls(t: &model::ListenerTls) -> Option<pb::ServerTls> {
    let mode = match t.mode.as_str() {
        "STRICT" => pb::server_tls::Mode::Strict,
        "PERMISSIVE" => pb::server_tls::Mode::Permissive,
        _ => return None,
    };
    Some(pb::ServerTls {
        mode: mode as i32,
        certificate: t
            .certificate
            .as_ref()
            .and_then(|c| c.file.as_ref())
            .map(certificate_files),
        client_validation: t.validation.as_ref().map(|v| pb::PeerValidation {
            trust_files: trust_files(v),
            subject_alt_names: v.names().to_vec(),
        }),
    })
}

fn certificate_files(f: &model::TlsFile) -> pb::CertificateFiles {
    pb::CertificateFiles {
        certificate_chain: f.certificate_chain.clone(),
        private_key: f.private_key.clone().unwrap_or_default(),
    }
}

fn trust_files(v: &model::TlsValidation) -> Vec<String> {
    v.trust
        .file
        .iter()
        .map(|f| f.certificate_chain.clone())
        .collect()
}

/// An App Mesh client policy's TLS as the proxy's: the client certificate (`file`, `sds`: the
/// workload certificate, none: no client certificate), the trust (`file`, `sds`: the mesh's
/// bundle) and the names the server must carry.
fn client_policy_tls(p: &model::ClientTls) -> pb::UpstreamTls {
    pb::UpstreamTls {
        identities: p.validation.names().to_vec(),
        plaintext_without_identity: false,
        certificate: p
            .certificate
            .as_ref()
            .and_then(|c| c.file.as_ref())
            .map(certificate_files),
        no_certificate: p.certificate.is_none(),
        trust_files: trust_files(&p.validation),
    }
}

/// One GatewayRoute's routes — expanded through its target service's router when it has one —
/// with the hostname they are served for ("" = any); None when its target is missing.
fn gateway_route(
    b: &mut Builder<'_>,
    rank: usize,
    gr_key: &ResourceKey,
    gr: &model::GatewayRouteSpec,
    route_sources: &mut BTreeMap<String, Vec<Source>>,
) -> Option<(String, Vec<pb::Route>)> {
    let state = b.state;
    b.uses.insert((*gr_key).clone());
    let grpc_as_http;
    let h = match (
        gr.http_route.as_ref().or(gr.http2_route.as_ref()),
        &gr.grpc_route,
    ) {
        (Some(h), _) => h,
        (None, Some(g)) => {
            grpc_as_http = gateway_grpc_as_http(g);
            &grpc_as_http
        }
        (None, None) => return None,
    };
    let vs_ref = &h.action.target.virtual_service.virtual_service_ref;
    let vs_key = vs_ref.key(Kind::VirtualService, &gr_key.namespace);
    let Some(Spec::VirtualService(vs)) = state.get(&vs_key).map(|r| &r.spec) else {
        return None;
    };
    b.uses.insert(vs_key.clone());
    let expansion = GatewayExpansion {
        gr_key,
        h,
        rewrite: GatewayRewrites::new(h, &vs_key, vs),
        base: i32::try_from(rank)
            .unwrap_or(i32::MAX / 2_000)
            .saturating_mul(2_000),
    };
    let provider = vs.provider.clone().unwrap_or_default();
    let mut out = Vec::new();
    if let Some(p) = &provider.virtual_node {
        let node = p.virtual_node_ref.key(Kind::VirtualNode, &vs_key.namespace);
        out.extend(expansion.to_node(b, &node, h.action.target.port, route_sources));
    } else if let Some(p) = &provider.virtual_router {
        let router_key = p
            .virtual_router_ref
            .key(Kind::VirtualRouter, &vs_key.namespace);
        out = expansion.through_router(b, &router_key, route_sources)?;
    }
    Some((gateway_host(&h.matcher), out))
}

/// The hostname a gateway route is served for: its exact or suffix match ("" = any).
fn gateway_host(m: &model::GatewayHttpMatch) -> String {
    match &m.hostname {
        Some(model::HostnameMatch { exact: Some(e), .. }) => e.to_ascii_lowercase(),
        Some(model::HostnameMatch {
            suffix: Some(s), ..
        }) => format!(
            "*.{}",
            s.trim_start_matches(['*', '.']).to_ascii_lowercase()
        ),
        _ => String::new(),
    }
}

/// What a gateway route rewrites on the requests it forwards (App Mesh's defaults: the matched
/// prefix becomes "/", the Host the target service's hostname).
struct GatewayRewrites {
    /// (matched prefix, replacement).
    prefix: Option<(String, String)>,
    /// "" keeps the Host.
    host: String,
}

impl GatewayRewrites {
    fn new(
        h: &model::GatewayHttpRoute,
        vs_key: &ResourceKey,
        vs: &model::VirtualServiceSpec,
    ) -> Self {
        let rewrite = h.action.rewrite.clone().unwrap_or_default();
        let exact = h.matcher.path.as_ref().and_then(|p| p.exact.as_ref());
        let prefix = match (&h.matcher.prefix, &rewrite.prefix) {
            // An exact path rewritten to another: the whole path is the "prefix" replaced.
            (None, _) if rewrite.path.is_some() && exact.is_some() => exact
                .cloned()
                .zip(rewrite.path.as_ref().map(|p| p.exact.clone())),
            (Some(_), Some(p))
                if p.default_prefix.as_deref() == Some("DISABLED") && p.value.is_none() =>
            {
                None
            }
            (Some(pg), p) => Some((
                pg.clone(),
                p.as_ref()
                    .and_then(|p| p.value.clone())
                    .unwrap_or_else(|| "/".into()),
            )),
            (None, _) => None,
        };
        let host = match rewrite
            .hostname
            .as_ref()
            .and_then(|h| h.default_target_hostname.as_deref())
        {
            Some("DISABLED") => String::new(),
            _ => hostname(vs_key, vs),
        };
        Self { prefix, host }
    }

    /// The action forwarding to `targets` with these rewrites.
    fn action(&self, targets: Vec<pb::WeightedTarget>) -> pb::RouteAction {
        pb::RouteAction {
            weighted_targets: targets,
            path_rewrite: self.prefix.as_ref().map(|(p, r)| pb::PathRewrite {
                prefix: p.clone(),
                replacement: r.clone(),
                ..Default::default()
            }),
            host_rewrite: self.host.clone(),
            direct_response: None,
            then_path_rewrites: Vec::new(),
        }
    }
}

/// One gateway route being turned into proxy routes.
struct GatewayExpansion<'a> {
    gr_key: &'a ResourceKey,
    h: &'a model::GatewayHttpRoute,
    rewrite: GatewayRewrites,
    /// Priority of its first route: gateway routes in rank order, each with room for a router's.
    base: i32,
}

impl GatewayExpansion<'_> {
    /// What the router sees instead of the gateway prefix: the rewrite, or the prefix itself.
    fn view(&self) -> Option<(&str, &str)> {
        self.rewrite
            .prefix
            .as_ref()
            .map(|(p, r)| (p.as_str(), r.as_str()))
            .or(self.h.matcher.prefix.as_deref().map(|p| (p, p)))
    }

    /// The route to a service provided by a node: all of it, to the node's cluster.
    fn to_node(
        &self,
        b: &mut Builder<'_>,
        node: &ResourceKey,
        port: Option<i64>,
        route_sources: &mut BTreeMap<String, Vec<Source>>,
    ) -> Option<pb::Route> {
        let cluster = b.cluster(node, port);
        let any = HttpMatch {
            prefix: Some("/".into()),
            ..Default::default()
        };
        let m = combine(&self.h.matcher, self.view(), &any)?;
        let gr_key = self.gr_key;
        route_sources
            .entry(gr_key.name.clone())
            .or_default()
            .push(Source::Resource(gr_key.clone()));
        Some(pb::Route {
            name: gr_key.name.clone(),
            priority: self.base,
            r#match: Some(m),
            action: Some(
                self.rewrite
                    .action(vec![pb::WeightedTarget { cluster, weight: 1 }]),
            ),
            ..Default::default()
        })
    }

    /// The routes to a service provided by a router: each router route the gateway route's
    /// match can reach, narrowed to both, with the router route's targets and policies; None
    /// when the router is missing.
    fn through_router(
        &self,
        b: &mut Builder<'_>,
        router_key: &ResourceKey,
        route_sources: &mut BTreeMap<String, Vec<Source>>,
    ) -> Option<Vec<pb::Route>> {
        let state = b.state;
        let Some(Spec::VirtualRouter(router)) = state.get(router_key).map(|r| &r.spec) else {
            return None;
        };
        b.uses.insert(router_key.clone());
        // `target.port` names the router listener whose routes apply (validation requires it
        // with several listeners, and checks it names one).
        let port = self
            .h
            .action
            .target
            .port
            .filter(|_| router.listeners.len() > 1);
        let mut out = Vec::new();
        for route in &router.routes {
            if port.is_some() && crate::validate::route_port(route).1 != port {
                continue;
            }
            let grpc_match;
            let rh_match = match (
                route.http_route.as_ref().or(route.http2_route.as_ref()),
                &route.grpc_route,
            ) {
                (Some(rh), _) => &rh.matcher,
                (None, Some(g)) => {
                    grpc_match = grpc_as_http_match(&g.matcher);
                    &grpc_match
                }
                (None, None) => continue,
            };
            let Some(m) = combine(&self.h.matcher, self.view(), rh_match) else {
                continue;
            };
            let translated = b.route(router_key, route);
            let name = format!("{}/{}", self.gr_key.name, translated.name);
            route_sources.entry(name.clone()).or_default().extend([
                Source::Resource(self.gr_key.clone()),
                Source::Resource(router_key.clone()),
            ]);
            out.push(pb::Route {
                name,
                priority: self.base.saturating_add(
                    route
                        .priority
                        .map_or(1001, |p| i32::try_from(p).unwrap_or(1001)),
                ),
                r#match: Some(m),
                action: translated.action.map(|a| {
                    // The gateway's rewrites, then the router route's.
                    let mut action = self.rewrite.action(a.weighted_targets);
                    action.then_path_rewrites.extend(a.path_rewrite);
                    if !a.host_rewrite.is_empty() {
                        action.host_rewrite = a.host_rewrite;
                    }
                    action
                }),
                retry_policy: translated.retry_policy,
                timeout: translated.timeout,
                request_headers: translated.request_headers,
                response_headers: translated.response_headers,
                fault: translated.fault,
                rate_limit: translated.rate_limit,
                mirror: translated.mirror,
            });
        }
        Some(out)
    }
}

/// A content hash of the snapshot (its version field left empty).
pub fn version(snapshot: &pb::Snapshot) -> String {
    use prost::Message as _;
    let mut unversioned = snapshot.clone();
    unversioned.version.clear();
    format!(
        "{:016x}",
        xxhash_rust::xxh3::xxh3_64(&unversioned.encode_to_vec())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{self, parse_documents};
    use std::collections::HashMap;

    fn state(yaml: &str) -> State {
        let mut state = State::new();
        for m in parse_documents(yaml).unwrap() {
            let r = validate::admit(m, None).unwrap();
            state.insert(r.key.clone(), r.into());
        }
        assert_eq!(validate::check(&state, &HashMap::new()), vec![]);
        state
    }

    fn instance(id: &str, version: &str, port: u16, status: InstanceStatus) -> Instance {
        Instance {
            namespace: "demo".into(),
            service: "colorteller".into(),
            id: id.into(),
            address: "127.0.0.1".into(),
            port,
            attributes: [("version".to_string(), version.to_string())].into(),
            status,
            ttl_seconds: None,
            lease: None,
        }
    }

    const MESH: &str = include_str!("../../examples/colorapp/mesh.yaml");

    /// A gateway whose route `colors` sends /colors/ to the colorteller service.
    const GATEWAY: &str = r#"apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualGateway
metadata: { name: ingress-gw }
spec:
  listeners: [{ portMapping: { port: 8088, protocol: http } }]
---
apiVersion: mesh.trellis.dev/v1beta1
kind: GatewayRoute
metadata: { name: colors }
spec:
  virtualGatewayRef: { name: ingress-gw }
  httpRoute:
    match: { prefix: /colors/ }
    action: { target: { virtualService: { virtualServiceRef: { name: colorteller } } } }
"#;

    /// The control plane's retry vocabulary and limits cannot drift from the proxy's: every
    /// event it accepts, at the largest count, translates into a policy the proxy compiles.
    #[test]
    fn every_retry_event_the_control_plane_accepts_compiles_in_the_proxy() {
        let policy = RetryPolicy {
            max_retries: i64::from(trellis_proxy::retry::MAX_RETRIES),
            per_retry_timeout: model::Duration {
                unit: model::DurationUnit::Ms,
                value: 100,
            },
            http_retry_events: validate::HTTP_EVENTS.map(String::from).to_vec(),
            tcp_retry_events: vec!["connection-error".into()],
            grpc_retry_events: trellis_proxy::retry::GRPC_EVENTS
                .map(|(name, _)| name.to_string())
                .to_vec(),
            ..Default::default()
        };
        let snapshot = pb::Snapshot {
            revoked: Vec::new(),
            access_log: None,
            tracing: None,
            measure: None,
            version: "v".into(),
            listeners: vec![pb::Listener {
                name: "egress".into(),
                role: pb::listener::Role::Egress as i32,
                virtual_hosts: vec![pb::VirtualHost {
                    name: "h".into(),
                    domains: vec!["*".into()],
                    routes: vec![pb::Route {
                        name: "r".into(),
                        action: Some(pb::RouteAction {
                            weighted_targets: vec![pb::WeightedTarget {
                                cluster: "c".into(),
                                weight: 1,
                            }],
                            ..Default::default()
                        }),
                        retry_policy: Some(retry(&policy)),
                        ..Default::default()
                    }],
                }],
                ..Default::default()
            }],
            clusters: vec![pb::Cluster {
                name: "c".into(),
                ..Default::default()
            }],
        };
        trellis_proxy::snapshot::check(&snapshot).unwrap();
    }

    /// The cluster the front sidecar builds for blue when blue's listener has `extra` (YAML
    /// lines under it), and the whole snapshot.
    fn blue_cluster_at_front(extra: &str) -> (pb::Cluster, pb::Snapshot) {
        let listener = "    - portMapping: { port: 9081, protocol: http }\n";
        let mesh = MESH.replacen(listener, &format!("{listener}{extra}"), 1);
        assert_ne!(mesh, MESH);
        let instances = [instance("b1", "blue", 20001, InstanceStatus::Healthy)];
        let front = ResourceKey::new(Kind::VirtualNode, "default", "front");
        let t = sidecar(&state(&mesh), &instances, &front, Security::default()).unwrap();
        let blue = cluster(&t.snapshot, "default/blue").clone();
        (blue, t.snapshot)
    }

    fn cluster<'a>(snapshot: &'a pb::Snapshot, name: &str) -> &'a pb::Cluster {
        snapshot.clusters.iter().find(|c| c.name == name).unwrap()
    }

    /// The clusters that call a node carry its listener's outlier detection and connection
    /// pool, and the proxy compiles them.
    #[test]
    fn callers_clusters_carry_the_nodes_outlier_detection_and_connection_pool() {
        let (blue, snapshot) = blue_cluster_at_front(
            "      outlierDetection: { maxServerErrors: 5, interval: { unit: s, value: 10 }, baseEjectionDuration: { unit: ms, value: 30000 }, maxEjectionPercent: 50 }\n      connectionPool: { http: { maxConnections: 20, maxPendingRequests: 7 } }\n",
        );
        let blue = &blue;
        assert_eq!(
            blue.outlier_detection,
            Some(pb::OutlierDetection {
                max_server_errors: 5,
                interval: Some(PbDuration {
                    seconds: 10,
                    nanos: 0
                }),
                base_ejection_duration: Some(PbDuration {
                    seconds: 30,
                    nanos: 0
                }),
                max_ejection_percent: 50,
            })
        );
        assert_eq!(
            blue.connection_pool,
            Some(pb::ConnectionPool {
                max_connections: 20,
                max_pending_requests: 7,
                max_requests: 0,
            })
        );
        let green = cluster(&snapshot, "default/green");
        assert_eq!(
            (&green.outlier_detection, &green.connection_pool),
            (&None, &None)
        );
        trellis_proxy::snapshot::check(&snapshot).unwrap();
    }

    /// The clusters that call a node carry the health check of the node's listener they reach,
    /// and the proxy compiles it.
    #[test]
    fn callers_clusters_carry_the_nodes_health_check() {
        let (blue, snapshot) = blue_cluster_at_front(
            "      healthCheck: { protocol: http, path: /ping, port: 9900, intervalMillis: 5000, timeoutMillis: 2000, healthyThreshold: 2, unhealthyThreshold: 3 }\n",
        );
        let secs = |seconds| Some(PbDuration { seconds, nanos: 0 });
        assert_eq!(
            blue.health_check,
            Some(pb::HealthCheck {
                protocol: pb::health_check::Protocol::Http as i32,
                path: "/ping".into(),
                port: 9900,
                interval: secs(5),
                timeout: secs(2),
                healthy_threshold: 2,
                unhealthy_threshold: 3,
            })
        );
        let green = cluster(&snapshot, "default/green");
        assert_eq!(green.health_check, None);
        trellis_proxy::snapshot::check(&snapshot).unwrap();
    }

    /// A tcp (or grpc) health check's path, which App Mesh does not use, is not sent to the
    /// proxy (whose snapshot refuses one there).
    #[test]
    fn a_tcp_health_checks_path_is_not_sent() {
        let (blue, snapshot) = blue_cluster_at_front(
            "      healthCheck: { protocol: tcp, path: /ping, intervalMillis: 5000, timeoutMillis: 2000, healthyThreshold: 2, unhealthyThreshold: 3 }\n",
        );
        let hc = blue.health_check.as_ref().unwrap();
        assert_eq!(hc.protocol, pb::health_check::Protocol::Tcp as i32);
        assert_eq!(hc.path, "");
        trellis_proxy::snapshot::check(&snapshot).unwrap();
    }

    #[test]
    fn registrations_of_one_address_are_one_endpoint_draining_only_when_all_are() {
        let state = state(MESH);
        let front = ResourceKey::new(Kind::VirtualNode, "default", "front");
        let health = |statuses: [InstanceStatus; 2]| {
            let instances = [
                instance("b1", "blue", 20001, statuses[0]),
                instance("b2", "blue", 20001, statuses[1]),
            ];
            let t = sidecar(&state, &instances, &front, Security::default()).unwrap();
            let blue = t
                .snapshot
                .clusters
                .iter()
                .find(|c| c.name == "default/blue")
                .unwrap();
            assert_eq!(blue.endpoints.len(), 1, "{blue:?}");
            assert_eq!(blue.endpoints[0].address, "127.0.0.1:20001");
            blue.endpoints[0].health
        };
        use InstanceStatus::{Draining, Healthy};
        let (healthy, draining) = (
            pb::endpoint::Health::Healthy as i32,
            pb::endpoint::Health::Draining as i32,
        );
        assert_eq!(health([Healthy, Healthy]), healthy);
        assert_eq!(health([Draining, Healthy]), healthy);
        assert_eq!(health([Healthy, Draining]), healthy);
        assert_eq!(health([Draining, Draining]), draining);
    }

    #[test]
    fn colorapp_front_snapshot() {
        let state = state(MESH);
        let instances = [
            instance("b1", "blue", 20001, InstanceStatus::Healthy),
            instance("g1", "green", 20002, InstanceStatus::Draining),
            instance("r1", "red", 20003, InstanceStatus::Healthy),
            instance("x1", "other", 20004, InstanceStatus::Healthy),
        ];
        let front = ResourceKey::new(Kind::VirtualNode, "default", "front");
        let t = sidecar(&state, &instances, &front, Security::default()).unwrap();
        let s = &t.snapshot;
        let egress = s.listeners.iter().find(|l| l.name == "egress").unwrap();
        let vh = &egress.virtual_hosts[0];
        assert_eq!(
            vh.domains,
            ["colorteller.default:9080", "colorteller.default"]
        );
        let clusters: BTreeMap<_, _> = s.clusters.iter().map(|c| (c.name.as_str(), c)).collect();
        assert_eq!(
            clusters["default/blue"].endpoints[0].address,
            "127.0.0.1:20001"
        );
        assert_eq!(
            clusters["default/green"].endpoints[0].health,
            pb::endpoint::Health::Draining as i32
        );
        assert_eq!(
            clusters["local:8080"].endpoints[0].address,
            "127.0.0.1:8080"
        );
        assert!(
            !clusters.contains_key("default/front"),
            "only backends get clusters"
        );
        assert!(t.uses.contains(&ResourceKey::new(
            Kind::VirtualRouter,
            "default",
            "colorteller"
        )));
        // Deterministic, and the version follows the content.
        let again = sidecar(&state, &instances, &front, Security::default()).unwrap();
        assert_eq!(again.snapshot, t.snapshot);
        let fewer = sidecar(&state, &instances[..1], &front, Security::default()).unwrap();
        assert_ne!(fewer.snapshot.version, t.snapshot.version);
        // The proxy's own compiler accepts it.
        let json = serde_json::to_string(s).unwrap();
        assert!(json.contains("colorteller/split"));
    }

    /// App Mesh's hidden default retry policy applies to routes without one of routers applied
    /// with App Mesh's API group, unless the mesh turns App Mesh's defaults off; never to
    /// Trellis's group, whose routes retry only when asked.
    #[test]
    fn app_mesh_routes_get_app_mesh_default_retries() {
        let front = ResourceKey::new(Kind::VirtualNode, "default", "front");
        let policy = |yaml: &str| {
            let t = sidecar(&state(yaml), &[], &front, Security::default()).unwrap();
            let egress = t
                .snapshot
                .listeners
                .iter()
                .find(|l| l.name == "egress")
                .unwrap();
            egress.virtual_hosts[0].routes[0].retry_policy.clone()
        };
        let start = MESH.find("        retryPolicy:").unwrap();
        let end = MESH.find("        timeout:").unwrap();
        let no_policy = format!("{}{}", &MESH[..start], &MESH[end..]);
        assert_eq!(
            policy(&no_policy),
            None,
            "Trellis's group: no hidden retries"
        );
        let appmesh = no_policy.replace("mesh.trellis.dev/v1beta1", "appmesh.k8s.aws/v1beta2");
        let p = policy(&appmesh).expect("App Mesh's default retry policy");
        assert_eq!(p.max_retries, 2);
        assert_eq!(p.retriable_status_codes, [503]);
        assert_eq!(p.grpc_retry_events, ["unavailable"]);
        for event in ["connect-failure", "refused-stream", "reset"] {
            assert!(p.http_retry_events.iter().any(|e| e == event), "{event}");
        }
        assert!(!p.http_retry_events.iter().any(|e| e == "gateway-error"));
        let off = appmesh.replace(
            "  mtls: STRICT\n",
            "  mtls: STRICT\n  appMeshDefaults: DISABLED\n",
        );
        assert_ne!(off, appmesh);
        assert_eq!(policy(&off), None, "turned off for the mesh");
        // The proxy compiles it.
        let t = sidecar(&state(&appmesh), &[], &front, Security::default()).unwrap();
        trellis_proxy::snapshot::check(&t.snapshot).unwrap();
    }

    /// A VirtualNode listener's inbound timeouts (the one of its protocol) go on its sidecar's
    /// ingress route toward the app; a TCP listener's idle timeout on its TCP route.
    #[test]
    fn listener_timeouts_apply_inbound() {
        let yaml = MESH.replace(
            "    - portMapping: { port: 9081, protocol: http }\n",
            "    - portMapping: { port: 9081, protocol: http }\n      timeout: { http: { perRequest: { unit: ms, value: 1500 }, idle: { unit: s, value: 30 } } }\n",
        );
        assert_ne!(yaml, MESH);
        let blue = ResourceKey::new(Kind::VirtualNode, "default", "blue");
        let t = sidecar(&state(&yaml), &[], &blue, Security::default()).unwrap();
        let ingress = t
            .snapshot
            .listeners
            .iter()
            .find(|l| l.name == "ingress")
            .unwrap();
        let timeout = ingress.virtual_hosts[0].routes[0].timeout.unwrap();
        assert_eq!(timeout.per_request.unwrap().nanos, 500_000_000);
        assert_eq!(timeout.idle.unwrap().seconds, 30);
        trellis_proxy::snapshot::check(&t.snapshot).unwrap();
        // Without one, none.
        let t = sidecar(&state(MESH), &[], &blue, Security::default()).unwrap();
        let ingress = t
            .snapshot
            .listeners
            .iter()
            .find(|l| l.name == "ingress")
            .unwrap();
        assert_eq!(ingress.virtual_hosts[0].routes[0].timeout, None);
        // TCP: the idle timeout on the listener's TCP route.
        let tcp = yaml.replace(
            "port: 9081, protocol: http }\n      timeout: { http: { perRequest: { unit: ms, value: 1500 }, idle: { unit: s, value: 30 } } }",
            "port: 9081, protocol: tcp }\n      timeout: { tcp: { idle: { unit: s, value: 7 } } }",
        );
        let t = sidecar(&state(&tcp), &[], &blue, Security::default()).unwrap();
        let ingress = t
            .snapshot
            .listeners
            .iter()
            .find(|l| l.name == "ingress")
            .unwrap();
        assert_eq!(ingress.tcp.as_ref().unwrap().idle.unwrap().seconds, 7);
        // Another protocol's timeout is refused, naming it.
        let wrong = yaml.replace("timeout: { http:", "timeout: { grpc:");
        let mut problems = Vec::new();
        let mut st = State::new();
        for m in parse_documents(&wrong).unwrap() {
            match validate::admit(m, None) {
                Ok(r) => {
                    st.insert(r.key.clone(), r.into());
                }
                Err(p) => problems.extend(p),
            }
        }
        problems.extend(validate::check(&st, &HashMap::new()));
        assert!(
            problems
                .iter()
                .any(|p| p.path == "spec.listeners[0].timeout.grpc"),
            "{problems:?}"
        );
    }

    /// A tcpRoute's `match.port` becomes a port match on its CONNECT route.
    #[test]
    fn tcp_routes_match_ports() {
        let yaml = MESH.replace(
            "      httpRoute:\n        match: { prefix: / }\n",
            "      tcpRoute:\n        match: { port: 9080 }\n",
        );
        let yaml = {
            let start = yaml.find("        retryPolicy:").unwrap();
            let end = yaml.find("        timeout:").unwrap();
            format!("{}{}", &yaml[..start], &yaml[end..]).replace(
                "        timeout:\n          perRequest: { unit: s, value: 5 }\n",
                "        timeout: { idle: { unit: s, value: 9 } }\n",
            )
        };
        let front = ResourceKey::new(Kind::VirtualNode, "default", "front");
        let t = sidecar(&state(&yaml), &[], &front, Security::default()).unwrap();
        let egress = t
            .snapshot
            .listeners
            .iter()
            .find(|l| l.name == "egress")
            .unwrap();
        let r = &egress.virtual_hosts[0].routes[0];
        assert_eq!(r.r#match.as_ref().map(|m| m.port), Some(9080), "{r:?}");
        assert_eq!(r.timeout.unwrap().idle.unwrap().seconds, 9);
        trellis_proxy::snapshot::check(&t.snapshot).unwrap();
    }

    /// A node's rate limit covers every route to its app but its callers' health checks.
    #[test]
    fn a_nodes_rate_limit_spares_its_health_checks() {
        let limited = MESH.replacen(
            "kind: VirtualNode\nmetadata:\n  name: blue\nspec:\n",
            "kind: VirtualNode\nmetadata:\n  name: blue\nspec:\n  rateLimit: { requests: 10, per: { unit: s, value: 1 } }\n",
            1,
        )
        .replacen(
            "    - portMapping: { port: 9081, protocol: http }\n",
            "    - portMapping: { port: 9081, protocol: http }\n      healthCheck: { protocol: http, path: /ping, intervalMillis: 5000, timeoutMillis: 2000, healthyThreshold: 2, unhealthyThreshold: 2 }\n",
            1,
        );
        assert_ne!(limited, MESH, "the example's blue node");
        let state = state(&limited);
        let blue = ResourceKey::new(Kind::VirtualNode, "default", "blue");
        let t = sidecar(&state, &[], &blue, Security::default()).unwrap();
        trellis_proxy::snapshot::check(&t.snapshot).unwrap();
        let ingress = t
            .snapshot
            .listeners
            .iter()
            .find(|l| l.name == "ingress")
            .unwrap();
        let routes = &ingress.virtual_hosts[0].routes;
        let limited: Vec<&str> = routes
            .iter()
            .filter(|r| r.rate_limit.as_ref().is_some_and(|l| l.bucket == "node"))
            .map(|r| r.name.as_str())
            .collect();
        assert!(!limited.is_empty(), "{routes:?}");
        let health: Vec<&pb::Route> = routes
            .iter()
            .filter(|r| r.name.starts_with("health:"))
            .collect();
        assert_eq!(health.len(), 1, "{routes:?}");
        for h in health {
            assert!(h.rate_limit.is_none());
            assert!(
                h.priority
                    < routes
                        .iter()
                        .map(|r| r.priority)
                        .filter(|p| *p >= 0)
                        .min()
                        .unwrap_or(0)
            );
        }
    }

    /// A router route's rewrite: at a sidecar, the route's own; through a gateway, after the
    /// gateway route's (its hostname replacing the gateway's).
    #[test]
    fn router_route_rewrites_apply_at_sidecars_and_after_a_gateways() {
        let router_rewrite = "        match: { prefix: / }\n        rewrite: { regex: { pattern: \"^/([a-z]+)$\", substitution: \"/api/$1\" }, hostname: colors.internal }\n";
        let mesh = MESH.replacen("        match: { prefix: / }\n", router_rewrite, 1);
        assert_ne!(mesh, MESH);
        let yaml = format!("{mesh}\n---\n{GATEWAY}");
        let state = state(&yaml);
        let regex = pb::PathRewrite {
            regex: "^/([a-z]+)$".into(),
            substitution: "/api/$1".into(),
            ..Default::default()
        };
        let front = ResourceKey::new(Kind::VirtualNode, "default", "front");
        let t = sidecar(&state, &[], &front, Security::default()).unwrap();
        trellis_proxy::snapshot::check(&t.snapshot).unwrap();
        let egress = t
            .snapshot
            .listeners
            .iter()
            .find(|l| l.name == "egress")
            .unwrap();
        let action = egress
            .virtual_hosts
            .iter()
            .flat_map(|h| &h.routes)
            .find(|r| r.name == "colorteller/split")
            .and_then(|r| r.action.as_ref())
            .unwrap();
        assert_eq!(action.path_rewrite.as_ref(), Some(&regex));
        assert_eq!(action.host_rewrite, "colors.internal");

        let gw = ResourceKey::new(Kind::VirtualGateway, "default", "ingress-gw");
        let t = gateway(&state, &[], &gw, Security::default()).unwrap();
        trellis_proxy::snapshot::check(&t.snapshot).unwrap();
        let r = &t.snapshot.listeners[0].virtual_hosts[0].routes[0];
        let action = r.action.as_ref().unwrap();
        assert_eq!(
            action
                .path_rewrite
                .as_ref()
                .map(|p| (&*p.prefix, &*p.replacement)),
            Some(("/colors/", "/")),
            "the gateway's first"
        );
        assert_eq!(
            action.then_path_rewrites,
            [regex],
            "then the router route's"
        );
        assert_eq!(action.host_rewrite, "colors.internal");
    }

    #[test]
    fn gateway_routes_expand_through_the_router_with_rewrites() {
        let yaml = format!(
            "{MESH}\n---\n{GATEWAY}---{}",
            r#"
apiVersion: mesh.trellis.dev/v1beta1
kind: GatewayRoute
metadata: { name: front }
spec:
  priority: 1
  httpRoute:
    match: { prefix: /, hostname: { exact: front.example.com } }
    action:
      target: { virtualService: { virtualServiceRef: { name: front } } }
      rewrite: { prefix: { defaultPrefix: DISABLED }, hostname: { defaultTargetHostname: DISABLED } }
"#
        );
        let state = state(&yaml);
        let gw = ResourceKey::new(Kind::VirtualGateway, "default", "ingress-gw");
        let t = gateway(&state, &[], &gw, Security::default()).unwrap();
        let l = &t.snapshot.listeners[0];
        let hosts: Vec<&str> = l
            .virtual_hosts
            .iter()
            .map(|h| h.domains[0].as_str())
            .collect();
        assert_eq!(hosts, ["front.example.com", "*"]);
        let any = &l.virtual_hosts[1].routes;
        assert_eq!(any.len(), 1);
        let r = &any[0];
        assert_eq!(r.name, "colors/colorteller/split");
        assert_eq!(
            r.r#match.as_ref().unwrap().path,
            Some(pb::route_match::Path::Prefix("/colors/".into()))
        );
        let action = r.action.as_ref().unwrap();
        assert_eq!(
            action.path_rewrite,
            Some(pb::PathRewrite {
                prefix: "/colors/".into(),
                replacement: "/".into(),
                ..Default::default()
            })
        );
        assert!(action.then_path_rewrites.is_empty());
        assert_eq!(action.host_rewrite, "colorteller.default");
        assert_eq!(action.weighted_targets.len(), 3, "the router's targets");
        assert!(
            r.retry_policy.is_some(),
            "the router route's policies come along"
        );
        let front = &l.virtual_hosts[0].routes;
        assert_eq!(
            front[0].name, "front",
            "priority 1 before routes without one"
        );
        assert_eq!(front[1].name, "colors/colorteller/split");
        let fa = front[0].action.as_ref().unwrap();
        assert_eq!(
            (fa.path_rewrite.clone(), fa.host_rewrite.as_str()),
            (None, "")
        );
        assert!(
            t.uses
                .contains(&ResourceKey::new(Kind::GatewayRoute, "default", "front"))
        );
        assert!(
            gateway(
                &state,
                &[],
                &ResourceKey::new(Kind::VirtualGateway, "default", "nope"),
                Security::default(),
            )
            .is_none()
        );
    }

    /// A gateway serves each of its listeners on its own port, with the routes whose
    /// `match.port` names it; `target.port` picks the router listener whose routes apply; a
    /// weighted target's `port` picks the node listener: a cluster per port, reaching registered
    /// instances with the port in the authority and DNS names on the port itself.
    /// A gateway listener's connectionPool goes on clusters of its own (named after the
    /// listener), replacing the target node's pool; a listener without one shares the node's
    /// cluster and pool. Its healthCheck is a direct response ahead of every host's routes.
    #[test]
    fn gateway_listener_pools_and_health_checks() {
        let yaml = format!(
            "{MESH}\n---\n{}",
            r#"apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: { name: app }
spec:
  listeners:
    - portMapping: { port: 7001, protocol: http }
      connectionPool: { http: { maxConnections: 50 } }
  serviceDiscovery: { dns: { hostname: app.example } }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualService
metadata: { name: app }
spec:
  provider: { virtualNode: { virtualNodeRef: { name: app } } }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualGateway
metadata: { name: gw }
spec:
  listeners:
    - portMapping: { port: 8088, protocol: http }
      connectionPool: { http: { maxConnections: 3, maxPendingRequests: 4 } }
      healthCheck: { protocol: http, path: /ping, intervalMillis: 5000, timeoutMillis: 2000, unhealthyThreshold: 2 }
    - portMapping: { port: 8089, protocol: http }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: GatewayRoute
metadata: { name: a }
spec:
  httpRoute:
    match: { prefix: /, port: 8088, hostname: { exact: a.example } }
    action: { target: { virtualService: { virtualServiceRef: { name: app } } } }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: GatewayRoute
metadata: { name: b }
spec:
  httpRoute:
    match: { prefix: /, port: 8089 }
    action: { target: { virtualService: { virtualServiceRef: { name: app } } } }
"#
        );
        let state = state(&yaml);
        let t = gateway(
            &state,
            &[],
            &ResourceKey::new(Kind::VirtualGateway, "default", "gw"),
            Security::default(),
        )
        .unwrap();
        let pool = |name: &str| cluster(&t.snapshot, name).connection_pool;
        assert_eq!(
            pool("default/app@gateway:8088"),
            Some(pb::ConnectionPool {
                max_connections: 3,
                max_pending_requests: 4,
                max_requests: 0
            })
        );
        assert_eq!(pool("default/app").map(|p| p.max_connections), Some(50));
        let [limited, open] = &t.snapshot.listeners[..] else {
            panic!("{:?}", t.snapshot.listeners)
        };
        let first = |h: &pb::VirtualHost| h.routes[0].clone();
        assert_eq!(limited.virtual_hosts.len(), 2, "a.example and any");
        for host in &limited.virtual_hosts {
            let health = first(host);
            assert_eq!(health.name, "healthCheck");
            assert_eq!(
                health.r#match.and_then(|m| m.path),
                Some(pb::route_match::Path::Exact("/ping".into()))
            );
            let direct = health.action.and_then(|a| a.direct_response).unwrap();
            assert_eq!(direct.kind, pb::direct_response::Kind::Readiness as i32);
        }
        assert!(
            open.virtual_hosts
                .iter()
                .flat_map(|h| &h.routes)
                .all(|r| r.name != "healthCheck")
        );
        let proxied = trellis_proxy::snapshot::check(&t.snapshot);
        assert!(proxied.is_ok(), "{proxied:?}");
    }

    #[test]
    fn gateway_listeners_and_target_ports() {
        let yaml = format!(
            "{MESH}\n---\n{}",
            r#"apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: { name: multi }
spec:
  listeners:
    - portMapping: { port: 7001, protocol: http }
    - portMapping: { port: 7002, protocol: http2 }
  serviceDiscovery: { registry: { namespaceName: demo, serviceName: multi } }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualNode
metadata: { name: multidns }
spec:
  listeners:
    - portMapping: { port: 7001, protocol: http }
    - portMapping: { port: 7002, protocol: http2 }
  serviceDiscovery: { dns: { hostname: multi.example } }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualRouter
metadata: { name: two }
spec:
  listeners:
    - portMapping: { port: 9090, protocol: http }
    - portMapping: { port: 9091, protocol: http2 }
  routes:
    - name: a
      httpRoute:
        match: { prefix: /, port: 9090 }
        action: { weightedTargets: [{ virtualNodeRef: { name: multi }, weight: 1, port: 7001 }] }
    - name: b
      http2Route:
        match: { prefix: /, port: 9091 }
        action:
          weightedTargets:
            - { virtualNodeRef: { name: multi }, weight: 1, port: 7002 }
            - { virtualNodeRef: { name: multidns }, weight: 1, port: 7002 }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualService
metadata: { name: two }
spec:
  provider: { virtualRouter: { virtualRouterRef: { name: two } } }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualGateway
metadata: { name: gw2 }
spec:
  listeners:
    - portMapping: { port: 8088, protocol: http }
    - portMapping: { port: 8089, protocol: http2 }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: GatewayRoute
metadata: { name: r1 }
spec:
  virtualGatewayRef: { name: gw2 }
  httpRoute:
    match: { prefix: /a/, port: 8088 }
    action: { target: { port: 9090, virtualService: { virtualServiceRef: { name: two } } } }
---
apiVersion: mesh.trellis.dev/v1beta1
kind: GatewayRoute
metadata: { name: r2 }
spec:
  virtualGatewayRef: { name: gw2 }
  http2Route:
    match: { prefix: /b/, port: 8089 }
    action: { target: { port: 9091, virtualService: { virtualServiceRef: { name: two } } } }
"#
        );
        let state = state(&yaml);
        let instances = [Instance {
            service: "multi".into(),
            ..instance("m1", "x", 20001, InstanceStatus::Healthy)
        }];
        let gw = ResourceKey::new(Kind::VirtualGateway, "default", "gw2");
        let t = gateway(&state, &instances, &gw, Security::default()).unwrap();
        trellis_proxy::snapshot::check(&t.snapshot).unwrap();
        let served: Vec<(&str, u32, i32, Vec<&str>)> = t
            .snapshot
            .listeners
            .iter()
            .map(|l| {
                let routes = l.virtual_hosts.iter().flat_map(|h| &h.routes);
                (
                    l.name.as_str(),
                    l.port,
                    l.role,
                    routes.map(|r| r.name.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            served,
            [
                ("gateway:8088", 8088, 0, vec!["r1/two/a"]),
                ("gateway:8089", 8089, 0, vec!["r2/two/b"]),
            ]
        );
        let r1 = &t.snapshot.listeners[0].virtual_hosts[0].routes[0];
        assert_eq!(
            r1.r#match.as_ref().map(|m| m.port),
            Some(0),
            "the listener is the port match"
        );
        let targets: Vec<&str> = t.snapshot.listeners[1].virtual_hosts[0].routes[0]
            .action
            .as_ref()
            .unwrap()
            .weighted_targets
            .iter()
            .map(|w| w.cluster.as_str())
            .collect();
        assert_eq!(targets, ["default/multi:7002", "default/multidns:7002"]);
        let c = cluster(&t.snapshot, "default/multi:7001");
        assert_eq!(
            (c.authority_port, c.protocol),
            (7001, pb::cluster::Protocol::Http1 as i32)
        );
        assert_eq!(c.endpoints[0].address, "127.0.0.1:20001");
        let c = cluster(&t.snapshot, "default/multi:7002");
        assert_eq!(
            (c.authority_port, c.protocol),
            (7002, pb::cluster::Protocol::Http2 as i32)
        );
        let c = cluster(&t.snapshot, "default/multidns:7002");
        assert_eq!(
            c.authority_port, 0,
            "a DNS name is reached on the port itself"
        );
        assert_eq!(c.endpoints[0].address, "multi.example:7002");
    }

    #[test]
    fn gateway_grpc_routes_keep_their_paths() {
        let yaml = format!(
            "{MESH}\n---\n{}",
            r#"apiVersion: mesh.trellis.dev/v1beta1
kind: VirtualGateway
metadata: { name: gw }
spec:
  listeners: [{ portMapping: { port: 8088, protocol: grpc } }]
---
apiVersion: mesh.trellis.dev/v1beta1
kind: GatewayRoute
metadata: { name: echo }
spec:
  grpcRoute:
    match: { serviceName: pkg.Echo, metadata: [{ name: x-tenant, match: { exact: a } }] }
    action: { target: { virtualService: { virtualServiceRef: { name: front } } } }
"#
        );
        let state = state(&yaml);
        let t = gateway(
            &state,
            &[],
            &ResourceKey::new(Kind::VirtualGateway, "default", "gw"),
            Security::default(),
        )
        .unwrap();
        let r = &t.snapshot.listeners[0].virtual_hosts[0].routes[0];
        let m = r.r#match.as_ref().unwrap();
        assert_eq!(
            m.path,
            Some(pb::route_match::Path::Prefix("/pkg.Echo/".into()))
        );
        assert_eq!(m.headers[0].name, "x-tenant");
        let a = r.action.as_ref().unwrap();
        assert_eq!(a.path_rewrite, None, "gRPC paths are not rewritten");
        assert_eq!(a.host_rewrite, "front.demo");
        assert_eq!(a.weighted_targets[0].cluster, "default/front");
        // A router's grpcRoute combines with the gateway's service prefix.
        let gw = gateway_grpc_as_http(&model::GatewayGrpcRoute {
            matcher: model::GatewayGrpcMatch {
                service_name: Some("pkg.Echo".into()),
                ..Default::default()
            },
            ..Default::default()
        });
        let router = grpc_as_http_match(&model::GrpcMatch {
            service_name: Some("pkg.Echo".into()),
            method_name: Some("Get".into()),
            ..Default::default()
        });
        let combined = combine(&gw.matcher, Some(("/pkg.Echo/", "/pkg.Echo/")), &router).unwrap();
        assert_eq!(
            combined.path,
            Some(pb::route_match::Path::Exact("/pkg.Echo/Get".into()))
        );
        let other = grpc_as_http_match(&model::GrpcMatch {
            service_name: Some("pkg.Other".into()),
            ..Default::default()
        });
        assert!(combine(&gw.matcher, Some(("/pkg.Echo/", "/pkg.Echo/")), &other).is_none());
    }

    #[test]
    fn combining_gateway_and_router_paths() {
        use pb::route_match::Path;
        let gw = model::GatewayHttpMatch {
            prefix: Some("/colors/".into()),
            ..Default::default()
        };
        let prefix = |p: &str| HttpMatch {
            prefix: Some(p.into()),
            ..Default::default()
        };
        let path = |m: Option<pb::RouteMatch>| m.and_then(|m| m.path);
        let rw = Some(("/colors/", "/"));
        assert_eq!(
            path(combine(&gw, rw, &prefix("/"))),
            Some(Path::Prefix("/colors/".into()))
        );
        assert_eq!(
            path(combine(&gw, rw, &prefix("/api"))),
            Some(Path::Prefix("/colors/api".into()))
        );
        let v2 = Some(("/colors/", "/v2/"));
        assert_eq!(
            path(combine(&gw, v2, &prefix("/v2/x"))),
            Some(Path::Prefix("/colors/x".into()))
        );
        assert!(
            combine(&gw, v2, &prefix("/v3")).is_none(),
            "can never match"
        );
        // No rewrite: the router sees the client's path.
        let same = Some(("/colors/", "/colors/"));
        assert_eq!(
            path(combine(&gw, same, &prefix("/colors/red"))),
            Some(Path::Prefix("/colors/red".into()))
        );
        assert_eq!(
            path(combine(&gw, same, &prefix("/"))),
            Some(Path::Prefix("/colors/".into()))
        );
        let exact = HttpMatch {
            path: Some(model::PathMatch {
                exact: Some("/x".into()),
                regex: None,
            }),
            ..Default::default()
        };
        assert_eq!(
            path(combine(&gw, rw, &exact)),
            Some(Path::Exact("/colors/x".into()))
        );
        let get = model::GatewayHttpMatch {
            method: Some("GET".into()),
            ..gw.clone()
        };
        let post = HttpMatch {
            method: Some("POST".into()),
            ..prefix("/")
        };
        assert!(combine(&get, rw, &post).is_none(), "methods conflict");
    }

    #[test]
    fn nodes_without_backends_get_no_egress_routes_and_unknown_nodes_none() {
        let state = state(MESH);
        let blue = ResourceKey::new(Kind::VirtualNode, "default", "blue");
        let t = sidecar(&state, &[], &blue, Security::default()).unwrap();
        let egress = t
            .snapshot
            .listeners
            .iter()
            .find(|l| l.name == "egress")
            .unwrap();
        assert!(egress.virtual_hosts.is_empty());
        assert!(
            sidecar(
                &state,
                &[],
                &ResourceKey::new(Kind::VirtualNode, "default", "nope"),
                Security::default(),
            )
            .is_none()
        );
    }
}
