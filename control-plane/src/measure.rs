//! What proxies measure of their routes, for canaries and the dashboard: a snapshot's
//! `measure` lists its routes; the proxy reports the cumulative count, 5xx count and latency
//! buckets of each (route, cluster) pair of them on the config stream (every second when a
//! canary judges one of them, else every 5 s, and only when they changed). Each control plane
//! adds up what each proxy stream counted between two of its reports into totals per (caller,
//! route, target node) ([`Measurements`]), and samples them for live rates.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use trellis_proto::v1 as pb;

use crate::model::{CanarySpec, Kind, ResourceKey, Spec};

/// How often proxies report the measured routes.
pub const MEASURE_INTERVAL: Duration = Duration::from_secs(1);
/// The name a proxy knows a canary's route by (`ROUTER/ROUTE`, as translated).
pub fn route_name(spec: &CanarySpec) -> String {
    format!("{}/{}", spec.virtual_router_ref.name, spec.route)
}

/// The router route a proxy's route name stands for: a gateway names the routes of a router it
/// reaches `GATEWAYROUTE/ROUTER/ROUTE`; a sidecar `ROUTER/ROUTE` (names have no `/`).
pub fn router_route(name: &str) -> &str {
    match name.match_indices('/').nth(1) {
        Some(_) => name.split_once('/').map_or(name, |(_, rest)| rest),
        None => name,
    }
}

/// The node a cluster reaches: `NAMESPACE/NAME` of `NAMESPACE/NAME[:PORT][@...][#mirror]`.
fn node_of(cluster: &str) -> &str {
    cluster.split([':', '@', '#']).next().unwrap_or(cluster)
}

/// Request counts of one (route, node) pair: cumulative, or the change over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub requests: u64,
    pub failures: u64,
    /// Latency bucket bounds (seconds), the requests at most each, and how many requests the
    /// buckets count (those of reports with other bounds are left out of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bounds: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<u64>,
    #[serde(default)]
    pub bucketed: u64,
}

impl Counts {
    fn from_report(m: &pb::RouteMeasurement) -> Self {
        let bucketed = if m.bounds_seconds.len() == m.counts.len() && !m.counts.is_empty() {
            m.requests
        } else {
            0
        };
        Self {
            requests: m.requests,
            failures: m.failures.min(m.requests),
            bounds: if bucketed > 0 {
                m.bounds_seconds.clone()
            } else {
                Vec::new()
            },
            buckets: if bucketed > 0 {
                m.counts.clone()
            } else {
                Vec::new()
            },
            bucketed,
        }
    }

    /// Adds `other` (saturating: a proxy's counts are not trusted to stay in range).
    pub(crate) fn add(&mut self, other: &Counts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.failures = self.failures.saturating_add(other.failures);
        if self.bucketed == 0 && self.buckets.iter().all(|b| *b == 0) {
            self.bounds = other.bounds.clone();
            self.buckets = vec![0; other.buckets.len()];
        }
        // Buckets of other bounds (another proxy version) are left out; counts are not.
        if self.bounds == other.bounds {
            for (sum, n) in self.buckets.iter_mut().zip(&other.buckets) {
                *sum = sum.saturating_add(*n);
            }
            self.bucketed = self.bucketed.saturating_add(other.bucketed);
        }
    }

    /// What a proxy process counted since `before`: a counter that went back (a series
    /// dropped and made again) counts from zero.
    fn since_reset(&self, before: &Counts) -> Counts {
        if self.requests < before.requests || self.failures < before.failures {
            return self.clone();
        }
        self.since(before)
    }

    /// The change since `before`, each count at least zero (a control plane's totals only
    /// grow: a lower value is an older reading of them).
    pub(crate) fn since(&self, before: &Counts) -> Counts {
        let same = self.bounds == before.bounds;
        let buckets = if same {
            self.buckets
                .iter()
                .zip(before.buckets.iter().chain(std::iter::repeat(&0)))
                .map(|(now, then)| now.saturating_sub(*then))
                .collect()
        } else {
            self.buckets.clone()
        };
        let bucketed = if same {
            self.bucketed.saturating_sub(before.bucketed)
        } else {
            self.bucketed
        };
        let requests = self.requests.saturating_sub(before.requests);
        Counts {
            requests,
            failures: self.failures.saturating_sub(before.failures).min(requests),
            bounds: self.bounds.clone(),
            buckets,
            bucketed,
        }
    }

    /// The `q` quantile of the durations (seconds), estimated within its bucket by linear
    /// interpolation, as Prometheus's `histogram_quantile`; infinite when it is beyond the last
    /// bound (the proxy's buckets end at 10 s). None without bucketed requests.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.bucketed == 0 || self.bounds.is_empty() || self.bounds.len() != self.buckets.len() {
            return None;
        }
        let rank = q * self.bucketed as f64;
        let mut below = (0.0, 0u64);
        for (&bound, &count) in self.bounds.iter().zip(&self.buckets) {
            if count as f64 >= rank {
                let (lower, before) = below;
                let within = count.saturating_sub(before);
                if within == 0 {
                    return Some(bound);
                }
                return Some(lower + (bound - lower) * (rank - before as f64) / within as f64);
            }
            below = (bound, count);
        }
        Some(f64::INFINITY)
    }

    /// The window as shown and judged.
    pub fn window(&self) -> Window {
        let p99 = self.quantile(0.99);
        let over = p99.is_some_and(f64::is_infinite);
        Window {
            requests: self.requests,
            failures: self.failures,
            success_rate: (self.requests > 0).then(|| {
                100.0 * (self.requests - self.failures.min(self.requests)) as f64
                    / self.requests as f64
            }),
            p99_ms: if over {
                self.bounds.last().map(|b| b * 1000.0)
            } else {
                p99.map(|s| s * 1000.0)
            },
            p99_over_last_bucket: over,
        }
    }
}

/// A step's measurements: requests, 5xx, success rate (percent) and p99 (milliseconds).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Window {
    pub requests: u64,
    pub failures: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// The p99 is beyond the largest latency bucket (`p99Ms` is that bucket's bound).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub p99_over_last_bucket: bool,
}

/// This control plane's totals of the measured pairs, from its proxies' reports.
#[derive(Debug, Default)]
pub struct Measurements {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By proxy stream (its node, its hello's `instance`, the stream): forgotten when the
    /// stream ends, so a process's next stream (here or at another control plane) starts
    /// from a baseline and nothing is counted twice.
    processes: HashMap<String, Process>,
    /// By (caller node, route, target node).
    totals: BTreeMap<Pair, Counts>,
    /// Requests and failures of every pair at a few past moments (every [`RATE_SAMPLE`]), for
    /// rates.
    samples: std::collections::VecDeque<Sample>,
}

/// Every pair's (requests, failures) at one moment.
type Sample = (Instant, BTreeMap<Pair, (u64, u64)>);

/// (caller node, route, target node).
type Pair = (String, String, String);

/// How often totals are sampled for rates, and how many samples are kept (rates are over the
/// oldest kept, 10 to 12 s back).
pub const RATE_SAMPLE: Duration = Duration::from_secs(2);
const RATE_SAMPLES: usize = 6;

/// A pair's live rate: requests per second and the share that succeeded (percent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rate {
    pub caller: String,
    pub route: String,
    pub node: String,
    pub requests_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
}

#[derive(Debug)]
struct Process {
    /// The routes an earlier report of this process covered.
    covered: HashSet<String>,
    /// The last report's counts by (route, cluster).
    last: HashMap<(String, String), Counts>,
}

impl Measurements {
    /// Adds what a proxy process counted since its last report. A route's first report from a
    /// process is its baseline (what it counted before is not in any step); a pair that appears
    /// later on a covered route is new since (its series start at its first request).
    pub fn record(&self, instance: &str, caller: &str, report: &pb::Report) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let inner = &mut *inner;
        let process = inner
            .processes
            .entry(instance.to_string())
            .or_insert_with(|| Process {
                covered: HashSet::new(),
                last: HashMap::new(),
            });
        for m in &report.routes {
            let counts = Counts::from_report(m);
            let pair = (m.route.clone(), m.cluster.clone());
            if process.covered.contains(&m.route) {
                let delta = match process.last.get(&pair) {
                    Some(before) => counts.since_reset(before),
                    None => counts.clone(),
                };
                inner
                    .totals
                    .entry((
                        caller.to_string(),
                        router_route(&m.route).to_string(),
                        node_of(&m.cluster).to_string(),
                    ))
                    .or_default()
                    .add(&delta);
            }
            process.last.insert(pair, counts);
        }
        process
            .covered
            .extend(report.measured_routes.iter().cloned());
    }

    /// Drops the totals of routes and callers `keep` does not keep (gone from the mesh).
    pub fn prune(&self, keep: impl Fn(&str, &str) -> bool) {
        if let Ok(mut inner) = self.inner.lock() {
            inner
                .totals
                .retain(|(caller, route, _), _| keep(caller, route));
        }
    }

    /// Forgets a stream that ended.
    pub fn forget(&self, stream: &str) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.processes.remove(stream);
        }
    }

    /// The totals of one (route, node) pair, every caller's.
    pub fn total(&self, route: &str, node: &str) -> Option<Counts> {
        let inner = self.inner.lock().ok()?;
        let mut sum: Option<Counts> = None;
        for ((_, r, n), c) in &inner.totals {
            if r == route && n == node {
                sum.get_or_insert_with(Counts::default).add(c);
            }
        }
        sum
    }

    /// The totals of `routes` (the canaries'), every caller's, as published for the other
    /// control planes: `ROUTE\tNODE` -> counts.
    pub fn published(&self, routes: &HashSet<String>) -> BTreeMap<String, Counts> {
        let Ok(inner) = self.inner.lock() else {
            return BTreeMap::new();
        };
        let mut out: BTreeMap<String, Counts> = BTreeMap::new();
        for ((_, route, node), c) in &inner.totals {
            if routes.contains(route) {
                out.entry(format!("{route}\t{node}")).or_default().add(c);
            }
        }
        out
    }

    /// Keeps the totals of now for [`Self::rates`] (called every [`RATE_SAMPLE`]).
    pub fn sample(&self) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let now: BTreeMap<_, _> = inner
            .totals
            .iter()
            .map(|(k, c)| (k.clone(), (c.requests, c.failures)))
            .collect();
        inner.samples.push_back((Instant::now(), now));
        while inner.samples.len() > RATE_SAMPLES {
            inner.samples.pop_front();
        }
    }

    /// Every pair's rate since the oldest sample (none before two samples).
    pub fn rates(&self) -> Vec<Rate> {
        let Ok(inner) = self.inner.lock() else {
            return Vec::new();
        };
        let (Some((then, old)), Some((last, _))) = (inner.samples.front(), inner.samples.back())
        else {
            return Vec::new();
        };
        let seconds = last.duration_since(*then).as_secs_f64();
        if seconds <= 0.0 {
            return Vec::new();
        }
        let Some((_, newest)) = inner.samples.back() else {
            return Vec::new();
        };
        newest
            .iter()
            .map(|(key, &(requests, failures))| {
                let (r0, f0) = old.get(key).copied().unwrap_or((0, 0));
                let done = requests.saturating_sub(r0);
                let failed = failures.saturating_sub(f0).min(done);
                Rate {
                    caller: key.0.clone(),
                    route: key.1.clone(),
                    node: key.2.clone(),
                    requests_per_second: done as f64 / seconds,
                    success_rate: (done > 0).then(|| 100.0 * (done - failed) as f64 / done as f64),
                }
            })
            .collect()
    }
}

/// The routes canaries judge (`ROUTER/ROUTE` names).
pub fn canary_routes(state: &crate::validate::State) -> HashSet<String> {
    state
        .range(ResourceKey::new(Kind::Canary, "", "")..)
        .take_while(|(k, _)| k.kind == Kind::Canary)
        .filter_map(|(_, r)| match &r.spec {
            Spec::Canary(c) => Some(route_name(c)),
            _ => None,
        })
        .collect()
}

/// Every route name a proxy may report, as router routes (`ROUTER/ROUTE` of every router,
/// `SERVICE/default` of every virtual service).
pub fn route_names(state: &crate::validate::State) -> HashSet<String> {
    let mut names = HashSet::new();
    for (key, r) in state {
        match &r.spec {
            Spec::VirtualRouter(vr) => {
                names.extend(
                    vr.routes
                        .iter()
                        .map(|route| format!("{}/{}", key.name, route.name)),
                );
            }
            Spec::VirtualService(_) => {
                names.insert(format!("{}/default", key.name));
            }
            _ => {}
        }
    }
    names
}

/// How often a proxy reports routes no canary judges (the dashboard's rates).
pub const MEASURE_INTERVAL_IDLE: Duration = Duration::from_secs(5);

/// What a snapshot's proxy measures: every named route of its virtual hosts (the dashboard's
/// rates), every [`MEASURE_INTERVAL`] when a canary judges one of them, else every
/// [`MEASURE_INTERVAL_IDLE`]. None when it has no routes.
pub fn measure(state: &crate::validate::State, snapshot: &pb::Snapshot) -> Option<pb::Measure> {
    let mut routes: Vec<String> = snapshot
        .listeners
        .iter()
        .flat_map(|l| &l.virtual_hosts)
        .flat_map(|h| &h.routes)
        .filter(|r| !r.name.is_empty())
        .map(|r| r.name.clone())
        .collect();
    if routes.is_empty() {
        return None;
    }
    routes.sort();
    routes.dedup();
    let judged = canary_routes(state);
    let interval = if routes.iter().any(|r| judged.contains(router_route(r))) {
        MEASURE_INTERVAL
    } else {
        MEASURE_INTERVAL_IDLE
    };
    Some(pb::Measure {
        routes,
        interval: Some(trellis_proto::Duration {
            seconds: i64::try_from(interval.as_secs()).unwrap_or(1),
            nanos: 0,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateways_route_name_stands_for_its_routers() {
        assert_eq!(router_route("color/main"), "color/main");
        assert_eq!(router_route("web/color/main"), "color/main");
        assert_eq!(router_route("front/default"), "front/default");
        let m = Measurements::default();
        let gateway = |n| {
            report(
                &["web/color/main"],
                &[("web/color/main", "default/v2", n, 1)],
            )
        };
        m.record("g", "VirtualGateway/default/gw", &gateway(3));
        m.record("g", "VirtualGateway/default/gw", &gateway(10));
        assert_eq!(
            m.total("color/main", "default/v2").map(|c| c.requests),
            Some(7)
        );
        m.prune(|caller, _| caller != "VirtualGateway/default/gw");
        assert!(m.total("color/main", "default/v2").is_none());
    }

    fn counts(requests: u64, failures: u64, buckets: &[u64]) -> Counts {
        Counts {
            requests,
            failures,
            bounds: vec![0.01, 0.1, 1.0],
            buckets: buckets.to_vec(),
            bucketed: requests,
        }
    }

    fn report(routes: &[&str], pairs: &[(&str, &str, u64, u64)]) -> pb::Report {
        pb::Report {
            routes: pairs
                .iter()
                .map(
                    |&(route, cluster, requests, failures)| pb::RouteMeasurement {
                        route: route.into(),
                        cluster: cluster.into(),
                        requests,
                        failures,
                        bounds_seconds: vec![0.1],
                        counts: vec![requests],
                    },
                )
                .collect(),
            measured_routes: routes.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn the_p99_is_interpolated_within_its_bucket_and_beyond_the_last_bound_fails_any_gate() {
        // 100 requests: 50 by 10 ms, 98 by 100 ms, all by 1 s.
        let c = counts(100, 0, &[50, 98, 100]);
        // Rank 99 is the first of the two in (0.1, 1]: halfway.
        let p99 = c.quantile(0.99).unwrap();
        assert!((p99 - 0.55).abs() < 1e-9, "{p99}");
        let p50 = c.quantile(0.5).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        // Beyond the last bound: above any gate (shown as the last bound, flagged).
        assert_eq!(
            counts(10, 0, &[0, 0, 5]).quantile(0.99),
            Some(f64::INFINITY)
        );
        let over = counts(10, 0, &[0, 0, 5]).window();
        assert!(over.p99_over_last_bucket && over.p99_ms == Some(1000.0));
        assert_eq!(counts(0, 0, &[0, 0, 0]).quantile(0.99), None);
    }

    #[test]
    fn totals_count_what_each_process_counted_after_its_first_report() {
        let m = Measurements::default();
        // A process's first report on a route is its baseline: what came before is no step's.
        m.record(
            "a",
            "VirtualNode/default/front",
            &report(&["r/main"], &[("r/main", "default/v2", 500, 5)]),
        );
        assert_eq!(m.total("r/main", "default/v2").map_or(0, |c| c.requests), 0);
        m.record(
            "a",
            "VirtualNode/default/front",
            &report(&["r/main"], &[("r/main", "default/v2", 520, 6)]),
        );
        // Another process, and a pair new on a covered route (a port's cluster of the node).
        m.record(
            "b",
            "VirtualNode/default/front",
            &report(&["r/main"], &[("r/main", "default/v2", 7, 0)]),
        );
        m.record(
            "b",
            "VirtualNode/default/front",
            &report(
                &["r/main"],
                &[
                    ("r/main", "default/v2", 10, 1),
                    ("r/main", "default/v2:8080", 4, 4),
                ],
            ),
        );
        let total = m.total("r/main", "default/v2").unwrap();
        assert_eq!((total.requests, total.failures), (20 + 3 + 4, 1 + 1 + 4));
        // A counter that went back (a series dropped and made again) counts from zero.
        m.record(
            "a",
            "VirtualNode/default/front",
            &report(&["r/main"], &[("r/main", "default/v2", 2, 0)]),
        );
        assert_eq!(m.total("r/main", "default/v2").unwrap().requests, 29);
        assert!(m.total("r/main", "default/v1").is_none());
        // A stream that ends is forgotten: the process's next stream (here, or after another
        // control plane counted some of its requests) starts from a baseline again.
        m.forget("a");
        m.record(
            "a2",
            "VirtualNode/default/front",
            &report(&["r/main"], &[("r/main", "default/v2", 900, 6)]),
        );
        assert_eq!(m.total("r/main", "default/v2").unwrap().requests, 29);
        // Counts out of range saturate instead of wrapping or panicking.
        m.record(
            "a2",
            "VirtualNode/default/front",
            &report(&["r/main"], &[("r/main", "default/v2", u64::MAX, 6)]),
        );
        m.record(
            "b",
            "VirtualNode/default/front",
            &report(&["r/main"], &[("r/main", "default/v2", u64::MAX, 0)]),
        );
        assert_eq!(m.total("r/main", "default/v2").unwrap().requests, u64::MAX);
    }
}
