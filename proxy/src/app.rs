//! Wires the proxy together: the snapshot store, the sockets of listeners with their own
//! address, reloads and log control. Accepting and serving connections, and the drain, are
//! the listener stage ([`crate::listener`]).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use parking_lot::Mutex;

use prometheus::Registry;
use tokio::{net::TcpListener, sync::watch};
use trellis_proto::v1 as pb;

use crate::{
    access_log::AccessLog,
    listener::Listeners,
    metrics::ProxyMetrics,
    proxy::Services,
    snapshot::{self, FieldError, Runtime, Slot, SnapshotError},
};

/// Changes the log filter at runtime (`/logging`).
pub type LogControl = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

pub struct App {
    /// What the request path uses: the snapshot store, metrics, the access log, the idle
    /// timeout.
    pub services: Arc<Services>,
    pub registry: Registry,
    pub(crate) log_control: LogControl,
    pub(crate) log_filter: Mutex<String>,
    /// Why the last snapshot was rejected, for `/config_dump`.
    pub(crate) last_rejection: Mutex<Option<String>>,
    /// Accepts and serves the connections of every socket; the drain.
    listeners: Arc<Listeners>,
    /// Sockets of listeners with their own address, by listener name.
    named: Mutex<HashMap<Arc<str>, NamedSocket>>,
    /// The IP that listeners given only a port bind (a gateway's listeners): the one of
    /// `--ingress-addr`.
    listener_ip: IpAddr,
    /// The workload certificate, key and trust bundle, once issued (for mTLS).
    pub credentials: Arc<crate::tls::Credentials>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("store", &self.services.store)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct NamedSocket {
    /// The address the snapshot asked for.
    requested: SocketAddr,
    /// Dropping it stops the accept loop.
    _stop: watch::Sender<()>,
}

impl App {
    pub fn new(
        registry: Registry,
        metrics: ProxyMetrics,
        access_log: AccessLog,
        log_filter: String,
        log_control: LogControl,
        idle_timeout: Duration,
        listener_ip: IpAddr,
    ) -> Arc<Self> {
        let services = Arc::new(Services::new(metrics, access_log, idle_timeout));
        let credentials = services.store.credentials().clone();
        Arc::new(Self {
            listeners: Listeners::new(services.clone()),
            services,
            registry,
            log_control,
            log_filter: Mutex::new(log_filter),
            last_rejection: Mutex::new(None),
            named: Mutex::new(HashMap::new()),
            listener_ip,
            credentials,
        })
    }

    /// Compiles and applies a snapshot, binding the sockets of new listeners first. All or
    /// nothing: on error the config in use stays.
    pub fn apply(self: &Arc<Self>, snapshot: &pb::Snapshot) -> Result<Arc<Runtime>, SnapshotError> {
        let mut bound = Vec::new();
        let result = self.services.store.apply(snapshot, |rt| {
            let named = self.named.lock();
            let mut errors = Vec::new();
            for (name, listener) in &rt.named {
                let Some(addr) = listener
                    .address
                    .or_else(|| listener.port.map(|p| SocketAddr::new(self.listener_ip, p)))
                else {
                    continue;
                };
                if named.get(name).is_some_and(|s| s.requested == addr) {
                    continue;
                }
                match std::net::TcpListener::bind(addr).and_then(|l| {
                    l.set_nonblocking(true)?;
                    Ok(l)
                }) {
                    Ok(l) => bound.push((name.clone(), addr, l)),
                    Err(e) => {
                        let index = snapshot.listeners.iter().position(|l| *l.name == **name);
                        let field = if listener.address.is_some() {
                            "address"
                        } else {
                            "port"
                        };
                        errors.push(FieldError {
                            path: format!("listeners[{}].{field}", index.unwrap_or_default()),
                            reason: format!("cannot bind {addr}: {e}"),
                        });
                    }
                }
            }
            if errors.is_empty() {
                Ok(())
            } else {
                Err(SnapshotError::Invalid(errors))
            }
        });
        match &result {
            Ok(rt) => {
                *self.last_rejection.lock() = None;
                self.credentials.set_revoked(
                    snapshot
                        .revoked
                        .iter()
                        .map(|r| (r.identity.clone(), r.not_before_until))
                        .collect(),
                );
                let mut named = self.named.lock();
                named.retain(|name, _| rt.named.contains_key(name));
                for (name, requested, listener) in bound {
                    let (stop, stopped) = watch::channel(());
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            self.listeners.serve(
                                listener,
                                Slot::Named(name.clone()),
                                Some(stopped),
                            );
                            named.insert(
                                name,
                                NamedSocket {
                                    requested,
                                    _stop: stop,
                                },
                            );
                        }
                        Err(e) => {
                            tracing::error!(listener = %name, error = %e, "cannot serve listener")
                        }
                    }
                }
                tracing::info!(version = %rt.version, "snapshot applied");
            }
            Err(e) => {
                tracing::warn!(version = %snapshot.version, error = %e, "snapshot rejected; the previous one keeps serving");
                // The reason first, then the count: whoever sees the count sees why.
                *self.last_rejection.lock() = Some(format!("{}: {e}", snapshot.version));
                self.services.metrics.snapshot_rejected();
            }
        }
        result
    }

    /// Resolves the DNS names of ENDPOINTS clusters at once after a new config is in use, then
    /// every [`DNS_REFRESH`], and recompiles the config when their addresses change.
    pub async fn refresh_dns(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<(Arc<str>, tokio::time::Instant)> = None;
        loop {
            tick.tick().await;
            let store = &self.services.store;
            let version = store.load().version.clone();
            let due = last
                .as_ref()
                .is_none_or(|(v, at)| *v != version || at.elapsed() >= DNS_REFRESH);
            if !due {
                continue;
            }
            last = Some((version, tokio::time::Instant::now()));
            let mut resolved = crate::snapshot::Resolved::new();
            for (name, family) in store.names_to_resolve() {
                let lookup = crate::dial::resolve(&name, family);
                let addrs = tokio::time::timeout(DNS_REFRESH, lookup)
                    .await
                    .unwrap_or_default();
                resolved.insert((name, family), addrs);
            }
            match store.refresh_dns(resolved) {
                Ok(true) => tracing::info!("DNS answers changed: endpoints updated"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "DNS answers not applied"),
            }
        }
    }

    /// Reads, parses and applies a snapshot file. Blocking (file I/O, parsing, compiling): call
    /// it off the threads that serve requests.
    pub fn apply_file(self: &Arc<Self>, path: &Path) -> Result<Arc<Runtime>, SnapshotError> {
        let snapshot = snapshot::read_file(path)
            .and_then(|text| snapshot::parse_file(&text))
            .inspect_err(|e| {
                tracing::warn!(error = %e, "snapshot rejected; the previous one keeps serving");
                *self.last_rejection.lock() = Some(e.to_string());
                self.services.metrics.snapshot_rejected();
            })?;
        self.apply(&snapshot)
    }

    /// Serves the ingress or egress socket until the drain starts.
    pub fn serve(&self, listener: TcpListener, slot: Slot) {
        self.listeners.serve(listener, slot, None);
    }

    /// Stops accepting, lets open connections finish (up to `timeout`); true when all did.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.listeners.drain(timeout).await
    }

    /// Reloads `path` on SIGHUP and whenever its metadata changes (polled every `every`).
    pub async fn watch_file(self: Arc<Self>, path: PathBuf, every: Duration) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file changes only");
                None
            }
        };
        let mut last = fingerprint(&path);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let draining = self.listeners.draining();
        loop {
            tokio::select! {
                () = draining.cancelled() => return,
                Some(()) = async { match &mut hangup { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!(path = %path.display(), "SIGHUP: reloading snapshot");
                }
                _ = tick.tick() => {
                    let now = fingerprint(&path);
                    if now == last {
                        continue;
                    }
                    tracing::info!(path = %path.display(), "snapshot file changed: reloading");
                    // A file rewritten in place is read once it stops changing.
                    last = now;
                    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
                    loop {
                        tokio::time::sleep(SETTLE).await;
                        let now = fingerprint(&path);
                        if now == last || tokio::time::Instant::now() >= deadline {
                            break;
                        }
                        last = now;
                    }
                }
            }
            last = fingerprint(&path);
            // Reading, parsing and compiling run on a blocking thread, never on one serving
            // requests (with `--workers 1` there is only one).
            let app = Arc::clone(&self);
            let file = path.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || app.apply_file(&file)).await {
                tracing::error!(error = %e, "snapshot reload failed");
            }
        }
    }
}

/// How long a changed snapshot file must stay unchanged before it is read, and the longest wait.
/// How often the names of ENDPOINTS clusters are resolved again (Envoy's default DNS refresh).
pub const DNS_REFRESH: Duration = Duration::from_secs(5);

const SETTLE: Duration = Duration::from_millis(50);
const SETTLE_MAX: Duration = Duration::from_secs(2);

fn fingerprint(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}
