//! The config stream client: subscribe to the control plane, compile and swap every pushed
//! snapshot through the same path as file reloads, ACK or NACK it, keep the last accepted one on
//! disk, reconnect with jittered backoff and fail over across the listed control planes.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use trellis_proto::v1::{
    self as pb, Ack, Hello, Nack, ProxyMessage, SnapshotFieldError,
    config_stream_client::ConfigStreamClient, hello::Kind as HelloKind, proxy_message::Kind as Msg,
};

use crate::{BoxError, app::App, identity::Identity, retry};

const SNAPSHOT_FILE: &str = "snapshot.json";
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub urls: Vec<String>,
    /// "NAMESPACE/NAME".
    pub node: String,
    pub gateway: bool,
    pub data_dir: PathBuf,
    /// A join token: with it the proxy asks for its workload certificate.
    pub token: Option<String>,
    /// Or a file holding it, read at each connection (a projected token rotates).
    pub token_file: Option<PathBuf>,
    /// The CA (PEM) an `https://` control plane's certificate must chain to.
    pub control_plane_ca: Option<String>,
}

impl ControlConfig {
    fn snapshot_path(&self) -> PathBuf {
        self.data_dir.join(SNAPSHOT_FILE)
    }

    /// The token to present now: the one given, else the token file's current content.
    fn token(&self) -> Option<String> {
        if let Some(token) = &self.token {
            return Some(token.clone());
        }
        let path = self.token_file.as_ref()?;
        match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the token file");
                None
            }
        }
    }
}

/// Applies the snapshot persisted in the data dir, if there is a valid one (static stability:
/// the proxy serves even when no control plane answers).
pub fn restore(app: &Arc<App>, config: &ControlConfig) -> Option<String> {
    let path = config.snapshot_path();
    let text = std::fs::read_to_string(&path).ok()?;
    match app.apply_file(&path) {
        Ok(rt) => {
            tracing::info!(version = %rt.version, path = %path.display(), "serving the persisted snapshot");
            Some(rt.version.to_string())
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, bytes = text.len(), "ignoring the persisted snapshot");
            None
        }
    }
}

fn persist(config: &ControlConfig, snapshot: &pb::Snapshot) -> std::io::Result<()> {
    std::fs::create_dir_all(&config.data_dir)?;
    let tmp = config.data_dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    let json = serde_json::to_vec_pretty(snapshot).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, config.snapshot_path())
}

/// Follows the control planes until the process ends.
pub async fn run(app: Arc<App>, config: ControlConfig) {
    let instance = format!("{}-{}", std::process::id(), fastrand::u32(..));
    let mut failures = 0u32;
    // Proxies spread over the control planes they list: each starts at a random one, and moves
    // to the next when its stream fails.
    let mut index = fastrand::usize(..config.urls.len().max(1));
    loop {
        let Some(url) = config.urls.get(index % config.urls.len().max(1)) else {
            return;
        };
        match session(&app, url, &config, &instance).await {
            Ok(()) => {
                tracing::info!(control_plane = %url, "config stream closed by the control plane");
                failures = 0;
            }
            Err(e) => {
                tracing::warn!(control_plane = %url, error = %e, "config stream failed");
                failures = failures.saturating_add(1);
                // Try the next control plane.
                index += 1;
            }
        }
        let delay = retry::backoff(
            BACKOFF_BASE,
            BACKOFF_MAX,
            failures.saturating_add(1),
            retry::Jitter::Half,
        );
        tokio::time::sleep(delay).await;
    }
}

async fn session(
    app: &Arc<App>,
    url: &str,
    config: &ControlConfig,
    instance: &str,
) -> Result<(), BoxError> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())?;
    if url.starts_with("https://") {
        // The CA given and the mesh's trust bundle the proxy keeps (issued over TLS before,
        // and following root rotations, so the control plane's certificate from a new root is
        // trusted after the old root is gone).
        let kept =
            std::fs::read_to_string(config.data_dir.join("identity").join("bundle.pem")).ok();
        let ca = match (config.control_plane_ca.clone(), kept) {
            (Some(given), Some(kept)) => Some(format!("{given}\n{kept}")),
            (given, kept) => given.or(kept),
        };
        let Some(ca) = ca else {
            return Err("an https control plane needs --control-plane-ca".into());
        };
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca));
        // With a workload certificate, the proxy proves its node with it (no token needed).
        let dir = config.data_dir.join("identity");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        if let (Some(chain), Some(key)) = (read("cert.pem"), read("key.pem")) {
            tls = tls.identity(tonic::transport::Identity::from_pem(chain, key));
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let mut client = ConfigStreamClient::new(channel)
        .max_decoding_message_size(crate::snapshot::MAX_SNAPSHOT_BYTES)
        .max_encoding_message_size(crate::snapshot::MAX_SNAPSHOT_BYTES);
    let (tx, rx) = mpsc::channel::<ProxyMessage>(8);
    let applied = app.services.store.load().version.to_string();
    // With a join token, or a key from an earlier admission (a certificate admits the proxy
    // over TLS): the key (made once, kept in the data dir) and a CSR for it, so the certificate
    // is renewed however the proxy was admitted.
    let has_key = config.data_dir.join("identity").join("key.pem").exists();
    let token = config.token();
    let identity = if token.is_some() || has_key {
        Some(Identity::load_or_create(&config.data_dir, &config.node)?)
    } else {
        None
    };
    let csr = identity.as_ref().map(Identity::csr).transpose()?;
    if let Some(identity) = &identity
        && app.credentials.spiffe_id().is_none()
        && identity.restore(&app.credentials)
    {
        tracing::info!(identity = ?app.credentials.spiffe_id(), "workload certificate restored from the data dir");
    }
    tx.send(ProxyMessage {
        kind: Some(Msg::Hello(Hello {
            node: config.node.clone(),
            kind: if config.gateway {
                HelloKind::Gateway
            } else {
                HelloKind::Sidecar
            } as i32,
            proxy_version: env!("CARGO_PKG_VERSION").to_string(),
            applied_version: applied,
            instance: instance.to_string(),
            token: token.unwrap_or_default(),
            csr: csr.unwrap_or_default(),
        })),
    })
    .await?;
    let mut renewal: Option<tokio::task::JoinHandle<()>> = None;
    // Measurements the running snapshot asks for, on this stream while it lasts.
    let reporter = AbortOnDrop(tokio::spawn(report(app.clone(), tx.clone())));
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut inbound = client.stream(outbound).await?.into_inner();
    tracing::info!(control_plane = %url, node = %config.node, "config stream open");
    while let Some(push) = inbound.message().await? {
        let mut refused_identity = None;
        if let (Some(issued), Some(identity)) = (&push.identity, &identity) {
            // Used first, kept only if usable: a restart must not load what does not work.
            if let Err(e) = app.credentials.set(
                &issued.certificate_chain,
                &identity.key_pem(),
                &issued.trust_bundle,
            ) {
                tracing::warn!(error = %e, "the workload certificate cannot be used");
                refused_identity = Some(e);
            }
        }
        if let (Some(issued), Some(identity), None) = (&push.identity, &identity, &refused_identity)
        {
            let mut renew_in = identity.store(issued)?;
            // A root rotation asks for a certificate from the new root now.
            if issued.renew {
                renew_in = Duration::ZERO;
            }
            tracing::info!(identity = %issued.spiffe_id, renew_in = ?renew_in, "workload certificate received");
            // Renewed at half-life, on this stream.
            if let Some(previous) = renewal.take() {
                previous.abort();
            }
            let csr = identity.csr()?;
            let tx = tx.clone();
            renewal = Some(tokio::spawn(async move {
                tokio::time::sleep(renew_in).await;
                let _ = tx
                    .send(ProxyMessage {
                        kind: Some(Msg::Renew(pb::Renew { csr })),
                    })
                    .await;
            }));
        }
        let Some(snapshot) = push.snapshot else {
            if push.identity.is_some() {
                // Whether the identity and trust bundle are in use: said, so the control plane
                // knows which roots this proxy trusts and which certificate it serves (a root
                // rotation waits for them).
                let version = app.services.store.load().version.to_string();
                let reply = match refused_identity {
                    None => Msg::Ack(Ack {
                        nonce: push.nonce,
                        version,
                    }),
                    Some(reason) => Msg::Nack(Nack {
                        nonce: push.nonce,
                        version,
                        errors: vec![SnapshotFieldError {
                            path: "identity".into(),
                            reason,
                        }],
                    }),
                };
                tx.send(ProxyMessage { kind: Some(reply) }).await?;
            }
            continue;
        };
        let version = snapshot.version.clone();
        // Compiling runs on a blocking thread, never on one serving requests.
        let applying = Arc::clone(app);
        let (snapshot, applied) = tokio::task::spawn_blocking(move || {
            let applied = applying.apply(&snapshot).map(drop);
            (snapshot, applied)
        })
        .await?;
        let reply = match applied {
            Ok(_) => {
                if let Err(e) = persist(config, &snapshot) {
                    tracing::warn!(error = %e, "cannot persist the snapshot");
                }
                Msg::Ack(Ack {
                    nonce: push.nonce,
                    version,
                })
            }
            Err(e) => Msg::Nack(Nack {
                nonce: push.nonce,
                version,
                errors: e
                    .field_errors()
                    .into_iter()
                    .map(|f| SnapshotFieldError {
                        path: f.path,
                        reason: f.reason,
                    })
                    .collect(),
            }),
        };
        tx.send(ProxyMessage { kind: Some(reply) }).await?;
    }
    if let Some(renewal) = renewal {
        renewal.abort();
    }
    drop(reporter);
    Ok(())
}

/// A task that ends with its handle (the session's helpers end with the session, however it
/// ends).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends the running snapshot's `measure` routes' counts every interval, when they changed
/// (the first report at once: the control plane's baseline for this process).
async fn report(app: Arc<App>, tx: mpsc::Sender<ProxyMessage>) {
    let mut last: Option<pb::Report> = None;
    loop {
        let source = app.services.store.load().source.clone();
        let Some(measure) = source.measure.as_ref() else {
            last = None;
            tokio::time::sleep(crate::report::IDLE_CHECK).await;
            continue;
        };
        let metrics = app.services.metrics.clone();
        let routes = measure.routes.clone();
        // Reading the histograms is not for a thread serving requests.
        let Ok(report) =
            tokio::task::spawn_blocking(move || crate::report::measure(&metrics, &routes)).await
        else {
            return;
        };
        if last.as_ref() != Some(&report) {
            last = Some(report.clone());
            let message = ProxyMessage {
                kind: Some(Msg::Report(report)),
            };
            if tx.send(message).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(crate::report::interval(measure)).await;
    }
}
