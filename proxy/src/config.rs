//! Start-up configuration: flags, each with its `TRELLIS_PROXY_*` environment variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::access_log::AccessLogTarget;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "trellis-proxy",
    version,
    about = "Trellis sidecar and gateway proxy"
)]
pub struct ProxyConfig {
    /// Snapshot file (YAML or JSON) to serve; reloaded on SIGHUP and when it changes.
    #[arg(
        long,
        env = "TRELLIS_PROXY_SNAPSHOT",
        required_unless_present = "control_plane",
        conflicts_with = "control_plane"
    )]
    pub snapshot: Option<PathBuf>,

    /// Control plane URL(s), comma-separated; the proxy fails over between them.
    #[arg(long, env = "TRELLIS_PROXY_CONTROL_PLANE", value_delimiter = ',')]
    pub control_plane: Vec<String>,

    /// A join token (`trellis token create --node ...`): the proxy proves who it is with it and
    /// gets its workload certificate (its key is made and kept in --data-dir).
    #[arg(long, env = "TRELLIS_PROXY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// A file holding the join token, read again at each connection to the control plane: on
    /// Kubernetes, the pod's projected service-account token (audience `trellis`), which the
    /// control plane checks with the API server (TokenReview) and binds to the pod's node.
    #[arg(long, env = "TRELLIS_PROXY_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,

    /// The CA certificate (PEM file) an `https://` control plane's certificate chains to
    /// (trellis-control --tls writes it to its DATA_DIR/ca.pem).
    #[arg(long, env = "TRELLIS_PROXY_CONTROL_PLANE_CA")]
    pub control_plane_ca: Option<PathBuf>,

    /// The same CA as PEM text (what the sidecar injector sets, from the control plane's
    /// current trust bundle).
    #[arg(
        long,
        env = "TRELLIS_PROXY_CONTROL_PLANE_CA_PEM",
        conflicts_with = "control_plane_ca",
        hide_env_values = true
    )]
    pub control_plane_ca_pem: Option<String>,

    /// The VirtualNode this sidecar serves, NAMESPACE/NAME.
    #[arg(long, env = "TRELLIS_PROXY_NODE", conflicts_with = "gateway", required_unless_present_any = ["gateway", "snapshot"])]
    pub node: Option<String>,

    /// The VirtualGateway this gateway serves, NAMESPACE/NAME.
    #[arg(long, env = "TRELLIS_PROXY_GATEWAY")]
    pub gateway: Option<String>,

    /// Where the last accepted snapshot is kept, to start without a control plane.
    #[arg(
        long,
        env = "TRELLIS_PROXY_DATA_DIR",
        default_value = "./trellis-proxy-data"
    )]
    pub data_dir: PathBuf,

    /// Ingress socket: traffic from the mesh to the local app. A gateway (--gateway) does not
    /// bind this port: it serves each of its VirtualGateway's listener ports on this IP.
    #[arg(
        long,
        env = "TRELLIS_PROXY_INGRESS_ADDR",
        default_value = "0.0.0.0:15000"
    )]
    pub ingress_addr: SocketAddr,

    /// Egress socket: traffic from the local app to the mesh (Host routing, http_proxy, CONNECT).
    #[arg(
        long,
        env = "TRELLIS_PROXY_EGRESS_ADDR",
        default_value = "127.0.0.1:15001"
    )]
    pub egress_addr: SocketAddr,

    /// Also serve the ingress on this IPv6 address (IPv6-only socket, beside --ingress-addr):
    /// where `trellis-proxy init`'s IPv6 rules send inbound IPv6. Skipped, with a log line, on
    /// a host without IPv6 (where no IPv6 traffic can come).
    #[arg(long, env = "TRELLIS_PROXY_IPV6_INGRESS_ADDR")]
    pub ipv6_ingress_addr: Option<SocketAddr>,

    /// Also serve the egress on this IPv6 address (e.g. `[::1]:15001`, where captured IPv6
    /// connections are redirected); skipped likewise on a host without IPv6.
    #[arg(long, env = "TRELLIS_PROXY_IPV6_EGRESS_ADDR")]
    pub ipv6_egress_addr: Option<SocketAddr>,

    /// Admin socket: /metrics, /ready, /live, /config_dump, /clusters, /logging.
    #[arg(
        long,
        env = "TRELLIS_PROXY_ADMIN_ADDR",
        default_value = "127.0.0.1:9901"
    )]
    pub admin_addr: SocketAddr,

    /// Worker threads for the data path (1 runs a single-threaded runtime).
    #[arg(long, env = "TRELLIS_PROXY_WORKERS", default_value_t = 2)]
    pub workers: usize,

    /// How long SIGTERM waits for in-flight requests before exiting.
    #[arg(long, env = "TRELLIS_PROXY_DRAIN_TIMEOUT", default_value = "20s", value_parser = duration)]
    pub drain_timeout: Duration,

    /// The zone (availability zone) this proxy runs in: zone-aware clusters prefer their
    /// endpoints in it.
    #[arg(long, env = "TRELLIS_PROXY_ZONE")]
    pub zone: Option<String>,

    /// Client connections that start no request for this long, with none in flight, are closed
    /// (an HTTP/1.1 connection that has not sent a whole request head by then too). Also the
    /// request-body idle timeout of routes without `timeout.idle`, except for gRPC requests.
    #[arg(long, env = "TRELLIS_PROXY_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub idle_timeout: Duration,

    /// Access log: off, stdout, or a file path (JSON lines).
    #[arg(long, env = "TRELLIS_PROXY_ACCESS_LOG", default_value = "off")]
    pub access_log: AccessLogTarget,

    /// Log filter (tracing EnvFilter syntax); changeable at runtime via the admin /logging.
    #[arg(long, env = "TRELLIS_PROXY_LOG", default_value = "info")]
    pub log: String,

    /// How often the snapshot file is checked for changes.
    #[arg(long, env = "TRELLIS_PROXY_SNAPSHOT_POLL", default_value = "1s", value_parser = duration)]
    pub snapshot_poll: Duration,
}

/// A command-line duration, bounded like a snapshot's (365 days) so no deadline overflows.
fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    let max = crate::snapshot::MAX_DURATION;
    if d > max {
        return Err(format!("must be at most {}s (365 days)", max.as_secs()));
    }
    Ok(d)
}
