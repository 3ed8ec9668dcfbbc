//! [`Rotel`]: a real OpenTelemetry collector (PyPI `rotel`, which the test command installs)
//! receiving OTLP on 127.0.0.1 ports the OS picked, printing every span it receives; the test
//! reads them back as [`ReceivedSpan`]s.

use std::{net::SocketAddr, path::PathBuf, process::Stdio, time::Duration};

use tokio::process::{Child, Command};

/// One span as the collector received it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// Its resource's `service.name`.
    pub service: String,
    pub trace_id: String,
    /// Empty for a trace's root.
    pub parent_id: String,
    pub id: String,
    pub name: String,
    /// `SPAN_KIND_SERVER`, `SPAN_KIND_CLIENT`, ...
    pub kind: String,
}

#[derive(Debug)]
pub struct Rotel {
    /// Where it takes OTLP over gRPC.
    pub grpc: SocketAddr,
    log: PathBuf,
    _child: Child,
    _dir: tempfile::TempDir,
}

/// The collector's binary, from the installed Python package.
fn agent() -> String {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "rotel (PyPI) must be installed; the test command installs it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Rotel {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("rotel.log");
        let grpc: SocketAddr = format!("127.0.0.1:{}", crate::free_port()).parse().unwrap();
        let http = format!("127.0.0.1:{}", crate::free_port());
        let child = Command::new(agent())
            .args([
                "start",
                "--otlp-grpc-endpoint",
                &grpc.to_string(),
                "--otlp-http-endpoint",
                &http,
                "--exporter",
                "blackhole",
                "--debug-log",
                "traces",
                "--debug-log-verbosity",
                "detailed",
            ])
            .env("NO_COLOR", "1")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("rotel-agent starts");
        crate::eventually(Duration::from_secs(20), "rotel listens", || async {
            tokio::net::TcpStream::connect(grpc)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .await;
        Self {
            grpc,
            log,
            _child: child,
            _dir: dir,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut spans = Vec::new();
        let mut service = String::new();
        let mut current: Option<ReceivedSpan> = None;
        for line in text.lines() {
            let line = line.trim();
            if let Some(v) = line.strip_prefix("-> service.name: Str(") {
                service = v.trim_end_matches(')').to_string();
            } else if line.starts_with("Span #") {
                spans.extend(current.take());
                current = Some(ReceivedSpan {
                    service: service.clone(),
                    ..ReceivedSpan::default()
                });
            } else if line.starts_with("ResourceSpans #") {
                spans.extend(current.take());
            } else if let (Some(span), Some((key, value))) =
                (current.as_mut(), line.split_once(':'))
            {
                let value = value.trim().to_string();
                match key.trim() {
                    "Trace ID" => span.trace_id = value,
                    "Parent ID" => span.parent_id = value,
                    "ID" => span.id = value,
                    "Name" => span.name = value,
                    "Kind" => span.kind = value,
                    _ => {}
                }
            }
        }
        spans.extend(current);
        spans
    }
}
