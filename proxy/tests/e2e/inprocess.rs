//! The proxy library's app served in the test's own runtime on 127.0.0.1:0 sockets: the same
//! listeners, request path and admin server as the binary, without a process to start, and on
//! the test's clock (so `start_paused` tests control its timers). Tests of what only a process
//! has — signals, file reloads, exit codes, restore from the data directory — use
//! [`trellis_testkit::ProxyProcess`].

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use trellis_proxy::{
    access_log::{AccessLog, AccessLogTarget},
    app::App,
    metrics::ProxyMetrics,
    snapshot::{self, Slot},
};

#[derive(Debug)]
pub struct InProcessProxy {
    pub app: Arc<App>,
    pub ingress: SocketAddr,
    pub egress: SocketAddr,
    pub admin: SocketAddr,
}

impl InProcessProxy {
    /// Applies `snapshot` (YAML) and serves it; `idle_timeout` as `--idle-timeout`.
    pub async fn start(snapshot: &str, idle_timeout: Duration) -> Self {
        let registry = prometheus::Registry::new();
        let metrics = ProxyMetrics::new(&registry).unwrap();
        let (access_log, writer) = AccessLog::new(&AccessLogTarget::Off, metrics.clone());
        tokio::spawn(writer);
        let app = App::new(
            registry,
            metrics,
            access_log,
            "info".into(),
            Box::new(|_| Ok(())),
            idle_timeout,
            std::net::Ipv4Addr::LOCALHOST.into(),
        );
        let parsed = snapshot::parse_file(snapshot).unwrap();
        app.apply(&parsed).unwrap();
        let bind = || async { TcpListener::bind("127.0.0.1:0").await.unwrap() };
        let (ingress, egress, admin) = (bind().await, bind().await, bind().await);
        let addrs = (
            ingress.local_addr().unwrap(),
            egress.local_addr().unwrap(),
            admin.local_addr().unwrap(),
        );
        app.serve(ingress, Slot::Ingress);
        app.serve(egress, Slot::Egress);
        tokio::spawn(trellis_proxy::admin::serve(app.clone(), admin));
        Self {
            app,
            ingress: addrs.0,
            egress: addrs.1,
            admin: addrs.2,
        }
    }

    /// Applies another snapshot, as a config push would.
    pub fn apply(&self, snapshot: &str) {
        let parsed = snapshot::parse_file(snapshot).unwrap();
        self.app.apply(&parsed).unwrap();
    }

    /// One metric's value (summed over series matching all `labels`).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&self.app.registry.gather())
            .unwrap();
        trellis_testkit::process::metric_value(&text, name, labels)
    }
}
