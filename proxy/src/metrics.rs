//! Prometheus metrics, on a registry passed in (never the global one). Label values are bounded:
//! listener, route, cluster, status class and error kind come from config or fixed sets.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http::StatusCode;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    inner: Arc<Vecs>,
}

#[derive(Debug)]
struct Vecs {
    requests: IntCounterVec,
    duration: HistogramVec,
    retries: IntCounterVec,
    connect_errors: IntCounterVec,
    overflows: IntCounterVec,
    ejections: IntCounterVec,
    ejected: IntGaugeVec,
    health_checks: IntCounterVec,
    health_unhealthy: IntGaugeVec,
    timeouts: IntCounterVec,
    errors: IntCounterVec,
    faults: IntCounterVec,
    spans_dropped: prometheus::IntCounter,
    mirrored: IntCounterVec,
    active_connections: IntGaugeVec,
    tls_refused: IntCounterVec,
    unauthorized: IntCounterVec,
    snapshot_info: IntGaugeVec,
    snapshot_applied: IntCounter,
    snapshot_rejected: IntCounter,
    access_log_dropped: IntCounter,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: T,
) -> prometheus::Result<T> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

impl ProxyMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let r = registry;
        let inner = Vecs {
            requests: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "trellis_proxy_requests_total",
                        "HTTP requests by route, cluster and status class",
                    ),
                    &["route", "cluster", "status_class"],
                )?,
            )?,
            duration: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "trellis_proxy_request_duration_seconds",
                        "Time from request to the end of the response",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["route", "cluster", "status_class"],
                )?,
            )?,
            retries: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "trellis_proxy_retries_total",
                        "Retry attempts sent, by cluster",
                    ),
                    &["cluster"],
                )?,
            )?,
            connect_errors: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "trellis_proxy_upstream_connect_errors_total",
                        "Failed or timed-out upstream connects, by cluster",
                    ),
                    &["cluster"],
                )?,
            )?,
            overflows: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "trellis_proxy_upstream_overflow_total",
                        "Requests refused by a cluster's connection pool limits (503 overflow), by cluster",
                    ),
                    &["cluster"],
                )?,
            )?,
            ejections: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "trellis_proxy_outlier_ejections_total",
                        "Endpoints ejected by outlier detection, by cluster",
                    ),
                    &["cluster"],
                )?,
            )?,
            ejected: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "trellis_proxy_outlier_ejected",
                        "Endpoints ejected by outlier detection now, by cluster",
                    ),
                    &["cluster"],
                )?,
            )?,
            health_checks: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "trellis_proxy_health_checks_total",
                        "Active health check probes by cluster and result (success, failure)",
                    ),
                    &["cluster", "result"],
                )?,
            )?,
            health_unhealthy: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "trellis_proxy_health_check_unhealthy",
                        "Endpoints failing their active health check now, by cluster",
                    ),
                    &["cluster"],
                )?,
            )?,
            timeouts: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "trellis_proxy_timeouts_total",
                        "Timeouts by kind (request, per_try, idle)",
                    ),
                    &["kind"],
                )?,
            )?,
            errors: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "trellis_proxy_errors_total",
                        "Requests answered by the proxy itself, by error kind",
                    ),
                    &["kind"],
                )?,
            )?,
            faults: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "trellis_proxy_faults_total",
                        "Faults routes injected, by kind (delay, abort)",
                    ),
                    &["kind"],
                )?,
            )?,
            spans_dropped: register(
                r,
                prometheus::IntCounter::new(
                    "trellis_proxy_spans_dropped_total",
                    "Trace spans dropped because the export queue was full",
                )?,
            )?,
            mirrored: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "trellis_proxy_mirrored_requests_total",
                        "Requests routes' mirrors drew, by outcome (sent, failed; not copied: body_too_large, incomplete, busy)",
                    ),
                    &["outcome"],
                )?,
            )?,
            active_connections: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "trellis_proxy_active_connections",
                        "Open downstream connections by listener",
                    ),
                    &["listener"],
                )?,
            )?,
            tls_refused: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "trellis_proxy_tls_handshake_failures_total",
                        "Downstream connections closed because their TLS handshake failed \
                         (plaintext under STRICT, a certificate refused), by listener",
                    ),
                    &["listener"],
                )?,
            )?,
            unauthorized: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "trellis_proxy_unauthorized_total",
                        "Requests and TCP connections refused because the caller may not call \
                         the listener, by listener and caller identity (\"\" without one)",
                    ),
                    &["listener", "source"],
                )?,
            )?,
            snapshot_info: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "trellis_proxy_snapshot_info",
                        "The applied snapshot's version (value 1)",
                    ),
                    &["version"],
                )?,
            )?,
            snapshot_applied: register(
                r,
                IntCounter::new("trellis_proxy_snapshot_applied_total", "Snapshots applied")?,
            )?,
            snapshot_rejected: register(
                r,
                IntCounter::new(
                    "trellis_proxy_snapshot_rejected_total",
                    "Snapshots rejected (the previous one kept serving)",
                )?,
            )?,
            access_log_dropped: register(
                r,
                IntCounter::new(
                    "trellis_proxy_access_log_dropped_total",
                    "Access log lines dropped because the writer fell behind",
                )?,
            )?,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Request metrics for one (route, cluster) pair; series appear on first use.
    pub fn requests(&self, route: &str, cluster: &str) -> RequestMetrics {
        RequestMetrics {
            vecs: self.inner.clone(),
            labels: [route.into(), cluster.into()],
            by_class: Default::default(),
            retired: AtomicBool::new(false),
        }
    }

    /// The request duration histograms (labels route, cluster, status_class) as they are now:
    /// what the control plane's measurements are read from, without the other families.
    pub fn request_durations(&self) -> Vec<prometheus::proto::MetricFamily> {
        prometheus::core::Collector::collect(&self.inner.duration)
    }

    /// Per-cluster counters; like request metrics, their series appear on first use, so a
    /// snapshot that is only compiled (checked by the control plane, or rejected) leaves none.
    pub fn cluster(&self, name: &str) -> ClusterMetrics {
        let name: Arc<str> = name.into();
        ClusterMetrics {
            retries: LazyCounter::new(&self.inner.retries, &name),
            connect_errors: LazyCounter::new(&self.inner.connect_errors, &name),
            overflows: LazyCounter::new(&self.inner.overflows, &name),
            ejections: LazyCounter::new(&self.inner.ejections, &name),
            ejected: Arc::new(LazyGauge {
                vec: self.inner.ejected.clone(),
                label: name.clone(),
                series: OnceLock::new(),
            }),
        }
    }

    /// Active health check metrics of one cluster; series appear on first use.
    pub fn health_check(&self, cluster: &Arc<str>) -> HealthCheckMetrics {
        HealthCheckMetrics {
            vecs: self.inner.clone(),
            cluster: cluster.clone(),
        }
    }

    pub fn timeout(&self, kind: &str) {
        self.inner.timeouts.with_label_values(&[kind]).inc();
    }

    pub fn error(&self, kind: &str) {
        self.inner.errors.with_label_values(&[kind]).inc();
    }

    /// Trace spans dropped (the export queue full).
    pub fn spans_dropped(&self) -> prometheus::IntCounter {
        self.inner.spans_dropped.clone()
    }

    /// A fault a route injected: `delay` or `abort`.
    pub fn fault(&self, kind: &str) {
        self.inner.faults.with_label_values(&[kind]).inc();
    }

    /// A request a route's mirror drew: `sent` (the copy was answered), `failed` (it was
    /// not), or not copied: `body_too_large`, `incomplete` (the body did not arrive whole),
    /// `busy` (too many copies in flight).
    pub fn mirror(&self, outcome: &str) {
        self.inner.mirrored.with_label_values(&[outcome]).inc();
    }

    pub fn tls_refused(&self, listener: &str) {
        self.inner.tls_refused.with_label_values(&[listener]).inc();
    }

    pub fn unauthorized(&self, listener: &str, source: Option<&str>) {
        self.inner
            .unauthorized
            .with_label_values(&[listener, source.unwrap_or("")])
            .inc();
    }

    pub fn active_connections(&self, listener: &str) -> IntGauge {
        self.inner.active_connections.with_label_values(&[listener])
    }

    pub fn snapshot_applied(&self, version: &str) {
        self.inner.snapshot_info.reset();
        self.inner
            .snapshot_info
            .with_label_values(&[version])
            .set(1);
        self.inner.snapshot_applied.inc();
    }

    pub fn snapshot_rejected(&self) {
        self.inner.snapshot_rejected.inc();
    }

    pub fn access_log_dropped(&self) {
        self.inner.access_log_dropped.inc();
    }
}

/// Per-cluster counters.
#[derive(Debug)]
pub struct ClusterMetrics {
    pub retries: LazyCounter,
    pub connect_errors: LazyCounter,
    pub overflows: LazyCounter,
    pub ejections: LazyCounter,
    /// Shared with the timers that end ejections.
    pub ejected: Arc<LazyGauge>,
}

impl ClusterMetrics {
    /// Drops the cluster's series: a reload removed it.
    pub fn retire(&self) {
        self.retries.retire();
        self.connect_errors.retire();
        self.overflows.retire();
        self.ejections.retire();
        // The ejected gauge stays while ejections of the cluster's endpoints last: their
        // state outlives the snapshot, and their timers bring the gauge back to 0.
    }
}

/// A cluster's active health check series, shared by the checkers of its endpoints (probes
/// are rare: each looks its series up).
#[derive(Debug, Clone)]
pub struct HealthCheckMetrics {
    vecs: Arc<Vecs>,
    cluster: Arc<str>,
}

impl HealthCheckMetrics {
    pub fn probe(&self, healthy: bool) {
        let result = if healthy { "success" } else { "failure" };
        self.vecs
            .health_checks
            .with_label_values(&[&*self.cluster, result])
            .inc();
    }

    /// One more (`1`) or one fewer (`-1`) unhealthy endpoint.
    pub fn unhealthy(&self, delta: i64) {
        self.vecs
            .health_unhealthy
            .with_label_values(&[&*self.cluster])
            .add(delta);
    }

    /// Drops the probe counters: a reload removed the cluster (its checkers are stopped, and
    /// the unhealthy gauge is back at 0).
    pub fn retire(&self) {
        for result in ["success", "failure"] {
            let _ = self
                .vecs
                .health_checks
                .remove_label_values(&[&*self.cluster, result]);
        }
        let _ = self
            .vecs
            .health_unhealthy
            .remove_label_values(&[&*self.cluster]);
    }
}

/// One gauge series, created on first use.
#[derive(Debug)]
pub struct LazyGauge {
    vec: IntGaugeVec,
    label: Arc<str>,
    series: OnceLock<IntGauge>,
}

impl LazyGauge {
    fn series(&self) -> &IntGauge {
        self.series
            .get_or_init(|| self.vec.with_label_values(&[&*self.label]))
    }

    pub fn inc(&self) {
        self.series().inc();
    }

    pub fn dec(&self) {
        self.series().dec();
    }
}

/// One counter series, created on its first increment and never again once retired.
#[derive(Debug)]
pub struct LazyCounter {
    vec: IntCounterVec,
    label: Arc<str>,
    series: OnceLock<IntCounter>,
    retired: AtomicBool,
}

impl LazyCounter {
    fn new(vec: &IntCounterVec, label: &Arc<str>) -> Self {
        Self {
            vec: vec.clone(),
            label: label.clone(),
            series: OnceLock::new(),
            retired: AtomicBool::new(false),
        }
    }

    pub fn inc(&self) {
        match self.series.get() {
            Some(series) => series.inc(),
            None if self.retired.load(Ordering::Relaxed) => {}
            None => self
                .series
                .get_or_init(|| self.vec.with_label_values(&[&*self.label]))
                .inc(),
        }
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        // An absent series (never created) is not an error worth reporting.
        let _ = self.vec.remove_label_values(&[&*self.label]);
    }
}

/// Request count and latency for one (route, cluster) pair.
#[derive(Debug)]
pub struct RequestMetrics {
    vecs: Arc<Vecs>,
    labels: [Box<str>; 2],
    by_class: [OnceLock<(IntCounter, Histogram)>; 5],
    /// Set when a reload removed the pair: its series are dropped and not created again.
    retired: AtomicBool,
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl RequestMetrics {
    pub fn observe(&self, status: StatusCode, elapsed: Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        let Some(slot) = self.by_class.get(class) else {
            return;
        };
        let (count, latency) = match slot.get() {
            Some(series) => series,
            // A request still finishing on a retired snapshot does not bring its series back.
            None if self.retired.load(Ordering::Relaxed) => return,
            None => slot.get_or_init(|| {
                let labels = [&*self.labels[0], &*self.labels[1], STATUS_CLASSES[class]];
                (
                    self.vecs.requests.with_label_values(&labels),
                    self.vecs.duration.with_label_values(&labels),
                )
            }),
        };
        count.inc();
        latency.observe(elapsed.as_secs_f64());
    }

    /// The (route, cluster) labels.
    pub fn labels(&self) -> (&str, &str) {
        (&self.labels[0], &self.labels[1])
    }

    /// Drops this pair's series: a reload removed the route or its cluster.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        for class in STATUS_CLASSES {
            let labels = [&*self.labels[0], &*self.labels[1], class];
            let _ = self.vecs.requests.remove_label_values(&labels);
            let _ = self.vecs.duration.remove_label_values(&labels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn observe_by_status_class() {
        let registry = Registry::new();
        let m = ProxyMetrics::new(&registry).unwrap();
        let rm = m.requests("r", "c");
        rm.observe(StatusCode::OK, Duration::from_millis(2));
        rm.observe(StatusCode::SERVICE_UNAVAILABLE, Duration::from_millis(2));
        rm.observe(StatusCode::NO_CONTENT, Duration::from_millis(2));
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(
            r#"trellis_proxy_requests_total{cluster="c",route="r",status_class="2xx"} 2"#
        ));
        assert!(text.contains(
            r#"trellis_proxy_requests_total{cluster="c",route="r",status_class="5xx"} 1"#
        ));
    }
}
