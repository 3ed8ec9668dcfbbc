//! One address serves both the HTTP API (JSON, for the CLI and scripts) and the gRPC config
//! stream: requests with `content-type: application/grpc` go to the stream service.

use std::{collections::BTreeMap, convert::Infallible, future::Future, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tower::ServiceExt as _;
use trellis_proto::v1::config_stream_server::ConfigStreamServer;

use crate::{
    controller::{Applied, ControlError, Controller},
    identity::PeerIdentity,
    model::{Kind, ResourceKey},
    push::ConfigService,
    registry::{Instance, Registration},
    store::StoreError,
    validate::{Problem, parse_documents},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Largest request body the API reads.
const MAX_BODY: usize = 8 << 20;

/// A list answer: `{"items": [...]}` (resources, instances).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Items<T> {
    pub items: Vec<T>,
}

/// What an apply or a delete did: `{"results": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub results: Vec<Applied>,
}

/// An error answer; `problems` for manifests or changes that are invalid.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
}

/// An answer with nothing to say but that it worked: `{"ok": true}`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Done {
    pub ok: bool,
}

const DONE: Done = Done { ok: true };

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    controller: Arc<Controller>,
    shutdown: impl Future<Output = ()>,
) {
    serve_tls(listener, controller, None, shutdown).await;
}

/// The TLS side of the control plane's listener: a certificate from the mesh's CA for `names`,
/// and client certificates (optional: the CLI and bootstrapping proxies have none) verified
/// against the mesh's roots. Both follow a root rotation: the roots trusted are the bundle in
/// use, and the certificate is issued anew by the root that signs when it changes.
pub fn tls_config(
    ca: Arc<crate::identity::Ca>,
    names: Vec<String>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let following = Arc::new(FollowingCa {
        current: parking_lot::Mutex::new(None),
        ca,
        names,
    });
    following.current().map_err(|e| e.to_string())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(following.clone())
        .with_cert_resolver(following);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The listener's certificate and client verifier for one step of the CA's rotation.
struct Following {
    step: u64,
    certified: Arc<rustls::sign::CertifiedKey>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

#[derive(Debug)]
struct FollowingCa {
    ca: Arc<crate::identity::Ca>,
    names: Vec<String>,
    current: parking_lot::Mutex<Option<Arc<Following>>>,
}

impl std::fmt::Debug for Following {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Following")
            .field("step", &self.step)
            .finish()
    }
}

impl FollowingCa {
    /// What the CA's current step gives, made once per step.
    fn current(&self) -> Result<Arc<Following>, rustls::Error> {
        let step = *self.ca.subscribe().borrow();
        let mut current = self.current.lock();
        if let Some(c) = current.as_ref().filter(|c| c.step == step) {
            return Ok(c.clone());
        }
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let general = |e: String| rustls::Error::General(e);
        let (chain_pem, key_pem) = self
            .ca
            .issue_server(&self.names)
            .map_err(|e| general(e.to_string()))?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| general(format!("certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| general(format!("key: {e}")))?;
        let signing = provider().key_provider.load_private_key(key)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca.trust_bundle().as_bytes()) {
            roots.add(cert.map_err(|e| general(format!("roots: {e}")))?)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| general(e.to_string()))?;
        let following = Arc::new(Following {
            step,
            certified: Arc::new(rustls::sign::CertifiedKey::new(chain, signing)),
            verifier,
        });
        *current = Some(following.clone());
        Ok(following)
    }

    fn verifier(
        &self,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, rustls::Error> {
        self.current().map(|c| c.verifier.clone())
    }
}

impl rustls::server::ResolvesServerCert for FollowingCa {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        match self.current() {
            Ok(c) => Some(c.certified.clone()),
            Err(e) => {
                tracing::warn!(error = %e, "no certificate for the control plane's listener");
                None
            }
        }
    }
}

impl rustls::server::danger::ClientCertVerifier for FollowingCa {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.verifier()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Serves until `shutdown` resolves, over TLS with `tls`.
pub async fn serve_tls(
    listener: TcpListener,
    controller: Arc<Controller>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let grpc = ConfigStreamServer::new(ConfigService::new(controller.clone()))
        .max_decoding_message_size(trellis_proxy::snapshot::MAX_SNAPSHOT_BYTES)
        .max_encoding_message_size(trellis_proxy::snapshot::MAX_SNAPSHOT_BYTES);
    // Envoy's ADS, beside it.
    let ads = envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer::new(
        crate::xds::AdsService::new(controller.clone()),
    )
    .max_decoding_message_size(trellis_proxy::snapshot::MAX_SNAPSHOT_BYTES)
    .max_encoding_message_size(trellis_proxy::snapshot::MAX_SNAPSHOT_BYTES);
    // Shared by the connections (each borrows it for its life: a clone would live in every
    // connection's task).
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let controller = controller.clone();
        let grpc = grpc.clone();
        let ads = ads.clone();
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            // The SPIFFE ID of the client certificate the connection presented, if any.
            let make = move |peer: Option<PeerIdentity>| {
                hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let controller = controller.clone();
                    let grpc = grpc.clone();
                    let ads = ads.clone();
                    if let Some(peer) = &peer {
                        req.extensions_mut().insert(peer.clone());
                    }
                    async move {
                        let is_grpc = req
                            .headers()
                            .get(header::CONTENT_TYPE)
                            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                        if is_grpc && req.uri().path().starts_with("/envoy.") {
                            let resp = match ads.oneshot(req).await {
                                Ok(r) => r,
                                Err(never) => match never {},
                            };
                            return Ok::<_, Infallible>(
                                resp.map(|b| b.map_err(BoxError::from).boxed_unsync()),
                            );
                        }
                        if is_grpc {
                            let resp = match grpc.oneshot(req).await {
                                Ok(r) => r,
                                Err(never) => match never {},
                            };
                            return Ok::<_, Infallible>(
                                resp.map(|b| b.map_err(BoxError::from).boxed_unsync()),
                            );
                        }
                        // Boxed: the API's future is larger than a config stream's, and
                        // every request's task (each proxy's stream) would carry its size.
                        Ok(Box::pin(api(&controller, req)).await)
                    }
                })
            };
            let served = match acceptor {
                // Boxed, each: a connection's task holds only the one it serves (a plain
                // connection does not carry the size of a TLS one).
                None => Box::pin(builder.serve_connection(TokioIo::new(stream), make(None))).await,
                Some(acceptor) => {
                    // Boxed too: the handshake holds a TLS session.
                    let handshake = Box::pin(tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(stream),
                    ));
                    match handshake.await {
                        Ok(Ok(tls)) => {
                            let peer = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|c| PeerIdentity::from_der(c));
                            Box::pin(builder.serve_connection(TokioIo::new(tls), make(peer))).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "API connection ended");
            }
        });
    }
}

fn reply(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    respond(status, "application/json", bytes)
}

fn respond(status: StatusCode, content_type: &'static str, bytes: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(bytes))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    reply(
        status,
        &ErrorBody {
            error: message.into(),
            problems: Vec::new(),
        },
    )
}

fn invalid(problems: Vec<Problem>) -> Response<Body> {
    reply(
        StatusCode::UNPROCESSABLE_ENTITY,
        &ErrorBody {
            error: "invalid".into(),
            problems,
        },
    )
}

fn control_error(e: ControlError) -> Response<Body> {
    match e {
        ControlError::Invalid(problems) => invalid(problems),
        ControlError::NotFound(what) => error(StatusCode::NOT_FOUND, format!("{what} not found")),
        e @ ControlError::ReadOnly(_) => error(StatusCode::CONFLICT, e.to_string()),
        ControlError::Store(StoreError::Conflict { key, reason }) => error(
            StatusCode::CONFLICT,
            format!("conflict on {key}: {reason}; try again"),
        ),
        ControlError::Store(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        ControlError::Conflict(e) => error(StatusCode::CONFLICT, e),
        ControlError::Internal(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn body_text(req: Request<Incoming>) -> Result<String, Response<Body>> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        })?
        .to_bytes();
    String::from_utf8(bytes.to_vec())
        .map_err(|_| error(StatusCode::BAD_REQUEST, "the body is not UTF-8"))
}

/// The manifests in a request body (YAML stream or JSON).
async fn manifests(req: Request<Incoming>) -> Result<Vec<crate::model::Manifest>, Response<Body>> {
    let text = body_text(req).await?;
    // Parsing is CPU work on untrusted input: off the threads that serve the API and streams.
    let parsed = tokio::task::spawn_blocking(move || parse_documents(&text))
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    parsed.map_err(invalid)
}

/// The query string's parameters, percent- and `+`-decoded.
fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// Who calls: with authentication on, the operator its bearer token names (401 without one,
/// 403 for a viewer's write); every write is recorded in the audit log.
async fn api(controller: &Arc<Controller>, req: Request<Incoming>) -> Response<Body> {
    // The API server calls the webhook with no operator token (it authenticates the control
    // plane by its certificate instead); it reads nothing but the pod it is sent.
    let open = matches!(
        req.uri().path(),
        // The dashboard's page holds no data: what it shows comes from the API, with a token.
        "/healthz" | "/readyz" | "/metrics" | "/v1/webhooks/inject" | "/ui"
    );
    let write = req.method() != Method::GET && req.method() != Method::HEAD && !previews(&req);
    let action = format!("{} {}", req.method(), req.uri().path());
    let anonymous = Who {
        name: "anonymous".into(),
        id: None,
    };
    let who = if controller.auth_required() && !open {
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        // Refused writes are recorded too: who tried (as far as the token tells), and why.
        let refused = |response: Response<Body>, who: Who| {
            let action = action.clone();
            async move {
                if write {
                    audited(controller, response, who, action).await
                } else {
                    response
                }
            }
        };
        let Some(token) = bearer else {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "an operator token is required (trellis login, or TRELLIS_TOKEN)",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return refused(r, anonymous).await;
        };
        match crate::auth::authenticate(controller.store().as_ref(), token).await {
            Ok(Some(op)) if write && op.operator.role == crate::auth::Role::Viewer => {
                let r = error(
                    StatusCode::FORBIDDEN,
                    format!(
                        "operator {} is a viewer: writes need an admin",
                        op.operator.name
                    ),
                );
                return refused(
                    r,
                    Who {
                        name: op.operator.name,
                        id: Some(op.id),
                    },
                )
                .await;
            }
            Ok(Some(op)) => Who {
                name: op.operator.name,
                id: Some(op.id),
            },
            Ok(None) => {
                let r = error(StatusCode::UNAUTHORIZED, "unknown operator token");
                return refused(r, anonymous).await;
            }
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    } else {
        anonymous
    };
    if !write || open {
        return route(controller, req, &who.name).await;
    }
    let response = route(controller, req, &who.name).await;
    audited(controller, response, who, action).await
}

/// Who calls the API: the operator's name and id (`anonymous` and none without one).
#[derive(Debug, Clone)]
struct Who {
    name: String,
    id: Option<String>,
}

/// Records a write (done or refused) with what the answer says changed, and returns the
/// answer.
async fn audited(
    controller: &Controller,
    response: Response<Body>,
    who: Who,
    action: String,
) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let what = match serde_json::from_slice::<Results>(&bytes) {
        Ok(r) => r
            .results
            .iter()
            .map(|a| {
                format!(
                    "{} {}/{}/{}",
                    a.action.as_str(),
                    a.kind,
                    a.namespace,
                    a.name
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        // Never the tokens themselves: what they are for.
        Err(_) => {
            if let Ok(o) = serde_json::from_slice::<OperatorCreated>(&bytes) {
                format!("operator {} ({:?})", o.name, o.role).to_lowercase()
            } else if let Ok(t) = serde_json::from_slice::<TokenCreated>(&bytes) {
                let kind = if t.gateway { "gateway" } else { "node" };
                format!("join token for {kind} {} until {}", t.node, t.expires)
            } else if let Some(revoked) = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["revoked"].as_str().map(str::to_string))
            {
                format!("revoked {revoked}")
            } else if let Ok(c) = serde_json::from_slice::<crate::canary::Status>(&bytes) {
                format!(
                    "canary {}/{}: {} at {}% to {}",
                    c.namespace, c.name, c.phase, c.weight, c.canary
                )
            } else if let Ok(e) = serde_json::from_slice::<ErrorBody>(&bytes) {
                format!("refused: {}", e.error)
            } else {
                String::new()
            }
        }
    };
    let entry = crate::auth::AuditEntry {
        time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        who: who.name,
        operator_id: who.id,
        action,
        what,
        status: parts.status.as_u16(),
    };
    if let Err(e) = crate::auth::record(controller.store().as_ref(), entry).await {
        tracing::warn!(error = %e, "a write could not be recorded in the audit log");
    }
    Response::from_parts(
        parts,
        Full::new(bytes).map_err(|e| match e {}).boxed_unsync(),
    )
}

/// An operator asked for: a name and a role.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorRequest {
    pub name: String,
    pub role: crate::auth::Role,
}

/// The operator's token, shown once.
#[derive(Debug, Serialize, Deserialize)]
pub struct OperatorCreated {
    pub token: String,
    pub name: String,
    pub role: crate::auth::Role,
}

/// `POST /v1/operators`: a new operator token (admins only, as every write).
async fn create_operator(controller: &Controller, req: Request<Incoming>) -> Response<Body> {
    let text = match body_text(req).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let request: OperatorRequest = match serde_json::from_str(&text) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid operator request: {e}"),
            );
        }
    };
    if request.name.is_empty() || request.name.len() > 253 {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid operator request: name: 1 to 253 characters",
        );
    }
    match crate::auth::create_operator(controller.store().as_ref(), &request.name, request.role)
        .await
    {
        Ok((token, op)) => reply(
            StatusCode::OK,
            &OperatorCreated {
                token,
                name: op.name,
                role: op.role,
            },
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `GET /v1/audit?limit=N`: the last writes (default 100).
async fn audit_log(controller: &Controller, req: &Request<Incoming>) -> Response<Body> {
    let limit = query(req)
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100);
    match crate::auth::audit(controller.store().as_ref(), limit).await {
        Ok(entries) => reply(StatusCode::OK, &entries),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Routes an API request to its endpoint.
async fn route(controller: &Arc<Controller>, req: Request<Incoming>, who: &str) -> Response<Body> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => reply(StatusCode::OK, &DONE),
        // Whether the store answers: a control plane that cannot read it serves its proxies
        // their last snapshots but can change nothing.
        (&Method::GET, ["readyz"]) => {
            let probe = controller.store().list(crate::view::GUARD_KEY);
            match tokio::time::timeout(std::time::Duration::from_secs(3), probe).await {
                Ok(Ok(_)) => reply(StatusCode::OK, &DONE),
                Ok(Err(e)) => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the store is unavailable: {e}"),
                ),
                Err(_) => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the store is unavailable: no answer within 3s",
                ),
            }
        }
        (&Method::POST, ["v1", "apply"] | ["v1", "diff"]) if previews(&req) => {
            preview(controller, req).await
        }
        (&Method::POST, ["v1", "apply"])
            if query(&req).get("dryRun").is_some_and(|v| v != "false") =>
        {
            error(StatusCode::BAD_REQUEST, "dryRun must be true or false")
        }
        (&Method::POST, ["v1", "apply"]) => apply(controller, req).await,
        (&Method::POST, ["v1", "delete"]) => delete(controller, req).await,
        (_, ["v1", "resources", kind, rest @ ..]) => {
            let Some(kind) = Kind::parse(kind) else {
                return error(StatusCode::NOT_FOUND, format!("unknown kind {kind:?}"));
            };
            match (&method, rest) {
                (&Method::GET, []) => list_resources(controller, kind, &req),
                (&Method::GET, [ns, name]) => get_resource(controller, kind, ns, name),
                (&Method::DELETE, [ns, name]) => {
                    let keys = vec![ResourceKey::new(kind, ns, name)];
                    results(controller.delete(keys).await)
                }
                _ => error(StatusCode::NOT_FOUND, "no such API path"),
            }
        }
        (&Method::POST, ["v1", "instances"]) => register(controller, req).await,
        (&Method::GET, ["v1", "instances"]) => list_instances(controller, &req),
        (&Method::POST, ["v1", "instances", ns, svc, id, action]) => {
            let result = match *action {
                "heartbeat" => controller
                    .heartbeat(ns, svc, id)
                    .await
                    .map(|()| reply(StatusCode::OK, &DONE)),
                "drain" => controller
                    .drain(ns, svc, id)
                    .await
                    .map(|i| reply(StatusCode::OK, &i)),
                _ => return error(StatusCode::NOT_FOUND, "no such API path"),
            };
            result.unwrap_or_else(control_error)
        }
        (&Method::DELETE, ["v1", "instances", ns, svc, id]) => {
            match controller.deregister(ns, svc, id).await {
                Ok(()) => reply(StatusCode::OK, &DONE),
                Err(e) => control_error(e),
            }
        }
        // `?local=true`: only this control plane's own proxies.
        (&Method::GET, ["v1", "status"])
            if query(&req).get("local").is_some_and(|v| v == "true") =>
        {
            reply(StatusCode::OK, &controller.status())
        }
        (&Method::GET, ["v1", "status"]) => reply(StatusCode::OK, &controller.status_all().await),
        (&Method::POST, ["v1", "tokens"]) => create_token(controller, req).await,
        (&Method::POST, ["v1", "operators"]) => create_operator(controller, req).await,
        (&Method::GET, ["v1", "operators"]) => {
            match crate::auth::list_operators(controller.store().as_ref()).await {
                Ok(list) => reply(StatusCode::OK, &list),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        }
        (&Method::DELETE, ["v1", "operators", id]) => {
            match crate::auth::revoke_operator(controller.store().as_ref(), id).await {
                Ok(op) => reply(StatusCode::OK, &serde_json::json!({ "revoked": op.name })),
                Err(e @ crate::auth::RevokeError::NotFound(_)) => {
                    error(StatusCode::NOT_FOUND, e.to_string())
                }
                Err(
                    e @ (crate::auth::RevokeError::LastAdmin(_)
                    | crate::auth::RevokeError::Concurrent),
                ) => error(StatusCode::CONFLICT, e.to_string()),
                Err(e @ crate::auth::RevokeError::Store(_)) => {
                    error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
                }
                Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
            }
        }
        (&Method::GET, ["v1", "tokens"]) => {
            match crate::identity::list_tokens(controller.store().as_ref()).await {
                Ok(list) => reply(StatusCode::OK, &list),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        }
        (&Method::DELETE, ["v1", "tokens", id]) => {
            match crate::identity::revoke_token(controller.store().as_ref(), id).await {
                Ok(Some(node)) => reply(StatusCode::OK, &serde_json::json!({ "revoked": node })),
                Ok(None) => error(StatusCode::NOT_FOUND, format!("no join token has id {id}")),
                Err(crate::identity::IdentityError::Denied(why)) => {
                    error(StatusCode::BAD_REQUEST, why)
                }
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        }
        (&Method::POST, ["v1", "revocations"]) => revoke_identity(controller, req).await,
        (&Method::GET, ["v1", "ca"]) => ca_status(controller).await,
        (&Method::POST, ["v1", "webhooks", "inject"]) => inject(controller, req).await,
        (&Method::POST, ["v1", "ca", step]) => {
            let force = req.uri().query().is_some_and(|q| {
                form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "force" && v == "true")
            });
            rotate(controller, step, force).await
        }
        (&Method::GET, ["v1", "audit"]) => audit_log(controller, &req).await,
        (&Method::GET, ["ui"]) => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            crate::dashboard::PAGE.as_bytes().to_vec(),
        ),
        (&Method::GET, ["v1", "graph"]) => {
            let view = controller.view();
            let rates = controller.measurements().rates();
            reply(
                StatusCode::OK,
                &crate::dashboard::graph(&view.state, &rates),
            )
        }
        // Every canary (`?namespace=NS`: one namespace's), and one.
        (&Method::GET, ["v1", "canaries"]) => {
            let namespace = query(&req).get("namespace").cloned();
            match controller.canaries(namespace.as_deref()).await {
                Ok(list) => reply(StatusCode::OK, &serde_json::json!({ "items": list })),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        }
        (&Method::GET, ["v1", "canaries", ns, name]) => {
            let key = ResourceKey::new(Kind::Canary, ns, name);
            match controller.canary(&key).await {
                Ok(status) => reply(StatusCode::OK, &status),
                Err(e) => control_error(e),
            }
        }
        // promote, abort, pause, resume.
        (&Method::POST, ["v1", "canaries", ns, name, command]) => {
            let Some(command) = crate::canary::Command::parse(command) else {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("no canary command {command:?} (promote, abort, pause, resume)"),
                );
            };
            let key = ResourceKey::new(Kind::Canary, ns, name);
            match controller.canary_command(&key, command, who).await {
                Ok(status) => reply(StatusCode::OK, &status),
                Err(e) => control_error(e),
            }
        }
        (&Method::GET, ["metrics"]) => metrics(controller),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no API path {method} {path}"),
        ),
    }
}

/// A join token asked for: the node (or gateway) it admits, how long, how many times.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    pub node: String,
    #[serde(default)]
    pub gateway: bool,
    pub ttl_seconds: u64,
    /// Admissions; unset: any number until it expires.
    #[serde(default)]
    pub uses: Option<u32>,
}

/// The token, shown once.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenCreated {
    pub token: String,
    pub node: String,
    pub gateway: bool,
    pub expires: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u32>,
}

/// `POST /v1/tokens`: a join token for a proxy of one node.
async fn create_token(controller: &Controller, req: Request<Incoming>) -> Response<Body> {
    let text = match body_text(req).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut de = serde_json::Deserializer::from_str(&text);
    let request = match serde_path_to_error::deserialize::<_, TokenRequest>(&mut de) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid token request: {}: {}", e.path(), e.inner()),
            );
        }
    };
    let valid_node = request
        .node
        .split_once('/')
        .is_some_and(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'));
    if !valid_node {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid token request: node: {:?} must be NAMESPACE/NAME",
                request.node
            ),
        );
    }
    if request.ttl_seconds == 0 || request.ttl_seconds > 365 * 24 * 3600 {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid token request: ttlSeconds: must be 1 second to 365 days",
        );
    }
    if request.uses == Some(0) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid token request: uses: must be at least 1",
        );
    }
    if controller.identity().is_none() {
        return error(
            StatusCode::CONFLICT,
            "this control plane issues no identities",
        );
    }
    let ttl = std::time::Duration::from_secs(request.ttl_seconds);
    match crate::identity::create_token(
        controller.store().as_ref(),
        &request.node,
        request.gateway,
        ttl,
        request.uses,
    )
    .await
    {
        Ok((token, stored)) => reply(
            StatusCode::OK,
            &TokenCreated {
                token,
                node: stored.node,
                gateway: stored.gateway,
                expires: humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(stored.expires),
                )
                .to_string(),
                uses: stored.uses_left,
            },
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// A node (or gateway) whose identity is revoked.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevocationRequest {
    /// `NAMESPACE/NAME`.
    pub node: String,
    #[serde(default)]
    pub gateway: bool,
}

/// What a revocation did.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revoked {
    /// `node NS/NAME` or `gateway NS/NAME`.
    pub revoked: String,
    /// Certificates of it issued until then (RFC 3339) no longer count.
    pub revoked_at: String,
}

/// `POST /v1/revocations`: revokes a node's identity (admins only, as every write): its
/// certificates issued until now no longer admit a proxy nor renew, its open config streams
/// close; its proxies need a new join token.
/// The sidecar injection webhook: an AdmissionReview in, its answer out.
async fn inject(controller: &Controller, req: Request<Incoming>) -> Response<Body> {
    let Some(injector) = controller.injector() else {
        return error(
            StatusCode::NOT_FOUND,
            "sidecar injection is not configured (trellis-control --inject-image)",
        );
    };
    let text = match body_text(req).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let review: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid AdmissionReview: {e}"),
            );
        }
    };
    if review["kind"] != "AdmissionReview" || review["request"]["uid"].as_str().is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid AdmissionReview: kind AdmissionReview with request.uid expected",
        );
    }
    let view = controller.view();
    let mut injector = injector.clone();
    if injector.control_plane.starts_with("https://") {
        injector.control_plane_ca = controller.identity().map(|(ca, _)| ca.trust_bundle());
    }
    reply(
        StatusCode::OK,
        &crate::inject::review(&view.state, &injector, &review),
    )
}

/// Where a root rotation stands, and each connected proxy's part in it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaStatus {
    pub rotation: crate::identity::Rotation,
    pub proxies: Vec<CaProxy>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaProxy {
    pub node: String,
    pub instance: String,
    /// The root its certificate chains to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_root: Option<String>,
    /// The roots of the bundle it acknowledged.
    #[serde(default)]
    pub trust_roots: Vec<String>,
}

/// The rotation and the proxies with an identity — of every control plane sharing the store,
/// so that a step run on one waits for the proxies of all.
async fn ca_report(controller: &Controller) -> Option<CaStatus> {
    let (ca, _) = controller.identity()?;
    // Without the other control planes' proxies a step could leave some behind: none then.
    let proxies = controller
        .status_all_checked()
        .await
        .ok()?
        .proxies
        .into_iter()
        .filter(|p| p.identity.is_some())
        .map(|p| CaProxy {
            node: p.node,
            instance: p.instance,
            certificate_root: p.certificate_root,
            trust_roots: p.trust_roots,
        })
        .collect();
    Some(CaStatus {
        rotation: ca.rotation(),
        proxies,
    })
}

async fn ca_status(controller: &Controller) -> Response<Body> {
    match ca_report(controller).await {
        Some(report) => reply(StatusCode::OK, &report),
        None if controller.identity().is_some() => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the store does not answer: the proxies of the other control planes cannot be counted",
        ),
        None => error(
            StatusCode::CONFLICT,
            "this control plane issues no identities",
        ),
    }
}

/// A step of a root rotation: `rotate` (a new root joins the bundle), `promote` (it signs;
/// only once every connected proxy with an identity acknowledged a bundle holding it), `finish`
/// (the previous roots leave the bundle; only once every such proxy has a certificate from
/// the new root). `force` skips the wait.
async fn rotate(controller: &Controller, step: &str, force: bool) -> Response<Body> {
    let Some((ca, _)) = controller.identity() else {
        return error(
            StatusCode::CONFLICT,
            "this control plane issues no identities",
        );
    };
    let Some(report) = ca_report(controller).await else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the store does not answer: the proxies of the other control planes cannot be counted",
        );
    };
    let lagging: Vec<String> = match step {
        "promote" => {
            let next = report.rotation.next.clone().unwrap_or_default();
            report
                .proxies
                .iter()
                .filter(|p| !p.trust_roots.contains(&next))
                .map(|p| format!("{} ({})", p.node, p.instance))
                .collect()
        }
        "finish" => report
            .proxies
            .iter()
            .filter(|p| p.certificate_root.as_ref() != Some(&report.rotation.current))
            .map(|p| format!("{} ({})", p.node, p.instance))
            .collect(),
        _ => Vec::new(),
    };
    if !force && !lagging.is_empty() && report.rotation.stage != "none" {
        let what = if step == "promote" {
            "trust the next root yet"
        } else {
            "have a certificate from the new root yet"
        };
        return error(
            StatusCode::CONFLICT,
            format!(
                "not every proxy does {what}: {} (retry, or force)",
                lagging.join(", ")
            ),
        );
    }
    let store = controller.store().as_ref();
    let result = match step {
        "rotate" => ca.begin_rotation(store).await,
        "promote" => ca.promote_rotation(store).await,
        "finish" => ca.finish_rotation(store).await,
        other => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no rotation step {other:?}: rotate, promote or finish"),
            );
        }
    };
    match result {
        Ok(rotation) => reply(StatusCode::OK, &rotation),
        Err(crate::identity::IdentityError::Denied(why)) => error(StatusCode::CONFLICT, why),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn revoke_identity(controller: &Controller, req: Request<Incoming>) -> Response<Body> {
    let text = match body_text(req).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut de = serde_json::Deserializer::from_str(&text);
    let request = match serde_path_to_error::deserialize::<_, RevocationRequest>(&mut de) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid revocation: {}: {}", e.path(), e.inner()),
            );
        }
    };
    let Some((ns, name)) = request
        .node
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
    else {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid revocation: node: {:?} must be NAMESPACE/NAME",
                request.node
            ),
        );
    };
    let (kind, label) = if request.gateway {
        (Kind::VirtualGateway, "gateway")
    } else {
        (Kind::VirtualNode, "node")
    };
    let node = ResourceKey::new(kind, ns, name);
    match crate::identity::revoke_node(controller.store().as_ref(), &node).await {
        Ok(r) => reply(
            StatusCode::OK,
            &Revoked {
                revoked: format!("{label} {ns}/{name}"),
                revoked_at: humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.revoked_ms),
                )
                .to_string(),
            },
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `GET /metrics`: Prometheus text.
fn metrics(controller: &Controller) -> Response<Body> {
    match controller.encode_metrics() {
        Ok(text) => respond(StatusCode::OK, "text/plain; version=0.0.4", text),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// What an apply or a delete did, or why it did nothing.
fn results(result: Result<Vec<Applied>, ControlError>) -> Response<Body> {
    match result {
        Ok(results) => reply(StatusCode::OK, &Results { results }),
        Err(e) => control_error(e),
    }
}

/// Whether a request only previews an apply (`POST /v1/diff`, `POST /v1/apply?dryRun=true`):
/// it writes nothing, so a viewer may send it and the audit log does not record it.
fn previews(req: &Request<Incoming>) -> bool {
    req.method() == Method::POST
        && match req.uri().path().trim_matches('/') {
            "v1/diff" => true,
            "v1/apply" => query(req).get("dryRun").is_some_and(|v| v == "true"),
            _ => false,
        }
}

/// `POST /v1/diff` and `POST /v1/apply?dryRun=true`: what applying the body's manifests would
/// do, storing nothing (see [`Controller::preview`]); invalid manifests get the problems an
/// apply would. `Instance` documents are refused: a preview covers mesh resources.
async fn preview(controller: &Arc<Controller>, req: Request<Incoming>) -> Response<Body> {
    let manifests = match manifests(req).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    if let Some((document, m)) = manifests
        .iter()
        .enumerate()
        .find(|(_, m)| m.kind == "Instance" && m.api_version == crate::model::API_VERSION)
    {
        return invalid(vec![Problem {
            document: Some(document),
            resource: Some(format!("Instance {}", m.metadata.name)),
            path: "kind".into(),
            reason: "not supported by a preview: it covers mesh resources, not instances".into(),
        }]);
    }
    match controller.preview(manifests).await {
        Ok(p) => reply(StatusCode::OK, &p),
        Err(e) => control_error(e),
    }
}

/// `POST /v1/apply`: the body's manifests, all or nothing; then its `Instance` documents
/// (what `trellis export --instances` writes), each registered as `POST /v1/instances` would,
/// once the resources are in. Every document is checked before anything is written.
async fn apply(controller: &Controller, req: Request<Incoming>) -> Response<Body> {
    let manifests = match manifests(req).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    let (instances, manifests): (Vec<_>, Vec<_>) = manifests
        .into_iter()
        .enumerate()
        .partition(|(_, m)| m.kind == "Instance" && m.api_version == crate::model::API_VERSION);
    let mut registrations = Vec::new();
    for (document, m) in instances {
        match instance_of(&m, controller.registration_policy()) {
            Ok(i) => registrations.push(i),
            Err((path, reason)) => {
                return invalid(vec![Problem {
                    document: Some(document),
                    resource: Some(format!("Instance {}", m.metadata.name)),
                    path,
                    reason,
                }]);
            }
        }
    }
    let manifests = manifests.into_iter().map(|(_, m)| m).collect::<Vec<_>>();
    let mut applied = if manifests.is_empty() {
        Vec::new()
    } else {
        match controller.apply(manifests).await {
            Ok(a) => a,
            Err(e) => return control_error(e),
        }
    };
    for i in registrations {
        let name = format!("{}/{}", i.service, i.id);
        let namespace = i.namespace.clone();
        if let Err(e) = controller.register(i).await {
            return control_error(e);
        }
        applied.push(Applied {
            kind: "Instance".into(),
            namespace,
            name,
            action: crate::controller::Action::Configured,
        });
    }
    reply(StatusCode::OK, &Results { results: applied })
}

/// An `Instance` document: `metadata.namespace` and `.name` are the registry namespace and the
/// instance id; `spec` has the registration's other fields. Checked as `POST /v1/instances`
/// checks a registration (fields, ranges, the address policy).
fn instance_of(
    m: &crate::model::Manifest,
    policy: &crate::registry::AddressPolicy,
) -> Result<Instance, (String, String)> {
    let meta = &m.metadata;
    if !meta.labels.is_empty() || !meta.annotations.is_empty() {
        return Err((
            "metadata".into(),
            "an Instance has only a name and a namespace".into(),
        ));
    }
    let namespace = meta.namespace.clone().ok_or_else(|| {
        (
            "metadata.namespace".to_string(),
            "the registry namespace is required".to_string(),
        )
    })?;
    let mut body = m.spec.clone();
    let Some(fields) = body.as_object_mut() else {
        return Err(("spec".into(), "must be an object".into()));
    };
    for taken in ["namespace", "id"] {
        if fields.contains_key(taken) {
            return Err((
                format!("spec.{taken}"),
                format!("unknown field `{taken}` (it is metadata's)"),
            ));
        }
    }
    fields.insert("namespace".into(), namespace.into());
    fields.insert("id".into(), meta.name.clone().into());
    let registration: crate::registry::Registration = serde_path_to_error::deserialize(body)
        .map_err(|e| (format!("spec.{}", e.path()), e.inner().to_string()))?;
    registration
        .into_instance(policy)
        .map_err(|(path, reason)| (format!("spec.{path}"), reason))
}

/// `POST /v1/delete`: the resources the body's manifests name.
async fn delete(controller: &Controller, req: Request<Incoming>) -> Response<Body> {
    let manifests = match manifests(req).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    let mut keys = Vec::new();
    for m in manifests {
        let Some(kind) = Kind::parse(&m.kind) else {
            return error(
                StatusCode::BAD_REQUEST,
                format!("unknown kind {:?}", m.kind),
            );
        };
        keys.push(ResourceKey::new(
            kind,
            m.metadata.namespace.as_deref().unwrap_or("default"),
            &m.metadata.name,
        ));
    }
    results(controller.delete(keys).await)
}

/// `GET /v1/resources/KIND[?namespace=NS]`.
fn list_resources(controller: &Controller, kind: Kind, req: &Request<Incoming>) -> Response<Body> {
    let q = query(req);
    let ns = q
        .get("namespace")
        .map(String::as_str)
        .filter(|n| !n.is_empty());
    reply(
        StatusCode::OK,
        &Items {
            items: controller.list(kind, ns),
        },
    )
}

/// `GET /v1/resources/KIND/NS/NAME`.
fn get_resource(controller: &Controller, kind: Kind, ns: &str, name: &str) -> Response<Body> {
    let key = ResourceKey::new(kind, ns, name);
    match controller.get(&key) {
        Some(m) => reply(StatusCode::OK, &m),
        None => error(StatusCode::NOT_FOUND, format!("{key} not found")),
    }
}

/// `POST /v1/instances`: a registration, checked like the endpoint it becomes and its address
/// with the controller's registration policy.
async fn register(controller: &Controller, req: Request<Incoming>) -> Response<Body> {
    let text = match body_text(req).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let invalid = |path: &str, reason: &dyn std::fmt::Display| {
        error(
            StatusCode::BAD_REQUEST,
            format!("invalid instance: {path}: {reason}"),
        )
    };
    let mut de = serde_json::Deserializer::from_str(&text);
    let registration = match serde_path_to_error::deserialize::<_, Registration>(&mut de) {
        Ok(r) => r,
        Err(e) => return invalid(&e.path().to_string(), e.inner()),
    };
    let instance = match registration.into_instance(controller.registration_policy()) {
        Ok(i) => i,
        Err((path, reason)) => return invalid(&path, &reason),
    };
    match controller.register(instance).await {
        Ok(i) => reply(StatusCode::OK, &i),
        Err(e) => control_error(e),
    }
}

/// `GET /v1/instances[?namespace=NS][&service=SVC]`.
fn list_instances(controller: &Controller, req: &Request<Incoming>) -> Response<Body> {
    let q = query(req);
    let matches =
        |want: Option<&String>, have: &str| want.is_none_or(|w| w.is_empty() || w == have);
    let view = controller.view();
    let items: Vec<&Instance> = view
        .instances
        .iter()
        .filter(|i| matches(q.get("namespace"), &i.namespace))
        .filter(|i| matches(q.get("service"), &i.service))
        .collect();
    reply(StatusCode::OK, &Items { items })
}
