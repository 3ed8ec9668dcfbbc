//! Snapshots: reading them, compiling them into the runtime config, and the one `ArcSwap` that
//! holds the config in use.

mod compile;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;

use arc_swap::ArcSwap;
use trellis_proto::v1 as pb;

use crate::{
    access_log::Sink,
    balance::WeightedTargets,
    dial::IpFamily,
    metrics::ProxyMetrics,
    passthrough::Passthrough,
    route::RouteTable,
    tls::{Credentials, ServerSide},
    upstream::{Cluster, Upstreams},
};

/// One problem in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read snapshot {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{}", join(.0))]
    Invalid(Vec<FieldError>),
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl SnapshotError {
    /// The individual problems (one for a read error), for NACKs.
    pub fn field_errors(&self) -> Vec<FieldError> {
        match self {
            Self::Read { path, source } => vec![FieldError {
                path: path.clone(),
                reason: source.to_string(),
            }],
            Self::Invalid(errors) => errors.clone(),
        }
    }
}

/// The longest duration a snapshot may give (timeouts, intervals): 365 days. Longer ones would
/// overflow the clock when a deadline is computed from them.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Largest snapshot a proxy reads from a file (the config stream's message limit).
pub const MAX_SNAPSHOT_BYTES: usize = 64 << 20;

/// Deepest nesting of collections (sequences and mappings, block or flow) accepted in YAML or
/// JSON input. Real snapshots and manifests nest about 12 deep.
pub const MAX_NESTING: usize = 64;

/// Refuses YAML or JSON nested deeper than [`MAX_NESTING`], or that is not YAML at all, before
/// serde_yaml_ng parses it: libyaml takes quadratic time on deep flow nesting and reads a whole
/// document before serde's recursion limit applies. The check walks a second, pure-Rust YAML
/// parser's event stream and stops at the first event too deep, so it is linear and follows the
/// grammar (quotes, comments and block scalars cannot hide brackets from it). The error names
/// the line.
pub fn check_nesting(text: &str) -> Result<(), String> {
    use saphyr_parser::{Event, Parser};
    let mut depth = 0usize;
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| {
            let reason = e.info();
            if reason.contains("recursion limit") {
                format!(
                    "line {}: nested deeper than {MAX_NESTING} levels (refused before parsing)",
                    e.marker().line()
                )
            } else {
                format!(
                    "line {} column {}: {reason}",
                    e.marker().line(),
                    e.marker().col() + 1
                )
            }
        })?;
        match event {
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(format!(
                        "line {}: nested deeper than {MAX_NESTING} levels (refused before parsing)",
                        span.start.line()
                    ));
                }
            }
            Event::SequenceEnd | Event::MappingEnd => depth = depth.saturating_sub(1),
            Event::StreamEnd => break,
            _ => {}
        }
    }
    Ok(())
}

fn document_error(reason: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid(vec![FieldError {
        path: "(document)".into(),
        reason: reason.into(),
    }])
}

/// Parses a snapshot document: YAML or JSON in the protobuf JSON mapping. Input larger than
/// [`MAX_SNAPSHOT_BYTES`] or nested deeper than [`MAX_NESTING`] is refused before parsing.
pub fn parse(text: &str) -> Result<pb::Snapshot, SnapshotError> {
    if text.len() > MAX_SNAPSHOT_BYTES {
        return Err(document_error(format!(
            "{} bytes: larger than the {MAX_SNAPSHOT_BYTES} bytes allowed",
            text.len()
        )));
    }
    check_nesting(text).map_err(document_error)?;
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = field_path(e.path());
        let reason = e.into_inner().to_string();
        // serde_yaml_ng prefixes its own idea of the path ("clusters[0]: ..."): keep one path.
        let reason = match reason.split_once(": ") {
            Some((prefix, rest)) if !prefix.contains(' ') => rest.to_string(),
            _ => reason,
        };
        // pbjson reads numbers through an untagged enum, whose error says nothing useful.
        let reason = match integer_range(&path) {
            Some(range) if reason.contains("untagged enum") => {
                format!("must be a whole number in {range}")
            }
            _ => reason,
        };
        SnapshotError::Invalid(vec![FieldError {
            path: if path == "." {
                "(document)".into()
            } else {
                path
            },
            reason,
        }])
    })
}

/// The range of the snapshot's integer field at `path` (by its last name, as in the schema).
fn integer_range(path: &str) -> Option<&'static str> {
    const U32: &str = "0..=4294967295";
    const I64: &str = "-9223372036854775808..=9223372036854775807";
    Some(match path.rsplit('.').next()? {
        "weight"
        | "port"
        | "maxRetries"
        | "max_retries"
        | "minRetriesPerSecond"
        | "min_retries_per_second"
        | "healthyThreshold"
        | "healthy_threshold"
        | "unhealthyThreshold"
        | "unhealthy_threshold" => U32,
        "priority" => "-2147483648..=2147483647",
        "start" | "end" => I64,
        "bufferLimitBytes" | "buffer_limit_bytes" => "0..=18446744073709551615",
        _ => return None,
    })
}

/// Parses a snapshot file: as [`parse`], and a file without listeners is refused unless it
/// says `listeners: []` — an empty or truncated file must never blank a running proxy.
pub fn parse_file(text: &str) -> Result<pb::Snapshot, SnapshotError> {
    if text.trim().is_empty() {
        return Err(document_error("the file is empty"));
    }
    let snapshot = parse(text)?;
    if snapshot.listeners.is_empty() {
        // Rare: only now look at whether the file names its listeners at all.
        let explicit = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text)
            .is_ok_and(|v| v.get("listeners").is_some_and(|l| l.is_sequence()));
        if !explicit {
            return Err(SnapshotError::Invalid(vec![FieldError {
                path: "listeners".into(),
                reason: "missing: the file may be truncated (write `listeners: []` to serve \
                         nothing on purpose)"
                    .into(),
            }]));
        }
    }
    Ok(snapshot)
}

/// Reads a snapshot file of at most [`MAX_SNAPSHOT_BYTES`] bytes of UTF-8.
pub fn read_file(path: &std::path::Path) -> Result<String, SnapshotError> {
    let read_error = |source| SnapshotError::Read {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_SNAPSHOT_BYTES as u64 + 1),
        &mut bytes,
    )
    .map_err(read_error)?;
    if bytes.len() > MAX_SNAPSHOT_BYTES {
        return Err(read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than the {MAX_SNAPSHOT_BYTES} bytes allowed"),
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        ))
    })
}

/// A deserialisation error's field path as problems name it; a key that is the empty string
/// (`"": 1` at the top) shows as `""` rather than as no path at all.
pub fn field_path(path: &serde_path_to_error::Path) -> String {
    match path.to_string() {
        p if p.is_empty() => "\"\"".into(),
        p => p,
    }
}

/// Whether `host` is something an endpoint address may name: an IP address (IPv6 without
/// brackets) or a DNS name of ASCII labels (letters, digits, `-`, `_`; 1 to 63 bytes, not starting
/// or ending with `-`; at most 253 bytes in all, an optional trailing dot).
pub fn valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `host:port` as an endpoint address names it: an IPv6 address in brackets.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Compiles `snapshot` exactly as a proxy would, without serving it: the control plane runs
/// this on every snapshot before it pushes one, so a proxy is never sent what it would reject.
pub fn check(snapshot: &pb::Snapshot) -> Result<(), SnapshotError> {
    // Compiling creates no metric series (they appear on first use), so one detached set serves
    // every check.
    static METRICS: std::sync::OnceLock<Result<ProxyMetrics, String>> = std::sync::OnceLock::new();
    let metrics = METRICS
        .get_or_init(|| ProxyMetrics::new(&prometheus::Registry::new()).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| {
            SnapshotError::Invalid(vec![FieldError {
                path: "(metrics)".into(),
                reason: e.clone(),
            }])
        })?;
    // Certificate and trust files are the proxy's machine's: not read here.
    let upstreams = Upstreams::offline();
    let mut generation = upstreams.generation();
    compile::compile(snapshot, &mut generation, metrics, &Resolved::new()).map(drop)
}

/// The problems this proxy's compiler finds with a cluster's own settings (its balancing, hash
/// key, slow start...: give a cluster without endpoints), each at its field under the cluster
/// (`hashKey.header`): what the control plane checks at apply time.
pub fn check_cluster(cluster: &pb::Cluster) -> Vec<FieldError> {
    let mut cluster = cluster.clone();
    cluster.name = "c".into();
    let snapshot = pb::Snapshot {
        version: "check".into(),
        clusters: vec![cluster],
        ..Default::default()
    };
    check_under(&snapshot, "clusters[0].")
}

/// `snapshot`'s problems, with their paths under `at` (the one part being checked).
fn check_under(snapshot: &pb::Snapshot, at: &str) -> Vec<FieldError> {
    match check(snapshot) {
        Ok(()) => Vec::new(),
        Err(SnapshotError::Invalid(errors)) => errors
            .into_iter()
            .map(|e| FieldError {
                path: e.path.strip_prefix(at).unwrap_or(&e.path).to_string(),
                reason: e.reason,
            })
            .collect(),
        Err(e) => vec![FieldError {
            path: String::new(),
            reason: e.to_string(),
        }],
    }
}

/// The problems this proxy's compiler finds with a route's own settings (its faults, its rate
/// limit, its mirror, its action's rewrites: give a route with only those set; its targets and
/// its mirror's cluster are made up), each at its field under the route
/// (`fault.abort.httpStatus`): what the control plane checks at apply time.
pub fn check_route(route: &pb::Route) -> Vec<FieldError> {
    let mut route = route.clone();
    route.name = "r".into();
    let mut action = route.action.take().unwrap_or_default();
    action.weighted_targets = vec![pb::WeightedTarget {
        cluster: "c".into(),
        weight: 1,
    }];
    route.action = Some(action);
    if let Some(m) = &mut route.mirror {
        m.cluster = "c".into();
    }
    let snapshot = pb::Snapshot {
        version: "check".into(),
        listeners: vec![pb::Listener {
            name: "l".into(),
            role: pb::listener::Role::Egress as i32,
            virtual_hosts: vec![pb::VirtualHost {
                name: "h".into(),
                domains: vec!["*".into()],
                routes: vec![route],
            }],
            ..Default::default()
        }],
        clusters: vec![pb::Cluster {
            name: "c".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    check_under(&snapshot, "listeners[0].virtualHosts[0].routes[0].")
}

/// The compiled, immutable config one proxy runs.
#[derive(Debug)]
pub struct Runtime {
    pub version: Arc<str>,
    /// The snapshot it was compiled from, for `/config_dump`.
    pub source: Arc<pb::Snapshot>,
    pub ingress: Option<Listener>,
    pub egress: Option<Listener>,
    /// Listeners with their own address, by name.
    pub named: HashMap<Arc<str>, Listener>,
    pub clusters: Vec<Arc<Cluster>>,
    /// The snapshot's access log; None: the `--access-log` flag's.
    pub access_log: Option<Arc<Sink>>,
    /// Distributed tracing, if the snapshot asks for it.
    pub tracer: Option<Arc<crate::trace::Tracer>>,
}

impl Runtime {
    fn empty() -> Self {
        Self {
            version: "".into(),
            source: Arc::default(),
            ingress: None,
            egress: None,
            named: HashMap::new(),
            clusters: Vec::new(),
            access_log: None,
            tracer: None,
        }
    }

    /// Every weighted target of every route and TCP listener.
    pub fn targets(&self) -> impl Iterator<Item = &crate::balance::Target> {
        self.ingress
            .iter()
            .chain(&self.egress)
            .chain(self.named.values())
            .flat_map(|l| -> Box<dyn Iterator<Item = &crate::balance::Target>> {
                match &l.kind {
                    ListenerKind::Http(table) => Box::new(
                        table
                            .hosts
                            .iter()
                            .flat_map(|h| &h.routes)
                            .flat_map(|r| r.targets.iter()),
                    ),
                    ListenerKind::Tcp(tcp) => Box::new(tcp.targets.iter()),
                }
            })
    }

    /// The request metrics of every weighted target and of every route answered directly.
    fn request_metrics(&self) -> impl Iterator<Item = &crate::metrics::RequestMetrics> {
        let direct = self
            .ingress
            .iter()
            .chain(&self.egress)
            .chain(self.named.values())
            .filter_map(|l| match &l.kind {
                ListenerKind::Http(table) => Some(table),
                ListenerKind::Tcp(_) => None,
            })
            .flat_map(|table| &table.hosts)
            .flat_map(|h| &h.routes)
            .filter_map(|r| r.direct.as_deref())
            .map(|d| &*d.metrics);
        self.targets().map(|t| &*t.metrics).chain(direct)
    }

    pub fn listener(&self, slot: &Slot) -> Option<&Listener> {
        match slot {
            Slot::Ingress => self.ingress.as_ref(),
            Slot::Egress => self.egress.as_ref(),
            Slot::Named(name) => self.named.get(name),
        }
    }
}

/// Which socket a connection arrived on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Slot {
    Ingress,
    Egress,
    Named(Arc<str>),
}

impl Slot {
    /// The listener's name in logs and metrics: `ingress`, `egress`, or its own.
    pub fn name(&self) -> &str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
            Self::Named(name) => name,
        }
    }
}

#[derive(Debug)]
pub struct Listener {
    pub name: Arc<str>,
    /// Set for listeners that bind their own socket.
    pub address: Option<SocketAddr>,
    /// Set for listeners that bind their own socket on this port of the proxy's ingress IP (a
    /// gateway's listeners).
    pub port: Option<u16>,
    pub kind: ListenerKind,
    /// HTTP: what a request gets whose authority no virtual host serves.
    pub unmatched: Unmatched,
    /// TLS on its connections, if set.
    pub tls: Option<ServerSide>,
    /// Under mTLS: the SPIFFE IDs of the callers it admits; None: every caller.
    pub authorized: Option<HashSet<Arc<str>>>,
}

impl Listener {
    /// Whether a caller of `identity` (None: no verified certificate) may call.
    pub fn admits(&self, identity: Option<&str>) -> bool {
        match (&self.authorized, identity) {
            (None, _) => true,
            (Some(ids), Some(id)) => ids.contains(id),
            (Some(_), None) => false,
        }
    }
}

/// What a request gets whose authority no virtual host serves.
#[derive(Debug)]
pub enum Unmatched {
    /// 404 `no_route`.
    NotFound,
    /// 403 `egress_denied`: egress the mesh does not allow.
    Deny,
    /// Forwarded to the host it names.
    Passthrough(Passthrough),
}

#[derive(Debug)]
pub enum ListenerKind {
    Http(RouteTable),
    Tcp(TcpRoute),
}

#[derive(Debug)]
pub struct TcpRoute {
    pub targets: WeightedTargets,
    pub idle: Option<Duration>,
}

/// Holds the runtime config in use. One writer at a time applies snapshots (compile, then swap);
/// readers load it once per request or connection.
#[derive(Debug)]
pub struct SnapshotStore {
    current: ArcSwap<Runtime>,
    ready: AtomicBool,
    upstreams: Upstreams,
    metrics: ProxyMetrics,
    /// Held while a config is compiled and swapped in; holds the DNS answers compiled with.
    writer: Mutex<Resolved>,
}

/// The addresses of `(HOST:PORT, family)` names of ENDPOINTS clusters, sorted.
pub type Resolved = HashMap<(String, IpFamily), Vec<SocketAddr>>;

impl SnapshotStore {
    /// The proxy's workload certificate, key and trust bundle (mTLS on both sides).
    pub fn credentials(&self) -> &Arc<Credentials> {
        &self.upstreams.credentials
    }

    pub fn new(metrics: ProxyMetrics) -> Self {
        Self {
            current: ArcSwap::from_pointee(Runtime::empty()),
            ready: AtomicBool::new(false),
            upstreams: Upstreams::default(),
            metrics,
            writer: Mutex::new(Resolved::new()),
        }
    }

    pub fn load(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    /// Sets the proxy's zone (`--zone`), before the first snapshot.
    pub fn set_zone(&self, zone: &str) {
        self.upstreams.set_zone(zone);
    }

    /// Runs active health checks on `runtime` (the binary gives them a thread of their own);
    /// without it they run on the runtime that applies snapshots.
    pub fn run_health_checks_on(&self, runtime: tokio::runtime::Handle) {
        self.upstreams.run_checkers_on(runtime);
    }

    /// Closes idle upstream connections that expired or that the upstream closed.
    pub fn sweep_idle(&self) {
        self.upstreams.sweep_idle();
    }

    /// True once a snapshot with at least one listener has been applied: never while no
    /// listener serves.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Compiles `snapshot` and, when `prepare` accepts the result (it binds new sockets), makes it
    /// the config in use. On any error the config in use stays and the rejection is counted.
    pub fn apply(
        &self,
        snapshot: &pb::Snapshot,
        prepare: impl FnOnce(&Runtime) -> Result<(), SnapshotError>,
    ) -> Result<Arc<Runtime>, SnapshotError> {
        let resolved = self.writer.lock();
        let mut generation = self.upstreams.generation();
        let result = compile::compile(snapshot, &mut generation, &self.metrics, &resolved)
            .and_then(|rt| prepare(&rt).map(|()| rt));
        match result {
            Ok(runtime) => {
                let runtime = Arc::new(runtime);
                generation.commit();
                let old = self.current.swap(runtime.clone());
                self.retire_metrics(&old, &runtime);
                let serves = runtime.ingress.is_some()
                    || runtime.egress.is_some()
                    || !runtime.named.is_empty();
                self.ready.store(serves, Ordering::Release);
                self.metrics.snapshot_applied(&runtime.version);
                Ok(runtime)
            }
            // Counted by the caller once it has recorded why.
            Err(e) => Err(e),
        }
    }
}

impl SnapshotStore {
    /// The names the config in use wants resolved: the endpoints given by a DNS name in its
    /// ENDPOINTS clusters.
    pub fn names_to_resolve(&self) -> Vec<(String, IpFamily)> {
        let runtime = self.load();
        let mut names: Vec<(String, IpFamily)> = runtime
            .source
            .clusters
            .iter()
            .filter(|c| c.dns == pb::cluster::Dns::Endpoints as i32)
            .flat_map(|c| {
                let family = match pb::cluster::IpFamily::try_from(c.ip_family) {
                    Ok(pb::cluster::IpFamily::V4Only) => IpFamily::V4Only,
                    Ok(pb::cluster::IpFamily::V6Only) => IpFamily::V6Only,
                    _ => IpFamily::Any,
                };
                c.endpoints
                    .iter()
                    .filter(|e| e.address.parse::<SocketAddr>().is_err())
                    .map(move |e| (e.address.clone(), family))
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Recompiles the config in use with new DNS answers, when they differ from those it was
    /// compiled with (the same snapshot and version: not counted as an applied snapshot).
    pub fn refresh_dns(&self, resolved: Resolved) -> Result<bool, SnapshotError> {
        let mut current = self.writer.lock();
        if *current == resolved {
            return Ok(false);
        }
        let runtime = self.load();
        let mut generation = self.upstreams.generation();
        let fresh = compile::compile(&runtime.source, &mut generation, &self.metrics, &resolved)?;
        *current = resolved;
        let fresh = Arc::new(fresh);
        generation.commit();
        let old = self.current.swap(fresh.clone());
        self.retire_metrics(&old, &fresh);
        Ok(true)
    }

    /// Drops the metric series of routes and clusters that `old` had and `new` has not, so
    /// reloads never pile up stale series.
    fn retire_metrics(&self, old: &Runtime, new: &Runtime) {
        let pairs: std::collections::HashSet<(&str, &str)> =
            new.request_metrics().map(|m| m.labels()).collect();
        for m in old.request_metrics() {
            if !pairs.contains(&m.labels()) {
                m.retire();
            }
        }
        let clusters: std::collections::HashSet<&str> =
            new.clusters.iter().map(|c| &*c.name).collect();
        for c in &old.clusters {
            if !clusters.contains(&*c.name) {
                c.metrics.retire();
                if c.health_check.is_some() {
                    self.metrics.health_check(&c.name).retire();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> SnapshotStore {
        SnapshotStore::new(ProxyMetrics::new(&prometheus::Registry::new()).unwrap())
    }

    const GOOD: &str = r#"
version: v1
listeners:
  - name: egress
    role: EGRESS
    virtualHosts:
      - name: svc
        domains: ["svc.default:9080", "*.example.com"]
        routes:
          - name: api
            priority: 1
            match: { prefix: /api, headers: [{ name: x-canary, exact: "1" }] }
            action: { weightedTargets: [{ cluster: svc-v2, weight: 1 }] }
            retryPolicy:
              maxRetries: 2
              perTryTimeout: 0.5s
              httpRetryEvents: [gateway-error]
              grpcRetryEvents: [unavailable]
              bufferLimitBytes: 1024
            timeout: { perRequest: 3s, idle: 10s }
          - name: default
            priority: 2
            match: { prefix: / }
            action:
              weightedTargets: [{ cluster: svc-v1, weight: 90 }, { cluster: svc-v2, weight: 10 }]
  - name: db
    address: 127.0.0.1:0
    protocol: TCP
    tcp: { weightedTargets: [{ cluster: db, weight: 1 }], idle: 60s }
clusters:
  - name: svc-v1
    endpoints: [{ address: "127.0.0.1:8081" }, { address: "localhost:8082", health: DRAINING }]
  - name: svc-v2
    protocol: GRPC
    lbPolicy: LEAST_REQUEST
    connectTimeout: 0.25s
    endpoints: [{ address: "127.0.0.1:8083" }]
  - name: db
    protocol: TCP_ONLY
    endpoints: [{ address: "127.0.0.1:5432" }]
"#;

    /// An ENDPOINTS cluster's names become one endpoint per address when resolved (the same
    /// snapshot and version), a per-connection cluster's stay names, and unchanged answers
    /// recompile nothing.
    #[test]
    fn dns_endpoints_clusters_take_each_resolved_address() {
        let s = store();
        let snap = parse(
            "version: v1\nlisteners: [{ name: egress, role: EGRESS, virtualHosts: [{ name: a, domains: ['*'], routes: [{ name: r, action: { weightedTargets: [{ cluster: each, weight: 1 }] } }] }] }]\n\
             clusters:\n  - { name: each, dns: ENDPOINTS, endpoints: [{ address: 'svc.test:80' }, { address: '10.0.0.9:80' }] }\n  \
             - { name: one, endpoints: [{ address: 'svc.test:80' }] }\n",
        )
        .unwrap();
        s.apply(&snap, |_| Ok(())).unwrap();
        assert_eq!(
            s.names_to_resolve(),
            [("svc.test:80".to_string(), IpFamily::Any)]
        );
        let addrs = |rt: &Runtime, name: &str| -> Vec<String> {
            let c = rt.clusters.iter().find(|c| &*c.name == name).unwrap();
            c.endpoints
                .iter()
                .map(|(e, _)| e.addr.to_string())
                .collect()
        };
        assert_eq!(addrs(&s.load(), "each"), ["svc.test:80", "10.0.0.9:80"]);
        let answers = Resolved::from([(
            ("svc.test:80".to_string(), IpFamily::Any),
            vec![
                "10.0.0.1:80".parse().unwrap(),
                "10.0.0.9:80".parse().unwrap(),
            ],
        )]);
        assert!(s.refresh_dns(answers.clone()).unwrap());
        let rt = s.load();
        assert_eq!(&*rt.version, "v1");
        // 10.0.0.9 is both a resolved and a given address: one endpoint.
        assert_eq!(addrs(&rt, "each"), ["10.0.0.1:80", "10.0.0.9:80"]);
        assert_eq!(addrs(&rt, "one"), ["svc.test:80"]);
        assert!(!s.refresh_dns(answers).unwrap());
        // A name that resolves to nothing stays the endpoint.
        assert!(s.refresh_dns(Resolved::new()).unwrap());
        assert_eq!(addrs(&s.load(), "each"), ["svc.test:80", "10.0.0.9:80"]);
    }

    #[test]
    fn good_snapshot_compiles() {
        let s = store();
        assert!(!s.is_ready());
        let snap = parse(GOOD).unwrap();
        let rt = s.apply(&snap, |_| Ok(())).unwrap();
        assert!(s.is_ready());
        assert_eq!(&*rt.version, "v1");
        assert!(rt.egress.is_some() && rt.ingress.is_none());
        assert!(rt.named.contains_key("db"));
        let v1 = rt.clusters.iter().find(|c| &*c.name == "svc-v1").unwrap();
        assert_eq!(v1.endpoints.len(), 2);
        assert_eq!(
            v1.healthy.len(),
            1,
            "draining endpoints take no new requests"
        );
        let Some(Listener {
            kind: ListenerKind::Http(table),
            ..
        }) = &rt.egress
        else {
            panic!("egress is HTTP");
        };
        let host = table.host("SVC.default:9080").unwrap();
        assert_eq!(&*host.routes[0].name, "api", "sorted by priority");
        let retry = host.routes[0].retry.as_ref().unwrap();
        assert_eq!(retry.per_try_timeout, Some(Duration::from_millis(500)));
        assert_eq!(retry.buffer_limit, 1024);
        assert_eq!(
            host.routes[0].timeouts.per_request,
            Some(Duration::from_secs(3))
        );
        // A timeout of 0 is none, as in Envoy and App Mesh.
        let zero = GOOD.replace(
            "timeout: { perRequest: 3s, idle: 10s }",
            "timeout: { perRequest: 0s, idle: 0s }",
        );
        let rt = s.apply(&parse(&zero).unwrap(), |_| Ok(())).unwrap();
        let Some(Listener {
            kind: ListenerKind::Http(table),
            ..
        }) = &rt.egress
        else {
            panic!("egress is HTTP");
        };
        let t = &table.host("svc.default:9080").unwrap().routes[0].timeouts;
        assert_eq!((t.per_request, t.idle), (None, None));
        assert!(table.host("a.example.com").is_some());
        assert!(table.host("other").is_none());
    }

    #[test]
    fn hosts_are_ip_addresses_or_dns_names() {
        for ok in [
            "10.0.0.1",
            "::1",
            "a.example",
            "a.example.",
            "red_svc.local",
            "x-1.y",
        ] {
            assert!(valid_host(ok), "{ok}");
        }
        let long_label = "a".repeat(64);
        let long_name = ["abc"; 64].join(".");
        for bad in [
            "",
            "ünï.example",
            "bad!host",
            "a\r\nb",
            "-a.b",
            "a-.b",
            "a..b",
            ".",
            "[::1]",
            "a b",
            &long_label,
            &long_name,
        ] {
            assert!(!valid_host(bad), "{bad:?}");
        }
        assert_eq!(host_port("::1", 80), "[::1]:80");
        assert_eq!(host_port("[::1]", 80), "[::1]:80");
        assert_eq!(host_port("a.example", 80), "a.example:80");
    }

    #[test]
    fn check_compiles_without_serving() {
        assert!(check(&parse(GOOD).unwrap()).is_ok());
        let bad = parse("clusters: [{name: c, endpoints: [{address: 'bad!host:80'}]}]").unwrap();
        let errors = check(&bad).unwrap_err().field_errors();
        assert_eq!(errors[0].path, "clusters[0].endpoints[0].address");
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let deep = "[".repeat(100_000);
        let err = parse(&deep).unwrap_err().to_string();
        assert_eq!(
            err,
            "(document): line 1: nested deeper than 64 levels (refused before parsing)"
        );
        let at_limit = format!("{}{}", "[".repeat(MAX_NESTING), "]".repeat(MAX_NESTING));
        assert!(check_nesting(&at_limit).is_ok());
        let block = "- ".repeat(MAX_NESTING + 1);
        assert!(check_nesting(&block).unwrap_err().contains("nested deeper"));
        // Brackets in strings, comments and block scalars are text, whatever their quotes.
        let text = format!(
            "a: \"{0}\"\nb: '{0}'\n# {0}\nc: don't [x]\nd: |\n  \" {0}\ne: x-'{0}",
            "[".repeat(100)
        );
        assert!(check_nesting(&text).is_ok(), "{text}");
        // Nothing hides real nesting: quotes inside words, comment-like text, odd quotes in a
        // block scalar, brackets in strings between real ones.
        let deep = "[".repeat(MAX_NESTING + 1);
        for hiding in [
            format!("a: x-'\nb: {deep}"),
            format!("[a-#, {deep}"),
            format!("a: |\n  \"\nb: {deep}"),
            "[ \"]\", ".repeat(MAX_NESTING + 1),
            "{a: ".repeat(100_000),
        ] {
            assert!(
                check_nesting(&hiding).is_err_and(|e| e.contains("nested deeper")),
                "{hiding:.60}"
            );
        }
    }

    /// A property of the guard: whatever it lets through, serde_yaml_ng finds no deeper.
    #[test]
    fn what_passes_the_nesting_guard_is_no_deeper_than_the_limit() {
        fn depth(v: &serde_yaml_ng::Value) -> usize {
            match v {
                serde_yaml_ng::Value::Sequence(s) => 1 + s.iter().map(depth).max().unwrap_or(0),
                serde_yaml_ng::Value::Mapping(m) => {
                    1 + m
                        .iter()
                        .map(|(k, v)| depth(k).max(depth(v)))
                        .max()
                        .unwrap_or(0)
                }
                serde_yaml_ng::Value::Tagged(t) => depth(&t.value),
                _ => 0,
            }
        }
        const PIECES: &[&str] = &[
            "[",
            "]",
            "{",
            "}",
            "a",
            ": ",
            ",",
            "\"",
            "'",
            "#",
            "\n",
            "- ",
            "|",
            "x-",
            " ",
            "\n  ",
            "[[[[[[[[[[[[[[[[",
            "{a: {a: {a: {a: ",
            "\"]\", ",
        ];
        let mut rng = fastrand::Rng::with_seed(8);
        for _ in 0..20_000 {
            let text: String = (0..rng.usize(1..300))
                .map(|_| PIECES[rng.usize(..PIECES.len())])
                .collect();
            if check_nesting(&text).is_ok()
                && let Ok(v) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text)
            {
                assert!(depth(&v) <= MAX_NESTING, "{text:?}");
            }
        }
    }

    #[test]
    fn files_without_listeners_are_refused_unless_they_say_so() {
        assert_eq!(
            parse_file(" \n").unwrap_err().to_string(),
            "(document): the file is empty"
        );
        assert!(
            parse_file("version: v1\nclusters: []\n")
                .unwrap_err()
                .to_string()
                .starts_with("listeners: missing")
        );
        assert!(parse_file("version: v1\nlisteners: []\n").is_ok());
        assert!(
            parse_file("version: v1\nlisteners:\n").is_err(),
            "cut right after the key"
        );
        assert!(parse_file("{\"version\": \"v1\", \"listeners\": []}").is_ok());
        assert!(parse_file(GOOD).is_ok());
    }

    #[test]
    fn out_of_range_numbers_name_the_range() {
        let route = |field: &str| {
            format!(
                "listeners: [{{name: e, role: EGRESS, virtualHosts: [{{name: h, domains: ['*'], routes: [{{name: r, {field}, action: {{weightedTargets: [{{cluster: c, weight: 1}}]}}}}]}}]}}]"
            )
        };
        let cases = [
            (
                "clusters: [{name: c}]\nlisteners: [{name: e, role: EGRESS, virtualHosts: [{name: h, domains: ['*'], routes: [{name: r, action: {weightedTargets: [{cluster: c, weight: 5000000000}]}}]}]}]".to_string(),
                "listeners[0].virtualHosts[0].routes[0].action.weightedTargets[0].weight: must be a whole number in 0..=4294967295",
            ),
            (
                route("priority: 3000000000"),
                "listeners[0].virtualHosts[0].routes[0].priority: must be a whole number in -2147483648..=2147483647",
            ),
            (
                route("retryPolicy: {maxRetries: -1}"),
                "listeners[0].virtualHosts[0].routes[0].retryPolicy.maxRetries: must be a whole number in 0..=4294967295",
            ),
        ];
        for (yaml, want) in cases {
            let got = parse(&yaml).unwrap_err().to_string();
            assert_eq!(got, want, "{yaml}");
        }
    }

    #[test]
    fn series_of_routes_and_clusters_removed_by_a_reload_are_dropped() {
        let registry = prometheus::Registry::new();
        let s = SnapshotStore::new(ProxyMetrics::new(&registry).unwrap());
        let text = || {
            let mut out = Vec::new();
            prometheus::Encoder::encode(
                &prometheus::TextEncoder::new(),
                &registry.gather(),
                &mut out,
            )
            .unwrap();
            String::from_utf8(out).unwrap()
        };
        let serve = |rt: &Runtime| {
            for t in rt.targets() {
                t.metrics.observe(http::StatusCode::OK, Duration::ZERO);
                t.metrics
                    .observe(http::StatusCode::BAD_GATEWAY, Duration::ZERO);
            }
            for c in &rt.clusters {
                c.metrics.retries.inc();
            }
        };
        let old = s.apply(&parse(GOOD).unwrap(), |_| Ok(())).unwrap();
        serve(&old);
        let before = text();
        for series in [
            r#"route="api",status_class="2xx""#,
            r#"route="default",status_class="5xx""#,
            r#"trellis_proxy_retries_total{cluster="svc-v2"}"#,
            r#"trellis_proxy_retries_total{cluster="db"}"#,
        ] {
            assert!(before.contains(series), "{series}\n{before}");
        }
        // A rejected snapshot leaves no series behind.
        let rejected = "version: bad\nclusters: [{name: other}]\nlisteners: [{name: e, role: EGRESS, virtualHosts: [{name: h, domains: ['*'], routes: [{name: r, action: {weightedTargets: [{cluster: other, weight: 1}, {cluster: missing, weight: 1}]}}]}]}]";
        assert!(s.apply(&parse(rejected).unwrap(), |_| Ok(())).is_err());
        assert!(!text().contains("other"), "{}", text());
        let next = "version: v2\nclusters: [{name: svc-v1}]\nlisteners: [{name: e, role: EGRESS, virtualHosts: [{name: h, domains: ['*'], routes: [{name: default, action: {weightedTargets: [{cluster: svc-v1, weight: 1}]}}]}]}]";
        let new = s.apply(&parse(next).unwrap(), |_| Ok(())).unwrap();
        // A request still finishing on the old snapshot does not bring its series back.
        serve(&old);
        serve(&new);
        let after = text();
        for gone in [r#"route="api""#, r#"cluster="svc-v2""#, r#"cluster="db""#] {
            assert!(!after.contains(gone), "{gone}\n{after}");
        }
        assert!(after.contains(
            r#"trellis_proxy_requests_total{cluster="svc-v1",route="default",status_class="2xx"} 3"#
        ), "{after}");
    }

    #[test]
    fn json_is_accepted_too() {
        let snap =
            parse(r#"{"version": "j", "clusters": [{"name": "c", "endpoints": []}]}"#).unwrap();
        assert_eq!(snap.version, "j");
    }

    fn errors_of(yaml: &str) -> Vec<String> {
        let s = store();
        let err = match parse(yaml) {
            Ok(snap) => s.apply(&snap, |_| Ok(())).unwrap_err(),
            Err(e) => e,
        };
        err.field_errors().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                "clusters: [{name: c, endpoints: [{address: nope}]}]",
                "clusters[0].endpoints[0].address: \"nope\" is not HOST:PORT",
            ),
            (
                "clusters: [{name: c, endpoints: [{address: '1::2:3'}]}]",
                "clusters[0].endpoints[0].address: \"1::2:3\" is not HOST:PORT",
            ),
            (
                "clusters: [{name: c}, {name: c}]",
                "clusters[1].name: duplicate cluster name \"c\"",
            ),
            (
                "listeners: [{name: e, role: EGRESS, virtualHosts: [{name: h, domains: ['*'], routes: [{name: r, action: {weightedTargets: [{cluster: missing, weight: 1}]}}]}]}]",
                "listeners[0].virtualHosts[0].routes[0].action.weightedTargets[0].cluster: unknown cluster \"missing\"",
            ),
            (
                "clusters: [{name: c}]\nlisteners: [{name: e, role: EGRESS, virtualHosts: [{name: h, domains: ['*'], routes: [{name: r, match: {regex: '(['}, action: {weightedTargets: [{cluster: c, weight: 1}]}}]}]}]",
                "listeners[0].virtualHosts[0].routes[0].match.regex: invalid regex",
            ),
            (
                "clusters: [{name: c}]\nlisteners: [{name: e, role: EGRESS, virtualHosts: [{name: h, domains: ['*'], routes: [{name: r, action: {weightedTargets: [{cluster: c, weight: 0}]}}]}]}]",
                "listeners[0].virtualHosts[0].routes[0].action.weightedTargets: the weights must not all be 0",
            ),
            (
                "clusters: [{name: c}]\nlisteners: [{name: e, role: EGRESS, virtualHosts: [{name: h, domains: ['*'], routes: [{name: r, retryPolicy: {httpRetryEvents: [bogus]}, action: {weightedTargets: [{cluster: c, weight: 1}]}}]}]}]",
                "listeners[0].virtualHosts[0].routes[0].retryPolicy.httpRetryEvents[0]: unknown event \"bogus\"",
            ),
            (
                "clusters: [{name: c}]\nlisteners: [{name: e, role: EGRESS, virtualHosts: [{name: h, domains: ['*'], routes: [{name: r, match: {headers: [{name: x, range: {start: 5, end: 1}}]}, action: {weightedTargets: [{cluster: c, weight: 1}]}}]}]}]",
                "listeners[0].virtualHosts[0].routes[0].match.headers[0].range: start must be less than end",
            ),
            (
                "clusters: [{name: c}]\nlisteners: [{name: e, role: EGRESS, virtualHosts: [{name: h, domains: ['*'], routes: [{name: r, action: {directResponse: {kind: READINESS}, weightedTargets: [{cluster: c, weight: 1}]}}]}]}]",
                "listeners[0].virtualHosts[0].routes[0].action.weightedTargets: must be empty with a directResponse",
            ),
            (
                "listeners: [{name: e, role: EGRESS, virtualHosts: [{name: h, domains: ['*'], routes: [{name: r, action: {directResponse: {status: 1000}}}]}]}]",
                "listeners[0].virtualHosts[0].routes[0].action.directResponse.status: must be 100..=599",
            ),
            (
                "listeners: [{name: e, role: EGRESS, virtualHosts: [{name: h, domains: ['*'], routes: [{name: r, retryPolicy: {maxRetries: 1}, action: {directResponse: {kind: GRPC_HEALTH}}}]}]}]",
                "listeners[0].virtualHosts[0].routes[0].action.directResponse: a direct response is not forwarded: no retryPolicy",
            ),
            (
                "listeners: [{name: x}]",
                "listeners[0].role: set a role (INGRESS or EGRESS), an address or a port",
            ),
            (
                "listeners: [{name: x, role: INGRESS, port: 8088}]",
                "listeners[0].port: 8088: only for a listener without a role or an address",
            ),
            (
                "listeners: [{name: x, port: 70000}]",
                "listeners[0].port: must be 1..=65535",
            ),
            (
                "clusters: [{name: c, protocol: TCP_ONLY, authorityPort: 9080}]",
                "clusters[0].authorityPort: 9080: a TCP only cluster's requests carry no authority",
            ),
            (
                "clusters: [{name: c}]\nlisteners: [{name: e, role: EGRESS, virtualHosts: [{name: h, domains: ['*'], routes: [{name: r, match: {scheme: ftp}, action: {weightedTargets: [{cluster: c, weight: 1}]}}]}]}]",
                "listeners[0].virtualHosts[0].routes[0].match.scheme: \"ftp\" is not http or https",
            ),
            (
                "listeners: [{name: a, role: INGRESS, virtualHosts: []}, {name: b, role: INGRESS}]",
                "listeners[1].role: only one INGRESS listener is allowed",
            ),
            (
                "clusters: [{name: c, connectTimeout: -1s}]",
                "clusters[0].connectTimeout: must be a non-negative duration",
            ),
            (
                "clusters: [{name: c, lbPolicy: FASTEST}]",
                "clusters[0].lbPolicy",
            ),
            (
                "clusters: [{name: c, endpoint: []}]",
                "clusters[0].endpoint: unknown field `endpoint`",
            ),
            (
                "clusters: [{name: c, connectTimeout: 5}]",
                "clusters[0].connectTimeout: ",
            ),
            (
                "clusters: [{name: c, connectTimeout: 31536001s}]",
                "clusters[0].connectTimeout: must be at most 31536000s (365 days)",
            ),
        ];
        for (yaml, want) in cases {
            let got = errors_of(yaml);
            assert!(
                got.iter().any(|e| e.starts_with(want)),
                "{yaml}\nwant {want}\ngot {got:?}"
            );
        }
    }

    #[test]
    fn outlier_detection_and_connection_pools_are_validated() {
        let od = "{maxServerErrors: 5, interval: 10s, baseEjectionDuration: 30s, maxEjectionPercent: 50}";
        let good = format!(
            "clusters: [{{name: a, outlierDetection: {od}, connectionPool: {{maxConnections: 2, maxPendingRequests: 1, maxRequests: 9}}}}, {{name: b, protocol: GRPC, connectionPool: {{maxRequests: 3}}}}, {{name: t, protocol: TCP_ONLY, connectionPool: {{maxConnections: 3}}, outlierDetection: {od}}}]"
        );
        store().apply(&parse(&good).unwrap(), |_| Ok(())).unwrap();
        let cases: &[(&str, &str)] = &[
            (
                "clusters: [{name: c, outlierDetection: {maxServerErrors: 0, interval: 1s, baseEjectionDuration: 1s}}]",
                "clusters[0].outlierDetection.maxServerErrors: must be at least 1",
            ),
            (
                "clusters: [{name: c, outlierDetection: {maxServerErrors: 1, baseEjectionDuration: 1s}}]",
                "clusters[0].outlierDetection.interval: is required",
            ),
            (
                "clusters: [{name: c, outlierDetection: {maxServerErrors: 1, interval: 0s, baseEjectionDuration: 1s}}]",
                "clusters[0].outlierDetection.interval: must be greater than 0",
            ),
            (
                "clusters: [{name: c, outlierDetection: {maxServerErrors: 1, interval: 1s}}]",
                "clusters[0].outlierDetection.baseEjectionDuration: is required",
            ),
            (
                "clusters: [{name: c, outlierDetection: {maxServerErrors: 1, interval: 1s, baseEjectionDuration: 1s, maxEjectionPercent: 101}}]",
                "clusters[0].outlierDetection.maxEjectionPercent: must be 0..=100",
            ),
            (
                "clusters: [{name: c, connectionPool: {maxPendingRequests: 1}}]",
                "clusters[0].connectionPool.maxPendingRequests: needs maxConnections",
            ),
            (
                "clusters: [{name: c, protocol: HTTP2, connectionPool: {maxConnections: 1}}]",
                "clusters[0].connectionPool.maxConnections: not used by HTTP/2 and gRPC clusters",
            ),
            (
                "clusters: [{name: c, protocol: TCP_ONLY, connectionPool: {maxRequests: 1}}]",
                "clusters[0].connectionPool.maxRequests: not used by TCP_ONLY clusters",
            ),
            (
                "clusters: [{name: c, connectionPool: {maxConnection: 1}}]",
                "clusters[0].connectionPool.maxConnection: unknown field",
            ),
        ];
        for (yaml, want) in cases {
            let got = errors_of(yaml);
            assert!(
                got.iter().any(|e| e.starts_with(want)),
                "{yaml}\nwant {want}\ngot {got:?}"
            );
        }
    }

    #[test]
    fn health_checks_are_validated() {
        let good = "clusters: [{name: a, healthCheck: {protocol: HTTP, path: /health, port: 9, interval: 5s, timeout: 2s, healthyThreshold: 2, unhealthyThreshold: 3}}, {name: b, protocol: GRPC, healthCheck: {protocol: GRPC, interval: 5s, timeout: 2s, healthyThreshold: 1, unhealthyThreshold: 1}}, {name: t, protocol: TCP_ONLY, healthCheck: {protocol: TCP, interval: 1s, timeout: 1s, healthyThreshold: 2, unhealthyThreshold: 2}}, {name: h, healthCheck: {protocol: HTTP2, interval: 1s, timeout: 1s, healthyThreshold: 2, unhealthyThreshold: 2}}]";
        store().apply(&parse(good).unwrap(), |_| Ok(())).unwrap();
        let base = "interval: 5s, timeout: 2s, healthyThreshold: 2, unhealthyThreshold: 2";
        let cases: &[(String, &str)] = &[
            (
                format!("{{protocol: HTTP, path: health, {base}}}"),
                "clusters[0].healthCheck.path: \"health\" is not a path starting with /",
            ),
            (
                format!("{{protocol: TCP, path: /health, {base}}}"),
                "clusters[0].healthCheck.path: used only by HTTP and HTTP2 health checks",
            ),
            (
                format!("{{protocol: GRPC, path: /x, {base}}}"),
                "clusters[0].healthCheck.path: used only by HTTP and HTTP2",
            ),
            (
                format!("{{protocol: TCP, port: 65536, {base}}}"),
                "clusters[0].healthCheck.port: must be 1..=65535",
            ),
            (
                "{protocol: TCP, timeout: 2s, healthyThreshold: 2, unhealthyThreshold: 2}".into(),
                "clusters[0].healthCheck.interval: is required",
            ),
            (
                "{protocol: TCP, interval: 0s, timeout: 2s, healthyThreshold: 2, unhealthyThreshold: 2}".into(),
                "clusters[0].healthCheck.interval: must be greater than 0",
            ),
            (
                "{protocol: TCP, interval: 5s, healthyThreshold: 2, unhealthyThreshold: 2}".into(),
                "clusters[0].healthCheck.timeout: is required",
            ),
            (
                "{protocol: TCP, interval: 5s, timeout: 2s, unhealthyThreshold: 2}".into(),
                "clusters[0].healthCheck.healthyThreshold: must be at least 1",
            ),
            (
                "{protocol: TCP, interval: 5s, timeout: 2s, healthyThreshold: 2}".into(),
                "clusters[0].healthCheck.unhealthyThreshold: must be at least 1",
            ),
            (
                format!("{{protocol: TCP, intervalMillis: 5000, {base}}}"),
                "clusters[0].healthCheck.intervalMillis: unknown field",
            ),
        ];
        for (hc, want) in cases {
            let yaml = format!("clusters: [{{name: c, healthCheck: {hc}}}]");
            let got = errors_of(&yaml);
            assert!(
                got.iter().any(|e| e.starts_with(want)),
                "{yaml}\nwant {want}\ngot {got:?}"
            );
        }
    }

    #[test]
    fn rejected_snapshot_keeps_the_old_one() {
        let s = store();
        s.apply(&parse(GOOD).unwrap(), |_| Ok(())).unwrap();
        let bad = parse("version: v2\nclusters: [{name: c, endpoints: [{address: bad}]}]").unwrap();
        assert!(s.apply(&bad, |_| Ok(())).is_err());
        assert_eq!(&*s.load().version, "v1");
        let refused = s.apply(&parse("version: v3").unwrap(), |_| {
            Err(SnapshotError::Invalid(vec![FieldError {
                path: "listeners[0].address".into(),
                reason: "cannot bind".into(),
            }]))
        });
        assert!(refused.is_err());
        assert_eq!(
            &*s.load().version,
            "v1",
            "a failed prepare step rejects too"
        );
    }
}
