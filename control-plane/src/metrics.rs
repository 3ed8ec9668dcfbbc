//! The control plane's Prometheus metrics, on a registry of its own (never the global one):
//! connected proxies, pushes, ACKs and NACKs, how long a push takes to be acknowledged, how many
//! proxies run something else than they should, and how long an apply takes. Labels are bounded
//! (proxy kind, outcome); node names are not labels.

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// The store's operations, as `op` labels.
pub const STORE_OPS: [&str; 7] = [
    "list",
    "get",
    "apply",
    "watch",
    "grant_lease",
    "keep_alive",
    "revoke",
];

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Clone)]
pub struct ControlMetrics {
    registry: Registry,
    pub connected: IntGauge,
    pub out_of_sync: IntGauge,
    /// Snapshots sent, by proxy kind (sidecar, gateway).
    pub pushes: IntCounterVec,
    /// Answers to pushes, by outcome (ack, nack).
    pub answers: IntCounterVec,
    /// From a push to its ACK.
    pub ack_latency: Histogram,
    /// From an apply request to its store write (validation included).
    pub apply_latency: Histogram,
    /// Each store call, by operation (list, get, apply, watch, grant_lease, keep_alive,
    /// revoke).
    pub store_latency: HistogramVec,
    /// Store calls that failed, by operation.
    pub store_errors: IntCounterVec,
    /// When the mesh CA's signing root expires (Unix seconds); 0 without a CA.
    pub ca_expiry: IntGauge,
}

impl ControlMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let connected = IntGauge::new(
            "trellis_control_connected_proxies",
            "Proxies with an open config stream",
        )?;
        let out_of_sync = IntGauge::new(
            "trellis_control_proxies_out_of_sync",
            "Connected proxies that have not acknowledged the snapshot they should run",
        )?;
        let pushes = IntCounterVec::new(
            Opts::new("trellis_control_pushes_total", "Snapshots sent to proxies"),
            &["kind"],
        )?;
        let answers = IntCounterVec::new(
            Opts::new(
                "trellis_control_push_answers_total",
                "Proxies' answers to pushed snapshots, by outcome (ack, nack)",
            ),
            &["outcome"],
        )?;
        let ack_latency = Histogram::with_opts(
            HistogramOpts::new(
                "trellis_control_push_ack_seconds",
                "Time from a push to the proxy's ACK",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let apply_latency = Histogram::with_opts(
            HistogramOpts::new(
                "trellis_control_apply_seconds",
                "Time to validate and store an apply",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let store_latency = HistogramVec::new(
            HistogramOpts::new(
                "trellis_control_store_seconds",
                "Time of each call to the store (embedded or etcd), by operation",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["op"],
        )?;
        let store_errors = IntCounterVec::new(
            Opts::new(
                "trellis_control_store_errors_total",
                "Store calls that failed, by operation",
            ),
            &["op"],
        )?;
        let ca_expiry = IntGauge::new(
            "trellis_control_ca_root_expiry_timestamp_seconds",
            "When the mesh CA's signing root certificate expires (Unix seconds; 0 without a CA)",
        )?;
        // Every series an alert watches exists from the start at 0: `increase()` sees the first
        // NACK or store failure (a series born at 1 shows no increase).
        for outcome in ["ack", "nack"] {
            answers.with_label_values(&[outcome]);
        }
        for op in STORE_OPS {
            store_errors.with_label_values(&[op]);
        }
        registry.register(Box::new(store_latency.clone()))?;
        registry.register(Box::new(store_errors.clone()))?;
        registry.register(Box::new(ca_expiry.clone()))?;
        registry.register(Box::new(connected.clone()))?;
        registry.register(Box::new(out_of_sync.clone()))?;
        registry.register(Box::new(pushes.clone()))?;
        registry.register(Box::new(answers.clone()))?;
        registry.register(Box::new(ack_latency.clone()))?;
        registry.register(Box::new(apply_latency.clone()))?;
        Ok(Self {
            registry,
            connected,
            out_of_sync,
            pushes,
            answers,
            ack_latency,
            apply_latency,
            store_latency,
            store_errors,
            ca_expiry,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut out = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &self.registry.gather(),
            &mut out,
        )?;
        Ok(out)
    }
}
