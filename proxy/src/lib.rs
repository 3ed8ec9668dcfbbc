//! trellis-proxy: the Trellis data plane, a sidecar and gateway L7 proxy.
//!
//! A connection is accepted on a socket (ingress, egress or a listener's own), served by hyper
//! (HTTP/1.1 and prior-knowledge h2c) or forwarded as bytes (TCP), and each request runs the path
//! in [`proxy`] against the snapshot in use, held by [`snapshot::SnapshotStore`].

pub mod access_log;
pub mod activity;
pub mod admin;
pub mod app;
pub mod balance;
pub mod body;
pub mod capture;
mod chunked;
mod client_io;
pub mod config;
pub mod control;
pub mod dial;
pub mod downstream;
pub mod error;
pub mod fault;
pub mod h1;
pub mod hash_lb;
mod head;
pub mod header_rules;
pub mod health_check;
pub mod identity;
pub mod latency;
pub mod limit;
pub mod listener;
pub mod matching;
pub mod metrics;
pub mod mirror;
pub mod outbound;
pub mod outlier;
pub mod passthrough;
pub mod proxy;
pub mod rate_limit;
pub mod report;
pub mod retry;
pub mod route;
pub mod snapshot;
pub mod span_export;
pub mod steps;
pub mod streams;
pub mod tcp;
pub mod tls;
pub mod trace;
pub mod transparent;
pub mod upstream;
pub mod websocket;

/// The parsers of untrusted bytes as pure functions, for the fuzz targets in `fuzz/`: not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::downstream::{
        BodyLength, MAX_HEAD as MAX_REQUEST_HEAD, Refusal, RequestHead, read_request,
    };
    pub use crate::h1::{
        Chunked, Framing, Head, Parsed, Step, decode_chunked, parse_head, read_head,
    };
}

use std::{io::IsTerminal as _, sync::Arc};

use anyhow::Context as _;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

/// How often idle pooled upstream connections are checked for expiry and for upstream closes.
const IDLE_SWEEP: std::time::Duration = std::time::Duration::from_secs(5);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the proxy until SIGTERM or SIGINT, then drains.
pub fn run(config: config::ProxyConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.log).context("invalid --log filter")?;
    let (filter, reload) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .try_init()
        .context("cannot install the log subscriber")?;
    let log_control: app::LogControl = Box::new(move |f| {
        let filter = EnvFilter::try_new(f).map_err(|e| e.to_string())?;
        reload.reload(filter).map_err(|e| e.to_string())
    });

    let runtime = if config.workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers)
            .enable_all()
            .build()
    }
    .context("cannot start the runtime")?;
    runtime.block_on(serve(config, log_control))
}

async fn serve(config: config::ProxyConfig, log_control: app::LogControl) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    let metrics = metrics::ProxyMetrics::new(&registry).context("cannot register metrics")?;
    let (access_log, writer) = access_log::AccessLog::new(&config.access_log, metrics.clone());
    tokio::spawn(writer);
    let app = app::App::new(
        registry,
        metrics,
        access_log,
        config.log.clone(),
        log_control,
        config.idle_timeout,
        config.ingress_addr.ip(),
    );

    if let Some(zone) = &config.zone {
        app.services.store.set_zone(zone);
    }
    start_health_checks(&app)?;
    let control = match &config.snapshot {
        Some(path) => {
            app.apply_file(path)
                .map_err(|e| anyhow::anyhow!("invalid snapshot {}: {e}", path.display()))?;
            None
        }
        None => {
            let control = control::ControlConfig {
                urls: config.control_plane.clone(),
                node: config
                    .node
                    .clone()
                    .or(config.gateway.clone())
                    .unwrap_or_default(),
                gateway: config.gateway.is_some(),
                data_dir: config.data_dir.clone(),
                token: config.token.clone(),
                token_file: config.token_file.clone(),
                control_plane_ca: match &config.control_plane_ca {
                    Some(path) => Some(std::fs::read_to_string(path).with_context(|| {
                        format!("cannot read --control-plane-ca {}", path.display())
                    })?),
                    None => config.control_plane_ca_pem.clone(),
                },
            };
            control::restore(&app, &control);
            Some(control)
        }
    };

    let bind = |addr, what| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind the {what} address {addr}"))
    };
    // A gateway serves its listeners' ports on the ingress address's IP (bound as its snapshot
    // names them), not the ingress port: it answers where its VirtualGateway says.
    let ingress = match config.gateway {
        Some(_) => None,
        None => Some(bind(config.ingress_addr, "ingress").await?),
    };
    let egress = bind(config.egress_addr, "egress").await?;
    let ingress_v6 = match (&config.gateway, config.ipv6_ingress_addr) {
        (None, Some(addr)) => bind_ipv6(addr, "ingress")?,
        _ => None,
    };
    let egress_v6 = match config.ipv6_egress_addr {
        Some(addr) => bind_ipv6(addr, "egress")?,
        None => None,
    };
    start_admin(&app, config.admin_addr)?;
    let sweeper = Arc::clone(&app);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(IDLE_SWEEP);
        loop {
            tick.tick().await;
            sweeper.services.store.sweep_idle();
        }
    });
    tokio::spawn(Arc::clone(&app).refresh_dns());
    if let Some(ingress) = ingress {
        app.serve(ingress, snapshot::Slot::Ingress);
    }
    app.serve(egress, snapshot::Slot::Egress);
    if let Some(ingress) = ingress_v6 {
        app.serve(ingress, snapshot::Slot::Ingress);
    }
    if let Some(egress) = egress_v6 {
        app.serve(egress, snapshot::Slot::Egress);
    }
    match (control, &config.snapshot) {
        (Some(control), _) => {
            tokio::spawn(control::run(Arc::clone(&app), control));
        }
        (None, Some(path)) => {
            tokio::spawn(Arc::clone(&app).watch_file(path.clone(), config.snapshot_poll));
        }
        (None, None) => {}
    }

    shutdown_signal().await?;
    tracing::info!(timeout = ?config.drain_timeout, "draining");
    if app.drain(config.drain_timeout).await {
        tracing::info!("drained");
    } else {
        tracing::warn!("drain timeout: closing the remaining connections");
    }
    Ok(())
}

/// Serves the admin endpoints on a thread and runtime of their own, so they answer however
/// busy the proxy is.
fn start_admin(app: &Arc<app::App>, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let admin = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .with_context(|| format!("cannot bind the admin address {addr}"))?;
    if let Ok(addr) = admin.local_addr() {
        tracing::info!(listener = %"admin", addr = %addr, "listening");
    }
    let admin_app = app.clone();
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match rt {
                Ok(rt) => rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(admin) {
                        Ok(l) => admin::serve(admin_app, l).await,
                        Err(e) => tracing::error!(error = %e, "admin server failed"),
                    }
                }),
                Err(e) => tracing::error!(error = %e, "admin runtime failed"),
            }
        })
        .context("cannot start the admin thread")?;
    Ok(())
}

/// Runs active health checks on a thread and single-threaded runtime of their own: the probes
/// of many endpoints then share that thread's wake-ups instead of waking the request workers
/// (measured in `benches/README.md`).
fn start_health_checks(app: &Arc<app::App>) -> anyhow::Result<()> {
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("health-check".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => {
                    let _ = handle_tx.send(Ok(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    let _ = handle_tx.send(Err(e));
                }
            }
        })
        .context("cannot start the health check thread")?;
    let handle = handle_rx
        .recv()
        .context("the health check thread ended")?
        .context("cannot start the health check runtime")?;
    app.services.store.run_health_checks_on(handle);
    Ok(())
}

/// Resolves at SIGTERM or SIGINT.
async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// An IPv6-only listening socket on `addr` (so it can share its port with an IPv4 one), or
/// None on a host without IPv6 — where no IPv6 traffic can reach the proxy either.
fn bind_ipv6(
    addr: std::net::SocketAddr,
    what: &str,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    if !addr.is_ipv6() {
        anyhow::bail!("the IPv6 {what} address {addr} is not an IPv6 address");
    }
    let socket = match Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc_eafnosupport()) => {
            tracing::info!(listener = what, %addr, "no IPv6 on this host: not listening there");
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot open the {what} socket {addr}")),
    };
    let bound = socket
        .set_only_v6(true)
        .and_then(|()| socket.set_reuse_address(true))
        .and_then(|()| socket.set_nonblocking(true))
        .and_then(|()| socket.bind(&addr.into()));
    match bound {
        Ok(()) => {}
        // IPv6 disabled on the host or the interface: the address cannot be there.
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
            tracing::info!(listener = what, %addr, "no IPv6 on this host: not listening there");
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot bind the {what} address {addr}")),
    }
    socket
        .listen(1024)
        .with_context(|| format!("cannot listen on {addr}"))?;
    let listener = tokio::net::TcpListener::from_std(socket.into())
        .with_context(|| format!("cannot listen on {addr}"))?;
    Ok(Some(listener))
}

/// EAFNOSUPPORT on Linux: the kernel was built or booted without IPv6.
const fn libc_eafnosupport() -> i32 {
    97
}
