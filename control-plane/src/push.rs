//! The config stream: each proxy says who it is, gets its snapshot whenever its version changes
//! (with a fresh nonce), and answers with ACK or NACK; the controller records all of it.

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::v1::{
    ProxyMessage, SnapshotPush, config_stream_server::ConfigStream, hello::Kind as HelloKind,
    proxy_message::Kind as Msg,
};

use crate::{
    controller::Controller,
    model::{Kind, ResourceKey},
    status::ProxyStatus,
    translate::Translated,
    view::View,
};

/// How long a proxy has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ConfigService {
    controller: Arc<Controller>,
}

impl ConfigService {
    pub fn new(controller: Arc<Controller>) -> Self {
        Self { controller }
    }
}

type PushStream = Pin<Box<dyn Stream<Item = Result<SnapshotPush, Status>> + Send>>;

/// What the hello proved: whether a join token admitted the proxy, and its first CSR.
struct Admission {
    admitted: bool,
    csr: Option<String>,
}

impl ConfigService {
    /// Checks the hello's join token: an admitted proxy may get certificates; without one, the
    /// proxy gets its snapshot only where identity is not required.
    async fn admit(
        &self,
        token: &str,
        certificate: Option<&str>,
        node: &ResourceKey,
    ) -> Result<bool, Status> {
        let identity = self.controller.identity();
        // A workload certificate (verified in the TLS handshake) proves the node it names.
        if let (Some(id), Some((ca, _))) = (certificate, identity) {
            let wanted = ca.spiffe_id(node);
            if id == wanted {
                return Ok(true);
            }
            return Err(Status::permission_denied(format!(
                "the client certificate is for {id}, not {wanted}"
            )));
        }
        if token.is_empty() {
            return match identity {
                Some((_, true)) => Err(Status::unauthenticated(
                    "this control plane requires a join token (trellis token create)",
                )),
                _ => Ok(false),
            };
        }
        if identity.is_none() {
            return Err(Status::failed_precondition(
                "this control plane issues no identities",
            ));
        }
        match crate::identity::admit(self.controller.store().as_ref(), token, node).await {
            Ok(()) => Ok(true),
            Err(crate::identity::IdentityError::Denied(why)) => Err(Status::permission_denied(why)),
            Err(crate::identity::IdentityError::Unauthenticated(why)) => {
                Err(Status::unauthenticated(why))
            }
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}

fn parse_node(node: &str, kind: Kind) -> Result<ResourceKey, Status> {
    match node.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(ResourceKey::new(kind, ns, name))
        }
        _ => Err(Status::invalid_argument(format!(
            "node {node:?} must be NAMESPACE/NAME"
        ))),
    }
}

#[tonic::async_trait]
impl ConfigStream for ConfigService {
    type StreamStream = PushStream;

    async fn stream(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request
            .extensions()
            .get::<crate::identity::PeerIdentity>()
            .map(|p| p.0.clone());
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello"))??;
        let Some(ProxyMessage {
            kind: Some(Msg::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message must be a hello",
            ));
        };
        let gateway = hello.kind == HelloKind::Gateway as i32;
        let node = parse_node(
            &hello.node,
            if gateway {
                Kind::VirtualGateway
            } else {
                Kind::VirtualNode
            },
        )?;
        let admitted = self.admit(&hello.token, peer.as_deref(), &node).await?;
        let id = self.controller.proxies().connected(ProxyStatus {
            node: hello.node.clone(),
            kind: if gateway { "gateway" } else { "sidecar" }.into(),
            instance: hello.instance.clone(),
            proxy_version: hello.proxy_version.clone(),
            connected_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            desired_version: None,
            sent_version: None,
            acked_version: None,
            nacked_version: None,
            nack_reason: None,
            problems: Vec::new(),
            withheld: None,
            identity: None,
            certificate_expires: None,
            uses: Default::default(),
        });
        tracing::info!(node = %hello.node, instance = %hello.instance, applied = %hello.applied_version, "proxy connected");
        let (tx, rx) = mpsc::channel(4);
        let controller = self.controller.clone();
        let csr = Some(hello.csr).filter(|c| admitted && !c.is_empty());
        tokio::spawn(async move {
            let admission = Admission { admitted, csr };
            serve_proxy(
                &controller,
                id,
                &node,
                hello.applied_version,
                admission,
                inbound,
                tx,
            )
            .await;
            controller.proxies().disconnected(id);
            tracing::info!(node = %node, "proxy disconnected");
        });
        let out =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            );
        Ok(Response::new(Box::pin(out)))
    }
}

/// One proxy's stream: what it runs, what was last sent, and the pushes' timing.
struct Session<'a> {
    controller: &'a Arc<Controller>,
    id: u64,
    node: &'a ResourceKey,
    /// sidecar or gateway (the metrics label).
    kind: &'static str,
    nonce: u64,
    /// The version the proxy runs, as far as we know.
    running: Option<String>,
    /// The last version sent.
    sent: Option<String>,
    /// When the last push left, for the ACK latency.
    pushed_at: std::time::Instant,
    tx: mpsc::Sender<Result<SnapshotPush, Status>>,
}

async fn serve_proxy(
    controller: &Arc<Controller>,
    id: u64,
    node: &ResourceKey,
    applied: String,
    admission: Admission,
    mut inbound: Streaming<ProxyMessage>,
    tx: mpsc::Sender<Result<SnapshotPush, Status>>,
) {
    let mut views = controller.subscribe();
    let mut session = Session {
        controller,
        id,
        node,
        kind: if node.kind == Kind::VirtualGateway {
            "gateway"
        } else {
            "sidecar"
        },
        nonce: 0,
        running: Some(applied).filter(|v| !v.is_empty()),
        sent: None,
        pushed_at: std::time::Instant::now(),
        tx,
    };
    // The certificate first: the snapshot's mTLS needs it.
    if let Some(csr) = admission.csr {
        if session.certify(&csr).await.is_err() {
            return;
        }
    }
    loop {
        let view = views.borrow_and_update().clone();
        let Some(desired) = session.desired(view).await else {
            return;
        };
        if session.offer(desired).await.is_err() {
            return;
        }
        tokio::select! {
            changed = views.changed() => if changed.is_err() { return },
            msg = inbound.message() => match msg {
                Ok(Some(ProxyMessage { kind: Some(Msg::Renew(renew)) })) => {
                    if !admission.admitted {
                        tracing::warn!(node = %node, "renewal on a stream no join token admitted: ignored");
                    } else if session.certify(&renew.csr).await.is_err() {
                        return;
                    }
                }
                Ok(Some(ProxyMessage { kind: Some(kind) })) => session.answer(kind),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            },
        }
    }
}

/// The proxy went away.
struct Gone;

impl Session<'_> {
    /// The snapshot the proxy should run at `view`; None if translation failed (a bug).
    /// Translating and checking is CPU work, done once per revision and node, off the async
    /// threads; every other pass reads the cache.
    async fn desired(&self, view: Arc<View>) -> Option<Option<Arc<Translated>>> {
        if let Some(desired) = self.controller.cached_snapshot(&view, self.node) {
            return Some(desired);
        }
        let (controller, node) = (self.controller.clone(), self.node.clone());
        match tokio::task::spawn_blocking(move || controller.snapshot_for(&view, &node)).await {
            Ok(desired) => Some(desired),
            Err(e) => {
                tracing::error!(error = %e, "translation failed");
                None
            }
        }
    }

    /// Records what the proxy should run and sends it unless the proxy runs it or has it.
    async fn offer(&mut self, desired: Option<Arc<Translated>>) -> Result<(), Gone> {
        let proxies = self.controller.proxies();
        let Some(t) = desired else {
            proxies.update(self.id, |p| {
                p.desired_version = None;
                p.problems.clear();
                p.withheld = None;
            });
            return Ok(());
        };
        if t.withheld.is_some() {
            // Never sent: the proxy keeps what it runs; status says why.
            proxies.update(self.id, |p| {
                p.desired_version = None;
                p.problems = t.problems.clone();
                p.withheld = t.withheld.clone();
                p.uses = t.uses.clone();
            });
            return Ok(());
        }
        let version = &t.snapshot.version;
        proxies.update(self.id, |p| {
            p.desired_version = Some(version.clone());
            p.problems = t.problems.clone();
            p.withheld = None;
            p.uses = t.uses.clone();
            if self.running.as_ref() == Some(version) {
                p.acked_version = Some(version.clone());
            }
        });
        if self.running.as_ref() == Some(version) || self.sent.as_ref() == Some(version) {
            return Ok(());
        }
        self.nonce += 1;
        let push = SnapshotPush {
            nonce: self.nonce.to_string(),
            snapshot: Some(t.snapshot.clone()),
            identity: None,
        };
        self.tx.send(Ok(push)).await.map_err(|_| Gone)?;
        let metrics = self.controller.metrics();
        metrics.pushes.with_label_values(&[self.kind]).inc();
        self.pushed_at = std::time::Instant::now();
        self.sent = Some(version.clone());
        proxies.update(self.id, |p| p.sent_version = Some(version.clone()));
        Ok(())
    }

    /// Issues a workload certificate for `csr` and pushes it; a CSR the CA refuses is logged
    /// and answered with nothing (the proxy keeps what it has).
    async fn certify(&mut self, csr: &str) -> Result<(), Gone> {
        let Some((ca, _)) = self.controller.identity() else {
            return Ok(());
        };
        let issued = match ca.issue(csr, self.node) {
            Ok(issued) => issued,
            Err(e) => {
                tracing::warn!(node = %self.node, error = %e, "certificate not issued");
                return Ok(());
            }
        };
        let not_after = issued
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let expires = humantime::format_rfc3339_seconds(issued.not_after).to_string();
        tracing::info!(node = %self.node, identity = %issued.spiffe_id, %expires, "certificate issued");
        self.controller.proxies().update(self.id, |p| {
            p.identity = Some(issued.spiffe_id.clone());
            p.certificate_expires = Some(expires);
        });
        self.nonce += 1;
        let push = SnapshotPush {
            nonce: self.nonce.to_string(),
            snapshot: None,
            identity: Some(trellis_proto::v1::Identity {
                certificate_chain: issued.chain_pem,
                trust_bundle: ca.trust_bundle().to_string(),
                spiffe_id: issued.spiffe_id,
                not_after,
            }),
        };
        self.tx.send(Ok(push)).await.map_err(|_| Gone)
    }

    /// Records the proxy's ACK or NACK.
    fn answer(&mut self, message: Msg) {
        let metrics = self.controller.metrics();
        let proxies = self.controller.proxies();
        match message {
            Msg::Ack(ack) => {
                metrics.answers.with_label_values(&["ack"]).inc();
                if self.sent.as_ref() == Some(&ack.version) {
                    metrics
                        .ack_latency
                        .observe(self.pushed_at.elapsed().as_secs_f64());
                }
                self.running = Some(ack.version.clone());
                proxies.update(self.id, |p| {
                    p.acked_version = Some(ack.version.clone());
                    if p.nacked_version.as_ref() == Some(&ack.version) {
                        p.nacked_version = None;
                        p.nack_reason = None;
                    }
                });
            }
            Msg::Nack(nack) => {
                metrics.answers.with_label_values(&["nack"]).inc();
                let reason = nack
                    .errors
                    .iter()
                    .map(|e| format!("{}: {}", e.path, e.reason))
                    .collect::<Vec<_>>()
                    .join("; ");
                tracing::warn!(node = %self.node, version = %nack.version, reason = %reason, "proxy rejected its snapshot");
                proxies.update(self.id, |p| {
                    p.nacked_version = Some(nack.version.clone());
                    p.nack_reason = Some(reason);
                });
            }
            _ => {}
        }
    }
}
