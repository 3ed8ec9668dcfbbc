//! The mesh resource model: Kubernetes-style manifests (`apiVersion`, `kind`, `metadata`, `spec`)
//! whose specs have the field names and shapes of App Mesh's `appmesh.k8s.aws/v1beta2` CRDs, plus
//! Trellis additions (retry backoff and budget, retriable status codes, load-balancer choice,
//! the `registry` service discovery and a VirtualService `hostname`).

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const API_VERSION: &str = "mesh.trellis.dev/v1beta1";
/// App Mesh's API group, accepted wherever Trellis's is.
pub const APPMESH_API_VERSION: &str = "appmesh.k8s.aws/v1beta2";

/// The API group a resource was applied with, and is served back with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiVersion {
    #[default]
    Trellis,
    AppMesh,
    /// Kubernetes's core group, for Namespaces.
    Kubernetes,
}

impl ApiVersion {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            API_VERSION => Some(Self::Trellis),
            APPMESH_API_VERSION => Some(Self::AppMesh),
            "v1" => Some(Self::Kubernetes),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trellis => API_VERSION,
            Self::AppMesh => APPMESH_API_VERSION,
            Self::Kubernetes => "v1",
        }
    }

    /// Whether `kind` is of this group: Namespaces of Kubernetes's, mesh kinds of the others.
    pub fn has(self, kind: Kind) -> bool {
        match kind {
            Kind::Namespace => self == Self::Kubernetes,
            // Trellis's own kind.
            Kind::Canary => self == Self::Trellis,
            _ => self != Self::Kubernetes,
        }
    }
}
pub const DEFAULT_NAMESPACE: &str = "default";

/// A VirtualService annotation (Trellis addition): more `ip:port` addresses its callers reach it
/// at, comma-separated — on Kubernetes, set by the control plane to its Service's cluster IPs and
/// ports. A sidecar routes a captured connection sent there (whatever its `Host`, or not HTTP)
/// to the virtual service.
pub const ADDRESSES_ANNOTATION: &str = "trellis.dev/addresses";

/// The addresses of [`ADDRESSES_ANNOTATION`], or why they are not addresses.
pub fn annotated_addresses(
    annotations: &BTreeMap<String, String>,
) -> Result<Vec<std::net::SocketAddr>, String> {
    let Some(value) = annotations.get(ADDRESSES_ANNOTATION) else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.parse()
                .map_err(|_| format!("{a:?} is not an ip:port address (IPv6 in brackets)"))
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Mesh,
    VirtualService,
    VirtualRouter,
    VirtualNode,
    VirtualGateway,
    GatewayRoute,
    /// A Kubernetes `v1` Namespace: only its labels, which meshes' `namespaceSelector`s select.
    Namespace,
    /// A progressive delivery of a VirtualRouter route (Trellis's own kind).
    Canary,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Mesh,
        Kind::VirtualService,
        Kind::VirtualRouter,
        Kind::VirtualNode,
        Kind::VirtualGateway,
        Kind::GatewayRoute,
        Kind::Namespace,
        Kind::Canary,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mesh => "Mesh",
            Self::VirtualService => "VirtualService",
            Self::VirtualRouter => "VirtualRouter",
            Self::VirtualNode => "VirtualNode",
            Self::VirtualGateway => "VirtualGateway",
            Self::GatewayRoute => "GatewayRoute",
            Self::Namespace => "Namespace",
            Self::Canary => "Canary",
        }
    }

    /// The lowercase singular name (`virtualrouter`), used in keys and URLs.
    pub fn lower(self) -> String {
        self.as_str().to_ascii_lowercase()
    }

    /// Parses `VirtualRouter`, `virtualrouter` or `virtualrouters` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        // Singular or plural ("meshes", "virtualnodes"), any case.
        let lower = s.to_ascii_lowercase();
        let singular = lower
            .strip_suffix("es")
            .filter(|s| s.ends_with("sh"))
            .or_else(|| lower.strip_suffix('s'))
            .unwrap_or(&lower);
        Self::ALL
            .into_iter()
            .find(|k| k.lower() == lower || k.lower() == singular)
    }

    /// Whether the kind is App Mesh's (checked against its field table): not Trellis's own
    /// Canary, nor Kubernetes's Namespace.
    pub fn is_appmesh(self) -> bool {
        !matches!(self, Self::Namespace | Self::Canary)
    }

    /// Meshes and namespaces are cluster-scoped; everything else lives in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Self::Mesh | Self::Namespace)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies one resource.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceKey {
    pub kind: Kind,
    /// Empty for meshes.
    pub namespace: String,
    pub name: String,
}

impl ResourceKey {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        Self {
            kind,
            namespace: if kind.namespaced() {
                namespace.to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        }
    }

    /// The store key: `resources/<kind>/<namespace>/<name>`.
    pub fn store_key(&self) -> String {
        format!(
            "resources/{}/{}/{}",
            self.kind.lower(),
            self.namespace,
            self.name
        )
    }

    pub fn from_store_key(key: &str) -> Option<Self> {
        let mut parts = key.strip_prefix("resources/")?.splitn(3, '/');
        let kind = Kind::parse(parts.next()?)?;
        Some(Self::new(kind, parts.next()?, parts.next()?))
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// A manifest as written by users and stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: Value,
    /// Ignored on apply; filled in by `get` from the control plane's view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Set by the control plane: the store revision of the last change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

// ---- specs -------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Ref {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// App Mesh carries the mesh uid in meshRef; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl Ref {
    /// The resource of `kind` this names; without a namespace, in `namespace` (the referrer's).
    pub fn key(&self, kind: Kind, namespace: &str) -> ResourceKey {
        ResourceKey::new(
            kind,
            self.namespace.as_deref().unwrap_or(namespace),
            &self.name,
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_filter: Option<EgressFilter>,
    /// The namespaces whose resources belong to the mesh (without a `meshRef` of their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// The AWS account owning a shared mesh: accepted, not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_owner: Option<String>,
    /// Trellis addition: whether App Mesh's hidden defaults apply to the mesh's resources
    /// applied with App Mesh's API group (`ENABLED`, the default) or not (`DISABLED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_mesh_defaults: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_service_discovery: Option<MeshServiceDiscovery>,
    /// Trellis addition: mTLS between the mesh's sidecars — `STRICT`, `PERMISSIVE` or
    /// `DISABLED`. Unset: STRICT when the control plane requires every proxy to have an
    /// identity, else DISABLED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<String>,
    /// Trellis addition: distributed tracing by the mesh's proxies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<MeshTracing>,
}

/// A mesh's tracing: spans exported over OTLP/gRPC to `collector` (HOST:PORT), and the share of
/// new traces sampled (requests that carry a trace keep its decision).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshTracing {
    pub collector: String,
    /// Percent, 0 to 100; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_percent: Option<f64>,
}

impl MeshTracing {
    /// As the proxy of `node` takes it (its service.name: NAMESPACE/NAME).
    pub fn to_proto(&self, node: &ResourceKey) -> trellis_proto::v1::Tracing {
        trellis_proto::v1::Tracing {
            collector: self.collector.clone(),
            sampling_percent: self.sampling_percent.unwrap_or(1.0),
            service_name: format!("{}/{}", node.namespace, node.name),
        }
    }
}

/// A mesh's `spec.mtls`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mtls {
    /// Plaintext between sidecars (App Mesh's behaviour).
    #[default]
    Disabled,
    /// Sidecars call each other with mTLS; their ingresses also take plaintext (callers
    /// without a sidecar, during a migration), and authorize nobody by identity.
    Permissive,
    /// mTLS only; an ingress admits only the callers the mesh graph declares.
    Strict,
}

impl Mtls {
    pub const VALUES: [&str; 3] = ["STRICT", "PERMISSIVE", "DISABLED"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "STRICT" => Some(Self::Strict),
            "PERMISSIVE" => Some(Self::Permissive),
            "DISABLED" => Some(Self::Disabled),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "STRICT",
            Self::Permissive => "PERMISSIVE",
            Self::Disabled => "DISABLED",
        }
    }
}

/// How the mesh's proxies reach its nodes' instances.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshServiceDiscovery {
    /// `IPv4_ONLY` or `IPv6_ONLY`: the addresses dialled (DNS names resolved to that family
    /// only, registry instances by their address of that family). Unset: as registered or
    /// resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_preference: Option<String>,
}

impl MeshSpec {
    /// The mesh's ipPreference: "IPv4_ONLY", "IPv6_ONLY", or None.
    pub fn ip_preference(&self) -> Option<&str> {
        self.mesh_service_discovery
            .as_ref()
            .and_then(|d| d.ip_preference.as_deref())
    }
}

/// A mesh's egress filter: `DROP_ALL` (App Mesh's default) or `ALLOW_ALL`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressFilter {
    #[serde(rename = "type")]
    pub kind: String,
}

/// A Kubernetes label selector: every `matchLabels` pair, and every `matchExpressions`
/// requirement (`In`, `NotIn`, `Exists`, `DoesNotExist`). An empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelRequirement>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator.as_str() {
                    "In" => value.is_some_and(|v| r.values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !r.values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
    }
}

impl MeshSpec {
    /// Whether App Mesh's defaults (its default retry policy) apply.
    pub fn app_mesh_defaults(&self) -> bool {
        self.app_mesh_defaults.as_deref() != Some("DISABLED")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_name: Option<String>,
    /// Where callers reach the service; defaults to `awsName`, then `<name>.<namespace>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ref: Option<Ref>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<Provider>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Provider {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_node: Option<NodeProvider>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_router: Option<RouterProvider>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeProvider {
    pub virtual_node_ref: Ref,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterProvider {
    pub virtual_router_ref: Ref,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    pub port_mapping: PortMapping,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Inbound timeouts toward the app, per protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<ListenerTimeout>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
}

/// App Mesh's TLS on a listener: its mode, the certificate it serves, and whether (and how)
/// clients' certificates are validated. The shapes are App Mesh's; `acm` sources are refused by
/// the compatibility check before these are read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerTls {
    /// `STRICT`, `PERMISSIVE` or `DISABLED`.
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<TlsCertificate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<TlsValidation>,
}

/// A certificate and its key: PEM files on the proxy's machine, or (`sds`) the proxy's
/// Trellis-issued workload certificate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsCertificate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acm: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<TlsFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sds: Option<TlsSds>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsFile {
    pub certificate_chain: String,
    /// Set for a certificate; a trust file has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsSds {
    pub secret_name: String,
}

/// How a peer's certificate is validated: the roots it must chain to, and the names it must
/// carry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsValidation {
    pub trust: TlsTrust,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_alternative_names: Option<SubjectAlternativeNames>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsTrust {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acm: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<TlsFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sds: Option<TlsSds>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubjectAlternativeNames {
    #[serde(rename = "match")]
    pub matcher: SanMatch,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SanMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exact: Vec<String>,
}

impl TlsValidation {
    /// The SANs a peer's certificate must carry one of (empty: any).
    pub fn names(&self) -> &[String] {
        self.subject_alternative_names
            .as_ref()
            .map_or(&[], |s| &s.matcher.exact)
    }
}

/// App Mesh's backend defaults (a node's or a gateway's): the client policy toward backends.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_policy: Option<ClientPolicy>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTls>,
}

/// TLS toward backends: whether it is used (`enforce`, default true) and toward which ports
/// (unset: all), the client certificate for mTLS, and how the server is validated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforce: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<TlsCertificate>,
    pub validation: TlsValidation,
}

/// A VirtualNode listener's inbound timeouts: the one of its protocol applies.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerTimeout {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<Timeouts>,
    /// Only `idle` is App Mesh's for TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<Timeouts>,
}

impl ListenerTimeout {
    /// The timeouts for a listener of `protocol`.
    pub fn for_protocol(&self, protocol: &str) -> Option<&Timeouts> {
        match protocol {
            "http" => self.http.as_ref(),
            "http2" => self.http2.as_ref(),
            "grpc" => self.grpc.as_ref(),
            "tcp" => self.tcp.as_ref(),
            _ => None,
        }
    }
}

/// A VirtualNode listener's `healthCheck` (App Mesh v1beta2): active health checks that the
/// proxies calling the node perform against each of its endpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheck {
    /// http, http2, grpc or tcp.
    pub protocol: String,
    /// http and http2 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Unset: the endpoint's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    pub interval_millis: i64,
    pub timeout_millis: i64,
    /// Required for a VirtualNode's (the CRD schema says so); optional for a VirtualGateway's,
    /// 0 when not given — and then not stored, so that a stored gateway reads back as it was
    /// applied (a stored 0 would be refused as out of 2..=10).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub healthy_threshold: i64,
    pub unhealthy_threshold: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// A VirtualNode listener's `outlierDetection` (App Mesh v1beta2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    pub max_server_errors: i64,
    pub interval: Duration,
    pub base_ejection_duration: Duration,
    pub max_ejection_percent: i64,
}

/// A VirtualNode listener's `connectionPool`: one of its protocols' limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2: Option<RequestPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<RequestPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpPool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPool {
    pub max_connections: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestPool {
    pub max_requests: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpPool {
    pub max_connections: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortMapping {
    pub port: i64,
    /// http, http2, grpc or tcp.
    pub protocol: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualRouterSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ref: Option<Ref>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<Listener>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    // Boxed: a route has one of the four, and routers keep their routes for as long as they live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_route: Option<Box<HttpRoute>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_route: Option<Box<HttpRoute>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_route: Option<Box<GrpcRoute>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_route: Option<Box<TcpRoute>>,
}

impl Route {
    /// The action of an http, http2 or grpc route (not a tcp route's).
    pub fn action(&self) -> Option<&RouteAction> {
        if let Some(h) = self.http_route.as_ref().or(self.http2_route.as_ref()) {
            return Some(&h.action);
        }
        self.grpc_route.as_ref().map(|g| &g.action)
    }

    pub fn action_mut(&mut self) -> Option<&mut RouteAction> {
        if let Some(h) = self.http_route.as_mut() {
            return Some(&mut h.action);
        }
        if let Some(h) = self.http2_route.as_mut() {
            return Some(&mut h.action);
        }
        self.grpc_route.as_mut().map(|g| &mut g.action)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(rename = "match")]
    pub matcher: HttpMatch,
    pub action: RouteAction,
    /// Trellis: the path and host the route's requests are sent with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<RouteRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Timeouts>,
    /// Trellis: changes to the request's headers before it goes to the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderRules>,
    /// Trellis: changes to the response's headers before it goes back to the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderRules>,
    /// Trellis: delays and errors injected into the route's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Trellis: requests admitted at most at a rate, at the caller's sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Trellis: a share of the route's requests copied to a VirtualNode, fire and forget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

/// Trellis: a route's rewrites — one of `prefix` (the route's `match.prefix` replaced by it),
/// `path` (the whole path) or `regex`; and `hostname` (the authority sent). The query stays.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<RegexRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// Each match of `pattern` in the path replaced by `substitution` ($1, ${name}: its groups).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegexRewrite {
    pub pattern: String,
    pub substitution: String,
}

impl RouteRewrite {
    /// The path rewrite as the proxy takes it, for a route matching `prefix` (None: the
    /// rewrite changes only the host, or asks for a prefix the route does not match on).
    pub fn path_proto(&self, prefix: Option<&str>) -> Option<trellis_proto::v1::PathRewrite> {
        use trellis_proto::v1::PathRewrite;
        if let Some(to) = &self.prefix {
            return prefix.map(|p| PathRewrite {
                prefix: p.to_string(),
                replacement: to.clone(),
                ..Default::default()
            });
        }
        if let Some(path) = &self.path {
            return Some(PathRewrite {
                exact: path.clone(),
                ..Default::default()
            });
        }
        self.regex.as_ref().map(|r| PathRewrite {
            regex: r.pattern.clone(),
            substitution: r.substitution.clone(),
            ..Default::default()
        })
    }
}

/// Trellis: a token bucket at a sidecar: `requests` per `per`, `burst` at once (default
/// `requests`), one bucket per value of `key` (a header, or the caller's verified identity).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    pub requests: i64,
    pub per: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RateLimitKey>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<bool>,
}

impl RateLimit {
    /// As the proxy takes it; routes naming the same `bucket` share one.
    pub fn to_proto(&self, bucket: &str) -> trellis_proto::v1::RateLimit {
        use trellis_proto::v1::{self as pb, rate_limit::Key};
        let per = self.per.to_proto();
        pb::RateLimit {
            requests: u32::try_from(self.requests).unwrap_or(0),
            per,
            burst: self.burst.map_or(0, |b| u32::try_from(b).unwrap_or(0)),
            key: self
                .key
                .as_ref()
                .and_then(|k| match (&k.header, k.peer_identity) {
                    (Some(h), _) => Some(Key::Header(h.clone())),
                    (None, Some(true)) => Some(Key::PeerIdentity(true)),
                    _ => None,
                }),
            bucket: bucket.to_string(),
        }
    }
}

/// Trellis: a share of a route's requests copied, at the caller's sidecar, to a VirtualNode
/// (its `port`, as a weighted target's), fire and forget: bodies up to `maxBodyBytes` (default
/// 64 KiB), responses discarded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    pub virtual_node_ref: Ref,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// Percent of the requests, 0 to 100.
    pub percentage: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<i64>,
}

impl Mirror {
    /// As the proxy takes it, copying to `cluster`; a bound out of range is made one the
    /// proxy's compiler refuses.
    pub fn to_proto(&self, cluster: String) -> trellis_proto::v1::Mirror {
        trellis_proto::v1::Mirror {
            cluster,
            percentage: self.percentage,
            max_body_bytes: self
                .max_body_bytes
                .map_or(0, |n| u64::try_from(n).unwrap_or(u64::MAX)),
        }
    }
}

/// Trellis: faults injected into a route's requests at the caller's sidecar, before they are
/// forwarded (to test how callers take delays and errors).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    /// Only requests matching every one of these (App Mesh's header match) get faults.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    pub fixed_delay: Duration,
    /// Percent of the requests, 0 to 100.
    pub percentage: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    pub http_status: i64,
    /// For gRPC requests: the grpc-status answered (with HTTP 200) instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<i64>,
    /// Percent of the requests, 0 to 100.
    pub percentage: f64,
}

impl Fault {
    /// As the proxy takes it, with `headers` (the matches translated); a duration out of range
    /// is left unset (the proxy's compiler then says it is required).
    pub fn to_proto(
        &self,
        headers: Vec<trellis_proto::v1::HeaderMatch>,
    ) -> trellis_proto::v1::Fault {
        use trellis_proto::v1 as pb;
        pb::Fault {
            headers,
            delay: self.delay.as_ref().map(|d| pb::FaultDelay {
                fixed_delay: d.fixed_delay.to_proto(),
                percentage: d.percentage,
            }),
            abort: self.abort.as_ref().map(|a| pb::FaultAbort {
                http_status: u32::try_from(a.http_status).unwrap_or(u32::MAX),
                grpc_status: a
                    .grpc_status
                    .map_or(0, |g| u32::try_from(g).unwrap_or(u32::MAX)),
                percentage: a.percentage,
            }),
        }
    }
}

/// Trellis: headers set (every value replaced), added (appended) and removed; values may use
/// the variables of `trellis_proxy::header_rules::VARIABLES`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderRules {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValueRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValueRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderValueRule {
    pub name: String,
    pub value: String,
}

impl HeaderRules {
    pub fn to_proto(&self) -> trellis_proto::v1::HeaderRules {
        let rule = |r: &HeaderValueRule| trellis_proto::v1::HeaderValueRule {
            name: r.name.clone(),
            value: r.value.clone(),
        };
        trellis_proto::v1::HeaderRules {
            set: self.set.iter().map(rule).collect(),
            add: self.add.iter().map(rule).collect(),
            remove: self.remove.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_parameters: Vec<QueryMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invert: Option<bool>,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<ValueMatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValueMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<RangeMatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RangeMatch {
    pub start: i64,
    pub end: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueryMatch {
    pub name: String,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<ExactMatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExactMatch {
    pub exact: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteAction {
    pub weighted_targets: Vec<WeightedTarget>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedTarget {
    pub virtual_node_ref: Ref,
    pub weight: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
}

/// App Mesh durations: `{unit: ms|s, value: N}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Duration {
    pub unit: DurationUnit,
    pub value: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DurationUnit {
    #[default]
    #[serde(rename = "ms")]
    Ms,
    #[serde(rename = "s")]
    S,
}

impl Duration {
    /// As the proxy takes it; None when negative.
    pub fn to_proto(self) -> Option<trellis_proto::Duration> {
        self.to_std().map(|t| trellis_proto::Duration {
            seconds: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(t.subsec_nanos()).unwrap_or(0),
        })
    }

    pub fn to_std(self) -> Option<std::time::Duration> {
        let v = u64::try_from(self.value).ok()?;
        Some(match self.unit {
            DurationUnit::Ms => std::time::Duration::from_millis(v),
            DurationUnit::S => std::time::Duration::from_secs(v),
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    pub max_retries: i64,
    pub per_retry_timeout: Duration,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_retry_events: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_retry_events: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_retry_events: Vec<String>,
    /// Trellis: status codes retried besides the events.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<i64>,
    /// Trellis: exponential backoff with jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Trellis: a retry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
    /// Trellis: hedging — an attempt past the per-retry timeout goes on beside the next, the
    /// first usable response wins (idempotent requests without a body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge_on_per_retry_timeout: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_interval: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Percent of requests that may be retried (App Mesh style 0..=100); default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_request: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRoute {
    #[serde(rename = "match")]
    pub matcher: GrpcMatch,
    pub action: RouteAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Timeouts>,
    /// Trellis: changes to the request's headers (metadata) before it goes to the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderRules>,
    /// Trellis: changes to the response's headers before it goes back to the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderRules>,
    /// Trellis: delays and errors injected into the route's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Trellis: requests admitted at most at a rate, at the caller's sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Trellis: a share of the route's requests copied to a VirtualNode, fire and forget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metadata: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRoute {
    pub action: RouteAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Timeouts>,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualNodeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ref: Option<Ref>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<Listener>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_discovery: Option<ServiceDiscovery>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    /// App Mesh controller's backend groups: `name: "*"` makes every VirtualService of the
    /// namespace (of the node's mesh) a backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_groups: Vec<BackendGroupRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_defaults: Option<BackendDefaults>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging: Option<Logging>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Trellis: how callers balance over this node's instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// Trellis: callers admitted under mTLS STRICT besides those the mesh graph declares.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_callers: Vec<AllowedCaller>,
    /// Trellis: changes to the headers of requests arriving at the node (at its sidecar's
    /// ingress, before the app), and of its app's responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderRules>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderRules>,
    /// Trellis: requests to the node admitted at most at a rate, at its sidecar (one bucket
    /// over all its listeners).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// A caller a node admits outside the mesh graph: a VirtualNode, a VirtualGateway, or a SPIFFE
/// ID (a workload with a certificate from the mesh's CA that is not a mesh resource). One of the
/// three.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowedCaller {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_node_ref: Option<Ref>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_gateway_ref: Option<Ref>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
}

/// A VirtualNode's or VirtualGateway's `logging`: its proxy's access log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Logging {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLog>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLog {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileAccessLog>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileAccessLog {
    /// Where the proxy appends lines; `/dev/stdout` is its standard output.
    pub path: String,
    /// Unset: Envoy's default text format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<LogFormat>,
}

/// One of `text` (an Envoy format string) or `json` (keys with Envoy format strings).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogFormat {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<Vec<JsonLogField>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JsonLogField {
    pub key: String,
    pub value: String,
}

impl FileAccessLog {
    /// The snapshot's access log, compiled by the proxy (which refuses what it cannot render).
    pub fn to_proto(&self) -> trellis_proto::v1::AccessLog {
        use trellis_proto::v1 as pb;
        let format = self.format.as_ref().and_then(|f| match (&f.text, &f.json) {
            (Some(text), _) => Some(pb::access_log::Format::Text(text.clone())),
            (None, Some(json)) => Some(pb::access_log::Format::Json(pb::JsonFormat {
                fields: json
                    .iter()
                    .map(|f| pb::JsonField {
                        key: f.key.clone(),
                        value: f.value.clone(),
                    })
                    .collect(),
            })),
            (None, None) => None,
        });
        pb::AccessLog {
            path: self.path.clone(),
            format,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// ROUND_ROBIN (default), LEAST_REQUEST, RANDOM, PEAK_EWMA, RING_HASH or MAGLEV.
    #[serde(default = "round_robin")]
    pub policy: String,
    /// New instances' share ramped up over a window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<SlowStart>,
    /// RING_HASH and MAGLEV: what a request is hashed by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<HashKey>,
    /// Callers prefer the instances in their own zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_aware: Option<ZoneAware>,
}

/// A caller that knows its zone (its proxy's `--zone`) sends to the instances in that zone
/// (by their `AVAILABILITY_ZONE` attribute) while at least `minEndpoints` (default 1) of them
/// are in service, else to all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZoneAware {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_endpoints: Option<i64>,
}

/// What consistent hashing places a request by: one of a header's value, a cookie's, or the
/// client connection's IP address.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HashKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
}

impl LoadBalancer {
    /// The policy, as the proxy takes it (an unknown one: round robin; validation refuses it).
    pub fn policy_proto(&self) -> trellis_proto::v1::cluster::LbPolicy {
        use trellis_proto::v1::cluster::LbPolicy;
        match self.policy.as_str() {
            "LEAST_REQUEST" => LbPolicy::LeastRequest,
            "RANDOM" => LbPolicy::Random,
            "PEAK_EWMA" => LbPolicy::PeakEwma,
            "RING_HASH" => LbPolicy::RingHash,
            "MAGLEV" => LbPolicy::Maglev,
            _ => LbPolicy::RoundRobin,
        }
    }

    /// Zone awareness, as the proxy takes it (a minimum out of range: one it refuses).
    pub fn zone_aware_proto(&self) -> Option<trellis_proto::v1::ZoneAware> {
        self.zone_aware
            .as_ref()
            .map(|z| trellis_proto::v1::ZoneAware {
                min_endpoints: z
                    .min_endpoints
                    .map_or(0, |m| u32::try_from(m).unwrap_or(u32::MAX)),
            })
    }

    /// The hash key, as the proxy takes it (several given: the first; validation refuses it).
    pub fn hash_key_proto(&self) -> Option<trellis_proto::v1::HashKey> {
        use trellis_proto::v1::hash_key::Key;
        self.hash_key.as_ref().map(|k| trellis_proto::v1::HashKey {
            key: match (&k.header, &k.cookie, k.source_ip) {
                (Some(h), _, _) => Some(Key::Header(h.clone())),
                (None, Some(c), _) => Some(Key::Cookie(c.clone())),
                (None, None, Some(s)) => Some(Key::SourceIp(s)),
                (None, None, None) => None,
            },
        })
    }
}

fn round_robin() -> String {
    "ROUND_ROBIN".into()
}

/// An instance that appeared less than `window` ago at a caller's sidecar weighs
/// `(age / window)^(1 / aggression)` (default 1: linear), at least `minWeightPercent` (default
/// 10) percent, as Envoy's slow start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SlowStart {
    pub window: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggression: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_weight_percent: Option<f64>,
}

impl SlowStart {
    pub fn to_proto(&self) -> trellis_proto::v1::SlowStart {
        trellis_proto::v1::SlowStart {
            window: self.window.to_proto(),
            aggression: self.aggression.unwrap_or(0.0),
            min_weight_percent: self.min_weight_percent.unwrap_or(0.0),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceDiscovery {
    /// The Trellis registry (Cloud Map-like).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryDiscovery>,
    /// App Mesh's name for the same thing; treated as `registry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_cloud_map: Option<RegistryDiscovery>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsDiscovery>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryDiscovery {
    pub namespace_name: String,
    pub service_name: String,
    /// `{key: value}` or App Mesh's `[{key, value}]`.
    #[serde(default, skip_serializing_if = "Attributes::is_empty")]
    pub attributes: Attributes,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Attributes {
    Map(BTreeMap<String, String>),
    List(Vec<KeyValueAttr>),
}

impl Default for Attributes {
    fn default() -> Self {
        Self::Map(BTreeMap::new())
    }
}

/// The same attributes, whichever form they were written in (`[]` and a missing field are both
/// none), so re-applying a manifest is "unchanged" also after it was stored and read back.
impl PartialEq for Attributes {
    fn eq(&self, other: &Self) -> bool {
        let mut a = self.pairs();
        let mut b = other.pairs();
        a.sort_unstable();
        b.sort_unstable();
        a == b
    }
}

impl Attributes {
    pub fn is_empty(&self) -> bool {
        match self {
            Self::Map(m) => m.is_empty(),
            Self::List(l) => l.is_empty(),
        }
    }

    pub fn pairs(&self) -> Vec<(&str, &str)> {
        match self {
            Self::Map(m) => m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            Self::List(l) => l
                .iter()
                .map(|a| (a.key.as_str(), a.value.as_str()))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyValueAttr {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsDiscovery {
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_type: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendGroupRef {
    #[serde(default)]
    pub name: String,
    /// Unset: the node's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    pub virtual_service: VirtualServiceBackend,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceBackend {
    pub virtual_service_ref: Ref,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_policy: Option<ClientPolicy>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualGatewaySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ref: Option<Ref>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<Listener>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_defaults: Option<BackendDefaults>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging: Option<Logging>,
    /// The namespaces whose GatewayRoutes (without a virtualGatewayRef) the gateway serves;
    /// unset: its own namespace's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Of those, the GatewayRoutes it serves, by their labels; unset: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_route_selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayRouteSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ref: Option<Ref>,
    /// The VirtualGateway this route belongs to (App Mesh selects by labels on Kubernetes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_gateway_ref: Option<Ref>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_route: Option<GatewayHttpRoute>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_route: Option<GatewayHttpRoute>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_route: Option<GatewayGrpcRoute>,
}

impl GatewayRouteSpec {
    /// The route's `match.port`, whichever kind it is: the gateway listener it is served on.
    pub fn match_port(&self) -> Option<i64> {
        self.http_route
            .as_ref()
            .or(self.http2_route.as_ref())
            .and_then(|h| h.matcher.port)
            .or_else(|| self.grpc_route.as_ref().and_then(|g| g.matcher.port))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayGrpcRoute {
    #[serde(rename = "match")]
    pub matcher: GatewayGrpcMatch,
    pub action: GatewayAction,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayGrpcMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<HostnameMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metadata: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayHttpRoute {
    #[serde(rename = "match")]
    pub matcher: GatewayHttpMatch,
    pub action: GatewayAction,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayHttpMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<HostnameMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_parameters: Vec<QueryMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostnameMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
}

/// App Mesh gateway rewrites: by default the matched prefix becomes "/" and the Host becomes the
/// target virtual service's hostname.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<PrefixRewrite>,
    /// With `match.path.exact`: the path sent on instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<ExactPathRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<HostnameRewrite>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExactPathRewrite {
    pub exact: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrefixRewrite {
    /// ENABLED (default) or DISABLED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_prefix: Option<String>,
    /// Replace the matched prefix with this instead of "/".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostnameRewrite {
    /// ENABLED (default) or DISABLED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_target_hostname: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayAction {
    pub target: GatewayTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<GatewayRewrite>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayTarget {
    pub virtual_service: VirtualServiceBackend,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
}

/// A resource whose spec has been parsed. Every resource of the view holds one: the variants are
/// boxed so each takes the size of its own kind (a GatewayRouteSpec is ten times a MeshSpec).
/// Serialises as the inner spec (the manifest's `spec` field).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Spec {
    Mesh(Box<MeshSpec>),
    VirtualService(Box<VirtualServiceSpec>),
    VirtualRouter(Box<VirtualRouterSpec>),
    VirtualNode(Box<VirtualNodeSpec>),
    VirtualGateway(Box<VirtualGatewaySpec>),
    GatewayRoute(Box<GatewayRouteSpec>),
    /// A Namespace has nothing but its metadata (labels).
    Namespace,
    Canary(Box<CanarySpec>),
}

/// A canary (Trellis addition, `mesh.trellis.dev/v1beta1` only): the control plane moves a
/// VirtualRouter route's traffic from `stable` to `canary` step by step, judging each step by
/// the callers' proxies' own measurements of the canary's requests on that route, and rolls
/// back (the canary's weight to 0) when a gate fails.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CanarySpec {
    /// The router (in the canary's namespace unless it names one).
    pub virtual_router_ref: Ref,
    /// The name of one of its http, http2 or grpc routes.
    pub route: String,
    /// The VirtualNode serving the route now: a target of the route.
    pub stable_ref: Ref,
    /// The new version's VirtualNode: added to the route's targets if it is not one.
    pub canary_ref: Ref,
    /// The canary's weight (percent of the route's traffic, 1 to 100, rising) at each step,
    /// and for how long at least the step lasts.
    pub steps: Vec<CanaryStep>,
    pub gates: CanaryGates,
    /// How often the gates are checked: 1 s to 1 h (default 10 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CanaryStep {
    pub weight: i64,
    pub duration: Duration,
}

/// What a step's canary requests must show before the next step (all of them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CanaryGates {
    /// The canary's requests in the step before it is judged at all (at least 1): a step with
    /// fewer never advances.
    pub min_requests: i64,
    /// Percent of non-5xx responses, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_success_rate: Option<f64>,
    /// The step's 99th percentile of request durations, estimated from the proxies' latency
    /// buckets as Prometheus's `histogram_quantile` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_p99: Option<Duration>,
}

impl Spec {
    /// The resource's explicit mesh, if it names one.
    pub fn mesh_ref(&self) -> Option<&Ref> {
        match self {
            Self::Mesh(_) => None,
            Self::VirtualService(s) => s.mesh_ref.as_ref(),
            Self::VirtualRouter(s) => s.mesh_ref.as_ref(),
            Self::VirtualNode(s) => s.mesh_ref.as_ref(),
            Self::VirtualGateway(s) => s.mesh_ref.as_ref(),
            Self::GatewayRoute(s) => s.mesh_ref.as_ref(),
            Self::Namespace | Self::Canary(_) => None,
        }
    }
}

/// Parses `spec` for `kind`; errors carry the path under `spec`.
pub fn parse_spec(kind: Kind, spec: Value) -> Result<Spec, (String, String)> {
    fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<Box<T>, (String, String)> {
        let v = if v.is_null() {
            Value::Object(Default::default())
        } else {
            v
        };
        serde_path_to_error::deserialize(v)
            .map(Box::new)
            .map_err(|e| {
                let path = e.path().to_string();
                let path = if path == "." {
                    "spec".to_string()
                } else {
                    format!("spec.{path}")
                };
                (path, e.into_inner().to_string())
            })
    }
    Ok(match kind {
        Kind::Mesh => Spec::Mesh(parse(spec)?),
        Kind::VirtualService => Spec::VirtualService(parse(spec)?),
        Kind::VirtualRouter => Spec::VirtualRouter(parse(spec)?),
        Kind::VirtualNode => Spec::VirtualNode(parse(spec)?),
        Kind::VirtualGateway => Spec::VirtualGateway(parse(spec)?),
        Kind::GatewayRoute => Spec::GatewayRoute(parse(spec)?),
        Kind::Canary => Spec::Canary(parse(spec)?),
        Kind::Namespace => {
            if !spec.is_null() && spec != Value::Object(Default::default()) {
                return Err((
                    "spec".into(),
                    "not supported by Trellis: only a Namespace's labels are used".into(),
                ));
            }
            Spec::Namespace
        }
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn attributes_compare_by_content_not_form() {
        let map: Attributes = serde_json::from_str(r#"{"version":"blue","zone":"a"}"#).unwrap();
        let list: Attributes = serde_json::from_str(
            r#"[{"key":"zone","value":"a"},{"key":"version","value":"blue"}]"#,
        )
        .unwrap();
        assert_eq!(map, list);
        let empty_list: Attributes = serde_json::from_str("[]").unwrap();
        assert_eq!(empty_list, Attributes::default());
        assert_ne!(map, Attributes::default());
    }

    use super::*;

    #[test]
    fn kinds_parse_in_every_spelling() {
        for s in [
            "VirtualRouter",
            "virtualrouter",
            "virtualrouters",
            "VIRTUALROUTERS",
        ] {
            assert_eq!(Kind::parse(s), Some(Kind::VirtualRouter), "{s}");
        }
        for s in ["mesh", "meshes", "Meshes", "MESH"] {
            assert_eq!(Kind::parse(s), Some(Kind::Mesh), "{s}");
        }
        assert_eq!(
            Kind::parse("meshs"),
            Some(Kind::Mesh),
            "a plural s on any kind"
        );
        assert_eq!(Kind::parse("virtualgatewayes"), None);
        assert_eq!(Kind::parse("nope"), None);
    }

    #[test]
    fn store_keys_round_trip() {
        let k = ResourceKey::new(Kind::VirtualNode, "prod", "blue");
        assert_eq!(k.store_key(), "resources/virtualnode/prod/blue");
        assert_eq!(ResourceKey::from_store_key(&k.store_key()), Some(k));
        let m = ResourceKey::new(Kind::Mesh, "ignored", "m");
        assert_eq!(m.store_key(), "resources/mesh//m");
        assert_eq!(ResourceKey::from_store_key(&m.store_key()), Some(m));
    }

    #[test]
    fn app_mesh_shapes_parse() {
        let spec: Value = serde_json::json!({
            "listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}],
            "routes": [{
                "name": "r",
                "httpRoute": {
                    "match": {"prefix": "/", "headers": [{"name": "x", "match": {"range": {"start": 1, "end": 2}}}]},
                    "action": {"weightedTargets": [{"virtualNodeRef": {"name": "blue"}, "weight": 1}]},
                    "retryPolicy": {"maxRetries": 2, "perRetryTimeout": {"unit": "ms", "value": 500}, "httpRetryEvents": ["server-error"]},
                    "timeout": {"perRequest": {"unit": "s", "value": 3}}
                }
            }]
        });
        let Spec::VirtualRouter(r) = parse_spec(Kind::VirtualRouter, spec).unwrap() else {
            panic!()
        };
        let http = r.routes[0].http_route.as_ref().unwrap();
        assert_eq!(
            http.retry_policy
                .as_ref()
                .unwrap()
                .per_retry_timeout
                .to_std(),
            Some(std::time::Duration::from_millis(500))
        );
        let bad: Value =
            serde_json::json!({"routes": [{"name": "r", "httpRoute": {"match": {"prefx": "/"}}}]});
        let (path, reason) = parse_spec(Kind::VirtualRouter, bad).unwrap_err();
        assert_eq!(path, "spec.routes[0].httpRoute.match.prefx");
        assert!(reason.contains("unknown field"), "{reason}");
    }

    #[test]
    fn attributes_as_map_or_list() {
        let map: RegistryDiscovery = serde_json::from_value(serde_json::json!({
            "namespaceName": "ns", "serviceName": "s", "attributes": {"version": "v2"}
        }))
        .unwrap();
        let list: RegistryDiscovery = serde_json::from_value(serde_json::json!({
            "namespaceName": "ns", "serviceName": "s", "attributes": [{"key": "version", "value": "v2"}]
        })).unwrap();
        assert_eq!(map.attributes.pairs(), list.attributes.pairs());
    }
}
