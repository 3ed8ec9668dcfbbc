//! Measurements for the control plane: when the running snapshot's `measure` lists routes (a
//! canary is judged on them), the config stream carries, every interval and while they change,
//! each (route, cluster) pair's cumulative request count, 5xx count and latency buckets, read
//! from the proxy's own request metrics. Nothing runs per request: the counts are the ones
//! Prometheus scrapes.

use std::time::Duration;

use std::collections::HashSet;

use trellis_proto::v1 as pb;

use crate::metrics::ProxyMetrics;

/// How often a proxy whose snapshot asks for nothing looks again.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

/// The measurement interval `measure` asks for (checked by the compiler: 100 ms to 60 s).
pub fn interval(measure: &pb::Measure) -> Duration {
    measure
        .interval
        .as_ref()
        .and_then(|d| {
            Some(Duration::new(
                u64::try_from(d.seconds).ok()?,
                u32::try_from(d.nanos).ok()?,
            ))
        })
        .filter(|d| !d.is_zero())
        .unwrap_or(IDLE_CHECK)
}

/// The cumulative counts of every (route, cluster) pair of `routes` that has served requests,
/// in (route, cluster) order.
pub fn measure(metrics: &ProxyMetrics, routes: &[String]) -> pb::Report {
    let wanted: HashSet<&str> = routes.iter().map(String::as_str).collect();
    let mut out: Vec<pb::RouteMeasurement> = Vec::new();
    for family in metrics.request_durations() {
        for metric in family.get_metric() {
            let label = |name: &str| {
                metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value())
                    .unwrap_or_default()
            };
            let route = label("route");
            if !wanted.contains(route) {
                continue;
            }
            let cluster = label("cluster");
            let failed = label("status_class") == "5xx";
            let histogram = metric.get_histogram();
            let at = match out
                .binary_search_by(|m| (m.route.as_str(), m.cluster.as_str()).cmp(&(route, cluster)))
            {
                Ok(at) => at,
                Err(at) => {
                    out.insert(
                        at,
                        pb::RouteMeasurement {
                            route: route.to_string(),
                            cluster: cluster.to_string(),
                            bounds_seconds: histogram
                                .get_bucket()
                                .iter()
                                .map(|b| b.upper_bound())
                                .collect(),
                            counts: vec![0; histogram.get_bucket().len()],
                            ..Default::default()
                        },
                    );
                    at
                }
            };
            let Some(m) = out.get_mut(at) else { continue };
            let count = histogram.get_sample_count();
            m.requests += count;
            if failed {
                m.failures += count;
            }
            for (sum, bucket) in m.counts.iter_mut().zip(histogram.get_bucket()) {
                *sum += bucket.cumulative_count();
            }
        }
    }
    pb::Report {
        routes: out,
        measured_routes: routes.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::StatusCode;

    use super::*;

    #[test]
    fn a_report_sums_status_classes_and_counts_5xx_as_failures_for_the_listed_routes_only() {
        let metrics = ProxyMetrics::new(&prometheus::Registry::new()).unwrap();
        let canary = metrics.requests("router/main", "default/v2");
        let stable = metrics.requests("router/main", "default/v1");
        let other = metrics.requests("other/main", "default/v1");
        for _ in 0..3 {
            canary.observe(StatusCode::OK, Duration::from_millis(2));
        }
        canary.observe(StatusCode::SERVICE_UNAVAILABLE, Duration::from_millis(700));
        stable.observe(StatusCode::NOT_FOUND, Duration::from_millis(2));
        other.observe(StatusCode::OK, Duration::from_millis(2));

        let report = measure(&metrics, &["router/main".to_string()]);
        let pairs: Vec<_> = report
            .routes
            .iter()
            .map(|m| (m.route.as_str(), m.cluster.as_str(), m.requests, m.failures))
            .collect();
        assert_eq!(
            pairs,
            [
                ("router/main", "default/v1", 1, 0),
                ("router/main", "default/v2", 4, 1)
            ]
        );
        let v2 = &report.routes[1];
        assert_eq!(v2.bounds_seconds.len(), v2.counts.len());
        let at = |bound: f64| {
            let i = v2.bounds_seconds.iter().position(|b| *b == bound).unwrap();
            v2.counts[i]
        };
        // Three within 2.5 ms, the fourth only by 1 s.
        assert_eq!(at(0.0025), 3);
        assert_eq!(at(0.5), 3);
        assert_eq!(at(1.0), 4);
        assert!(measure(&metrics, &[]).routes.is_empty());
    }
}
