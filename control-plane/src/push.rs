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
    identity::{MIN_RENEWAL_INTERVAL, PeerIdentity},
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

/// What the session sends its proxy's response stream, boxed: a channel allocates a block of
/// 32 slots when made, which at the push's size (~250 bytes) was 8 KiB per connected proxy.
type Outgoing = Box<Result<SnapshotPush, Status>>;

/// How the hello proved who the proxy is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Admitted {
    /// It did not (identity is not required here): a snapshot, no certificate.
    Anonymous,
    /// By a join token: its first CSR may bring any key.
    Token,
    /// By its workload certificate: renewals keep that certificate's key.
    Certificate(PeerIdentity),
}

/// What the hello proved, and its first CSR.
struct Admission {
    /// The proxy's stream (its node, hello's instance and the stream's id), whose
    /// measurement reports are counted from one to the next.
    process: String,
    admitted: Admitted,
    csr: Option<String>,
}

impl ConfigService {
    /// Checks the hello: a workload certificate (verified in the TLS handshake) for the node,
    /// not revoked, of a node the mesh still has, admits it; else a join token does. Without
    /// either, the proxy gets its snapshot only where identity is not required.
    async fn admit(
        &self,
        token: &str,
        certificate: Option<&PeerIdentity>,
        node: &ResourceKey,
    ) -> Result<Admitted, Status> {
        let identity = self.controller.identity();
        if let (Some(peer), Some((ca, _))) = (certificate, identity) {
            match self.admit_certificate(ca, peer, node).await {
                Ok(()) => return Ok(Admitted::Certificate(peer.clone())),
                // A join token still admits a proxy whose certificate no longer does.
                Err(refused) if token.is_empty() => return Err(refused),
                Err(refused) => {
                    return self.admit_token(token, node).await.map_err(|e| {
                        Status::new(
                            e.code(),
                            format!("{}; the join token: {}", refused.message(), e.message()),
                        )
                    });
                }
            }
        }
        if token.is_empty() {
            return match identity {
                Some((_, true)) => Err(Status::unauthenticated(
                    "this control plane requires a join token (trellis token create) or a workload certificate",
                )),
                _ => Ok(Admitted::Anonymous),
            };
        }
        self.admit_token(token, node).await
    }

    /// A join token admits the proxy of the node it names.
    async fn admit_token(&self, token: &str, node: &ResourceKey) -> Result<Admitted, Status> {
        admit_token(&self.controller, token, node).await?;
        Ok(Admitted::Token)
    }

    /// A certificate admits its node's proxy while the node is in the mesh and its identity
    /// was not revoked after the certificate was issued.
    async fn admit_certificate(
        &self,
        ca: &crate::identity::Ca,
        peer: &PeerIdentity,
        node: &ResourceKey,
    ) -> Result<(), Status> {
        let wanted = ca.spiffe_id(node);
        if *peer.spiffe_id != *wanted {
            return Err(Status::permission_denied(format!(
                "the client certificate is for {}, not {wanted}",
                peer.spiffe_id
            )));
        }
        if self.controller.view().state.get(node).is_none() {
            return Err(Status::permission_denied(format!(
                "the client certificate is for {node}, which the mesh no longer has: a new join token is needed"
            )));
        }
        let (revoked, _) = crate::identity::revocation(self.controller.store().as_ref(), node)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if revoked.is_some_and(|r| r.covers_certificate(peer.issued)) {
            return Err(Status::permission_denied(format!(
                "the client certificate of {node} was revoked (trellis identity revoke): a new join token is needed"
            )));
        }
        Ok(())
    }
}

/// Admits the proxy of `node` (a trellis-proxy's hello, an Envoy's ADS stream) by the join
/// token it presents: one of this control plane's (`trellis token create`), or one its token
/// reviewer recognizes (a Kubernetes service account's).
pub(crate) async fn admit_token(
    controller: &Controller,
    token: &str,
    node: &ResourceKey,
) -> Result<(), Status> {
    if controller.identity().is_none() {
        return Err(Status::failed_precondition(
            "this control plane issues no identities",
        ));
    }
    if let Some(reviewer) = controller.token_reviewer()
        && reviewer.recognizes(token)
    {
        use crate::controller::TokenRefused;
        return match reviewer.review(token, node, controller.view()).await {
            Ok(()) => Ok(()),
            Err(TokenRefused::Unauthenticated(why)) => Err(Status::unauthenticated(why)),
            Err(TokenRefused::Denied(why)) => Err(Status::permission_denied(why)),
            Err(TokenRefused::Unavailable(why)) => Err(Status::unavailable(why)),
        };
    }
    match crate::identity::admit(controller.store().as_ref(), token, node).await {
        Ok(()) => Ok(()),
        Err(crate::identity::IdentityError::Denied(why)) => Err(Status::permission_denied(why)),
        Err(crate::identity::IdentityError::Unauthenticated(why)) => {
            Err(Status::unauthenticated(why))
        }
        Err(e) => Err(Status::unavailable(e.to_string())),
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
        let peer = request.extensions().get::<PeerIdentity>().cloned();
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
        let admitted = self.admit(&hello.token, peer.as_ref(), &node).await?;
        let id = self.controller.proxies().connected(ProxyStatus::connected(
            hello.node.clone(),
            if gateway { "gateway" } else { "sidecar" },
            hello.instance.clone(),
            hello.proxy_version.clone(),
        ));
        tracing::info!(node = %hello.node, instance = %hello.instance, applied = %hello.applied_version, "proxy connected");
        let (tx, rx) = mpsc::channel(4);
        let controller = self.controller.clone();
        let csr = Some(hello.csr).filter(|c| admitted != Admitted::Anonymous && !c.is_empty());
        tokio::spawn(async move {
            let process = format!("{}#{}#{id}", hello.node, hello.instance);
            let _connected = Connected {
                controller: controller.clone(),
                id,
                process: process.clone(),
            };
            let admission = Admission {
                process,
                admitted,
                csr,
            };
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
            tracing::info!(node = %node, "proxy disconnected");
        });
        let out = futures_util::stream::unfold(rx, |mut rx: mpsc::Receiver<Outgoing>| async move {
            rx.recv().await.map(|m| (*m, rx))
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// A connected proxy's row in status and its measurements, removed when its session ends
/// however it ends (a panic too: status never shows a proxy that is gone).
struct Connected {
    controller: Arc<Controller>,
    id: u64,
    process: String,
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.controller.proxies().disconnected(self.id);
        self.controller.measurements().forget(&self.process);
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
    /// The routes its snapshot asks measurements of (reports of others are dropped).
    measured: std::collections::HashSet<String>,
    /// The key certificates on this stream are for: the admitting certificate's, else the
    /// first one issued here (a renewal keeps its key).
    key: Option<Vec<u8>>,
    /// When the last renewal was answered (at most one per [`MIN_RENEWAL_INTERVAL`]).
    renewed_at: Option<tokio::time::Instant>,
    /// The identity last sent (the certificate and the bundle), to send again with a rotated
    /// bundle.
    issued: Option<trellis_proto::v1::Identity>,
    /// The push that carried the last identity, that bundle's roots and the certificate's
    /// root: its ACK records them (the proxy uses them from then on).
    bundle_sent: Option<(String, Vec<String>, Option<String>)>,
    /// The CA asked this proxy to renew (a promoted rotation): its next renewal is not held to
    /// the interval.
    renew_asked: bool,
    tx: mpsc::Sender<Outgoing>,
}

/// Why a proxy's stream ends, told to the proxy.
fn ended(why: Status) -> Outgoing {
    Box::new(Err(why))
}

async fn serve_proxy(
    controller: &Arc<Controller>,
    id: u64,
    node: &ResourceKey,
    applied: String,
    admission: Admission,
    mut inbound: Streaming<ProxyMessage>,
    tx: mpsc::Sender<Outgoing>,
) {
    let mut views = controller.subscribe();
    // An admitted stream ends when its node's identity is revoked (on any control plane).
    let mut revocations = match &admission.admitted {
        Admitted::Anonymous => None,
        Admitted::Token | Admitted::Certificate(_) => {
            let store = controller.store().as_ref();
            // The rare steps' futures are boxed (here and below): the session's task, one
            // per connected proxy, is as large as its largest inline future.
            let watched = match Box::pin(crate::identity::revocation(store, node)).await {
                Ok((_, revision)) => {
                    Box::pin(crate::identity::watch_revocation(store, node, revision)).await
                }
                Err(e) => Err(e),
            };
            match watched {
                Ok(w) => Some(w),
                Err(e) => {
                    let _ = tx.send(ended(Status::unavailable(e.to_string()))).await;
                    return;
                }
            }
        }
    };
    let admitted_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
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
        measured: Default::default(),
        pushed_at: std::time::Instant::now(),
        key: match &admission.admitted {
            Admitted::Certificate(peer) => Some(peer.public_key.to_vec()),
            Admitted::Token | Admitted::Anonymous => None,
        },
        renewed_at: None,
        issued: None,
        bundle_sent: None,
        renew_asked: false,
        tx,
    };
    // None without a CA (nothing rotates), or once the CA's channel closed.
    let mut rotations = controller.identity().map(|(ca, _)| ca.subscribe());
    if let Some(r) = rotations.as_mut() {
        r.borrow_and_update();
    }
    // The certificate first: the snapshot's mTLS needs it.
    if let Some(csr) = admission.csr
        && Box::pin(session.certify(&csr)).await.is_err()
    {
        return;
    }
    // What the last offer was made from: a view that changed elsewhere (the audit log, what
    // control planes publish of their proxies, the leader key) wakes every stream, and each
    // goes back to sleep without a lookup.
    let mut offered = None;
    loop {
        let view = views.borrow_and_update().clone();
        let made_from = Some(controller.cache_key(&view));
        if made_from != offered {
            let Some(desired) = session.desired(view).await else {
                return;
            };
            if session.offer(desired).await.is_err() {
                return;
            }
            offered = made_from;
        }
        tokio::select! {
            changed = views.changed() => if changed.is_err() { return },
            rotated = async {
                match rotations.as_mut() {
                    Some(r) => r.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if rotated.is_err() {
                    rotations = None;
                } else if Box::pin(session.rotated()).await.is_err() {
                    return;
                }
            }
            revoked = crate::identity::next_revocation(revocations.as_mut(), node) => {
                if revoked {
                    tracing::info!(node = %node, "identity revoked: stream closed");
                    let _ = session.tx.send(ended(Status::permission_denied(format!(
                        "the identity of {node} was revoked (trellis identity revoke): a new join token is needed"
                    )))).await;
                    return;
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(ProxyMessage { kind: Some(Msg::Renew(renew)) })) => {
                    if admission.admitted == Admitted::Anonymous {
                        tracing::warn!(node = %node, "renewal on a stream no join token or certificate admitted: ignored");
                    } else if let Err(why) = Box::pin(session.renewable(admitted_ms)).await {
                        tracing::warn!(node = %node, reason = %why.message(), "renewal refused");
                        let _ = session.tx.send(ended(why)).await;
                        return;
                    } else if Box::pin(session.certify(&renew.csr)).await.is_err() {
                        return;
                    }
                }
                Ok(Some(ProxyMessage { kind: Some(Msg::Report(mut report)) })) => {
                    // Only the routes its snapshot asked for.
                    report.routes.retain(|m| session.measured.contains(&m.route));
                    report.measured_routes.retain(|r| session.measured.contains(r));
                    let caller = format!("{}/{}/{}", node.kind, node.namespace, node.name);
                    session.controller.measurements().record(&admission.process, &caller, &report);
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
        self.measured = t
            .snapshot
            .measure
            .iter()
            .flat_map(|m| m.routes.iter().cloned())
            .collect();
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
        self.tx.send(Box::new(Ok(push))).await.map_err(|_| Gone)?;
        let metrics = self.controller.metrics();
        metrics.pushes.with_label_values(&[self.kind]).inc();
        self.pushed_at = std::time::Instant::now();
        self.sent = Some(version.clone());
        proxies.update(self.id, |p| p.sent_version = Some(version.clone()));
        Ok(())
    }

    /// Whether a renewal may be answered now: not sooner than [`MIN_RENEWAL_INTERVAL`] after
    /// the last one, and not when the node's identity was revoked since the stream was admitted
    /// (at `admitted_ms`, Unix milliseconds).
    async fn renewable(&mut self, admitted_ms: u64) -> Result<(), Status> {
        let now = tokio::time::Instant::now();
        if let Some(last) = self.renewed_at.filter(|_| !self.renew_asked)
            && now.duration_since(last) < MIN_RENEWAL_INTERVAL
        {
            return Err(Status::resource_exhausted(format!(
                "renewal refused: at most one every {}s on a config stream",
                MIN_RENEWAL_INTERVAL.as_secs()
            )));
        }
        let (revoked, _) = crate::identity::revocation(self.controller.store().as_ref(), self.node)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if revoked.is_some_and(|r| r.revoked_ms >= admitted_ms) {
            return Err(Status::permission_denied(format!(
                "renewal refused: the identity of {} was revoked (trellis identity revoke): a new join token is needed",
                self.node
            )));
        }
        self.renewed_at = Some(now);
        self.renew_asked = false;
        Ok(())
    }

    /// A step of a root rotation: the proxy gets the new trust bundle (with the certificate it
    /// has), and, when its certificate is not from the root that signs now, is asked to renew.
    async fn rotated(&mut self) -> Result<(), Gone> {
        let (Some((ca, _)), Some(mut identity)) = (self.controller.identity(), self.issued.clone())
        else {
            return Ok(());
        };
        identity.trust_bundle = ca.trust_bundle();
        identity.renew = !ca.issued_by_current(&identity.certificate_chain);
        self.renew_asked |= identity.renew;
        self.send_identity(ca, identity).await
    }

    /// Sends an identity (certificate and bundle); the proxy's ACK of it records the bundle's
    /// roots.
    async fn send_identity(
        &mut self,
        ca: &crate::identity::Ca,
        identity: trellis_proto::v1::Identity,
    ) -> Result<(), Gone> {
        self.nonce += 1;
        let root = crate::identity::chain_root(&identity.certificate_chain);
        self.bundle_sent = Some((self.nonce.to_string(), ca.bundle_roots(), root));
        self.issued = Some(identity.clone());
        let push = SnapshotPush {
            nonce: self.nonce.to_string(),
            snapshot: None,
            identity: Some(identity),
        };
        self.tx.send(Box::new(Ok(push))).await.map_err(|_| Gone)
    }

    /// Issues a workload certificate for `csr` and pushes it; a CSR the CA refuses is logged
    /// and answered with nothing (the proxy keeps what it has), one for another key than the
    /// stream's ends the stream with the reason.
    async fn certify(&mut self, csr: &str) -> Result<(), Gone> {
        let Some((ca, _)) = self.controller.identity() else {
            return Ok(());
        };
        let issued = match ca.issue(csr, self.node, self.key.as_deref()) {
            Ok(issued) => issued,
            Err(crate::identity::IdentityError::Denied(why)) => {
                tracing::warn!(node = %self.node, reason = %why, "certificate refused");
                let _ = self.tx.send(ended(Status::permission_denied(why))).await;
                return Err(Gone);
            }
            Err(e) => {
                tracing::warn!(node = %self.node, error = %e, "certificate not issued");
                return Ok(());
            }
        };
        self.key = Some(issued.public_key.clone());
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
        let identity = trellis_proto::v1::Identity {
            certificate_chain: issued.chain_pem,
            trust_bundle: ca.trust_bundle(),
            spiffe_id: issued.spiffe_id,
            not_after,
            renew: false,
        };
        self.send_identity(ca, identity).await
    }

    /// Records the proxy's ACK or NACK.
    fn answer(&mut self, message: Msg) {
        let metrics = self.controller.metrics();
        let proxies = self.controller.proxies();
        match message {
            Msg::Ack(ack)
                if self
                    .bundle_sent
                    .as_ref()
                    .is_some_and(|(n, ..)| *n == ack.nonce) =>
            {
                // The proxy uses the identity and bundle of that push.
                if let Some((_, roots, root)) = self.bundle_sent.take() {
                    proxies.update(self.id, |p| {
                        p.trust_roots = roots;
                        p.certificate_root = root;
                    });
                }
            }
            Msg::Nack(nack)
                if self
                    .bundle_sent
                    .as_ref()
                    .is_some_and(|(n, ..)| *n == nack.nonce) =>
            {
                self.bundle_sent = None;
                let reason = nack
                    .errors
                    .iter()
                    .map(|e| format!("{}: {}", e.path, e.reason))
                    .collect::<Vec<_>>()
                    .join("; ");
                tracing::warn!(node = %self.node, reason = %reason, "proxy cannot use its identity");
            }
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
