//! Choosing where a request goes: a weighted target (cluster), then an endpoint of that cluster.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use crate::{
    metrics::RequestMetrics,
    upstream::{Cluster, EndpointState, LbPolicy, SlowStart},
};

/// A route's targets with cumulative weights. Targets of weight 0 are dropped at compile time.
#[derive(Debug)]
pub struct WeightedTargets {
    targets: Box<[Target]>,
}

/// One weighted target of a route.
#[derive(Debug)]
pub struct Target {
    pub cluster: Arc<Cluster>,
    /// Requests and latency for this (route, cluster) pair.
    pub metrics: Arc<RequestMetrics>,
    /// Cumulative weight up to and including this target.
    cumulative: u32,
}

impl WeightedTargets {
    pub(crate) fn new(
        targets: impl IntoIterator<Item = (Arc<Cluster>, u32, RequestMetrics)>,
    ) -> Self {
        let mut total = 0u32;
        let targets = targets
            .into_iter()
            .filter(|(_, w, _)| *w > 0)
            .map(|(cluster, w, metrics)| {
                total = total.saturating_add(w);
                Target {
                    cluster,
                    metrics: Arc::new(metrics),
                    cumulative: total,
                }
            })
            .collect();
        Self { targets }
    }

    /// A target chosen with probability weight / total.
    pub fn pick(&self) -> Option<&Target> {
        match &*self.targets {
            [] => None,
            [only] => Some(only),
            targets => {
                let total = targets.last().map_or(0, |t| t.cumulative);
                self.pick_at(fastrand::u32(0..total.max(1)))
            }
        }
    }

    /// The target owning point `r` in [0, total).
    fn pick_at(&self, r: u32) -> Option<&Target> {
        let i = self.targets.partition_point(|t| t.cumulative <= r);
        self.targets.get(i)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.targets.iter()
    }
}

impl Cluster {
    /// An endpoint for a new attempt, avoiding those in `avoid` while another is healthy.
    /// Endpoints ejected by outlier detection or failing their active health check are skipped
    /// like unhealthy ones (only clusters with outlier detection or a health check look).
    /// `key`: the request's hash on a RING_HASH or MAGLEV cluster (then its place decides).
    pub fn pick(
        &self,
        avoid: &[Arc<EndpointState>],
        key: Option<u64>,
    ) -> Option<Arc<EndpointState>> {
        if let (Some(hashing), Some(key)) = (&self.hashing, key)
            && let Some(e) = self.pick_hashed(hashing, key, avoid)
        {
            return Some(e);
        }
        if let Some(local) = &self.local_zone {
            let checks = self.outlier.is_some() || self.health_check.is_some();
            let in_service = local
                .endpoints
                .iter()
                .filter(|e| !(checks && self.is_out(e)));
            let (mut count, mut untried) = (0, 0);
            for e in in_service {
                count += 1;
                if !avoid.iter().any(|a| Arc::ptr_eq(a, e)) {
                    untried += 1;
                }
            }
            // Enough in the zone, and one this request has not tried (else a retry or a
            // connect attempt goes to another zone).
            if count >= local.min && untried > 0 {
                return self.pick_among(&local.endpoints, avoid);
            }
        }
        self.pick_among(&self.healthy, avoid)
    }

    /// An endpoint of `endpoints` that is in service, avoiding those in `avoid` while another
    /// is left.
    fn pick_among(
        &self,
        endpoints: &[Arc<EndpointState>],
        avoid: &[Arc<EndpointState>],
    ) -> Option<Arc<EndpointState>> {
        if (self.outlier.is_some() || self.health_check.is_some())
            && endpoints.iter().any(|e| self.is_out(e))
        {
            let left: Vec<Arc<EndpointState>> = endpoints
                .iter()
                .filter(|e| !self.is_out(e))
                .cloned()
                .collect();
            return self.pick_from(&left, avoid);
        }
        self.pick_from(endpoints, avoid)
    }

    fn pick_from(
        &self,
        endpoints: &[Arc<EndpointState>],
        avoid: &[Arc<EndpointState>],
    ) -> Option<Arc<EndpointState>> {
        match (&self.slow_start, self.ramping_until) {
            (Some(slow), Some(until)) if std::time::Instant::now() < until => {
                slow.pick(self.lb, endpoints, &self.cursor, avoid).cloned()
            }
            _ => pick(self.lb, endpoints, &self.cursor, avoid).cloned(),
        }
    }

    /// The first of the key's candidates that is in and not avoided; none among them: as
    /// without a key.
    fn pick_hashed(
        &self,
        hashing: &crate::hash_lb::Hashing,
        key: u64,
        avoid: &[Arc<EndpointState>],
    ) -> Option<Arc<EndpointState>> {
        let checks = self.outlier.is_some() || self.health_check.is_some();
        hashing
            .table
            .candidates(key)
            .filter_map(|i| self.healthy.get(i))
            .find(|e| {
                let out = checks && self.is_out(e);
                let tried = avoid.iter().any(|a| Arc::ptr_eq(a, e));
                !out && !tried
            })
            .cloned()
    }

    /// Whether an endpoint is out for now: ejected, or failing its health check.
    fn is_out(&self, e: &EndpointState) -> bool {
        (self.outlier.is_some() && e.outlier.is_ejected())
            || (self.health_check.is_some() && e.health.is_unhealthy())
    }
}

impl SlowStart {
    /// An endpoint's weight now, in (0, 1].
    fn weight(&self, e: &EndpointState, now: std::time::Instant) -> f64 {
        let Some(added) = e.added else { return 1.0 };
        let age = now.saturating_duration_since(added);
        if age >= self.window {
            return 1.0;
        }
        let ramp = (age.as_secs_f64() / self.window.as_secs_f64()).powf(1.0 / self.aggression);
        ramp.max(self.min_weight)
    }

    /// As [`pick`], with endpoints in their window taken by weight: round robin and random keep
    /// a choice with the probability of its weight, else choose again; least request compares
    /// the requests in flight of two choices drawn so.
    fn pick<'a>(
        &self,
        policy: LbPolicy,
        endpoints: &'a [Arc<EndpointState>],
        cursor: &AtomicUsize,
        avoid: &[Arc<EndpointState>],
    ) -> Option<&'a Arc<EndpointState>> {
        let now = std::time::Instant::now();
        let n = endpoints.len();
        if n < 2 {
            return pick(policy, endpoints, cursor, avoid);
        }
        if policy == LbPolicy::LeastRequest {
            // Two different choices, each drawn by weight; the one with fewer requests in
            // flight.
            let a = self.pick(LbPolicy::Random, endpoints, cursor, avoid)?;
            let mut b = a;
            for _ in 0..4 * n {
                b = self.pick(LbPolicy::Random, endpoints, cursor, avoid)?;
                if !Arc::ptr_eq(a, b) {
                    break;
                }
            }
            let avoided = |e: &Arc<EndpointState>| avoid.iter().any(|x| Arc::ptr_eq(x, e));
            return Some(match (avoided(a), avoided(b)) {
                (false, true) => a,
                (true, false) => b,
                _ if b.in_flight() < a.in_flight() => b,
                _ => a,
            });
        }
        // A choice kept with the probability of its weight, else another drawn (a few times
        // per endpoint at most; then the heaviest seen): shares go as the weights.
        let mut best: Option<(&Arc<EndpointState>, f64)> = None;
        for _ in 0..4 * n {
            let e = pick(policy, endpoints, cursor, avoid)?;
            let w = self.weight(e, now);
            if w >= 1.0 || fastrand::f64() < w {
                return Some(e);
            }
            if best.is_none_or(|(_, bw)| w > bw) {
                best = Some((e, w));
            }
        }
        best.map(|(e, _)| e)
    }
}

/// Picks an endpoint, avoiding those in `avoid` (the ones earlier attempts failed on) while any
/// other is left.
pub(crate) fn pick<'a>(
    policy: LbPolicy,
    endpoints: &'a [Arc<EndpointState>],
    cursor: &AtomicUsize,
    avoid: &[Arc<EndpointState>],
) -> Option<&'a Arc<EndpointState>> {
    let n = endpoints.len();
    let avoided = |i: usize| {
        endpoints
            .get(i)
            .is_some_and(|e| avoid.iter().any(|a| Arc::ptr_eq(a, e)))
    };
    let load = |i: usize| endpoints.get(i).map_or(usize::MAX, |e| e.in_flight());
    let i = match n {
        0 => return None,
        1 => 0,
        _ => match policy {
            LbPolicy::RoundRobin => cursor.fetch_add(1, Ordering::Relaxed) % n,
            // A hashing cluster's request without its key: at random.
            LbPolicy::Random | LbPolicy::RingHash | LbPolicy::Maglev => fastrand::usize(0..n),
            LbPolicy::LeastRequest => {
                let a = fastrand::usize(0..n);
                // A second, different index.
                let b = (a + 1 + fastrand::usize(0..n - 1)) % n;
                match (avoided(a), avoided(b)) {
                    (false, true) => a,
                    (true, false) => b,
                    _ if load(b) < load(a) => b,
                    _ => a,
                }
            }
            LbPolicy::PeakEwma => {
                let a = fastrand::usize(0..n);
                let b = (a + 1 + fastrand::usize(0..n - 1)) % n;
                let now = std::time::Instant::now();
                // Latency × (requests in flight + 1): the expected wait of one more.
                #[allow(clippy::cast_precision_loss)]
                let cost = |i: usize| {
                    endpoints.get(i).map_or(f64::INFINITY, |e| {
                        e.latency.estimate(now) * (e.in_flight() as f64 + 1.0)
                    })
                };
                match (avoided(a), avoided(b)) {
                    (false, true) => a,
                    (true, false) => b,
                    _ if cost(b) < cost(a) => b,
                    _ => a,
                }
            }
        },
    };
    if avoid.is_empty() || !avoided(i) {
        return endpoints.get(i);
    }
    // The choice was tried already: the next one that was not, else the choice itself.
    (1..n)
        .map(|k| (i + k) % n)
        .find(|&j| !avoided(j))
        .or(Some(i))
        .and_then(|j| endpoints.get(j))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::test_cluster;

    fn target(name: &str, weight: u32) -> (Arc<Cluster>, u32, RequestMetrics) {
        let m = crate::metrics::ProxyMetrics::new(&prometheus::Registry::new()).unwrap();
        (test_cluster(name, &[]), weight, m.requests("r", name))
    }

    /// Peak EWMA sends most requests to the endpoint that answers faster, and still some to
    /// the slower one.
    #[test]
    fn peak_ewma_prefers_the_faster_endpoint() {
        let now = std::time::Instant::now();
        let fast = Arc::new(EndpointState::new("fast", crate::upstream::Protocol::Http1));
        let slow = Arc::new(EndpointState::new("slow", crate::upstream::Protocol::Http1));
        fast.latency
            .sample(std::time::Duration::from_millis(5), now);
        slow.latency
            .sample(std::time::Duration::from_millis(50), now);
        let eps = [fast, slow];
        let cursor = AtomicUsize::new(0);
        let to_fast = (0..1000)
            .filter(|_| &*pick(LbPolicy::PeakEwma, &eps, &cursor, &[]).unwrap().addr == "fast")
            .count();
        // Two choices of two: always both, the cheaper wins while nothing is in flight.
        assert_eq!(to_fast, 1000);
        // Loaded with 20 requests in flight, the fast one costs more (5 × 21 > 50 × 1).
        for _ in 0..20 {
            std::mem::forget(eps[0].begin_request());
        }
        assert_eq!(
            &*pick(LbPolicy::PeakEwma, &eps, &cursor, &[]).unwrap().addr,
            "slow"
        );
    }

    /// A new endpoint's share ramps with its age; an old one's is whole.
    #[test]
    fn slow_start_ramps_a_new_endpoints_share() {
        let now = std::time::Instant::now();
        let endpoint = |addr: &str, age: u64| {
            let mut e = EndpointState::new(addr, crate::upstream::Protocol::Http1);
            e.added = Some(now - std::time::Duration::from_secs(age));
            Arc::new(e)
        };
        let slow = SlowStart {
            window: std::time::Duration::from_secs(100),
            aggression: 1.0,
            min_weight: 0.1,
        };
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::Random,
            LbPolicy::LeastRequest,
        ] {
            let share = |new_age: u64| {
                let old = Arc::new(EndpointState::new("old", crate::upstream::Protocol::Http1));
                let eps = [old, endpoint("new", new_age)];
                let cursor = AtomicUsize::new(0);
                let picks = 20_000;
                let new = (0..picks)
                    .filter(|_| &*slow.pick(policy, &eps, &cursor, &[]).unwrap().addr == "new")
                    .count();
                new as f64 / f64::from(picks)
            };
            // Just added: weight 0.1 (the minimum) against 1.
            let fresh = share(0);
            assert!(fresh < 0.2, "{policy:?}: {fresh}");
            // Half way: weight 0.5.
            let half = share(50);
            assert!(half > fresh + 0.1 && half < 0.45, "{policy:?}: {half}");
            // Past the window: an equal share.
            let whole = share(100);
            assert!((0.45..0.55).contains(&whole), "{policy:?}: {whole}");
        }
    }

    #[test]
    fn weights_split_by_ratio() {
        let wt = WeightedTargets::new([target("a", 90), target("zero", 0), target("b", 10)]);
        // Exhaustive over the weight space: exactly 90 points go to a, 10 to b, none to zero.
        let mut counts = std::collections::HashMap::<String, u32>::new();
        for r in 0..100 {
            let t = wt.pick_at(r).unwrap();
            *counts.entry(t.cluster.name.to_string()).or_default() += 1;
        }
        assert_eq!(counts.get("a"), Some(&90));
        assert_eq!(counts.get("b"), Some(&10));
        assert_eq!(counts.get("zero"), None);
        assert!(wt.pick_at(100).is_none());
    }

    #[test]
    fn single_and_empty_targets() {
        let one = WeightedTargets::new([target("a", 3)]);
        assert_eq!(&*one.pick().unwrap().cluster.name, "a");
        assert!(WeightedTargets::new([target("a", 0)]).pick().is_none());
    }

    /// A zone-aware cluster keeps to its zone's endpoints while enough are in, goes to every
    /// zone when fewer are, and when the request tried every one of its zone.
    #[test]
    fn zone_aware_picks_keep_to_the_zone_while_it_has_enough() {
        let mut c = Arc::try_unwrap(test_cluster(
            "c",
            &["10.0.0.1:1", "10.0.0.2:1", "10.0.1.1:1"],
        ))
        .unwrap();
        let local: Vec<_> = c.healthy[..2].to_vec();
        c.local_zone = Some(Box::new(crate::upstream::LocalZone {
            endpoints: local.clone(),
            min: 2,
        }));
        let picks: std::collections::HashSet<String> = (0..30)
            .map(|_| c.pick(&[], None).unwrap().addr.to_string())
            .collect();
        assert_eq!(picks.len(), 2, "{picks:?}");
        assert!(!picks.contains("10.0.1.1:1"));
        // The request tried both: another zone.
        assert_eq!(&*c.pick(&local, None).unwrap().addr, "10.0.1.1:1");
        // Tried one: the other of the zone.
        assert_eq!(&*c.pick(&local[..1], None).unwrap().addr, "10.0.0.2:1");
        // Fewer than the minimum: every zone.
        c.local_zone = Some(Box::new(crate::upstream::LocalZone {
            endpoints: local[..1].to_vec(),
            min: 2,
        }));
        let picks: std::collections::HashSet<String> = (0..30)
            .map(|_| c.pick(&[], None).unwrap().addr.to_string())
            .collect();
        assert_eq!(picks.len(), 3, "{picks:?}");
    }

    #[test]
    fn round_robin_cycles_and_avoids() {
        let c = test_cluster("c", &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let eps = &c.healthy;
        let cursor = AtomicUsize::new(0);
        let picks: Vec<_> = (0..6)
            .map(|_| {
                pick(LbPolicy::RoundRobin, eps, &cursor, &[])
                    .unwrap()
                    .addr
                    .to_string()
            })
            .collect();
        assert_eq!(
            picks,
            [
                "127.0.0.1:1",
                "127.0.0.1:2",
                "127.0.0.1:3",
                "127.0.0.1:1",
                "127.0.0.1:2",
                "127.0.0.1:3"
            ]
        );
        for _ in 0..10 {
            let got = pick(LbPolicy::RoundRobin, eps, &cursor, &eps[1..2]).unwrap();
            assert!(!Arc::ptr_eq(got, &eps[1]));
        }
    }

    #[test]
    fn every_tried_endpoint_is_avoided_while_others_remain() {
        let c = test_cluster("c", &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let cursor = AtomicUsize::new(0);
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest,
            LbPolicy::Random,
        ] {
            for _ in 0..50 {
                let got = pick(policy, &c.healthy, &cursor, &c.healthy[..2]).unwrap();
                assert_eq!(&*got.addr, "127.0.0.1:3", "{policy:?}");
            }
            // All tried: still an answer.
            assert!(pick(policy, &c.healthy, &cursor, &c.healthy).is_some());
        }
    }

    #[test]
    fn avoid_is_ignored_with_one_endpoint() {
        let c = test_cluster("c", &["127.0.0.1:1"]);
        let cursor = AtomicUsize::new(0);
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest,
            LbPolicy::Random,
        ] {
            let got = pick(policy, &c.healthy, &cursor, &c.healthy[..1]);
            assert!(got.is_some(), "{policy:?}");
        }
        assert!(pick(LbPolicy::Random, &[], &cursor, &[]).is_none());
    }

    #[test]
    fn least_request_prefers_idle_endpoints() {
        let c = test_cluster("c", &["127.0.0.1:1", "127.0.0.1:2"]);
        let busy = c.healthy[0].begin_request();
        let _busier = c.healthy[0].begin_request();
        let cursor = AtomicUsize::new(0);
        // With two endpoints both are always compared, so the idle one always wins.
        for _ in 0..100 {
            let got = pick(LbPolicy::LeastRequest, &c.healthy, &cursor, &[]).unwrap();
            assert_eq!(&*got.addr, "127.0.0.1:2");
        }
        drop(busy);
        for _ in 0..100 {
            let got = pick(
                LbPolicy::LeastRequest,
                &c.healthy,
                &cursor,
                &c.healthy[1..2],
            )
            .unwrap();
            assert_eq!(&*got.addr, "127.0.0.1:1", "avoid wins over load");
        }
    }

    #[test]
    fn least_request_spreads_over_many() {
        let addrs: Vec<String> = (1..=5).map(|p| format!("127.0.0.1:{p}")).collect();
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let c = test_cluster("c", &refs);
        let cursor = AtomicUsize::new(0);
        let mut guards = Vec::new();
        // Hold every picked request open: P2C must keep the load within 2 of even.
        for _ in 0..50 {
            let ep = pick(LbPolicy::LeastRequest, &c.healthy, &cursor, &[]).unwrap();
            guards.push(ep.begin_request());
        }
        let loads: Vec<usize> = c.healthy.iter().map(|e| e.in_flight()).collect();
        let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
        assert!(max - min <= 5, "uneven least-request spread {loads:?}");
    }
}
