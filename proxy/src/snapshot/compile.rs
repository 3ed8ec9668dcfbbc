//! Snapshot → runtime config, all or nothing. Every problem is reported with its field path
//! (protobuf JSON names, e.g. `listeners[0].virtualHosts[1].routes[2].match.regex`).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use regex::Regex;
use trellis_proto::v1 as pb;

use super::{
    FieldError, Listener, ListenerKind, Resolved, Runtime, SnapshotError, TcpRoute, Unmatched,
};
use crate::{
    access_log::{FormatSpec, Sink},
    balance::WeightedTargets,
    dial::IpFamily,
    fault::Fault,
    hash_lb::{HashKey, HashTable, Hashing},
    header_rules::HeaderRules,
    health_check::{HealthCheck, Probe},
    limit::PoolLimits,
    metrics::ProxyMetrics,
    outlier::OutlierDetection,
    passthrough::Passthrough,
    rate_limit::{RateLimitConfig, RateLimitKey, RateLimiter},
    retry::{self, RetryOn, RetryPolicy},
    route::{
        DirectKind, DirectResponse, HeaderMatch, PathMatch, QueryMatch, Route, RouteMatch,
        RouteTable, Timeouts, ValueRule, VirtualHost,
    },
    steps::{PathRewrite, RegexRewrite, RequestStep, Steps},
    tls::{ServerMode, ServerSide},
    upstream::{self, Cluster, EndpointState, Generation, Health, LbPolicy, LocalZone, Protocol},
};

const MAX_WEIGHT: u32 = 1_000_000;
const MAX_BUFFER_LIMIT: u64 = 64 << 20;

struct Compiler<'a> {
    errors: Vec<FieldError>,
    metrics: &'a ProxyMetrics,
    clusters: HashMap<&'a str, Arc<Cluster>>,
    /// The addresses of names in `Dns::Endpoints` clusters, as last resolved.
    resolved: &'a Resolved,
    /// The workload certificate, for listeners with TLS settings of their own.
    credentials: Arc<crate::tls::Credentials>,
    /// Whether certificate and trust files are read (not when checking elsewhere).
    read_files: bool,
    /// Rate limiters of the live snapshot (reused when unchanged) and of this one, by
    /// (listener, bucket); the listener and virtual host being compiled.
    live_limiters: crate::upstream::RateLimiterMap,
    next_limiters: crate::upstream::RateLimiterMap,
    scope: (Arc<str>, Arc<str>),
    /// What the routes' mirrors share, across snapshots.
    mirror_budget: Arc<crate::limit::MirrorBudget>,
}

impl Compiler<'_> {
    fn err(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            reason: reason.into(),
        });
    }

    fn duration(&mut self, path: &str, d: Option<&pb_duration::Duration>) -> Option<Duration> {
        let d = d?;
        match u64::try_from(d.seconds)
            .ok()
            .zip(u32::try_from(d.nanos).ok())
            .filter(|(_, n)| *n < 1_000_000_000)
        {
            // Bounded, so that no deadline computed from it can overflow the clock.
            Some((s, _)) if s > super::MAX_DURATION.as_secs() => {
                self.err(
                    path,
                    format!(
                        "must be at most {}s (365 days)",
                        super::MAX_DURATION.as_secs()
                    ),
                );
                None
            }
            Some((s, n)) => Some(Duration::new(s, n)),
            None => {
                self.err(path, "must be a non-negative duration");
                None
            }
        }
    }

    /// A timeout where 0 means none, as in Envoy and App Mesh.
    fn timeout(&mut self, path: &str, d: Option<&pb_duration::Duration>) -> Option<Duration> {
        self.duration(path, d).filter(|d| !d.is_zero())
    }

    fn regex(&mut self, path: &str, pattern: &str) -> Option<Regex> {
        // Anchored: the whole path or value must match, as in Envoy and App Mesh.
        match Regex::new(&format!("^(?:{pattern})$")) {
            Ok(re) => Some(re),
            Err(e) => {
                self.err(path, format!("invalid regex: {}", one_line(&e.to_string())));
                None
            }
        }
    }
}

mod pb_duration {
    pub(super) use pbjson_types::Duration;
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Compiles `snapshot`, taking endpoint state from `generation`.
pub(crate) fn compile(
    snapshot: &pb::Snapshot,
    generation: &mut Generation<'_>,
    metrics: &ProxyMetrics,
    resolved: &Resolved,
) -> Result<Runtime, SnapshotError> {
    let mut c = Compiler {
        errors: Vec::new(),
        metrics,
        clusters: HashMap::new(),
        resolved,
        credentials: generation.credentials().clone(),
        read_files: generation.reads_files(),
        live_limiters: generation.live_rate_limiters(),
        next_limiters: HashMap::new(),
        scope: (Arc::from(""), Arc::from("")),
        mirror_budget: generation.mirror_budget(),
    };
    let mut clusters = Vec::with_capacity(snapshot.clusters.len());
    for (i, cluster) in snapshot.clusters.iter().enumerate() {
        let path = format!("clusters[{i}]");
        if let Some(compiled) = compile_cluster(&mut c, &path, cluster, generation) {
            if c.clusters.contains_key(cluster.name.as_str()) {
                c.err(
                    format!("{path}.name"),
                    format!("duplicate cluster name {:?}", cluster.name),
                );
                continue;
            }
            c.clusters.insert(&cluster.name, compiled.clone());
            clusters.push(compiled);
        }
    }

    let mut runtime = Runtime {
        version: snapshot.version.as_str().into(),
        source: Arc::new(snapshot.clone()),
        ingress: None,
        egress: None,
        named: HashMap::new(),
        clusters,
        access_log: snapshot
            .access_log
            .as_ref()
            .and_then(|log| compile_access_log(&mut c, log)),
        tracer: snapshot
            .tracing
            .as_ref()
            .and_then(|t| compile_tracing(&mut c, t, generation)),
    };
    if let Some(measure) = &snapshot.measure {
        check_measure(&mut c, measure);
    }
    let mut names = HashSet::new();
    for (i, listener) in snapshot.listeners.iter().enumerate() {
        let path = format!("listeners[{i}]");
        if listener.name.is_empty() {
            c.err(format!("{path}.name"), "must not be empty");
        } else if !names.insert(listener.name.as_str()) {
            c.err(
                format!("{path}.name"),
                format!("duplicate listener name {:?}", listener.name),
            );
        }
        let Some(compiled) = compile_listener(&mut c, &path, listener) else {
            continue;
        };
        use pb::listener::Role;
        match Role::try_from(listener.role) {
            Ok(Role::Ingress) if runtime.ingress.is_some() => {
                c.err(
                    format!("{path}.role"),
                    "only one INGRESS listener is allowed",
                );
            }
            Ok(Role::Ingress) => runtime.ingress = Some(compiled),
            Ok(Role::Egress) if runtime.egress.is_some() => {
                c.err(
                    format!("{path}.role"),
                    "only one EGRESS listener is allowed",
                );
            }
            Ok(Role::Egress) => runtime.egress = Some(compiled),
            Ok(Role::Unspecified) => {
                runtime
                    .named
                    .insert(listener.name.as_str().into(), compiled);
            }
            Err(_) => c.err(format!("{path}.role"), "unknown role"),
        }
    }
    generation.set_rate_limiters(std::mem::take(&mut c.next_limiters));
    if c.errors.is_empty() {
        Ok(runtime)
    } else {
        Err(SnapshotError::Invalid(c.errors))
    }
}

fn compile_cluster(
    c: &mut Compiler<'_>,
    path: &str,
    cluster: &pb::Cluster,
    generation: &mut Generation<'_>,
) -> Option<Arc<Cluster>> {
    use pb::cluster::{LbPolicy as PbLb, Protocol as PbProtocol};
    let before = c.errors.len();
    if cluster.name.is_empty() {
        c.err(format!("{path}.name"), "must not be empty");
    }
    let protocol = match PbProtocol::try_from(cluster.protocol) {
        Ok(PbProtocol::Http1) => Protocol::Http1,
        Ok(PbProtocol::Http2 | PbProtocol::Grpc) => Protocol::Http2,
        Ok(PbProtocol::TcpOnly) => Protocol::Tcp,
        Err(_) => {
            c.err(format!("{path}.protocol"), "unknown protocol");
            Protocol::Http1
        }
    };
    let lb = match PbLb::try_from(cluster.lb_policy) {
        Ok(PbLb::RoundRobin) => LbPolicy::RoundRobin,
        Ok(PbLb::LeastRequest) => LbPolicy::LeastRequest,
        Ok(PbLb::Random) => LbPolicy::Random,
        Ok(PbLb::PeakEwma) => LbPolicy::PeakEwma,
        Ok(PbLb::RingHash) => LbPolicy::RingHash,
        Ok(PbLb::Maglev) => LbPolicy::Maglev,
        Err(_) => {
            c.err(format!("{path}.lbPolicy"), "unknown load-balancing policy");
            LbPolicy::RoundRobin
        }
    };
    let slow_start = cluster
        .slow_start
        .as_ref()
        .and_then(|s| compile_slow_start(c, &format!("{path}.slowStart"), s));
    let hash_key = compile_hash_key(c, path, cluster, lb);
    if slow_start.is_some() && matches!(lb, LbPolicy::RingHash | LbPolicy::Maglev) {
        c.err(
            format!("{path}.slowStart"),
            "ramps shares that are drawn: not with RING_HASH or MAGLEV, where a key decides",
        );
    }
    if cluster.zone_aware.is_some() && matches!(lb, LbPolicy::RingHash | LbPolicy::Maglev) {
        c.err(
            format!("{path}.zoneAware"),
            "not with RING_HASH or MAGLEV, where a key decides",
        );
    }
    // New endpoints ramp up when the cluster slow-starts and had endpoints already.
    let ramps = slow_start.is_some() && generation.had_endpoints(&cluster.name);
    let connect_timeout = c
        .duration(
            &format!("{path}.connectTimeout"),
            cluster.connect_timeout.as_ref(),
        )
        .unwrap_or(upstream::DEFAULT_CONNECT_TIMEOUT);
    if connect_timeout.is_zero() {
        c.err(format!("{path}.connectTimeout"), "must be greater than 0");
    }
    let pool_idle_timeout = c
        .duration(
            &format!("{path}.poolIdleTimeout"),
            cluster.pool_idle_timeout.as_ref(),
        )
        .unwrap_or(upstream::DEFAULT_POOL_IDLE_TIMEOUT);

    let family = match pb::cluster::IpFamily::try_from(cluster.ip_family) {
        Ok(pb::cluster::IpFamily::Any) => IpFamily::Any,
        Ok(pb::cluster::IpFamily::V4Only) => IpFamily::V4Only,
        Ok(pb::cluster::IpFamily::V6Only) => IpFamily::V6Only,
        Err(_) => {
            c.err(format!("{path}.ipFamily"), "unknown IP family");
            IpFamily::Any
        }
    };
    let Ok(dns) = pb::cluster::Dns::try_from(cluster.dns) else {
        c.err(format!("{path}.dns"), "unknown DNS mode");
        return None;
    };
    let name: Arc<str> = cluster.name.as_str().into();
    let tls = cluster.tls.as_ref().and_then(|t| {
        let tpath = format!("{path}.tls");
        generation
            .upstream_tls(t, protocol)
            .map_err(|e| c.err(&tpath, e))
            .ok()
    });
    let mut seen = HashSet::new();
    // Addresses the cluster's names resolved to: one address given, or shared by two names, is
    // one endpoint.
    let given: HashSet<&str> = cluster
        .endpoints
        .iter()
        .map(|e| e.address.as_str())
        .collect();
    let mut resolved_seen = HashSet::new();
    let mut endpoints = Vec::with_capacity(cluster.endpoints.len());
    // Zone-aware: which endpoints are in the proxy's zone (by index in `endpoints`).
    let zone: Option<Box<str>> = cluster
        .zone_aware
        .as_ref()
        .and(generation.zone())
        .map(Into::into);
    let mut local = HashSet::new();
    for (j, ep) in cluster.endpoints.iter().enumerate() {
        let epath = format!("{path}.endpoints[{j}]");
        if !valid_host_port(&ep.address) {
            c.err(
                format!("{epath}.address"),
                format!("{:?} is not HOST:PORT", ep.address),
            );
            continue;
        }
        if !seen.insert(ep.address.as_str()) {
            c.err(
                format!("{epath}.address"),
                format!("duplicate endpoint {:?}", ep.address),
            );
            continue;
        }
        let health = match pb::endpoint::Health::try_from(ep.health) {
            Ok(pb::endpoint::Health::Healthy) => Health::Healthy,
            Ok(pb::endpoint::Health::Draining) => Health::Draining,
            Ok(pb::endpoint::Health::Unhealthy) => Health::Unhealthy,
            Err(_) => {
                c.err(format!("{epath}.health"), "unknown health");
                continue;
            }
        };
        // A name in an ENDPOINTS cluster: each of its addresses, as last resolved.
        let addresses = match (dns, c.resolved.get(&(ep.address.clone(), family))) {
            (pb::cluster::Dns::Endpoints, Some(addrs)) if !addrs.is_empty() => addrs
                .iter()
                .map(ToString::to_string)
                .filter(|a| !given.contains(a.as_str()) && resolved_seen.insert(a.clone()))
                .collect(),
            _ => vec![ep.address.clone()],
        };
        for address in addresses {
            if zone.as_deref().is_some_and(|z| z == ep.zone) {
                local.insert(endpoints.len());
            }
            endpoints.push((
                generation.endpoint(&name, protocol, &address, family, tls.as_ref(), ramps),
                health,
            ));
        }
    }
    let outlier = cluster
        .outlier_detection
        .as_ref()
        .map(|o| compile_outlier(c, &format!("{path}.outlierDetection"), o));
    let limits = cluster
        .connection_pool
        .as_ref()
        .map(|p| compile_pool(c, &format!("{path}.connectionPool"), p, protocol));
    let health_check = cluster
        .health_check
        .as_ref()
        .map(|h| compile_health_check(c, &format!("{path}.healthCheck"), h));
    let authority_port = match u16::try_from(cluster.authority_port) {
        Ok(0) => None,
        Ok(p) if protocol == Protocol::Tcp => {
            c.err(
                format!("{path}.authorityPort"),
                format!("{p}: a TCP only cluster's requests carry no authority"),
            );
            None
        }
        Ok(p) => Some(p),
        Err(_) => {
            c.err(format!("{path}.authorityPort"), "must be 1..=65535");
            None
        }
    };
    if c.errors.len() > before {
        return None;
    }
    // Probes for the endpoints that may take requests; none (no task, no cost on the request
    // path) for clusters without a health check.
    let health_check = health_check.map(Arc::new);
    if let Some(hc) = &health_check {
        let metrics = c.metrics.health_check(&name);
        for (endpoint, _) in endpoints.iter().filter(|(_, h)| *h == Health::Healthy) {
            generation.health_check(&name, endpoint, hc, &metrics);
        }
    }
    // No state (and no cost on the request path) for a pool without limits.
    let limits = limits
        .filter(|l| *l != PoolLimits::default())
        .map(|l| generation.limits(&name, protocol, l));
    let healthy: Vec<Arc<EndpointState>> = endpoints
        .iter()
        .filter(|(_, h)| *h == Health::Healthy)
        .map(|(e, _)| e.clone())
        .collect();
    let local_zone = cluster
        .zone_aware
        .as_ref()
        .filter(|_| !local.is_empty())
        .map(|z| {
            let endpoints = endpoints
                .iter()
                .enumerate()
                .filter(|(i, (_, h))| *h == Health::Healthy && local.contains(i))
                .map(|(_, (e, _))| e.clone())
                .collect();
            let min = usize::try_from(z.min_endpoints.max(1)).unwrap_or(usize::MAX);
            Box::new(LocalZone { endpoints, min })
        });
    let hashing = hash_key.map(|key| {
        let addrs = healthy.iter().map(|e| &*e.addr);
        let table = match lb {
            LbPolicy::Maglev => HashTable::maglev(addrs),
            _ => HashTable::ring(addrs),
        };
        Box::new(Hashing { key, table })
    });
    let ramping_until = slow_start.and_then(|s| {
        endpoints
            .iter()
            .filter_map(|(e, _)| e.added)
            .max()
            .map(|newest| newest + s.window)
    });
    Some(Arc::new(Cluster {
        metrics: c.metrics.cluster(&name),
        name,
        protocol,
        lb,
        connect_timeout,
        pool_idle_timeout,
        endpoints,
        healthy,
        cursor: AtomicUsize::new(0),
        outlier,
        limits,
        health_check,
        authority_port,
        ramping_until,
        slow_start,
        hashing,
        local_zone,
    }))
}

/// A RING_HASH or MAGLEV cluster's key (required there, refused elsewhere).
fn compile_hash_key(
    c: &mut Compiler<'_>,
    path: &str,
    cluster: &pb::Cluster,
    lb: LbPolicy,
) -> Option<HashKey> {
    use pb::hash_key::Key;
    let kpath = format!("{path}.hashKey");
    let hashing = matches!(lb, LbPolicy::RingHash | LbPolicy::Maglev);
    let key = match (&cluster.hash_key, hashing) {
        (None, false) => return None,
        (Some(_), false) => {
            c.err(kpath, "only with RING_HASH or MAGLEV balancing");
            return None;
        }
        (None, true) | (Some(pb::HashKey { key: None }), true) => {
            c.err(
                kpath,
                "required with RING_HASH and MAGLEV: header, cookie or sourceIp",
            );
            return None;
        }
        (Some(pb::HashKey { key: Some(key) }), true) => key,
    };
    match key {
        Key::Header(name) => match http::HeaderName::from_bytes(name.as_bytes()) {
            Ok(name) => Some(HashKey::Header(name)),
            Err(_) => {
                c.err(
                    format!("{kpath}.header"),
                    format!("{name:?} is not a header name"),
                );
                None
            }
        },
        Key::Cookie(name)
            if !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)) =>
        {
            Some(HashKey::Cookie(name.as_str().into()))
        }
        Key::Cookie(name) => {
            c.err(
                format!("{kpath}.cookie"),
                format!("{name:?} is not a cookie name"),
            );
            None
        }
        Key::SourceIp(true) => Some(HashKey::SourceIp),
        Key::SourceIp(false) => {
            c.err(
                format!("{kpath}.sourceIp"),
                "true, or give header or cookie",
            );
            None
        }
    }
}

/// A duration that must be given and greater than 0.
fn required_positive(
    c: &mut Compiler<'_>,
    path: String,
    d: Option<&pb_duration::Duration>,
) -> Duration {
    match d {
        None => {
            c.err(path, "is required");
            Duration::ZERO
        }
        Some(_) => match c.duration(&path, d) {
            Some(d) if d.is_zero() => {
                c.err(path, "must be greater than 0");
                d
            }
            d => d.unwrap_or_default(),
        },
    }
}

fn compile_health_check(c: &mut Compiler<'_>, path: &str, h: &pb::HealthCheck) -> HealthCheck {
    use pb::health_check::Protocol as PbProtocol;
    let http_path = |c: &mut Compiler<'_>| -> Arc<str> {
        if h.path.is_empty() {
            return "/".into();
        }
        if !h.path.starts_with('/') || h.path.parse::<http::uri::PathAndQuery>().is_err() {
            c.err(
                format!("{path}.path"),
                format!("{:?} is not a path starting with /", h.path),
            );
        }
        h.path.as_str().into()
    };
    let probe = match PbProtocol::try_from(h.protocol) {
        Ok(PbProtocol::Http) => Probe::Http { path: http_path(c) },
        Ok(PbProtocol::Http2) => Probe::Http2 { path: http_path(c) },
        Ok(PbProtocol::Grpc) => Probe::Grpc,
        Ok(PbProtocol::Tcp) => Probe::Tcp,
        Err(_) => {
            c.err(format!("{path}.protocol"), "unknown protocol");
            Probe::Tcp
        }
    };
    if matches!(probe, Probe::Grpc | Probe::Tcp) && !h.path.is_empty() {
        c.err(
            format!("{path}.path"),
            "used only by HTTP and HTTP2 health checks",
        );
    }
    let port = match u16::try_from(h.port) {
        Ok(0) => None,
        Ok(port) => Some(port),
        Err(_) => {
            c.err(
                format!("{path}.port"),
                "must be 1..=65535 (0: the endpoint's port)",
            );
            None
        }
    };
    let interval = required_positive(c, format!("{path}.interval"), h.interval.as_ref());
    let timeout = required_positive(c, format!("{path}.timeout"), h.timeout.as_ref());
    for (field, v) in [
        ("healthyThreshold", h.healthy_threshold),
        ("unhealthyThreshold", h.unhealthy_threshold),
    ] {
        if v == 0 {
            c.err(format!("{path}.{field}"), "must be at least 1");
        }
    }
    HealthCheck {
        probe,
        port,
        interval,
        timeout,
        healthy_threshold: h.healthy_threshold,
        unhealthy_threshold: h.unhealthy_threshold,
    }
}

fn compile_outlier(c: &mut Compiler<'_>, path: &str, o: &pb::OutlierDetection) -> OutlierDetection {
    if o.max_server_errors == 0 {
        c.err(format!("{path}.maxServerErrors"), "must be at least 1");
    }
    let interval = required_positive(c, format!("{path}.interval"), o.interval.as_ref());
    let base_ejection = required_positive(
        c,
        format!("{path}.baseEjectionDuration"),
        o.base_ejection_duration.as_ref(),
    );
    if o.max_ejection_percent > 100 {
        c.err(format!("{path}.maxEjectionPercent"), "must be 0..=100");
    }
    OutlierDetection {
        max_server_errors: o.max_server_errors,
        interval,
        base_ejection,
        max_ejection_percent: o.max_ejection_percent,
    }
}

/// Limits that would have no effect on the cluster's protocol are refused, not ignored.
fn compile_pool(
    c: &mut Compiler<'_>,
    path: &str,
    p: &pb::ConnectionPool,
    protocol: Protocol,
) -> PoolLimits {
    match protocol {
        Protocol::Http1 => {
            if p.max_pending_requests > 0 && p.max_connections == 0 {
                c.err(
                    format!("{path}.maxPendingRequests"),
                    "needs maxConnections (requests wait only for a connection slot)",
                );
            }
        }
        Protocol::Http2 => {
            for (field, v) in [
                ("maxConnections", p.max_connections),
                ("maxPendingRequests", p.max_pending_requests),
            ] {
                if v > 0 {
                    c.err(
                        format!("{path}.{field}"),
                        "not used by HTTP/2 and gRPC clusters (one connection per endpoint); limit maxRequests",
                    );
                }
            }
        }
        Protocol::Tcp => {
            for (field, v) in [
                ("maxPendingRequests", p.max_pending_requests),
                ("maxRequests", p.max_requests),
            ] {
                if v > 0 {
                    c.err(
                        format!("{path}.{field}"),
                        "not used by TCP_ONLY clusters; limit maxConnections",
                    );
                }
            }
        }
    }
    PoolLimits {
        max_connections: p.max_connections,
        max_pending_requests: p.max_pending_requests,
        max_requests: p.max_requests,
    }
}

fn valid_host_port(address: &str) -> bool {
    if address.parse::<SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return false;
    };
    // An IPv6 address is bracketed (and parsed above): a bare one is ambiguous with the port.
    port.parse::<u16>().is_ok_and(|p| p > 0) && !host.contains(':') && super::valid_host(host)
}

fn compile_listener(c: &mut Compiler<'_>, path: &str, listener: &pb::Listener) -> Option<Listener> {
    use pb::listener::{Protocol as PbProtocol, Role};
    let before = c.errors.len();
    let has_role = listener.role != Role::Unspecified as i32;
    let port = match u16::try_from(listener.port) {
        Ok(0) => None,
        Ok(p) if has_role || !listener.address.is_empty() => {
            c.err(
                format!("{path}.port"),
                format!("{p}: only for a listener without a role or an address"),
            );
            None
        }
        Ok(p) => Some(p),
        Err(_) => {
            c.err(format!("{path}.port"), "must be 1..=65535");
            None
        }
    };
    let address = if listener.address.is_empty() {
        if !has_role && port.is_none() {
            c.err(
                format!("{path}.role"),
                "set a role (INGRESS or EGRESS), an address or a port",
            );
        }
        None
    } else if has_role {
        c.err(
            format!("{path}.address"),
            "not allowed with a role: the role's socket is used",
        );
        None
    } else {
        match listener.address.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                c.err(
                    format!("{path}.address"),
                    format!("{:?} is not IP:PORT", listener.address),
                );
                None
            }
        }
    };
    let kind = match PbProtocol::try_from(listener.protocol) {
        Ok(PbProtocol::Http) => {
            if listener.tcp.is_some() {
                c.err(format!("{path}.tcp"), "only for TCP listeners");
            }
            c.scope.0 = listener.name.as_str().into();
            ListenerKind::Http(compile_hosts(c, path, &listener.virtual_hosts))
        }
        Ok(PbProtocol::Tcp) => {
            if !listener.virtual_hosts.is_empty() {
                c.err(format!("{path}.virtualHosts"), "only for HTTP listeners");
            }
            let tpath = format!("{path}.tcp");
            match &listener.tcp {
                None => {
                    c.err(&tpath, "required for TCP listeners");
                    return None;
                }
                Some(tcp) => {
                    let targets = compile_targets(c, &tpath, &tcp.weighted_targets, &listener.name);
                    let idle = c.timeout(&format!("{tpath}.idle"), tcp.idle.as_ref());
                    ListenerKind::Tcp(TcpRoute { targets, idle })
                }
            }
        }
        Err(_) => {
            c.err(format!("{path}.protocol"), "unknown protocol");
            return None;
        }
    };
    let unmatched = match pb::listener::Unmatched::try_from(listener.unmatched) {
        Ok(pb::listener::Unmatched::NotFound) => Unmatched::NotFound,
        Ok(_) if !matches!(kind, ListenerKind::Http(_)) => {
            c.err(format!("{path}.unmatched"), "only for HTTP listeners");
            Unmatched::NotFound
        }
        Ok(pb::listener::Unmatched::Deny) => Unmatched::Deny,
        Ok(pb::listener::Unmatched::Passthrough) => {
            Unmatched::Passthrough(Passthrough::new(c.metrics.clone()))
        }
        Err(_) => {
            c.err(format!("{path}.unmatched"), "unknown value");
            Unmatched::NotFound
        }
    };
    let tls = listener
        .tls
        .as_ref()
        .and_then(|t| compile_server_tls(c, &format!("{path}.tls"), t));
    let authorized = listener.authorization.as_ref().map(|a| {
        if listener.tls.is_none() {
            c.err(
                format!("{path}.authorization"),
                "needs tls: callers are known by their certificates",
            );
        }
        for (k, id) in a.identities.iter().enumerate() {
            if !id.starts_with("spiffe://") {
                c.err(
                    format!("{path}.authorization.identities[{k}]"),
                    format!("{id:?} is not a spiffe:// URI"),
                );
            }
        }
        a.identities
            .iter()
            .map(|id| Arc::from(id.as_str()))
            .collect()
    });
    (c.errors.len() == before).then(|| Listener {
        name: listener.name.as_str().into(),
        address,
        port,
        kind,
        unmatched,
        tls,
        authorized,
    })
}

/// A listener's TLS: the mesh's (the workload certificate, client certificates from the trust
/// bundle) or settings of its own (certificate files, optional or validated clients).
fn compile_server_tls(c: &mut Compiler<'_>, path: &str, t: &pb::ServerTls) -> Option<ServerSide> {
    let mode = match pb::server_tls::Mode::try_from(t.mode) {
        Ok(pb::server_tls::Mode::Strict) => ServerMode::Strict,
        Ok(pb::server_tls::Mode::Permissive) => ServerMode::Permissive,
        Err(_) => {
            c.err(format!("{path}.mode"), "unknown mode");
            return None;
        }
    };
    let meshes = t.certificate.is_none()
        && t.client_validation
            .as_ref()
            .is_some_and(|v| v.trust_files.is_empty() && v.subject_alt_names.is_empty());
    if meshes || !c.read_files {
        // (Checking elsewhere: the files are the proxy's machine's.)
        return Some(ServerSide {
            mode,
            mesh_trust: true,
            config: None,
        });
    }
    let mesh_trust = t
        .client_validation
        .as_ref()
        .is_some_and(|v| v.trust_files.is_empty());
    let cert = match &t.certificate {
        None => None,
        Some(f) => match crate::tls::load_certified_key(&f.certificate_chain, &f.private_key) {
            Ok(key) => Some(key),
            Err(e) => {
                c.err(format!("{path}.certificate"), e);
                return None;
            }
        },
    };
    let clients = match &t.client_validation {
        None => None,
        Some(v) if v.trust_files.is_empty() => {
            Some((crate::tls::Roots::Bundle, v.subject_alt_names.clone()))
        }
        Some(v) => match crate::tls::load_roots(&v.trust_files) {
            Ok(roots) => Some((crate::tls::Roots::Fixed(roots), v.subject_alt_names.clone())),
            Err(e) => {
                c.err(format!("{path}.clientValidation.trustFiles"), e);
                return None;
            }
        },
    };
    match c.credentials.server_config_for(cert, clients) {
        Ok(config) => Some(ServerSide {
            mode,
            mesh_trust,
            config: Some(config),
        }),
        Err(e) => {
            c.err(path, e.to_string());
            None
        }
    }
}

fn compile_hosts(c: &mut Compiler<'_>, path: &str, hosts: &[pb::VirtualHost]) -> RouteTable {
    let mut table = RouteTable::default();
    for (i, host) in hosts.iter().enumerate() {
        let hpath = format!("{path}.virtualHosts[{i}]");
        if host.domains.is_empty() {
            c.err(
                format!("{hpath}.domains"),
                "must list at least one domain (\"*\" for any)",
            );
        }
        for (j, domain) in host.domains.iter().enumerate() {
            let dpath = format!("{hpath}.domains[{j}]");
            let domain = domain.to_ascii_lowercase();
            let taken = if domain == "*" {
                table.any.replace(i).is_some()
            } else if let Some(suffix) = domain.strip_prefix('*') {
                if !suffix.starts_with('.') || suffix.len() < 2 {
                    c.err(&dpath, "a wildcard must look like \"*.example.com\"");
                    continue;
                }
                let taken = table.suffixes.iter().any(|(s, _)| **s == *suffix);
                table.suffixes.push((suffix.into(), i));
                taken
            } else if domain.is_empty() || domain.contains(['/', ' ', '*']) {
                c.err(&dpath, format!("{domain:?} is not a valid authority"));
                continue;
            } else {
                table.exact.insert(domain.as_str().into(), i).is_some()
            };
            if taken {
                c.err(
                    &dpath,
                    format!("domain {domain:?} is served by another virtual host"),
                );
            }
        }
        let mut routes = Vec::with_capacity(host.routes.len());
        let mut names = HashSet::new();
        for (j, route) in host.routes.iter().enumerate() {
            let rpath = format!("{hpath}.routes[{j}]");
            if route.name.is_empty() {
                c.err(format!("{rpath}.name"), "must not be empty");
            } else if !names.insert(route.name.as_str()) {
                c.err(
                    format!("{rpath}.name"),
                    format!("duplicate route name {:?}", route.name),
                );
            }
            c.scope.1 = host.name.as_str().into();
            if let Some(r) = compile_route(c, &rpath, route) {
                routes.push(r);
            }
        }
        routes.sort_by_key(|r| r.priority);
        table.hosts.push(VirtualHost {
            name: host.name.as_str().into(),
            routes,
        });
    }
    // Longest suffix first, so the most specific wildcard wins.
    table
        .suffixes
        .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
    table
}

fn compile_route(c: &mut Compiler<'_>, path: &str, route: &pb::Route) -> Option<Route> {
    let before = c.errors.len();
    let matcher = match &route.r#match {
        Some(m) => compile_match(c, &format!("{path}.match"), m),
        None => RouteMatch::default(),
    };
    let apath = format!("{path}.action");
    let direct = route
        .action
        .as_ref()
        .and_then(|a| a.direct_response.as_ref())
        .map(|d| compile_direct(c, &apath, route, d));
    let targets = match &route.action {
        Some(_) if direct.is_some() => WeightedTargets::new([]),
        Some(a) => compile_targets(
            c,
            &format!("{apath}.weightedTargets"),
            &a.weighted_targets,
            &route.name,
        ),
        None => {
            c.err(&apath, "required");
            WeightedTargets::new([])
        }
    };
    let mut request_steps = route
        .action
        .as_ref()
        .map(|a| compile_rewrite(c, &apath, a))
        .unwrap_or_default();
    let request_rules = route
        .request_headers
        .as_ref()
        .and_then(|r| compile_header_rules(c, &format!("{path}.requestHeaders"), r, &route.name));
    request_steps.extend(request_rules.map(|r| RequestStep::Headers(Box::new(r))));
    let response_rules = route
        .response_headers
        .as_ref()
        .and_then(|r| compile_header_rules(c, &format!("{path}.responseHeaders"), r, &route.name));
    let steps = Steps::new(request_steps, response_rules);
    let fault = route
        .fault
        .as_ref()
        .and_then(|f| compile_fault(c, &format!("{path}.fault"), f));
    let rate_limit = route
        .rate_limit
        .as_ref()
        .and_then(|r| compile_rate_limit(c, &format!("{path}.rateLimit"), r, &route.name));
    let retry = route
        .retry_policy
        .as_ref()
        .and_then(|p| compile_retry(c, &format!("{path}.retryPolicy"), p));
    let timeouts = match &route.timeout {
        Some(t) => Timeouts {
            per_request: c.timeout(
                &format!("{path}.timeout.perRequest"),
                t.per_request.as_ref(),
            ),
            idle: c.timeout(&format!("{path}.timeout.idle"), t.idle.as_ref()),
        },
        None => Timeouts::default(),
    };
    let mirror = route.mirror.as_ref().and_then(|m| {
        let timeout = timeouts
            .per_request
            .unwrap_or(crate::mirror::DEFAULT_TIMEOUT);
        compile_mirror(c, &format!("{path}.mirror"), m, timeout)
    });
    (c.errors.len() == before).then(|| Route {
        name: route.name.as_str().into(),
        priority: route.priority,
        matcher,
        targets,
        retry: retry.map(Arc::new),
        timeouts,
        steps,
        direct: direct.flatten(),
        fault,
        rate_limit,
        mirror,
    })
}

/// A route the proxy answers itself: nothing to forward (no targets, rewrites or retries).
fn compile_direct(
    c: &mut Compiler<'_>,
    path: &str,
    route: &pb::Route,
    d: &pb::DirectResponse,
) -> Option<Box<DirectResponse>> {
    use pb::direct_response::Kind;
    let before = c.errors.len();
    if let Some(a) = &route.action {
        if !a.weighted_targets.is_empty() {
            c.err(
                format!("{path}.weightedTargets"),
                "must be empty with a directResponse",
            );
        }
        if a.path_rewrite.is_some()
            || !a.then_path_rewrites.is_empty()
            || !a.host_rewrite.is_empty()
        {
            c.err(
                format!("{path}.directResponse"),
                "a direct response is not forwarded: no pathRewrite or hostRewrite",
            );
        }
    }
    if route.retry_policy.is_some() {
        c.err(
            format!("{path}.directResponse"),
            "a direct response is not forwarded: no retryPolicy",
        );
    }
    if route.fault.is_some() || route.rate_limit.is_some() || route.mirror.is_some() {
        c.err(
            format!("{path}.directResponse"),
            "a direct response is not forwarded: no fault, rateLimit or mirror",
        );
    }
    if route.request_headers.is_some() || route.response_headers.is_some() {
        c.err(
            format!("{path}.directResponse"),
            "a direct response is not forwarded: no requestHeaders or responseHeaders",
        );
    }
    let body = bytes::Bytes::from(d.body.clone());
    let kind = match Kind::try_from(d.kind) {
        Ok(Kind::Static) => match u16::try_from(d.status)
            .ok()
            .filter(|s| (100..=599).contains(s))
            .and_then(|s| http::StatusCode::from_u16(s).ok())
        {
            Some(status) => DirectKind::Static { status, body },
            None => {
                c.err(format!("{path}.directResponse.status"), "must be 100..=599");
                return None;
            }
        },
        Ok(Kind::Readiness) => DirectKind::Readiness { body },
        Ok(Kind::GrpcHealth) => DirectKind::GrpcHealth,
        Err(_) => {
            c.err(format!("{path}.directResponse.kind"), "unknown kind");
            return None;
        }
    };
    (c.errors.len() == before).then(|| {
        Box::new(DirectResponse {
            kind,
            metrics: Arc::new(c.metrics.requests(&route.name, "")),
        })
    })
}

/// A route's header rules for one direction; None when there are none (or they are refused:
/// each problem is an error at its field).
fn compile_header_rules(
    c: &mut Compiler<'_>,
    path: &str,
    rules: &pb::HeaderRules,
    route: &str,
) -> Option<HeaderRules> {
    match HeaderRules::compile(rules, route) {
        Ok(compiled) => compiled,
        Err(problems) => {
            for (field, why) in problems {
                c.err(format!("{path}.{field}"), why);
            }
            None
        }
    }
}

/// The route's rewrite steps: the path (its rewrites in order), then the host.
fn compile_rewrite(c: &mut Compiler<'_>, path: &str, action: &pb::RouteAction) -> Vec<RequestStep> {
    let mut out = Vec::new();
    let rewrites = action
        .path_rewrite
        .iter()
        .map(|r| (format!("{path}.pathRewrite"), r))
        .chain(
            action
                .then_path_rewrites
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("{path}.thenPathRewrites[{i}]"), r)),
        );
    for (rpath, r) in rewrites {
        if let Some(step) = compile_path_rewrite(c, &rpath, r) {
            out.push(step);
        }
    }
    if !action.host_rewrite.is_empty() {
        match action.host_rewrite.parse::<http::uri::Authority>() {
            Ok(a) => out.push(RequestStep::RewriteHost(a)),
            Err(_) => c.err(
                format!("{path}.hostRewrite"),
                format!("{:?} is not an authority", action.host_rewrite),
            ),
        }
    }
    out
}

/// One path rewrite: a prefix, the whole path, or a regex's matches.
fn compile_path_rewrite(
    c: &mut Compiler<'_>,
    path: &str,
    r: &pb::PathRewrite,
) -> Option<RequestStep> {
    let given = [
        !r.prefix.is_empty(),
        !r.exact.is_empty(),
        !r.regex.is_empty(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        c.err(path, "give exactly one of prefix, exact or regex");
        return None;
    }
    // What a rewrite may put in a path: what a path may hold, without a query or fragment.
    let path_text = |t: &str| {
        !t.contains(['?', '#'])
            && http::uri::PathAndQuery::try_from(format!("/{t}").as_str()).is_ok()
    };
    if !r.prefix.is_empty() {
        if !r.prefix.starts_with('/') {
            c.err(format!("{path}.prefix"), "must start with \"/\"");
        } else if !r.replacement.starts_with('/') || !path_text(&r.replacement) {
            c.err(
                format!("{path}.replacement"),
                "must start with \"/\" and be a path (no ?, #, spaces)",
            );
        } else {
            return Some(RequestStep::RewritePath(PathRewrite {
                prefix: r.prefix.as_str().into(),
                replacement: r.replacement.as_str().into(),
            }));
        }
        return None;
    }
    if !r.exact.is_empty() {
        if !r.exact.starts_with('/')
            || !path_text(&r.exact)
            || http::uri::PathAndQuery::try_from(r.exact.as_str()).is_err()
        {
            c.err(
                format!("{path}.exact"),
                "must start with \"/\" and be a path (no ?, #, spaces)",
            );
            return None;
        }
        return Some(RequestStep::ReplacePath(r.exact.as_str().into()));
    }
    let regex = match Regex::new(&r.regex) {
        Ok(re) => re,
        Err(e) => {
            c.err(
                format!("{path}.regex"),
                format!("invalid regex: {}", one_line(&e.to_string())),
            );
            return None;
        }
    };
    if r.substitution.is_empty() || !path_text(&r.substitution.replace(['$', '{', '}'], "")) {
        c.err(
            format!("{path}.substitution"),
            "must be a path (not empty; no ?, #, spaces)",
        );
        return None;
    }
    if let Err(why) = check_substitution(&regex, &r.substitution) {
        c.err(format!("{path}.substitution"), why);
        return None;
    }
    Some(RequestStep::RegexPath(Box::new(RegexRewrite {
        regex,
        substitution: r.substitution.as_str().into(),
    })))
}

fn compile_targets(
    c: &mut Compiler<'_>,
    path: &str,
    targets: &[pb::WeightedTarget],
    route: &str,
) -> WeightedTargets {
    if targets.is_empty() {
        c.err(path, "must list at least one target");
    } else if targets.iter().all(|t| t.weight == 0) {
        c.err(path, "the weights must not all be 0");
    }
    let mut compiled = Vec::with_capacity(targets.len());
    for (i, t) in targets.iter().enumerate() {
        if t.weight > MAX_WEIGHT {
            c.err(
                format!("{path}[{i}].weight"),
                format!("must be 0..={MAX_WEIGHT}"),
            );
        }
        match c.clusters.get(t.cluster.as_str()) {
            Some(cluster) => {
                let metrics = c.metrics.requests(route, &cluster.name);
                compiled.push((cluster.clone(), t.weight, metrics));
            }
            None => c.err(
                format!("{path}[{i}].cluster"),
                format!("unknown cluster {:?}", t.cluster),
            ),
        }
    }
    WeightedTargets::new(compiled)
}

fn compile_match(c: &mut Compiler<'_>, path: &str, m: &pb::RouteMatch) -> RouteMatch {
    use pb::route_match::Path;
    let path_match = match &m.path {
        None => PathMatch::Any,
        Some(Path::Prefix(p)) if p.starts_with('/') => PathMatch::Prefix(p.as_str().into()),
        Some(Path::Exact(p)) if p.starts_with('/') => PathMatch::Exact(p.as_str().into()),
        Some(Path::Prefix(_)) => {
            c.err(format!("{path}.prefix"), "must start with \"/\"");
            PathMatch::Any
        }
        Some(Path::Exact(_)) => {
            c.err(format!("{path}.exact"), "must start with \"/\"");
            PathMatch::Any
        }
        Some(Path::Regex(re)) => c
            .regex(&format!("{path}.regex"), re)
            .map_or(PathMatch::Any, PathMatch::Regex),
    };
    let mut out = RouteMatch {
        path: path_match,
        ..RouteMatch::default()
    };
    if let Some(grpc) = &m.grpc {
        let gpath = format!("{path}.grpc");
        if m.path.is_some() {
            c.err(&gpath, "cannot be combined with a path match");
        }
        if grpc.service_name.is_empty() {
            if !grpc.method_name.is_empty() {
                c.err(format!("{gpath}.serviceName"), "required with methodName");
            }
        } else if grpc.method_name.is_empty() {
            out.path = PathMatch::Prefix(format!("/{}/", grpc.service_name).into());
        } else {
            out.path =
                PathMatch::Exact(format!("/{}/{}", grpc.service_name, grpc.method_name).into());
        }
    }
    if !m.method.is_empty() {
        match http::Method::from_bytes(m.method.as_bytes()) {
            Ok(method) => out.method = Some(method),
            Err(_) => c.err(
                format!("{path}.method"),
                format!("{:?} is not an HTTP method", m.method),
            ),
        }
    }
    match m.scheme.as_str() {
        "" => {}
        "http" => out.scheme = Some(http::uri::Scheme::HTTP),
        "https" => out.scheme = Some(http::uri::Scheme::HTTPS),
        other => c.err(
            format!("{path}.scheme"),
            format!("{other:?} is not http or https"),
        ),
    }
    if m.port > u32::from(u16::MAX) {
        c.err(format!("{path}.port"), "must be 0..=65535");
    } else if m.port > 0 {
        out.port = u16::try_from(m.port).ok();
    }
    out.headers = compile_header_matches(c, &format!("{path}.headers"), &m.headers);
    for (i, q) in m.query_parameters.iter().enumerate() {
        use pb::query_parameter_match::Rule;
        let qpath = format!("{path}.queryParameters[{i}]");
        if q.name.is_empty() {
            c.err(format!("{qpath}.name"), "must not be empty");
            continue;
        }
        let rule = match &q.rule {
            None | Some(Rule::Present(true)) => ValueRule::Present,
            Some(Rule::Present(false)) => {
                c.err(
                    format!("{qpath}.present"),
                    "use true, or leave the rule out",
                );
                continue;
            }
            Some(Rule::Exact(e)) => ValueRule::Exact(e.as_str().into()),
            Some(Rule::Regex(re)) => match c.regex(&format!("{qpath}.regex"), re) {
                Some(re) => ValueRule::Regex(re),
                None => continue,
            },
        };
        out.query.push(QueryMatch {
            name: q.name.as_str().into(),
            rule,
        });
    }
    out
}

/// Header matches (of a route's match, or a fault's).
fn compile_header_matches(
    c: &mut Compiler<'_>,
    path: &str,
    headers: &[pb::HeaderMatch],
) -> Vec<HeaderMatch> {
    let mut out = Vec::with_capacity(headers.len());
    for (i, h) in headers.iter().enumerate() {
        let hpath = format!("{path}[{i}]");
        let Ok(name) = http::HeaderName::from_bytes(h.name.as_bytes()) else {
            c.err(
                format!("{hpath}.name"),
                format!("{:?} is not a header name", h.name),
            );
            continue;
        };
        if let Some(rule) = compile_header_rule(c, &hpath, h.rule.as_ref()) {
            out.push(HeaderMatch {
                name,
                invert: h.invert,
                rule,
            });
        }
    }
    out
}

/// A cluster's slow start.
fn compile_slow_start(
    c: &mut Compiler<'_>,
    path: &str,
    s: &pb::SlowStart,
) -> Option<crate::upstream::SlowStart> {
    let before = c.errors.len();
    let window = c.timeout(&format!("{path}.window"), s.window.as_ref());
    if window.is_none() && c.errors.len() == before {
        c.err(format!("{path}.window"), "required, more than 0");
    }
    let aggression = if s.aggression == 0.0 {
        1.0
    } else {
        s.aggression
    };
    if !(aggression.is_finite() && aggression > 0.0) {
        c.err(format!("{path}.aggression"), "must be more than 0");
    }
    let min = if s.min_weight_percent == 0.0 {
        10.0
    } else {
        s.min_weight_percent
    };
    if !(min.is_finite() && min > 0.0 && min <= 100.0) {
        c.err(format!("{path}.minWeightPercent"), "must be 0..=100");
    }
    (c.errors.len() == before).then_some(())?;
    Some(crate::upstream::SlowStart {
        window: window?,
        aggression,
        min_weight: min / 100.0,
    })
}

/// A regex substitution's group references: `$N` and `$name` (the longest run of letters,
/// digits and `_`) or `${...}`, `$$` for `$`. Each must name a group of `regex`, and a bare
/// `$N` must not run into a letter (`$1x` reads as a group named `1x`: write `${1}x`).
fn check_substitution(regex: &Regex, substitution: &str) -> Result<(), String> {
    let names: Vec<&str> = regex.capture_names().flatten().collect();
    let groups = regex.captures_len();
    let known = |name: &str| match name.parse::<usize>() {
        Ok(i) => i < groups,
        Err(_) => names.contains(&name),
    };
    let mut rest = substitution;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            rest = after;
            continue;
        }
        let (name, after) = if let Some(braced) = rest.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| format!("{substitution:?}: a ${{ without its }}"))?;
            (&braced[..end], &braced[end + 1..])
        } else {
            let end = rest
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            if name.is_empty() {
                return Err(format!(
                    "{substitution:?}: a $ that names no group (write $$ for a $)"
                ));
            }
            let digits = name.bytes().take_while(u8::is_ascii_digit).count();
            if digits > 0 && digits < name.len() {
                return Err(format!(
                    "{substitution:?}: ${name} reads as a group named {name:?}: write ${{{}}}{}",
                    &name[..digits],
                    &name[digits..]
                ));
            }
            (name, &rest[end..])
        };
        if !known(name) {
            return Err(format!("{substitution:?}: the regex has no group {name:?}"));
        }
        rest = after;
    }
    Ok(())
}

/// A route's rate limit: its bucket, the live one when the settings are unchanged.
fn compile_rate_limit(
    c: &mut Compiler<'_>,
    path: &str,
    r: &pb::RateLimit,
    route: &str,
) -> Option<Arc<RateLimiter>> {
    use pb::rate_limit::Key;
    let before = c.errors.len();
    if r.requests == 0 {
        c.err(format!("{path}.requests"), "must be more than 0");
    }
    let per = c.timeout(&format!("{path}.per"), r.per.as_ref());
    if per.is_none() && c.errors.len() == before {
        c.err(format!("{path}.per"), "required, more than 0");
    }
    let key = match &r.key {
        None | Some(Key::PeerIdentity(false)) => RateLimitKey::None,
        Some(Key::PeerIdentity(true)) => RateLimitKey::PeerIdentity,
        Some(Key::Header(h)) => match http::HeaderName::from_bytes(h.as_bytes()) {
            Ok(name) => RateLimitKey::Header(name),
            Err(_) => {
                c.err(
                    format!("{path}.key.header"),
                    format!("{h:?} is not a header name"),
                );
                RateLimitKey::None
            }
        },
    };
    if c.errors.len() != before {
        return None;
    }
    let per = per?;
    let interval = per / r.requests;
    if interval.is_zero() {
        c.err(format!("{path}.requests"), "more than one per nanosecond");
        return None;
    }
    let config = RateLimitConfig {
        interval,
        burst: if r.burst == 0 { r.requests } else { r.burst },
        key,
    };
    // A full bucket is interval × burst of time: bounded as every duration is.
    if interval
        .checked_mul(config.burst)
        .is_none_or(|full| full > super::MAX_DURATION)
    {
        c.err(
            format!("{path}.burst"),
            format!(
                "the bucket would hold more than {}s (365 days) of requests",
                super::MAX_DURATION.as_secs()
            ),
        );
        return None;
    }
    let bucket: Arc<str> = if r.bucket.is_empty() {
        format!("route:{}/{route}", c.scope.1).into()
    } else {
        format!("bucket:{}", r.bucket).into()
    };
    let at = (c.scope.0.clone(), bucket);
    if let Some(shared) = c.next_limiters.get(&at) {
        if shared.config != config {
            c.err(
                format!("{path}.bucket"),
                format!("{:?} is shared by routes with other settings", r.bucket),
            );
            return None;
        }
        return Some(shared.clone());
    }
    let limiter = c
        .live_limiters
        .get(&at)
        .filter(|l| l.config == config)
        .cloned()
        .unwrap_or_else(|| Arc::new(RateLimiter::new(config)));
    c.next_limiters.insert(at, limiter.clone());
    Some(limiter)
}

/// A route's mirror: an HTTP cluster of the snapshot, a share, a body bound.
fn compile_mirror(
    c: &mut Compiler<'_>,
    path: &str,
    m: &pb::Mirror,
    timeout: std::time::Duration,
) -> Option<Box<crate::mirror::Mirror>> {
    use crate::mirror::{DEFAULT_MAX_BODY, MAX_BODY_LIMIT, Mirror};
    let before = c.errors.len();
    let cluster = match c.clusters.get(m.cluster.as_str()) {
        Some(cluster) if cluster.protocol == crate::upstream::Protocol::Tcp => {
            c.err(
                format!("{path}.cluster"),
                format!("{:?} is TCP_ONLY: it takes no HTTP requests", m.cluster),
            );
            None
        }
        Some(cluster) => Some(cluster.clone()),
        None => {
            c.err(
                format!("{path}.cluster"),
                format!("unknown cluster {:?}", m.cluster),
            );
            None
        }
    };
    let share = crate::fault::Share::from_percent(m.percentage);
    if share.is_none() {
        c.err(format!("{path}.percentage"), "must be 0..=100 (percent)");
    }
    let max_body = match m.max_body_bytes {
        0 => DEFAULT_MAX_BODY,
        n if n > MAX_BODY_LIMIT => {
            c.err(
                format!("{path}.maxBodyBytes"),
                format!("must be at most {MAX_BODY_LIMIT} (16 MiB)"),
            );
            0
        }
        n => n,
    };
    if c.errors.len() != before {
        return None;
    }
    let budget = c.mirror_budget.clone();
    Some(Box::new(Mirror::new(
        cluster?, share?, max_body, timeout, budget,
    )))
}

/// A route's fault injection.
fn compile_fault(c: &mut Compiler<'_>, path: &str, f: &pb::Fault) -> Option<Box<Fault>> {
    use crate::fault::{Abort, Delay, Share};
    let before = c.errors.len();
    let headers = compile_header_matches(c, &format!("{path}.headers"), &f.headers);
    let share = |c: &mut Compiler<'_>, field: String, p: f64| {
        let s = Share::from_percent(p);
        if s.is_none() {
            c.err(field, "must be 0..=100 (percent)");
        }
        s
    };
    let delay = f.delay.as_ref().and_then(|d| {
        let dpath = format!("{path}.delay");
        let fpath = format!("{dpath}.fixedDelay");
        let errors = c.errors.len();
        let duration = c.timeout(&fpath, d.fixed_delay.as_ref());
        if duration.is_none() && c.errors.len() == errors {
            c.err(fpath, "required, more than 0");
        }
        let share = share(c, format!("{dpath}.percentage"), d.percentage)?;
        Some(Delay {
            duration: duration?,
            share,
        })
    });
    let abort = f.abort.as_ref().and_then(|a| {
        let apath = format!("{path}.abort");
        let status = u16::try_from(a.http_status)
            .ok()
            .filter(|s| (200..=599).contains(s) && *s != 204 && *s != 304)
            .and_then(|s| http::StatusCode::from_u16(s).ok());
        if status.is_none() {
            c.err(
                format!("{apath}.httpStatus"),
                "must be 200..=599, not 204 or 304 (the answer has a body)",
            );
        }
        let grpc_status = match a.grpc_status {
            0 => None,
            n @ 1..=16 => u8::try_from(n).ok(),
            _ => {
                c.err(format!("{apath}.grpcStatus"), "must be 1..=16 (or 0: none)");
                None
            }
        };
        let share = share(c, format!("{apath}.percentage"), a.percentage)?;
        Some(Abort {
            status: status?,
            grpc_status,
            share,
        })
    });
    if f.delay.is_none() && f.abort.is_none() {
        c.err(path, "give a delay, an abort or both");
    }
    (c.errors.len() == before).then(|| {
        Box::new(Fault {
            headers: headers.into(),
            delay,
            abort,
        })
    })
}

fn compile_header_rule(
    c: &mut Compiler<'_>,
    path: &str,
    rule: Option<&pb::header_match::Rule>,
) -> Option<ValueRule> {
    use pb::header_match::Rule;
    Some(match rule {
        None | Some(Rule::Present(true)) => ValueRule::Present,
        Some(Rule::Present(false)) => {
            c.err(
                format!("{path}.present"),
                "use true, or invert: true for \"absent\"",
            );
            return None;
        }
        Some(Rule::Exact(e)) => ValueRule::Exact(e.as_str().into()),
        Some(Rule::Prefix(p)) => ValueRule::Prefix(p.as_str().into()),
        Some(Rule::Suffix(s)) => ValueRule::Suffix(s.as_str().into()),
        Some(Rule::Regex(re)) => ValueRule::Regex(c.regex(&format!("{path}.regex"), re)?),
        Some(Rule::Range(r)) => {
            if r.start >= r.end {
                c.err(format!("{path}.range"), "start must be less than end");
                return None;
            }
            ValueRule::Range(r.start, r.end)
        }
    })
}

fn compile_retry(c: &mut Compiler<'_>, path: &str, p: &pb::RetryPolicy) -> Option<RetryPolicy> {
    let before = c.errors.len();
    if p.max_retries > retry::MAX_RETRIES {
        c.err(
            format!("{path}.maxRetries"),
            format!("must be 0..={}", retry::MAX_RETRIES),
        );
    }
    let (on, grpc_codes) = compile_retry_events(c, path, p);
    let per_try_timeout = c.duration(&format!("{path}.perTryTimeout"), p.per_try_timeout.as_ref());
    if per_try_timeout.is_some_and(|d| d.is_zero()) {
        c.err(format!("{path}.perTryTimeout"), "must be greater than 0");
    }
    let (base, max) = compile_backoff(c, path, p.backoff.as_ref());
    // A budget only when configured; its unset fields take the defaults.
    let budget = p.budget.as_ref().map(|b| {
        (
            b.retry_ratio.unwrap_or(retry::DEFAULT_BUDGET_RATIO),
            b.min_retries_per_second
                .unwrap_or(retry::DEFAULT_BUDGET_MIN_PER_SECOND),
        )
    });
    if budget.is_some_and(|(ratio, _)| !(0.0..=10.0).contains(&ratio)) {
        c.err(format!("{path}.budget.retryRatio"), "must be 0..=10");
    }
    if p.buffer_limit_bytes > MAX_BUFFER_LIMIT {
        c.err(
            format!("{path}.bufferLimitBytes"),
            format!("must be at most {MAX_BUFFER_LIMIT}"),
        );
    }
    if p.hedge_on_per_try_timeout && per_try_timeout.is_none() {
        c.err(
            format!("{path}.hedgeOnPerTryTimeout"),
            "hedges when an attempt reaches the per-try timeout: give perTryTimeout",
        );
    }
    if c.errors.len() > before {
        return None;
    }
    let buffer_limit = match p.buffer_limit_bytes {
        0 => retry::DEFAULT_BUFFER_LIMIT,
        n => usize::try_from(n).unwrap_or(retry::DEFAULT_BUFFER_LIMIT),
    };
    Some(RetryPolicy {
        max_retries: p.max_retries,
        per_try_timeout,
        on,
        status_codes: p
            .retriable_status_codes
            .iter()
            .filter_map(|c| u16::try_from(*c).ok())
            .collect(),
        grpc_codes: grpc_codes.into(),
        backoff_base: base,
        backoff_max: max,
        buffer_limit,
        budget: budget.map(|(ratio, min)| retry::budget(ratio, min)),
        hedge: p.hedge_on_per_try_timeout,
    })
}

/// What a retry policy retries: HTTP events and status codes, gRPC events (as codes).
fn compile_retry_events(
    c: &mut Compiler<'_>,
    path: &str,
    p: &pb::RetryPolicy,
) -> (RetryOn, Vec<u32>) {
    let mut on = RetryOn::default();
    for (i, e) in p.http_retry_events.iter().enumerate() {
        if !on.enable(e) {
            c.err(
                format!("{path}.httpRetryEvents[{i}]"),
                format!("unknown event {e:?} (server-error, gateway-error, connect-failure, reset, refused-stream, retriable-status-codes)"),
            );
        }
    }
    for (i, code) in p.retriable_status_codes.iter().enumerate() {
        if !(100..=599).contains(code) {
            c.err(
                format!("{path}.retriableStatusCodes[{i}]"),
                "must be 100..=599",
            );
        }
    }
    let mut grpc_codes = Vec::new();
    for (i, e) in p.grpc_retry_events.iter().enumerate() {
        match retry::grpc_event_code(e) {
            Some(code) => grpc_codes.push(code),
            None => c.err(
                format!("{path}.grpcRetryEvents[{i}]"),
                format!("unknown event {e:?} ({})", retry::grpc_event_names()),
            ),
        }
    }
    (on, grpc_codes)
}

/// The backoff's base and maximum, defaulted (25 ms, 10 × base).
fn compile_backoff(
    c: &mut Compiler<'_>,
    path: &str,
    backoff: Option<&pb::Backoff>,
) -> (Duration, Duration) {
    let base = c
        .duration(
            &format!("{path}.backoff.baseInterval"),
            backoff.and_then(|b| b.base_interval.as_ref()),
        )
        .unwrap_or(retry::DEFAULT_BACKOFF_BASE);
    let max = c
        .duration(
            &format!("{path}.backoff.maxInterval"),
            backoff.and_then(|b| b.max_interval.as_ref()),
        )
        .unwrap_or(base.saturating_mul(10));
    if base.is_zero() {
        c.err(
            format!("{path}.backoff.baseInterval"),
            "must be greater than 0",
        );
    }
    if max < base {
        c.err(
            format!("{path}.backoff.maxInterval"),
            "must not be less than baseInterval",
        );
    }
    (base, max)
}

/// The routes the control plane asks measurements of (read from the snapshot by the config
/// stream's reporter), and how often.
fn check_measure(c: &mut Compiler<'_>, m: &pb::Measure) {
    let before = c.errors.len();
    let interval = c.timeout("measure.interval", m.interval.as_ref());
    let allowed = Duration::from_millis(100)..=Duration::from_secs(60);
    if c.errors.len() == before && !interval.is_some_and(|i| allowed.contains(&i)) {
        c.err("measure.interval", "must be 100ms..=60s");
    }
    for (i, route) in m.routes.iter().enumerate() {
        if route.is_empty() {
            c.err(format!("measure.routes[{i}]"), "must not be empty");
        }
    }
}

/// The snapshot's tracing: a collector address, a share, a service name.
fn compile_tracing(
    c: &mut Compiler<'_>,
    t: &pb::Tracing,
    generation: &Generation<'_>,
) -> Option<Arc<crate::trace::Tracer>> {
    let before = c.errors.len();
    let address = t.collector.strip_prefix("http://").unwrap_or(&t.collector);
    if !valid_host_port(address) {
        c.err(
            "tracing.collector",
            format!("{:?} is not HOST:PORT or http://HOST:PORT", t.collector),
        );
    }
    let share = crate::fault::Share::from_percent(t.sampling_percent);
    if share.is_none() {
        c.err("tracing.samplingPercent", "must be 0..=100 (percent)");
    }
    if c.errors.len() != before {
        return None;
    }
    Some(Arc::new(crate::trace::Tracer::new(
        generation.span_queue(&t.collector, &t.service_name),
        share?,
        c.metrics.spans_dropped(),
    )))
}

fn compile_access_log(c: &mut Compiler<'_>, log: &pb::AccessLog) -> Option<Arc<Sink>> {
    use pb::access_log::Format;
    if log.path.is_empty() {
        c.err("access_log.path", "must not be empty");
        return None;
    }
    let json: Vec<(String, String)>;
    let spec = match &log.format {
        None => FormatSpec::Default,
        Some(Format::Text(t)) => FormatSpec::Text(t),
        Some(Format::Json(j)) => {
            json = j
                .fields
                .iter()
                .map(|f| (f.key.clone(), f.value.clone()))
                .collect();
            FormatSpec::Json(&json)
        }
    };
    match Sink::compile(&log.path, spec) {
        Ok(sink) => Some(Arc::new(sink)),
        Err(e) => {
            let path = match e.json_field {
                Some(i) => format!("access_log.json.fields[{i}].value"),
                None => "access_log.text".into(),
            };
            c.err(path, e.reason);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutions_name_groups_the_regex_has() {
        let re = Regex::new(r"^/users/(?P<id>[0-9]+)/(.*)$").unwrap();
        for ok in [
            "/u/$1",
            "/u/${1}x",
            "/u/$id/$2",
            "/u/${id}",
            "/cost/$$5",
            "/plain",
        ] {
            assert!(check_substitution(&re, ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("/u/$1x", "write ${1}x"),
            ("/u/$3", "no group \"3\""),
            ("/u/$user", "no group \"user\""),
            ("/u/${1", "without its }"),
            ("/u/$", "names no group"),
        ] {
            let err = check_substitution(&re, bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
