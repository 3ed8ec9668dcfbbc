//! Span export over OTLP/gRPC: a queue per (collector, service) and the task that sends its
//! spans in batches. The tracers of successive snapshots share a queue through the upstreams'
//! registry while they export alike, so a config push opens no new connection.

use std::{sync::OnceLock, time::Duration};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use tokio::sync::mpsc;

/// Spans waiting for export at most; beyond, new ones are dropped (counted).
const QUEUE: usize = 4096;
/// Spans sent per export at most, and how long a span waits for a batch at most.
const BATCH: usize = 512;
const FLUSH: Duration = Duration::from_secs(1);

/// Where spans wait for their collector. The export task starts with the first span (not when
/// a snapshot is only checked), and ends once the queue is dropped and what it held is sent.
#[derive(Debug)]
pub struct SpanQueue {
    collector: String,
    service: String,
    queue: OnceLock<mpsc::Sender<Span>>,
}

impl SpanQueue {
    pub fn new(collector: String, service: String) -> Self {
        Self {
            collector,
            service,
            queue: OnceLock::new(),
        }
    }

    /// Queues `span`; false (dropped) when the queue is full.
    pub fn send(&self, span: Span) -> bool {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(export(self.collector.clone(), self.service.clone(), rx));
            tx
        });
        queue.try_send(span).is_ok()
    }
}

/// A string attribute.
pub(crate) fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
    }
}

/// Sends the queue's spans to `collector` (OTLP/gRPC, plaintext) in batches, until the queue
/// closes (the snapshot's tracer is gone) and what it held is sent. A failed export is logged
/// and its spans dropped: tracing never holds requests.
async fn export(collector: String, service: String, mut rx: mpsc::Receiver<Span>) {
    let endpoint = if collector.contains("://") {
        collector.clone()
    } else {
        format!("http://{collector}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(endpoint).map(|e| {
        e.connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
    });
    let Ok(channel) = endpoint else {
        tracing::warn!(%collector, "tracing collector address invalid; spans are dropped");
        return;
    };
    let mut client = TraceServiceClient::new(channel.connect_lazy());
    let resource = Resource {
        attributes: vec![string("service.name", &service)],
        ..Default::default()
    };
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let first = rx.recv().await;
        let Some(first) = first else { break };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + FLUSH;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "trellis-proxy".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: std::mem::take(&mut batch),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        if let Err(e) = client.export(request).await {
            tracing::warn!(%collector, error = %e, "span export failed; those spans are dropped");
        }
    }
}
