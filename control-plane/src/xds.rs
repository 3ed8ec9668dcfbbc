//! Envoy's aggregated discovery service (ADS, state of the world, `envoy.service.discovery.v3`)
//! on the control plane's listener: a stock Envoy sidecar or gateway gets its node's snapshot as
//! LDS/RDS/CDS/EDS resources (`envoy`), versioned with the snapshot's version and a nonce per
//! response, and its ACKs and NACKs (with Envoy's `error_detail`) show in `trellis status` next
//! to trellis-proxy's.
//!
//! Envoy names its node in its bootstrap: `node.id` is `NAMESPACE/NAME` of a VirtualNode (a
//! VirtualGateway with the metadata `TRELLIS_GATEWAY: true`), or App Mesh's
//! `mesh/<mesh>/virtualNode/<name>` (`virtualGateway/`; the full ARN too, in `node.id` or the
//! metadata `APPMESH_RESOURCE_ARN`), which names the VirtualNode whose `awsName`, or whose
//! `NAME_NAMESPACE` (App Mesh's controller's name for it), or whose name is `<name>` in that
//! mesh. Its listeners' addresses come from the metadata `TRELLIS_INGRESS` and
//! `TRELLIS_EGRESS` (default `0.0.0.0:15000` and `127.0.0.1:15001`, App Mesh's).
//!
//! An Envoy proves its node with a join token in its stream's gRPC metadata
//! (`x-trellis-join-token`, from its bootstrap): the token is checked as a trellis-proxy's, and
//! the stream then gets the node's workload certificate over SDS on the same stream — with a
//! key made here, as Envoy cannot send a signing request (App Mesh's SDS gave Envoys theirs
//! so) — renewed at half its life, re-issued and re-bundled through a root rotation, and the
//! stream is closed when the node's identity is revoked. Without a token the stream is
//! anonymous: served only where identities are optional, and never given a certificate.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use envoy_types::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_server::AggregatedDiscoveryService,
        },
    },
    google::protobuf::value::Kind as ValueKind,
};
use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    controller::Controller,
    envoy::{self, Addresses, Holder, Resources},
    model::{Kind, ResourceKey, Spec},
    status::ProxyStatus,
    view::View,
};

/// How long a new stream may take to send its first request.
const FIRST_REQUEST: Duration = Duration::from_secs(10);
/// The resource types, in the order a new version is sent (make before break): the clusters
/// old and new with their endpoints; once Envoy has them, the listeners and routes; once it runs
/// those, the clusters without the ones no longer used.
const ORDER: [&str; 4] = [
    envoy::CLUSTER,
    envoy::ENDPOINT,
    envoy::LISTENER,
    envoy::ROUTE,
];

/// Where a new version's make-before-break stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Nothing in flight.
    Idle,
    /// The old and new clusters (and endpoints) sent: waiting for them to be acknowledged.
    Clusters,
    /// The new listeners and routes sent: waiting for them before removing old clusters.
    Routes,
}

/// The ADS service.
#[derive(Debug, Clone)]
pub struct AdsService {
    controller: Arc<Controller>,
    /// Translations by (version, what else they depend on), shared by the streams of a
    /// node's Envoys (most listen alike): one translation per version, not per Envoy.
    translations: Arc<std::sync::Mutex<Translations>>,
}

type Translations = HashMap<(String, Holder), Arc<Result<Arc<Resources>, envoy::Refused>>>;

/// Translations kept at most (older versions are dropped when more come).
const TRANSLATIONS: usize = 256;

impl AdsService {
    pub fn new(controller: Arc<Controller>) -> Self {
        Self {
            controller,
            translations: Arc::default(),
        }
    }
}

type Responses = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaResponses = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

/// A string from the node's metadata.
fn metadata<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    let field = node.metadata.as_ref()?.fields.get(key)?;
    match field.kind.as_ref()? {
        ValueKind::StringValue(s) => Some(s),
        _ => None,
    }
}

fn metadata_bool(node: &Node, key: &str) -> bool {
    let Some(field) = node.metadata.as_ref().and_then(|m| m.fields.get(key)) else {
        return false;
    };
    match field.kind.as_ref() {
        Some(ValueKind::BoolValue(b)) => *b,
        Some(ValueKind::StringValue(s)) => s == "true",
        _ => false,
    }
}

/// The VirtualNode or VirtualGateway an Envoy's node names (see the module's header).
pub fn identify(view: &View, node: &Node) -> Result<ResourceKey, String> {
    let arn = metadata(node, "APPMESH_RESOURCE_ARN")
        .or_else(|| metadata(node, "APPMESH_VIRTUAL_NODE_NAME"))
        .unwrap_or(node.id.as_str());
    // App Mesh: [arn:aws:appmesh:REGION:ACCOUNT:]mesh/MESH/virtualNode/NAME.
    let short = arn.rsplit_once(':').map_or(arn, |(_, rest)| rest);
    let parts: Vec<&str> = short.split('/').collect();
    if let ["mesh", mesh, kind, name] = parts.as_slice() {
        let kind = match *kind {
            "virtualNode" => Kind::VirtualNode,
            "virtualGateway" => Kind::VirtualGateway,
            other => {
                return Err(format!(
                    "{arn:?}: {other:?} is not virtualNode or virtualGateway"
                ));
            }
        };
        // A shared mesh is MESH@OWNER.
        let mesh = mesh.split('@').next().unwrap_or(mesh);
        let found: Vec<&ResourceKey> = view
            .state
            .iter()
            .filter(|(k, r)| {
                if k.kind != kind {
                    return false;
                }
                let aws_name = match &r.spec {
                    Spec::VirtualNode(n) => n.aws_name.as_deref(),
                    Spec::VirtualGateway(g) => g.aws_name.as_deref(),
                    _ => None,
                };
                let named = aws_name == Some(*name)
                    || format!("{}_{}", k.name, k.namespace) == *name
                    || (aws_name.is_none() && k.name == *name);
                named && crate::validate::mesh_of(&view.state, r).is_none_or(|m| m == mesh)
            })
            .map(|(k, _)| k)
            .collect();
        return match found.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(format!("{arn:?}: no {kind} {name:?} in mesh {mesh:?}")),
            several => Err(format!(
                "{arn:?} names several: {}",
                several
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        };
    }
    let kind = if metadata_bool(node, "TRELLIS_GATEWAY") {
        Kind::VirtualGateway
    } else {
        Kind::VirtualNode
    };
    match node.id.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(ResourceKey::new(kind, ns, name))
        }
        _ => Err(format!(
            "node.id {:?} must be NAMESPACE/NAME or App Mesh's mesh/MESH/virtualNode/NAME",
            node.id
        )),
    }
}

fn addresses(node: &Node) -> Result<Addresses, String> {
    let mut a = Addresses::default();
    for (key, slot) in [
        ("TRELLIS_INGRESS", &mut a.ingress),
        ("TRELLIS_EGRESS", &mut a.egress),
    ] {
        if let Some(v) = metadata(node, key) {
            *slot = v
                .parse()
                .map_err(|_| format!("node.metadata.{key}: {v:?} is not IP:PORT"))?;
        }
    }
    Ok(a)
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = Responses;
    type DeltaAggregatedResourcesStream = DeltaResponses;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Responses>, Status> {
        let controller = self.controller.clone();
        let translations = self.translations.clone();
        let token = request
            .metadata()
            .get(envoy::JOIN_TOKEN_HEADER)
            .map(|v| v.to_str().map(str::to_string))
            .transpose()
            .map_err(|_| Status::invalid_argument("the join token is not text"))?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(FIRST_REQUEST, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no discovery request"))??
            .ok_or_else(|| Status::cancelled("the stream ended"))?;
        let node_info = first
            .node
            .clone()
            .ok_or_else(|| Status::invalid_argument("the first request must carry the node"))?;
        let node = identify(&controller.view(), &node_info).map_err(Status::not_found)?;
        let addresses = addresses(&node_info).map_err(Status::invalid_argument)?;
        // A revocation from this moment on ends the stream (checked again once watched).
        let admitted_ms = unix_ms();
        let admitted = match token.filter(|t| !t.is_empty()) {
            Some(token) => {
                crate::push::admit_token(&controller, &token, &node).await?;
                true
            }
            None if controller.identity().is_some_and(|(_, required)| required) => {
                return Err(Status::unauthenticated(
                    "this control plane requires a join token (trellis token create; give it to Envoy with trellis bootstrap envoy --join-token)",
                ));
            }
            None => false,
        };
        use envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType;
        let build = match &node_info.user_agent_version_type {
            Some(UserAgentVersionType::UserAgentBuildVersion(b)) => b
                .version
                .as_ref()
                .map(|v| format!("{}.{}.{}", v.major_number, v.minor_number, v.patch)),
            Some(UserAgentVersionType::UserAgentVersion(v)) => Some(v.clone()),
            None => None,
        };
        let build = format!(
            "{} {}",
            if node_info.user_agent_name.is_empty() {
                "envoy"
            } else {
                &node_info.user_agent_name
            },
            build.unwrap_or_default()
        )
        .trim()
        .to_string();
        let id = controller.proxies().connected(ProxyStatus::connected(
            format!("{}/{}", node.namespace, node.name),
            if node.kind == Kind::VirtualGateway {
                "envoy-gateway"
            } else {
                "envoy"
            },
            node_info.id.clone(),
            build,
        ));
        tracing::info!(node = %node, envoy = %node_info.id, "envoy connected");
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut session = Session {
                translations: &translations,
                controller: &controller,
                id,
                node: &node,
                holder: Holder {
                    addresses,
                    identity: admitted && controller.identity().is_some(),
                    denied: Vec::new(),
                },
                unrevoke_at: None,
                admitted_ms,
                renew_at: None,
                tx,
                current: None,
                applied: None,
                stage: Stage::Idle,
                subscriptions: HashMap::new(),
                secrets: Subscription::default(),
                certified: None,
                secrets_sent: None,
                secrets_nacked: false,
                nonce: 0,
            };
            session.serve(first, inbound).await;
            controller.proxies().disconnected(id);
            tracing::info!(node = %node, "envoy disconnected");
        });
        let out = futures_util::stream::unfold(rx, |mut rx: mpsc::Receiver<_>| async move {
            rx.recv().await.map(|m| (m, rx))
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaResponses>, Status> {
        Err(Status::unimplemented(
            "incremental xDS is not served: use state-of-the-world ADS (api_type: GRPC), as `trellis bootstrap envoy` writes",
        ))
    }
}

/// What one resource type's subscription has been sent and answered.
#[derive(Debug, Default)]
struct Subscription {
    /// Names asked for (EDS and RDS); empty: every resource (CDS and LDS).
    names: Vec<String>,
    /// The last response: its version and nonce.
    sent: Option<(String, String)>,
    /// The last version the Envoy acknowledged, and the last it rejected.
    acked: Option<String>,
    nacked: Option<String>,
}

/// The workload certificate an Envoy holds.
struct Certified {
    chain_pem: String,
    key_pem: String,
}

impl Subscription {
    /// Takes a request's names; None for an answer to an older response than the last sent
    /// (superseded: ignored), else whether the names asked for changed.
    fn take(&mut self, request: &DiscoveryRequest) -> Option<bool> {
        if !request.response_nonce.is_empty()
            && self.sent.as_ref().map(|(_, n)| n) != Some(&request.response_nonce)
        {
            return None;
        }
        let changed = self.names != request.resource_names;
        self.names = request.resource_names.clone();
        Some(changed)
    }
}

struct Session<'a> {
    translations: &'a std::sync::Mutex<Translations>,
    controller: &'a Arc<Controller>,
    id: u64,
    node: &'a ResourceKey,
    /// Its addresses, whether it holds a certificate, the identities it must refuse.
    holder: Holder,
    /// When the earliest denied identity's certificates have all expired.
    unrevoke_at: Option<tokio::time::Instant>,
    /// When the stream was admitted (Unix milliseconds): a revocation since ends it.
    admitted_ms: u64,
    /// When its certificate is renewed (at half its life), or issuing is tried again.
    renew_at: Option<tokio::time::Instant>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    /// The version and resources the Envoy should run.
    current: Option<(String, Arc<Resources>)>,
    /// The last resources every subscribed type acknowledged (what the Envoy runs).
    applied: Option<Arc<Resources>>,
    stage: Stage,
    subscriptions: HashMap<String, Subscription>,
    /// SDS, apart: secrets are versioned on their own, not with the snapshot.
    secrets: Subscription,
    certified: Option<Certified>,
    /// The last secrets response's nonce, the bundle's roots and the certificate's root it
    /// carried: its ACK records them (the Envoy uses them from then on).
    secrets_sent: Option<(String, Vec<String>, Option<String>)>,
    /// The Envoy rejected its secrets: shown as a NACK until it takes them.
    secrets_nacked: bool,
    nonce: u64,
}

struct Gone;

impl Session<'_> {
    async fn serve(&mut self, first: DiscoveryRequest, mut inbound: Streaming<DiscoveryRequest>) {
        let mut views = self.controller.subscribe();
        // An admitted stream ends when its node's identity is revoked (on any control plane),
        // also between its admission and the watch.
        let mut revocations = None;
        if self.holder.identity {
            let store = self.controller.store().as_ref();
            let watched = match Box::pin(crate::identity::revocation(store, self.node)).await {
                Ok((Some(r), _)) if r.revoked_ms >= self.admitted_ms => {
                    self.revoked().await;
                    return;
                }
                Ok((_, revision)) => {
                    Box::pin(crate::identity::watch_revocation(
                        store, self.node, revision,
                    ))
                    .await
                }
                Err(e) => Err(e),
            };
            match watched {
                Ok(w) => revocations = Some(w),
                Err(e) => {
                    let _ = self.tx.send(Err(Status::unavailable(e.to_string()))).await;
                    return;
                }
            }
            self.certify();
        }
        // Every step of a root rotation reaches the Envoy's secrets (the bundle goes to
        // anonymous Envoys too).
        let mut rotations = self.controller.identity().map(|(ca, _)| {
            let mut r = ca.subscribe();
            r.borrow_and_update();
            r
        });
        let view = views.borrow_and_update().clone();
        self.refresh(&view).await;
        if self.request(first).await.is_err() {
            return;
        }
        loop {
            let renew_at = self.renew_at;
            tokio::select! {
                changed = views.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let view = views.borrow_and_update().clone();
                    if self.refresh(&view).await && self.push_all().await.is_err() {
                        return;
                    }
                }
                () = sleep_until(self.unrevoke_at) => {
                    // A denied identity's certificates have all expired: it is taken again.
                    self.unrevoke_at = None;
                    let view = views.borrow().clone();
                    if self.refresh(&view).await && self.push_all().await.is_err() {
                        return;
                    }
                }
                () = sleep_until(renew_at) => {
                    // Not for a node revoked since the stream was admitted.
                    let store = self.controller.store().as_ref();
                    let checked = tokio::time::timeout(
                        RETRY / 3,
                        Box::pin(crate::identity::revocation(store, self.node)),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        Err(crate::identity::IdentityError::Ca("timed out".into()))
                    });
                    match checked {
                        Ok((Some(r), _)) if r.revoked_ms >= self.admitted_ms => {
                            self.revoked().await;
                            return;
                        }
                        Ok(_) => self.certify(),
                        Err(e) => {
                            tracing::warn!(node = %self.node, error = %e, "renewal postponed: the store does not answer");
                            self.renew_at = Some(tokio::time::Instant::now() + RETRY);
                            continue;
                        }
                    }
                    if self.send_secrets().await.is_err() {
                        return;
                    }
                }
                rotated = async {
                    match rotations.as_mut() {
                        Some(r) => r.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if rotated.is_err() {
                        rotations = None;
                        continue;
                    }
                    // A step of a root rotation: the new bundle, and a certificate from the
                    // root that signs now.
                    let stale = self.certified.as_ref().is_some_and(|c| {
                        self.controller
                            .identity()
                            .is_some_and(|(ca, _)| !ca.issued_by_current(&c.chain_pem))
                    });
                    if stale {
                        self.certify();
                    }
                    self.record_unsubscribed_roots();
                    if self.send_secrets().await.is_err() {
                        return;
                    }
                }
                revoked = crate::identity::next_revocation(revocations.as_mut(), self.node) => {
                    if revoked {
                        self.revoked().await;
                        return;
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(request)) => {
                        if self.request(request).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => return,
                },
            }
        }
    }

    /// Works out what the Envoy should run at `view`; whether it changed.
    async fn refresh(&mut self, view: &Arc<View>) -> bool {
        let (controller, node) = (self.controller.clone(), self.node.clone());
        let view = view.clone();
        let translated = match controller.cached_snapshot(&view, &node) {
            Some(t) => t,
            None => tokio::task::spawn_blocking(move || controller.snapshot_for(&view, &node))
                .await
                .ok()
                .flatten(),
        };
        let proxies = self.controller.proxies();
        let Some(t) = translated else {
            proxies.update(self.id, |p| {
                p.desired_version = None;
                p.withheld = None;
            });
            return false;
        };
        if let Some(why) = &t.withheld {
            proxies.update(self.id, |p| {
                p.desired_version = None;
                p.withheld = Some(why.clone());
                p.uses = t.uses.clone();
            });
            return false;
        }
        // Revoked identities whose certificates may still be valid are refused (and the
        // version tells that translation apart).
        let (denied, until) = self
            .controller
            .identity()
            .map(|(ca, _)| denied(&t.snapshot.revoked, ca.workload_ttl(), SystemTime::now()))
            .unwrap_or_default();
        self.unrevoke_at = until;
        let version = if denied.is_empty() {
            t.snapshot.version.clone()
        } else {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            denied.hash(&mut h);
            format!("{}-r{:08x}", t.snapshot.version, h.finish() as u32)
        };
        self.holder.denied = denied;
        if self.current.as_ref().is_some_and(|(v, _)| *v == version) {
            // Back to what it was sent (after a withheld version): nothing to send again.
            proxies.update(self.id, |p| {
                p.desired_version = Some(version.clone());
                p.withheld = None;
                p.problems = t.problems.clone();
            });
            return false;
        }
        let key = (version.clone(), self.holder.clone());
        let cached = self
            .translations
            .lock()
            .ok()
            .and_then(|c| c.get(&key).cloned());
        let translated = match cached {
            Some(t) => t,
            None => {
                let holder = self.holder.clone();
                let snapshot = t.snapshot.clone();
                let Ok(translated) = tokio::task::spawn_blocking(move || {
                    Arc::new(envoy::translate(&snapshot, &holder).map(Arc::new))
                })
                .await
                else {
                    return false;
                };
                if let Ok(mut cache) = self.translations.lock() {
                    if cache.len() >= TRANSLATIONS {
                        cache.clear();
                    }
                    cache.insert(key, translated.clone());
                }
                translated
            }
        };
        match translated.as_ref() {
            Ok(resources) => {
                proxies.update(self.id, |p| {
                    p.desired_version = Some(version.clone());
                    p.withheld = None;
                    p.problems = t.problems.clone();
                    p.uses = t.uses.clone();
                });
                self.current = Some((version, resources.clone()));
                true
            }
            Err(refused) => {
                let why = refused
                    .iter()
                    .map(|(path, reason)| format!("{path}: {reason}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                proxies.update(self.id, |p| {
                    p.desired_version = None;
                    p.withheld = Some(why);
                    p.problems = t.problems.clone();
                    p.uses = t.uses.clone();
                });
                false
            }
        }
    }

    /// Handles one request: an ACK, a NACK, a new subscription or new names.
    async fn request(&mut self, request: DiscoveryRequest) -> Result<(), Gone> {
        let type_url = request.type_url.clone();
        if type_url == envoy::SECRET {
            return self.secret_request(request).await;
        }
        if !ORDER.contains(&type_url.as_str()) {
            tracing::debug!(%type_url, "a resource type this control plane does not serve");
            return Ok(());
        }
        let sub = self.subscriptions.entry(type_url.clone()).or_default();
        let Some(names_changed) = sub.take(&request) else {
            return Ok(());
        };
        if let Some(error) = &request.error_detail {
            let version = sub.sent.as_ref().map(|(v, _)| v.clone());
            sub.nacked = version.clone();
            // The whole version is refused: what the Envoy runs stays as it was.
            let version = version.map(|v| v.trim_end_matches(UNION).to_string());
            let reason = format!("{}: {}", short(&type_url), error.message);
            tracing::warn!(node = %self.node, %reason, "envoy rejected its configuration");
            self.controller
                .metrics()
                .answers
                .with_label_values(&["nack"])
                .inc();
            self.controller.proxies().update(self.id, |p| {
                p.nacked_version = version;
                p.nack_reason = Some(reason);
            });
            return Ok(());
        }
        if !request.response_nonce.is_empty() {
            sub.acked = Some(request.version_info.clone());
            self.controller
                .metrics()
                .answers
                .with_label_values(&["ack"])
                .inc();
            self.record_acks();
        }
        // A new subscription, or other names asked for: answered at once (while a version is
        // staged, listeners and routes wait for their stage).
        let staged = self.stage == Stage::Clusters
            && (type_url == envoy::LISTENER || type_url == envoy::ROUTE);
        if (request.response_nonce.is_empty() || names_changed) && !staged {
            let union = self.stage == Stage::Clusters;
            self.send(&type_url, union).await?;
        }
        self.advance().await
    }

    /// Moves a staged version on when the Envoy has what the stage sent.
    async fn advance(&mut self) -> Result<(), Gone> {
        let Some((version, current)) = self.current.clone() else {
            return Ok(());
        };
        let acked = |s: &HashMap<String, Subscription>, t: &str, v: &str| {
            s.get(t).is_none_or(|sub| sub.acked.as_deref() == Some(v))
        };
        match self.stage {
            Stage::Idle => {
                // Types behind the current version (subscribed meanwhile): brought up, unless
                // the Envoy rejected that version.
                for type_url in ORDER {
                    let behind = self.subscriptions.get(type_url).is_some_and(|s| {
                        s.sent.as_ref().is_some_and(|(v, _)| *v != version)
                            && s.nacked.as_deref() != Some(version.as_str())
                    });
                    if behind {
                        self.send(type_url, false).await?;
                    }
                }
            }
            Stage::Clusters => {
                let union = format!("{version}{UNION}");
                // The endpoints of every new cluster asked for and acknowledged.
                let endpoints_ready = self.subscriptions.get(envoy::ENDPOINT).is_none_or(|s| {
                    current.endpoints.keys().all(|n| s.names.contains(n))
                        && s.acked.as_deref() == Some(union.as_str())
                });
                if acked(&self.subscriptions, envoy::CLUSTER, &union) && endpoints_ready {
                    self.stage = Stage::Routes;
                    for type_url in [envoy::LISTENER, envoy::ROUTE] {
                        if self.subscriptions.contains_key(type_url) {
                            self.send(type_url, false).await?;
                        }
                    }
                }
            }
            Stage::Routes => {
                let routes_ready = self.subscriptions.get(envoy::ROUTE).is_none_or(|s| {
                    current.routes.keys().all(|n| s.names.contains(n))
                        && s.acked.as_deref() == Some(version.as_str())
                });
                if acked(&self.subscriptions, envoy::LISTENER, &version) && routes_ready {
                    // Now the clusters no longer used go.
                    self.stage = Stage::Idle;
                    self.send(envoy::CLUSTER, false).await?;
                    if self.subscriptions.contains_key(envoy::ENDPOINT) {
                        self.send(envoy::ENDPOINT, false).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The Envoy runs the current version once every type it subscribed to acknowledged it.
    fn record_acks(&mut self) {
        let Some((version, _)) = &self.current else {
            return;
        };
        let all = self
            .subscriptions
            .values()
            .all(|s| s.acked.as_ref() == Some(version));
        if all {
            if let Some((_, resources)) = &self.current {
                self.applied = Some(resources.clone());
            }
            let version = version.clone();
            self.controller.proxies().update(self.id, |p| {
                p.acked_version = Some(version.clone());
                if p.nacked_version.as_ref() == Some(&version) {
                    p.nacked_version = None;
                    p.nack_reason = None;
                }
            });
        }
    }

    /// Sends a new version: make before break when the Envoy runs an earlier one (its clusters
    /// old and new first), else every subscribed type, clusters first.
    async fn push_all(&mut self) -> Result<(), Gone> {
        if self.applied.is_some() && self.subscriptions.contains_key(envoy::CLUSTER) {
            self.stage = Stage::Clusters;
            self.send(envoy::CLUSTER, true).await?;
            if self.subscriptions.contains_key(envoy::ENDPOINT) {
                self.send(envoy::ENDPOINT, true).await?;
            }
            return self.advance().await;
        }
        self.stage = Stage::Idle;
        for type_url in ORDER {
            if self.subscriptions.contains_key(type_url) {
                self.send(type_url, false).await?;
            }
        }
        Ok(())
    }

    /// Sends the current resources of `type_url`; with `union`, and the clusters and endpoints
    /// the Envoy runs now too (versioned `VERSION+`).
    async fn send(&mut self, type_url: &str, union: bool) -> Result<(), Gone> {
        let Some((version, resources)) = self.current.clone() else {
            return Ok(());
        };
        let Some(all) = resources.of(type_url) else {
            return Ok(());
        };
        let mut all = all.clone();
        let mut version = version;
        let union = union && (type_url == envoy::CLUSTER || type_url == envoy::ENDPOINT);
        if union {
            if let Some(before) = self.applied.as_ref().and_then(|a| a.of(type_url)) {
                for (name, r) in before {
                    all.entry(name.clone()).or_insert_with(|| r.clone());
                }
            }
            version.push_str(UNION);
        }
        let Some(sub) = self.subscriptions.get_mut(type_url) else {
            return Ok(());
        };
        let wildcard = type_url == envoy::CLUSTER || type_url == envoy::LISTENER;
        let resources = if wildcard || sub.names.is_empty() {
            all.values().cloned().collect()
        } else {
            sub.names
                .iter()
                .filter_map(|n| all.get(n).cloned())
                .collect()
        };
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        sub.sent = Some((version.clone(), nonce.clone()));
        let response = DiscoveryResponse {
            version_info: version.clone(),
            resources,
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        };
        self.tx.send(Ok(response)).await.map_err(|_| Gone)?;
        self.controller
            .metrics()
            .pushes
            .with_label_values(&["envoy"])
            .inc();
        let version = version.trim_end_matches(UNION).to_string();
        self.controller
            .proxies()
            .update(self.id, |p| p.sent_version = Some(version));
        Ok(())
    }
}

impl Session<'_> {
    /// Ends the stream of a node whose identity was revoked.
    async fn revoked(&self) {
        tracing::info!(node = %self.node, "identity revoked: envoy stream closed");
        let _ = self
            .tx
            .send(Err(Status::permission_denied(format!(
                "the identity of {} was revoked (trellis identity revoke)",
                self.node
            ))))
            .await;
    }

    /// Issues the Envoy a new workload certificate (and key); the CA refusing is logged and
    /// the Envoy keeps what it has.
    fn certify(&mut self) {
        let Some((ca, _)) = self.controller.identity() else {
            return;
        };
        let (issued, key_pem) = match ca.issue_with_key(self.node) {
            Ok(issued) => issued,
            Err(e) => {
                tracing::warn!(node = %self.node, error = %e, "certificate not issued: tried again in 30s");
                self.renew_at = Some(tokio::time::Instant::now() + RETRY);
                return;
            }
        };
        let life = issued
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let expires = humantime::format_rfc3339_seconds(issued.not_after).to_string();
        tracing::info!(node = %self.node, identity = %issued.spiffe_id, %expires, "envoy certificate issued");
        self.controller.proxies().update(self.id, |p| {
            p.identity = Some(issued.spiffe_id.clone());
            p.certificate_expires = Some(expires);
        });
        self.certified = Some(Certified {
            chain_pem: issued.chain_pem,
            key_pem,
        });
        self.renew_at = Some(tokio::time::Instant::now() + (life / 2).max(RETRY));
        self.record_unsubscribed_roots();
    }

    /// An Envoy that has not asked for its secrets uses none: whenever it does, it gets the
    /// bundle and certificate of then, so it holds back no root rotation.
    fn record_unsubscribed_roots(&self) {
        if self.secrets.sent.is_some() {
            return;
        }
        let (Some((ca, _)), Some(c)) = (self.controller.identity(), &self.certified) else {
            return;
        };
        let root = crate::identity::chain_root(&c.chain_pem);
        self.controller.proxies().update(self.id, |p| {
            p.trust_roots = ca.bundle_roots();
            p.certificate_root = root;
        });
    }

    /// An SDS request: an ACK (recording the roots the Envoy now uses), a NACK, or names asked.
    async fn secret_request(&mut self, request: DiscoveryRequest) -> Result<(), Gone> {
        let sub = &mut self.secrets;
        let Some(names_changed) = sub.take(&request) else {
            return Ok(());
        };
        if let Some(error) = &request.error_detail {
            self.secrets_sent = None;
            tracing::warn!(node = %self.node, reason = %error.message, "envoy cannot use its secrets");
            self.controller
                .metrics()
                .answers
                .with_label_values(&["nack"])
                .inc();
            // Shown as a NACK of what it should run: without its secrets it cannot.
            self.secrets_nacked = true;
            let version = self.current.as_ref().map(|(v, _)| v.clone());
            let reason = format!("Secret: {}", error.message);
            self.controller.proxies().update(self.id, |p| {
                p.nacked_version = version;
                p.nack_reason = Some(reason);
            });
            if names_changed {
                self.send_secrets().await?;
            }
            return Ok(());
        }
        if !request.response_nonce.is_empty() {
            sub.acked = Some(request.version_info.clone());
            if let Some((_, roots, root)) = self
                .secrets_sent
                .take_if(|(n, ..)| *n == request.response_nonce)
            {
                let cleared = std::mem::take(&mut self.secrets_nacked);
                self.controller.proxies().update(self.id, |p| {
                    if cleared {
                        p.nacked_version = None;
                        p.nack_reason = None;
                    }
                    p.trust_roots = roots;
                    if root.is_some() {
                        p.certificate_root = root;
                    }
                });
            }
        }
        if request.response_nonce.is_empty() || names_changed {
            self.send_secrets().await?;
        }
        Ok(())
    }

    /// Sends the secrets the Envoy asked for: its certificate (only to an admitted stream) and
    /// the mesh's trust bundle.
    async fn send_secrets(&mut self) -> Result<(), Gone> {
        let Some((ca, _)) = self.controller.identity() else {
            return Ok(());
        };
        if self.secrets.sent.is_none() && self.secrets.names.is_empty() {
            // Not subscribed.
            return Ok(());
        }
        // A secret the Envoy does not use holds back no rotation: it gets today's whenever
        // it asks. So the roots recorded are the bundle's and the certificate's either way.
        // The roots before the bundle: a rotation step between the two reads makes the bundle
        // hold more than recorded (a step waits longer), never less.
        let roots = ca.bundle_roots();
        let mut resources = Vec::new();
        for name in &self.secrets.names {
            match name.as_str() {
                envoy::IDENTITY_SECRET => {
                    if let Some(c) = &self.certified {
                        resources.push(envoy::identity_secret(&c.chain_pem, &c.key_pem));
                    }
                }
                envoy::BUNDLE_SECRET => {
                    resources.push(envoy::bundle_secret(&ca.trust_bundle()));
                }
                _ => {}
            }
        }
        let root = self
            .certified
            .as_ref()
            .and_then(|c| crate::identity::chain_root(&c.chain_pem));
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let version = format!("secrets-{nonce}");
        self.secrets.sent = Some((version.clone(), nonce.clone()));
        self.secrets_sent = Some((nonce.clone(), roots, root));
        let response = DiscoveryResponse {
            version_info: version,
            resources,
            type_url: envoy::SECRET.to_string(),
            nonce,
            ..Default::default()
        };
        self.tx.send(Ok(response)).await.map_err(|_| Gone)
    }
}

/// How soon a certificate not issued (or a renewal the store could not check) is tried again.
const RETRY: Duration = Duration::from_secs(30);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Sleeps until `at`; never without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The revoked identities whose certificates issued up to their revocation may still be valid
/// at `now` (a workload certificate lives `ttl`; the CA backdates notBefore by
/// [`crate::identity::SKEW`]), sorted, and when the first of them stops being so.
fn denied(
    revoked: &[trellis_proto::v1::RevokedIdentity],
    ttl: Duration,
    now: SystemTime,
) -> (Vec<String>, Option<tokio::time::Instant>) {
    let now_secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut denied = Vec::new();
    let mut first_end: Option<u64> = None;
    for r in revoked {
        let until = u64::try_from(r.not_before_until).unwrap_or(0);
        let end = until
            .saturating_add(crate::identity::SKEW.as_secs())
            .saturating_add(ttl.as_secs());
        if end > now_secs {
            denied.push(r.identity.clone());
            first_end = Some(first_end.map_or(end, |e| e.min(end)));
        }
    }
    denied.sort();
    denied.dedup();
    let at = first_end.map(|end| {
        tokio::time::Instant::now() + Duration::from_secs(end - now_secs) + Duration::from_secs(1)
    });
    (denied, at)
}

/// The mark of a version's make-before-break clusters (old and new).
const UNION: &str = "+";

/// `Cluster` of `type.googleapis.com/envoy.config.cluster.v3.Cluster`.
fn short(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind as V};

    use super::*;

    fn view(yaml: &str) -> View {
        let docs = crate::validate::parse_documents(yaml).unwrap();
        let mut state = crate::validate::State::new();
        for m in docs {
            let r = crate::validate::admit(m, None).unwrap();
            state.insert(r.key.clone(), Arc::new(r));
        }
        View {
            state: Arc::new(state),
            ..View::default()
        }
    }

    fn node(id: &str, metadata: &[(&str, V)]) -> Node {
        Node {
            id: id.into(),
            metadata: Some(Struct {
                fields: metadata
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            Value {
                                kind: Some(v.clone()),
                            },
                        )
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    const MESH: &str = "
apiVersion: mesh.trellis.dev/v1beta1
kind: Mesh
metadata: { name: shop }
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: { name: cart, namespace: prod }
spec:
  listeners: [{ portMapping: { port: 8080, protocol: http } }]
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: { name: pay, namespace: prod }
spec:
  awsName: payments-v2
  listeners: [{ portMapping: { port: 8080, protocol: http } }]
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualGateway
metadata: { name: ingress, namespace: prod }
spec:
  listeners: [{ portMapping: { port: 8088, protocol: http } }]
";

    /// An Envoy names its node as Trellis does, or as App Mesh's controller and ECS did.
    #[test]
    fn an_envoys_node_is_found_by_trellis_and_app_mesh_names() {
        let v = view(MESH);
        let key = |kind, name: &str| ResourceKey::new(kind, "prod", name);
        let cases = [
            (node("prod/cart", &[]), key(Kind::VirtualNode, "cart")),
            (
                node("prod/ingress", &[("TRELLIS_GATEWAY", V::BoolValue(true))]),
                key(Kind::VirtualGateway, "ingress"),
            ),
            // The controller's short form, with its NAME_NAMESPACE names.
            (node("mesh/shop/virtualNode/cart_prod", &[]), key(Kind::VirtualNode, "cart")),
            // awsName, in the full ARN ECS tasks carried, from the metadata.
            (
                node(
                    "whatever",
                    &[(
                        "APPMESH_RESOURCE_ARN",
                        V::StringValue(
                            "arn:aws:appmesh:eu-west-1:111122223333:mesh/shop/virtualNode/payments-v2".into(),
                        ),
                    )],
                ),
                key(Kind::VirtualNode, "pay"),
            ),
            // A shared mesh's owner is not part of its name.
            (
                node("mesh/shop@111122223333/virtualGateway/ingress_prod", &[]),
                key(Kind::VirtualGateway, "ingress"),
            ),
        ];
        for (n, want) in cases {
            assert_eq!(identify(&v, &n), Ok(want), "{}", n.id);
        }
        for (id, why) in [
            ("mesh/other/virtualNode/cart_prod", "no VirtualNode"),
            (
                "mesh/shop/virtualRouter/cart_prod",
                "not virtualNode or virtualGateway",
            ),
            ("cart", "must be NAMESPACE/NAME"),
        ] {
            let err = identify(&v, &node(id, &[])).unwrap_err();
            assert!(err.contains(why), "{id}: {err}");
        }
        let bad = node(
            "prod/cart",
            &[("TRELLIS_EGRESS", V::StringValue("nope".into()))],
        );
        assert!(addresses(&bad).unwrap_err().contains("TRELLIS_EGRESS"));
    }

    /// A revoked identity is refused while a certificate issued before its revocation may
    /// still be valid (its notBefore backdated by the CA's skew, its life the workload TTL),
    /// and taken again once the last has expired.
    #[tokio::test(start_paused = true)]
    async fn revoked_identities_are_refused_while_their_certificates_may_live() {
        use trellis_proto::v1::RevokedIdentity;
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ttl = Duration::from_secs(3600);
        let skew = crate::identity::SKEW.as_secs();
        let revoked = |id: &str, ago: u64| RevokedIdentity {
            identity: id.into(),
            not_before_until: i64::try_from(1_000_000 - ago - skew).unwrap(),
        };
        let list = [
            revoked("spiffe://t/ns/a/vn/old", 3600),
            revoked("spiffe://t/ns/a/vn/b", 600),
            revoked("spiffe://t/ns/a/vn/a", 60),
            revoked("spiffe://t/ns/a/vn/a", 30),
        ];
        let (denied, until) = denied(&list, ttl, now);
        assert_eq!(denied, ["spiffe://t/ns/a/vn/a", "spiffe://t/ns/a/vn/b"]);
        // b's certificates live 3000 s more (and a second to be sure).
        assert_eq!(
            until.unwrap() - tokio::time::Instant::now(),
            Duration::from_secs(3001)
        );
        assert_eq!(super::denied(&[], ttl, now), (Vec::<String>::new(), None));
    }
}
