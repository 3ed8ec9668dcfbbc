//! The access log: one JSON line per request, written off the request path by its own task.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::{Method, Request, Version};
use serde::Serialize;
use tokio::{io::AsyncWriteExt, sync::mpsc};

use crate::{metrics::ProxyMetrics, snapshot::Slot};

/// Lines queued for the writer; more are dropped (and counted) rather than slowing requests.
const QUEUE: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Off,
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for AccessLogTarget {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "off" | "" => Self::Off,
            "stdout" | "-" => Self::Stdout,
            path => Self::File(path.into()),
        })
    }
}

#[derive(Debug)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<Vec<u8>>>,
    metrics: ProxyMetrics,
}

/// What one request's line says.
#[derive(Debug, Serialize)]
pub struct LogRecord {
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub listener: String,
    #[serde(serialize_with = "display")]
    pub method: Method,
    pub authority: String,
    pub path: String,
    #[serde(serialize_with = "debug")]
    pub protocol: Version,
    pub status: u16,
    #[serde(rename = "duration_ms", serialize_with = "millis")]
    pub duration: Duration,
    pub route: Option<Arc<str>>,
    pub cluster: Option<Arc<str>>,
    pub endpoint: Option<Arc<str>>,
    pub retries: u32,
    pub error: Option<&'static str>,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}
fn display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}
fn debug<S: serde::Serializer>(v: &Version, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{v:?}"))
}
fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3)
}

impl LogRecord {
    pub fn new<B>(slot: &Slot, req: &Request<B>) -> Self {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or_default();
        Self {
            time: SystemTime::now(),
            listener: slot.name().into(),
            method: req.method().clone(),
            authority: authority.into(),
            path: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .into(),
            protocol: req.version(),
            status: 0,
            duration: Duration::ZERO,
            route: None,
            cluster: None,
            endpoint: None,
            retries: 0,
            error: None,
        }
    }
}

impl AccessLog {
    /// The log and, when it is on, the writer task to spawn.
    pub fn new(
        target: AccessLogTarget,
        metrics: ProxyMetrics,
    ) -> (Self, Option<impl Future<Output = ()> + Send + 'static>) {
        if target == AccessLogTarget::Off {
            return (Self { tx: None, metrics }, None);
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self {
                tx: Some(tx),
                metrics,
            },
            Some(writer(target, rx)),
        )
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn write(&self, record: &LogRecord) {
        let Some(tx) = &self.tx else { return };
        let Ok(mut line) = serde_json::to_vec(record) else {
            return;
        };
        line.push(b'\n');
        if tx.try_send(line).is_err() {
            self.metrics.access_log_dropped();
        }
    }
}

async fn writer(target: AccessLogTarget, mut rx: mpsc::Receiver<Vec<u8>>) {
    let out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match &target {
        AccessLogTarget::File(path) => {
            match tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await
            {
                Ok(f) => Box::new(f),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot open the access log; logging to stdout");
                    Box::new(tokio::io::stdout())
                }
            }
        }
        _ => Box::new(tokio::io::stdout()),
    };
    let mut out = tokio::io::BufWriter::new(out);
    while let Some(line) = rx.recv().await {
        let mut ok = out.write_all(&line).await.is_ok();
        // Batch what is already queued, then flush.
        while let Ok(line) = rx.try_recv() {
            ok &= out.write_all(&line).await.is_ok();
        }
        if !(ok && out.flush().await.is_ok()) {
            tracing::warn!("access log write failed");
        }
    }
}
