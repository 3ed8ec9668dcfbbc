//! The status of every App Mesh v1beta2 spec field (and of Trellis's additions): honoured (what
//! App Mesh documents, and where Trellis does it), an AWS identity (accepted, with the meaning
//! given) or refused (with the reason users see after "not supported by Trellis: "). A field is
//! honoured only when translate and the proxy really do what App Mesh documents for it; a field
//! the typed model parses but nothing uses is refused. Checked against
//! `control-plane/appmesh/v1beta2-fields.md` by `compat`'s tests; the README's compatibility
//! table is generated from it.
//!
//! Lookups go by the longest prefix of whole `.`-segments (`spec.routes[].httpRoute.match.headers[].name`
//! falls back to `...headers[]`, then `...match`): a container's entry covers what is below it
//! unless a longer path has its own, and a `[]` element's children need their parent's entry.

use super::Status::{self, Honoured, Identity, Refused};
use crate::model::Kind::{
    self, GatewayRoute, Mesh, VirtualGateway, VirtualNode, VirtualRouter, VirtualService,
};

/// Every spec has an entry so that each App Mesh field resolves to a status of its own, never to the root's.
const SPEC: &str = "the resource's spec; each field's status is listed below it";
const AWS_NAME: &str = "AWS name; accepted, not used: Trellis names resources by metadata.name";
const UID: &str = "accepted, not checked: uids are Kubernetes object ids";
/// App Mesh ARN references (`...ARN`): `compat` rewrites them into the `...Ref` they name.
const ARN: &str = "resolves to the resource named in the ARN's last segment within the mesh named in it (a mismatch is an error)";
const MESH_REF: &str =
    "the mesh the resource belongs to (without it, the only mesh); references stay within one mesh";
const MATCH_PORT: &str = "route match on the port named in the request's authority (a request naming no port does not match)";
const TARGET_PORT: &str = "the target node's listener the traffic goes to (one of its listener ports, else an error): with dns, the endpoint is hostname:port; with registered instances (sidecar ingresses), requests carry the port in their authority and the sidecar's ingress forwards them to that listener (a tcp listener so only when it is the node's one); unset: the first listener";
/// A GatewayRoute's `match.port`.
const GATEWAY_MATCH_PORT: &str = "the gateway listener the route is served on (required when the gateway has several); that listener's protocol must be the route's";
/// A GatewayRoute's `action.target.port`.
const GATEWAY_TARGET_PORT: &str = "the target service's provider listener: with a router, the router listener whose routes apply (required when it has several); with a node, the node listener the traffic goes to (unset: its first)";
const TLS_LISTENER: &str = "TLS on the listener (a VirtualNode's: its sidecar's ingress, which serves all of the node's listeners, so they must agree; a VirtualGateway's: that listener's socket); it replaces the mesh's spec.mtls there (no mesh-graph authorization then: the validation's names decide)";
const TLS_MODE: &str = "STRICT: TLS only (plaintext closed at once); PERMISSIVE: TLS and plaintext, told apart by the first byte; DISABLED: plaintext (then no certificate is needed)";
const TLS_CERT_FILE: &str = "PEM files on the proxy's machine (chain, then key), read when a snapshot is applied: an unreadable file NACKs the snapshot, naming the field; new contents take effect with the next snapshot";
const TLS_CERT_SDS: &str = "the proxy's workload certificate, issued and renewed by trellis-control's CA (SPIFFE ID spiffe://TRUST-DOMAIN/ns/NAMESPACE/vn/NAME): Trellis is the SDS";
const TLS_SDS_NAME: &str = "accepted, not used: the SPIRE secret App Mesh's Envoy asked for; Trellis's CA issues the certificate itself";
const TLS_ACM: &str = "AWS Certificate Manager is not available outside AWS: use file (PEM files) or sds (Trellis-issued)";
const TLS_VALIDATION: &str = "the peer's certificate is required and validated: on a listener, clients must present one (mTLS); in a client policy, the server's";
const TLS_TRUST_FILE: &str =
    "PEM file of the roots the peer's certificate must chain to, read when a snapshot is applied";
const TLS_TRUST_SDS: &str =
    "the mesh's trust bundle (trellis-control's CA roots, rotations included)";
const TLS_SANS: &str = "the peer's certificate must carry one of these subject alternative names, exact (DNS names or URIs such as SPIFFE IDs; with sds, Trellis's IDs: spiffe://TRUST-DOMAIN/ns/NAMESPACE/vn/NAME); unset: any";
const TLS_CLIENT: &str = "TLS from the caller's proxy to the backend's listeners: with it, mesh mTLS (spec.mtls) does not apply toward them";
const TLS_ENFORCE: &str =
    "false: the policy is not applied (the mesh's spec.mtls decides); default true";
const TLS_PORTS: &str = "the target listener ports the policy applies to; unset: all";
const TLS_CLIENT_CERT: &str = "the client certificate for mTLS; unset: none is presented";
const TLS_BACKEND_DEFAULTS: &str = "the client policy toward every backend without one of its own";
const LOGGING: &str = "the proxy's access log: one line per request (and per TCP connection) on every listener, appended to file.path (/dev/stdout and /dev/stderr are the proxy's own), in Envoy's default format or format.text / format.json with Envoy's command operators (those Trellis renders are listed in the README; others are refused); replaces the --access-log flag's while set";
const BACKEND_GROUPS: &str = "name \"*\" (the App Mesh controller's wildcard): every VirtualService of the group's namespace (unset: the node's) in the node's mesh is a backend, as they come and go; a named BackendGroup resource (an experimental controller feature) is refused";
/// A VirtualGateway health check's prober settings.
const GATEWAY_PROBER: &str = "validated (the CRD's range); a setting of the external prober (the load balancer probing the gateway), which Trellis documents and does not run: the gateway answers every probe";
const POD_SELECTOR: &str = "validated, and selects the node's pods on Kubernetes (issue 13); off Kubernetes there are no pods: a proxy names its node with --node (a gateway with --gateway)";
const GATEWAY_POD_SELECTOR: &str = "validated; selects no pods yet: Trellis's injector meshes VirtualNodes' pods only (App Mesh's set up the Envoy of the gateway pods it selected) — a gateway's pods run trellis-proxy --gateway NAMESPACE/NAME themselves, joining with a token (trellis token create)";

/// (kind, path, status): a path's status covers the fields below it unless a longer path says otherwise.
pub(super) const STATUS: &[(Kind, &str, Status)] = &[
    // ---- Mesh --------------------------------------------------------------------------------------
    (Mesh, "spec", Honoured(SPEC)),
    (Mesh, "spec.awsName", Identity(AWS_NAME)),
    (
        Mesh,
        "spec.egressFilter",
        Honoured(
            "DROP_ALL (App Mesh's default, also when unset): a sidecar's egress answers requests for hosts its VirtualNode does not declare with 403 egress_denied; ALLOW_ALL: it forwards them to the host they name (HTTP to host:port, 80 without a port; CONNECT tunnels), without retries or timeouts",
        ),
    ),
    (
        Mesh,
        "spec.meshOwner",
        Identity("the AWS account owning a shared mesh; accepted, not checked"),
    ),
    (
        Mesh,
        "spec.meshServiceDiscovery",
        Honoured(
            "ipPreference IPv4_ONLY or IPv6_ONLY: the mesh's proxies dial only addresses of that family — DNS names (dns discovery, registered names) resolved to that family, registry instances at their address of that family (attribute AWS_INSTANCE_IPV4 / AWS_INSTANCE_IPV6, else the registered address if it is one; an instance without one is left out); unset: as registered or resolved",
        ),
    ),
    (
        Mesh,
        "spec.namespaceSelector",
        Honoured(
            "mesh membership: a resource without spec.meshRef belongs to the mesh whose selector matches its namespace's labels (from the v1 Namespace applied with it; matchLabels and matchExpressions In, NotIn, Exists, DoesNotExist); two meshes selecting one namespace is an error",
        ),
    ),
    // ---- VirtualService ----------------------------------------------------------------------------
    (VirtualService, "spec", Honoured(SPEC)),
    (
        VirtualService,
        "spec.awsName",
        Honoured(
            "the hostname callers reach the service at (App Mesh: the service name is its DNS name), unless spec.hostname is set; also the Host a gateway rewrites to",
        ),
    ),
    (VirtualService, "spec.meshRef", Honoured(MESH_REF)),
    (VirtualService, "spec.meshRef.name", Honoured(MESH_REF)),
    (VirtualService, "spec.meshRef.uid", Identity(UID)),
    (
        VirtualService,
        "spec.provider",
        Honoured("what serves the service: a virtualNode or a virtualRouter (exactly one)"),
    ),
    (
        VirtualService,
        "spec.provider.virtualNode",
        Honoured(
            "all of the service's traffic goes to this node's cluster, on its first listener's port",
        ),
    ),
    (
        VirtualService,
        "spec.provider.virtualNode.virtualNodeARN",
        Identity(ARN),
    ),
    (
        VirtualService,
        "spec.provider.virtualNode.virtualNodeRef",
        Honoured("the providing VirtualNode (namespace defaults to the service's)"),
    ),
    (
        VirtualService,
        "spec.provider.virtualRouter",
        Honoured("the service's routes are the router's routes, on the router's listener port"),
    ),
    (
        VirtualService,
        "spec.provider.virtualRouter.virtualRouterARN",
        Identity(ARN),
    ),
    (
        VirtualService,
        "spec.provider.virtualRouter.virtualRouterRef",
        Honoured("the providing VirtualRouter (namespace defaults to the service's)"),
    ),
    // ---- VirtualRouter -----------------------------------------------------------------------------
    (VirtualRouter, "spec", Honoured(SPEC)),
    (VirtualRouter, "spec.awsName", Identity(AWS_NAME)),
    (
        VirtualRouter,
        "spec.listeners",
        Honoured(
            "the router's listeners: the services it provides are reached on each port; with several, each route's match.port names its listener (required then)",
        ),
    ),
    (
        VirtualRouter,
        "spec.listeners[].portMapping",
        Honoured("the router's port and protocol"),
    ),
    (
        VirtualRouter,
        "spec.listeners[].portMapping.port",
        Honoured(
            "the port the services it provides are reached at (the egress serves host:port and host)",
        ),
    ),
    (
        VirtualRouter,
        "spec.listeners[].portMapping.protocol",
        Honoured(
            "checked; the egress serves http, http2 and grpc routes, and tcp routes through CONNECT; upstream protocol follows the target node's listener",
        ),
    ),
    (VirtualRouter, "spec.meshRef", Honoured(MESH_REF)),
    (VirtualRouter, "spec.meshRef.name", Honoured(MESH_REF)),
    (VirtualRouter, "spec.meshRef.uid", Identity(UID)),
    (
        VirtualRouter,
        "spec.routes",
        Honoured(
            "the routes of every VirtualService the router provides, on its egress virtual host",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute",
        Honoured("a gRPC route (paths /service/method)"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.action",
        Honoured("where matched traffic goes"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.action.weightedTargets",
        Honoured(
            "a weighted split over the target nodes' clusters (1 to 10 targets, weights not all 0)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.action.weightedTargets[].port",
        Honoured(TARGET_PORT),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.action.weightedTargets[].virtualNodeARN",
        Identity(ARN),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.action.weightedTargets[].virtualNodeRef",
        Honoured(
            "the target VirtualNode: its registered instances or DNS name (namespace defaults to the router's)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.action.weightedTargets[].weight",
        Honoured("the target's relative weight (0-100; 0 sends nothing)"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.match",
        Honoured("the route's match: service, method, metadata and port"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.match.metadata",
        Honoured("metadata (request header) matches: all must hold"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.match.metadata[].invert",
        Honoured("the match holds when the rule does not"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.match.metadata[].match",
        Honoured(
            "exact, prefix, suffix, whole-value regex or integer range [start, end); without a rule, presence",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.match.metadata[].name",
        Honoured("the metadata name"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.match.methodName",
        Honoured("route match on the method: path /serviceName/methodName (needs serviceName)"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.match.port",
        Honoured(MATCH_PORT),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.match.serviceName",
        Honoured("route match on the service: path prefix /serviceName/"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.retryPolicy",
        Honoured("retries by the proxy, with a body replay buffer"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.retryPolicy.grpcRetryEvents",
        Honoured("retries on these grpc-status values in the response headers"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.retryPolicy.httpRetryEvents",
        Honoured(
            "server-error (5xx), gateway-error (502, 503, 504), client-error (409), stream-error (a refused stream); server-error and gateway-error include no response at all",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.retryPolicy.maxRetries",
        Honoured("retries after the first attempt (0-25)"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.retryPolicy.perRetryTimeout",
        Honoured("the limit on each attempt, up to its response headers"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.retryPolicy.tcpRetryEvents",
        Honoured("connection-error: retries when connecting to the endpoint fails"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.timeout",
        Honoured("the route's timeouts (none unless set)"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.timeout.idle",
        Honoured(
            "the longest gap between response body frames (and, before the response, in the request body)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.timeout.perRequest",
        Honoured("the whole request, to the response headers, retries included"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route",
        Honoured("an HTTP/2 route (matched and forwarded like httpRoute)"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.action",
        Honoured("where matched traffic goes"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.action.weightedTargets",
        Honoured(
            "a weighted split over the target nodes' clusters (1 to 10 targets, weights not all 0)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.action.weightedTargets[].port",
        Honoured(TARGET_PORT),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.action.weightedTargets[].virtualNodeARN",
        Identity(ARN),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.action.weightedTargets[].virtualNodeRef",
        Honoured(
            "the target VirtualNode: its registered instances or DNS name (namespace defaults to the router's)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.action.weightedTargets[].weight",
        Honoured("the target's relative weight (0-100; 0 sends nothing)"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.match",
        Honoured("the route's match: path (prefix or path) and every other condition given"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.match.headers",
        Honoured("header matches: all must hold"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.match.headers[].invert",
        Honoured("the match holds when the rule does not"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.match.headers[].match",
        Honoured(
            "exact, prefix, suffix, whole-value regex or integer range [start, end); without a rule, presence",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.match.headers[].name",
        Honoured("the header name"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.match.method",
        Honoured("route match on the request method"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.match.path",
        Honoured("route match on the exact path or a whole-path regex"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.match.port",
        Honoured(MATCH_PORT),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.match.prefix",
        Honoured("route match on the request path prefix"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.match.queryParameters",
        Honoured("query parameter matches: all must hold"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.match.queryParameters[].match",
        Honoured("exact value; without it, presence"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.match.queryParameters[].name",
        Honoured("the query parameter name"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.match.scheme",
        Honoured(
            "route match on the request's scheme: the HTTP/2 :scheme or an absolute-form request-target's, else http (listeners are plaintext)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.retryPolicy",
        Honoured("retries by the proxy, with a body replay buffer"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.retryPolicy.httpRetryEvents",
        Honoured(
            "server-error (5xx), gateway-error (502, 503, 504), client-error (409), stream-error (a refused stream); server-error and gateway-error include no response at all",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.retryPolicy.maxRetries",
        Honoured("retries after the first attempt (0-25)"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.retryPolicy.perRetryTimeout",
        Honoured("the limit on each attempt, up to its response headers"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.retryPolicy.tcpRetryEvents",
        Honoured("connection-error: retries when connecting to the endpoint fails"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.timeout",
        Honoured("the route's timeouts (none unless set)"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.timeout.idle",
        Honoured(
            "the longest gap between response body frames (and, before the response, in the request body)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.timeout.perRequest",
        Honoured("the whole request, to the response headers, retries included"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute",
        Honoured("an HTTP route"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.action",
        Honoured("where matched traffic goes"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.action.weightedTargets",
        Honoured(
            "a weighted split over the target nodes' clusters (1 to 10 targets, weights not all 0)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.action.weightedTargets[].port",
        Honoured(TARGET_PORT),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.action.weightedTargets[].virtualNodeARN",
        Identity(ARN),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.action.weightedTargets[].virtualNodeRef",
        Honoured(
            "the target VirtualNode: its registered instances or DNS name (namespace defaults to the router's)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.action.weightedTargets[].weight",
        Honoured("the target's relative weight (0-100; 0 sends nothing)"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.match",
        Honoured("the route's match: path (prefix or path) and every other condition given"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.match.headers",
        Honoured("header matches: all must hold"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.match.headers[].invert",
        Honoured("the match holds when the rule does not"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.match.headers[].match",
        Honoured(
            "exact, prefix, suffix, whole-value regex or integer range [start, end); without a rule, presence",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.match.headers[].name",
        Honoured("the header name"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.match.method",
        Honoured("route match on the request method"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.match.path",
        Honoured("route match on the exact path or a whole-path regex"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.match.port",
        Honoured(MATCH_PORT),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.match.prefix",
        Honoured("route match on the request path prefix"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.match.queryParameters",
        Honoured("query parameter matches: all must hold"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.match.queryParameters[].match",
        Honoured("exact value; without it, presence"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.match.queryParameters[].name",
        Honoured("the query parameter name"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.match.scheme",
        Honoured(
            "route match on the request's scheme: the HTTP/2 :scheme or an absolute-form request-target's, else http (listeners are plaintext)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.retryPolicy",
        Honoured("retries by the proxy, with a body replay buffer"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.retryPolicy.httpRetryEvents",
        Honoured(
            "server-error (5xx), gateway-error (502, 503, 504), client-error (409), stream-error (a refused stream); server-error and gateway-error include no response at all",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.retryPolicy.maxRetries",
        Honoured("retries after the first attempt (0-25)"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.retryPolicy.perRetryTimeout",
        Honoured("the limit on each attempt, up to its response headers"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.retryPolicy.tcpRetryEvents",
        Honoured("connection-error: retries when connecting to the endpoint fails"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.timeout",
        Honoured("the route's timeouts (none unless set)"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.timeout.idle",
        Honoured(
            "the longest gap between response body frames (and, before the response, in the request body)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.timeout.perRequest",
        Honoured("the whole request, to the response headers, retries included"),
    ),
    (
        VirtualRouter,
        "spec.routes[].name",
        Honoured("the route's name (unique in the router), used in metrics, logs and status"),
    ),
    (
        VirtualRouter,
        "spec.routes[].priority",
        Honoured(
            "route order: lower first; routes without a priority after those with one, in their order",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].tcpRoute",
        Honoured("a TCP route, reached through the sidecar egress with CONNECT"),
    ),
    (
        VirtualRouter,
        "spec.routes[].tcpRoute.action",
        Honoured("where matched traffic goes"),
    ),
    (
        VirtualRouter,
        "spec.routes[].tcpRoute.action.weightedTargets",
        Honoured(
            "a weighted split over the target nodes' clusters (1 to 10 targets, weights not all 0)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].tcpRoute.action.weightedTargets[].port",
        Honoured(TARGET_PORT),
    ),
    (
        VirtualRouter,
        "spec.routes[].tcpRoute.action.weightedTargets[].virtualNodeARN",
        Identity(ARN),
    ),
    (
        VirtualRouter,
        "spec.routes[].tcpRoute.action.weightedTargets[].virtualNodeRef",
        Honoured(
            "the target VirtualNode: its registered instances or DNS name (namespace defaults to the router's)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].tcpRoute.action.weightedTargets[].weight",
        Honoured("the target's relative weight (0-100; 0 sends nothing)"),
    ),
    (
        VirtualRouter,
        "spec.routes[].tcpRoute.match",
        Honoured(
            "match.port: the route takes CONNECT requests whose authority names this port (the router's listener with several)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].tcpRoute.timeout",
        Honoured("idle: a CONNECT tunnel ends after this long without a byte either way"),
    ),
    // ---- VirtualNode -------------------------------------------------------------------------------
    (VirtualNode, "spec", Honoured(SPEC)),
    (VirtualNode, "spec.awsName", Identity(AWS_NAME)),
    (
        VirtualNode,
        "spec.backendDefaults",
        Honoured(TLS_BACKEND_DEFAULTS),
    ),
    (
        VirtualNode,
        "spec.backendDefaults.clientPolicy.tls",
        Honoured(TLS_CLIENT),
    ),
    (
        VirtualNode,
        "spec.backendDefaults.clientPolicy.tls.enforce",
        Honoured(TLS_ENFORCE),
    ),
    (
        VirtualNode,
        "spec.backendDefaults.clientPolicy.tls.ports",
        Honoured(TLS_PORTS),
    ),
    (
        VirtualNode,
        "spec.backendDefaults.clientPolicy.tls.certificate",
        Honoured(TLS_CLIENT_CERT),
    ),
    (
        VirtualNode,
        "spec.backendDefaults.clientPolicy.tls.certificate.acm",
        Refused(TLS_ACM),
    ),
    (
        VirtualNode,
        "spec.backendDefaults.clientPolicy.tls.certificate.file",
        Honoured(TLS_CERT_FILE),
    ),
    (
        VirtualNode,
        "spec.backendDefaults.clientPolicy.tls.certificate.sds",
        Honoured(TLS_CERT_SDS),
    ),
    (
        VirtualNode,
        "spec.backendDefaults.clientPolicy.tls.certificate.sds.secretName",
        Identity(TLS_SDS_NAME),
    ),
    (
        VirtualNode,
        "spec.backendDefaults.clientPolicy.tls.validation",
        Honoured(TLS_VALIDATION),
    ),
    (
        VirtualNode,
        "spec.backendDefaults.clientPolicy.tls.validation.trust.acm",
        Refused(TLS_ACM),
    ),
    (
        VirtualNode,
        "spec.backendDefaults.clientPolicy.tls.validation.trust.file",
        Honoured(TLS_TRUST_FILE),
    ),
    (
        VirtualNode,
        "spec.backendDefaults.clientPolicy.tls.validation.trust.sds",
        Honoured(TLS_TRUST_SDS),
    ),
    (
        VirtualNode,
        "spec.backendDefaults.clientPolicy.tls.validation.trust.sds.secretName",
        Identity(TLS_SDS_NAME),
    ),
    (
        VirtualNode,
        "spec.backendDefaults.clientPolicy.tls.validation.subjectAlternativeNames",
        Honoured(TLS_SANS),
    ),
    (VirtualNode, "spec.backendGroups", Honoured(BACKEND_GROUPS)),
    (
        VirtualNode,
        "spec.backendGroups[].name",
        Honoured(BACKEND_GROUPS),
    ),
    (
        VirtualNode,
        "spec.backendGroups[].namespace",
        Honoured(BACKEND_GROUPS),
    ),
    (
        VirtualNode,
        "spec.backends",
        Honoured("the node's egress: the virtual services it may call, and only those"),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService",
        Honoured("a backend virtual service: its hostname becomes an egress virtual host"),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.clientPolicy",
        Honoured("the backend's own client policy (instead of backendDefaults')"),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.clientPolicy.tls",
        Honoured(TLS_CLIENT),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.clientPolicy.tls.enforce",
        Honoured(TLS_ENFORCE),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.clientPolicy.tls.ports",
        Honoured(TLS_PORTS),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.clientPolicy.tls.certificate",
        Honoured(TLS_CLIENT_CERT),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.clientPolicy.tls.certificate.acm",
        Refused(TLS_ACM),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.clientPolicy.tls.certificate.file",
        Honoured(TLS_CERT_FILE),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.clientPolicy.tls.certificate.sds",
        Honoured(TLS_CERT_SDS),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.clientPolicy.tls.certificate.sds.secretName",
        Identity(TLS_SDS_NAME),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.clientPolicy.tls.validation",
        Honoured(TLS_VALIDATION),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.clientPolicy.tls.validation.trust.acm",
        Refused(TLS_ACM),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.clientPolicy.tls.validation.trust.file",
        Honoured(TLS_TRUST_FILE),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.clientPolicy.tls.validation.trust.sds",
        Honoured(TLS_TRUST_SDS),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.clientPolicy.tls.validation.trust.sds.secretName",
        Identity(TLS_SDS_NAME),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.clientPolicy.tls.validation.subjectAlternativeNames",
        Honoured(TLS_SANS),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.virtualServiceARN",
        Identity(ARN),
    ),
    (
        VirtualNode,
        "spec.backends[].virtualService.virtualServiceRef",
        Honoured("the backend VirtualService (namespace defaults to the node's)"),
    ),
    (
        VirtualNode,
        "spec.listeners",
        Honoured("the node's inbound listeners (the sidecar ingress)"),
    ),
    (
        VirtualNode,
        "spec.listeners[].connectionPool",
        Honoured(
            "circuit breaking in every proxy calling the node, per calling proxy: http maxConnections (pooled connections included) and maxPendingRequests (requests waiting for a connection; unset: no limit), http2/grpc maxRequests (requests in flight), tcp maxConnections; over a limit → 503 overflow at once; the pool must be the listener protocol's",
        ),
    ),
    (
        VirtualNode,
        "spec.listeners[].healthCheck",
        Honoured(
            "active health checks by every proxy calling the node, against each endpoint (Envoy's semantics): http GET path over HTTP/1.1 and http2 over h2c healthy iff 200, grpc grpc.health.v1.Health/Check healthy iff SERVING, tcp a connection; a probe slower than timeoutMillis fails; unhealthy after unhealthyThreshold failures in a row, healthy after healthyThreshold successes; the first probe runs at once and decides (pending endpoints take requests); later ones jittered; unhealthy endpoints get no requests; path is used with http/http2 only (with grpc or tcp it is accepted and not used, as App Mesh documented); port defaults to the endpoint's",
        ),
    ),
    (
        VirtualNode,
        "spec.listeners[].outlierDetection",
        Honoured(
            "in every proxy calling the node (Envoy's consecutive 5xx): an endpoint with maxServerErrors 5xx or failed attempts in a row gets no requests for baseEjectionDuration × times ejected (at most max(300 s, base)), un-ejected at the next interval check; never beyond maxEjectionPercent; interval and baseEjectionDuration must be > 0",
        ),
    ),
    (
        VirtualNode,
        "spec.listeners[].portMapping",
        Honoured("the local app's port and protocol"),
    ),
    (
        VirtualNode,
        "spec.listeners[].portMapping.port",
        Honoured(
            "the sidecar ingress forwards to 127.0.0.1:<port> (with several listeners, by the request authority's port); callers reach the node on the listener a weighted target's port names, else its first (dns discovery: hostname:port)",
        ),
    ),
    (
        VirtualNode,
        "spec.listeners[].portMapping.protocol",
        Honoured(
            "the protocol to the local app and callers' protocol to the listener they reach (http, http2 as h2c, grpc, tcp)",
        ),
    ),
    (
        VirtualNode,
        "spec.listeners[].timeout",
        Honoured(
            "inbound timeouts toward the app: the one of the listener's protocol (http, http2, grpc: perRequest and idle; tcp: idle) on the sidecar's ingress route; another protocol's is refused",
        ),
    ),
    (VirtualNode, "spec.listeners[].tls", Honoured(TLS_LISTENER)),
    (VirtualNode, "spec.listeners[].tls.mode", Honoured(TLS_MODE)),
    (
        VirtualNode,
        "spec.listeners[].tls.certificate",
        Honoured("the certificate the listener serves: file or sds"),
    ),
    (
        VirtualNode,
        "spec.listeners[].tls.certificate.acm",
        Refused(TLS_ACM),
    ),
    (
        VirtualNode,
        "spec.listeners[].tls.certificate.file",
        Honoured(TLS_CERT_FILE),
    ),
    (
        VirtualNode,
        "spec.listeners[].tls.certificate.sds",
        Honoured(TLS_CERT_SDS),
    ),
    (
        VirtualNode,
        "spec.listeners[].tls.certificate.sds.secretName",
        Identity(TLS_SDS_NAME),
    ),
    (
        VirtualNode,
        "spec.listeners[].tls.validation",
        Honoured(TLS_VALIDATION),
    ),
    (
        VirtualNode,
        "spec.listeners[].tls.validation.trust.acm",
        Refused(TLS_ACM),
    ),
    (
        VirtualNode,
        "spec.listeners[].tls.validation.trust.file",
        Honoured(TLS_TRUST_FILE),
    ),
    (
        VirtualNode,
        "spec.listeners[].tls.validation.trust.sds",
        Honoured(TLS_TRUST_SDS),
    ),
    (
        VirtualNode,
        "spec.listeners[].tls.validation.trust.sds.secretName",
        Identity(TLS_SDS_NAME),
    ),
    (
        VirtualNode,
        "spec.listeners[].tls.validation.subjectAlternativeNames",
        Honoured(TLS_SANS),
    ),
    (VirtualNode, "spec.logging", Honoured(LOGGING)),
    (VirtualNode, "spec.meshRef", Honoured(MESH_REF)),
    (VirtualNode, "spec.meshRef.name", Honoured(MESH_REF)),
    (VirtualNode, "spec.meshRef.uid", Identity(UID)),
    (VirtualNode, "spec.podSelector", Identity(POD_SELECTOR)),
    (
        VirtualNode,
        "spec.serviceDiscovery",
        Honoured(
            "where the node's endpoints come from: awsCloudMap (the Trellis registry), dns or registry (exactly one)",
        ),
    ),
    (
        VirtualNode,
        "spec.serviceDiscovery.awsCloudMap",
        Honoured(
            "the node's endpoints: instances registered in the Trellis registry (not AWS Cloud Map), healthy or draining",
        ),
    ),
    (
        VirtualNode,
        "spec.serviceDiscovery.awsCloudMap.attributes",
        Honoured(
            "only instances whose attributes include all of these key/value pairs (Trellis also takes a {key: value} map)",
        ),
    ),
    (
        VirtualNode,
        "spec.serviceDiscovery.awsCloudMap.namespaceName",
        Honoured("the registry namespace the instances are registered in"),
    ),
    (
        VirtualNode,
        "spec.serviceDiscovery.awsCloudMap.serviceName",
        Honoured("the registry service the instances are registered under"),
    ),
    (
        VirtualNode,
        "spec.serviceDiscovery.dns",
        Honoured("one endpoint, hostname:<first listener port>"),
    ),
    (
        VirtualNode,
        "spec.serviceDiscovery.dns.hostname",
        Honoured("an IP address or DNS name, resolved by the proxy when it connects"),
    ),
    (
        VirtualNode,
        "spec.serviceDiscovery.dns.responseType",
        Honoured(
            "LOADBALANCER (App Mesh's default): the name is resolved when a connection is opened, and one of its addresses is used; ENDPOINTS: each proxy resolves the name (at once, then every 5 s) and every address is an endpoint of its own (balanced, health checked, ejected on its own), as Envoy's STRICT_DNS",
        ),
    ),
    // ---- VirtualGateway ----------------------------------------------------------------------------
    (VirtualGateway, "spec", Honoured(SPEC)),
    (VirtualGateway, "spec.awsName", Identity(AWS_NAME)),
    (
        VirtualGateway,
        "spec.backendDefaults",
        Honoured(TLS_BACKEND_DEFAULTS),
    ),
    (
        VirtualGateway,
        "spec.backendDefaults.clientPolicy.tls",
        Honoured(TLS_CLIENT),
    ),
    (
        VirtualGateway,
        "spec.backendDefaults.clientPolicy.tls.enforce",
        Honoured(TLS_ENFORCE),
    ),
    (
        VirtualGateway,
        "spec.backendDefaults.clientPolicy.tls.ports",
        Honoured(TLS_PORTS),
    ),
    (
        VirtualGateway,
        "spec.backendDefaults.clientPolicy.tls.certificate",
        Honoured(TLS_CLIENT_CERT),
    ),
    (
        VirtualGateway,
        "spec.backendDefaults.clientPolicy.tls.certificate.acm",
        Refused(TLS_ACM),
    ),
    (
        VirtualGateway,
        "spec.backendDefaults.clientPolicy.tls.certificate.file",
        Honoured(TLS_CERT_FILE),
    ),
    (
        VirtualGateway,
        "spec.backendDefaults.clientPolicy.tls.certificate.sds",
        Honoured(TLS_CERT_SDS),
    ),
    (
        VirtualGateway,
        "spec.backendDefaults.clientPolicy.tls.certificate.sds.secretName",
        Identity(TLS_SDS_NAME),
    ),
    (
        VirtualGateway,
        "spec.backendDefaults.clientPolicy.tls.validation",
        Honoured(TLS_VALIDATION),
    ),
    (
        VirtualGateway,
        "spec.backendDefaults.clientPolicy.tls.validation.trust.acm",
        Refused(TLS_ACM),
    ),
    (
        VirtualGateway,
        "spec.backendDefaults.clientPolicy.tls.validation.trust.file",
        Honoured(TLS_TRUST_FILE),
    ),
    (
        VirtualGateway,
        "spec.backendDefaults.clientPolicy.tls.validation.trust.sds",
        Honoured(TLS_TRUST_SDS),
    ),
    (
        VirtualGateway,
        "spec.backendDefaults.clientPolicy.tls.validation.trust.sds.secretName",
        Identity(TLS_SDS_NAME),
    ),
    (
        VirtualGateway,
        "spec.backendDefaults.clientPolicy.tls.validation.subjectAlternativeNames",
        Honoured(TLS_SANS),
    ),
    (
        VirtualGateway,
        "spec.gatewayRouteSelector",
        Honoured(
            "of the GatewayRoutes without a virtualGatewayRef in the namespaces the gateway takes (namespaceSelector's, else its own), those whose metadata.labels it selects (matchLabels and matchExpressions In, NotIn, Exists, DoesNotExist); unset: all of them",
        ),
    ),
    (
        VirtualGateway,
        "spec.listeners",
        Honoured(
            "the gateway's listeners (at least one): the gateway proxy serves each one's port; with several, each GatewayRoute's match.port names the one it is served on",
        ),
    ),
    (
        VirtualGateway,
        "spec.listeners[].connectionPool",
        Honoured(
            "circuit breaking of the gateway's traffic from the listener, per target cluster (Envoy's circuit breakers): http maxConnections and maxPendingRequests (unset: no limit on waiting requests), http2/grpc maxRequests; over a limit → 503 overflow at once; replaces the target node listener's connectionPool for that traffic (the listener's clusters are its own); the pool must be the listener protocol's",
        ),
    ),
    (
        VirtualGateway,
        "spec.listeners[].healthCheck",
        Honoured(
            "the health check a load balancer in front of the gateway probes: the gateway answers it itself on the listener, before any GatewayRoute and for any host — http/http2: a request for path gets 200 while the gateway has a config to serve and is not draining, else 503; grpc: grpc.health.v1.Health/Check answers SERVING, else NOT_SERVING",
        ),
    ),
    (
        VirtualGateway,
        "spec.listeners[].healthCheck.healthyThreshold",
        Honoured(GATEWAY_PROBER),
    ),
    (
        VirtualGateway,
        "spec.listeners[].healthCheck.intervalMillis",
        Honoured(GATEWAY_PROBER),
    ),
    (
        VirtualGateway,
        "spec.listeners[].healthCheck.path",
        Honoured(
            "http and http2: the path answered (exact match, default /); it shadows a GatewayRoute for that path; with grpc accepted and not used, as App Mesh documented",
        ),
    ),
    (
        VirtualGateway,
        "spec.listeners[].healthCheck.port",
        Honoured(
            "the listener's port (the only one the gateway answers the probe on; another is an error)",
        ),
    ),
    (
        VirtualGateway,
        "spec.listeners[].healthCheck.protocol",
        Honoured(
            "http and http2: a request for path (either protocol is served on every listener); grpc: grpc.health.v1.Health/Check",
        ),
    ),
    (
        VirtualGateway,
        "spec.listeners[].healthCheck.timeoutMillis",
        Honoured(GATEWAY_PROBER),
    ),
    (
        VirtualGateway,
        "spec.listeners[].healthCheck.unhealthyThreshold",
        Honoured(GATEWAY_PROBER),
    ),
    (
        VirtualGateway,
        "spec.listeners[].portMapping",
        Honoured("the gateway's port and protocol"),
    ),
    (
        VirtualGateway,
        "spec.listeners[].portMapping.port",
        Honoured(
            "the gateway proxy binds this port on the IP of its --ingress-addr (a gateway does not bind that flag's port) and serves the listener's GatewayRoutes there",
        ),
    ),
    (
        VirtualGateway,
        "spec.listeners[].portMapping.protocol",
        Honoured(
            "checked; the gateway's listener serves http, http2 (h2c) and grpc; its GatewayRoutes must be of its protocol (httpRoute, http2Route, grpcRoute)",
        ),
    ),
    (
        VirtualGateway,
        "spec.listeners[].tls",
        Honoured(TLS_LISTENER),
    ),
    (
        VirtualGateway,
        "spec.listeners[].tls.mode",
        Honoured(TLS_MODE),
    ),
    (
        VirtualGateway,
        "spec.listeners[].tls.certificate",
        Honoured("the certificate the listener serves: file or sds"),
    ),
    (
        VirtualGateway,
        "spec.listeners[].tls.certificate.acm",
        Refused(TLS_ACM),
    ),
    (
        VirtualGateway,
        "spec.listeners[].tls.certificate.file",
        Honoured(TLS_CERT_FILE),
    ),
    (
        VirtualGateway,
        "spec.listeners[].tls.certificate.sds",
        Honoured(TLS_CERT_SDS),
    ),
    (
        VirtualGateway,
        "spec.listeners[].tls.certificate.sds.secretName",
        Identity(TLS_SDS_NAME),
    ),
    (
        VirtualGateway,
        "spec.listeners[].tls.validation",
        Honoured(TLS_VALIDATION),
    ),
    (
        VirtualGateway,
        "spec.listeners[].tls.validation.trust.acm",
        Refused(TLS_ACM),
    ),
    (
        VirtualGateway,
        "spec.listeners[].tls.validation.trust.file",
        Honoured(TLS_TRUST_FILE),
    ),
    (
        VirtualGateway,
        "spec.listeners[].tls.validation.trust.sds",
        Honoured(TLS_TRUST_SDS),
    ),
    (
        VirtualGateway,
        "spec.listeners[].tls.validation.trust.sds.secretName",
        Identity(TLS_SDS_NAME),
    ),
    (
        VirtualGateway,
        "spec.listeners[].tls.validation.subjectAlternativeNames",
        Honoured(TLS_SANS),
    ),
    (VirtualGateway, "spec.logging", Honoured(LOGGING)),
    (VirtualGateway, "spec.meshRef", Honoured(MESH_REF)),
    (VirtualGateway, "spec.meshRef.name", Honoured(MESH_REF)),
    (VirtualGateway, "spec.meshRef.uid", Identity(UID)),
    (
        VirtualGateway,
        "spec.namespaceSelector",
        Honoured(
            "the gateway serves the GatewayRoutes without a virtualGatewayRef of its mesh in the namespaces it selects, by the labels of their v1 Namespace (and the kubernetes.io/metadata.name label; {} selects every namespace); unset: those of its own namespace; a route naming a gateway in virtualGatewayRef is that gateway's alone, as with App Mesh's controller",
        ),
    ),
    (
        VirtualGateway,
        "spec.podSelector",
        Identity(GATEWAY_POD_SELECTOR),
    ),
    // ---- GatewayRoute ------------------------------------------------------------------------------
    (GatewayRoute, "spec", Honoured(SPEC)),
    (GatewayRoute, "spec.awsName", Identity(AWS_NAME)),
    (
        GatewayRoute,
        "spec.grpcRoute",
        Honoured(
            "a gRPC gateway route: matched on the service's path prefix, the path never rewritten",
        ),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.action",
        Honoured("where matched requests go, with App Mesh's default rewrites"),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.action.rewrite",
        Honoured("what is rewritten on forwarded requests (WebSocket upgrades included)"),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.action.rewrite.hostname",
        Honoured(
            "Host rewrite: by default to the target virtual service's hostname; defaultTargetHostname DISABLED keeps the client's",
        ),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.action.target",
        Honoured("the target virtual service"),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.action.target.port",
        Honoured(GATEWAY_TARGET_PORT),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.action.target.virtualService",
        Honoured(
            "the target: its node's cluster, or each of its router's routes combined with this match",
        ),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.action.target.virtualService.virtualServiceARN",
        Identity(ARN),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.action.target.virtualService.virtualServiceRef",
        Honoured("the target VirtualService (namespace defaults to the route's)"),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.match",
        Honoured("the route's match: service, hostname, metadata and port"),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.match.hostname",
        Honoured("served on a virtual host for the exact hostname or *.suffix (case-insensitive)"),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.match.metadata",
        Honoured("metadata (request header) matches: all must hold"),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.match.metadata[].invert",
        Honoured("the match holds when the rule does not"),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.match.metadata[].match",
        Honoured(
            "exact, prefix, suffix, whole-value regex or integer range [start, end); without a rule, presence",
        ),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.match.metadata[].name",
        Honoured("the metadata name"),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.match.port",
        Honoured(GATEWAY_MATCH_PORT),
    ),
    (
        GatewayRoute,
        "spec.grpcRoute.match.serviceName",
        Honoured("route match on the path prefix /serviceName/"),
    ),
    (
        GatewayRoute,
        "spec.http2Route",
        Honoured("an HTTP/2 gateway route (matched and forwarded like httpRoute)"),
    ),
    (
        GatewayRoute,
        "spec.http2Route.action",
        Honoured("where matched requests go, with App Mesh's default rewrites"),
    ),
    (
        GatewayRoute,
        "spec.http2Route.action.rewrite",
        Honoured("what is rewritten on forwarded requests (WebSocket upgrades included)"),
    ),
    (
        GatewayRoute,
        "spec.http2Route.action.rewrite.hostname",
        Honoured(
            "Host rewrite: by default to the target virtual service's hostname; defaultTargetHostname DISABLED keeps the client's",
        ),
    ),
    (
        GatewayRoute,
        "spec.http2Route.action.rewrite.path",
        Honoured(
            "with match.path.exact: the path is sent on as rewrite.path.exact (the query stays), also through a router, whose routes see the new path; refused with another match",
        ),
    ),
    (
        GatewayRoute,
        "spec.http2Route.action.rewrite.prefix",
        Honoured(
            "prefix rewrite: by default the matched prefix becomes /; defaultPrefix DISABLED keeps it, value replaces it",
        ),
    ),
    (
        GatewayRoute,
        "spec.http2Route.action.target",
        Honoured("the target virtual service"),
    ),
    (
        GatewayRoute,
        "spec.http2Route.action.target.port",
        Honoured(GATEWAY_TARGET_PORT),
    ),
    (
        GatewayRoute,
        "spec.http2Route.action.target.virtualService",
        Honoured(
            "the target: its node's cluster, or each of its router's routes combined with this match",
        ),
    ),
    (
        GatewayRoute,
        "spec.http2Route.action.target.virtualService.virtualServiceARN",
        Identity(ARN),
    ),
    (
        GatewayRoute,
        "spec.http2Route.action.target.virtualService.virtualServiceRef",
        Honoured("the target VirtualService (namespace defaults to the route's)"),
    ),
    (
        GatewayRoute,
        "spec.http2Route.match",
        Honoured("the route's match: path (prefix or path) and every other condition given"),
    ),
    (
        GatewayRoute,
        "spec.http2Route.match.headers",
        Honoured("header matches: all must hold"),
    ),
    (
        GatewayRoute,
        "spec.http2Route.match.headers[].invert",
        Honoured("the match holds when the rule does not"),
    ),
    (
        GatewayRoute,
        "spec.http2Route.match.headers[].match",
        Honoured(
            "exact, prefix, suffix, whole-value regex or integer range [start, end); without a rule, presence",
        ),
    ),
    (
        GatewayRoute,
        "spec.http2Route.match.headers[].name",
        Honoured("the header name"),
    ),
    (
        GatewayRoute,
        "spec.http2Route.match.hostname",
        Honoured("served on a virtual host for the exact hostname or *.suffix (case-insensitive)"),
    ),
    (
        GatewayRoute,
        "spec.http2Route.match.method",
        Honoured("route match on the request method"),
    ),
    (
        GatewayRoute,
        "spec.http2Route.match.path",
        Honoured(
            "route match on the exact path or a whole-path regex; through a router, only with its routes that take any path",
        ),
    ),
    (
        GatewayRoute,
        "spec.http2Route.match.port",
        Honoured(GATEWAY_MATCH_PORT),
    ),
    (
        GatewayRoute,
        "spec.http2Route.match.prefix",
        Honoured(
            "route match on the request path prefix (combined with the target router's routes)",
        ),
    ),
    (
        GatewayRoute,
        "spec.http2Route.match.queryParameters",
        Honoured("query parameter matches: all must hold"),
    ),
    (
        GatewayRoute,
        "spec.http2Route.match.queryParameters[].match",
        Honoured("exact value; without it, presence"),
    ),
    (
        GatewayRoute,
        "spec.http2Route.match.queryParameters[].name",
        Honoured("the query parameter name"),
    ),
    (
        GatewayRoute,
        "spec.httpRoute",
        Honoured("an HTTP gateway route"),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.action",
        Honoured("where matched requests go, with App Mesh's default rewrites"),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.action.rewrite",
        Honoured("what is rewritten on forwarded requests (WebSocket upgrades included)"),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.action.rewrite.hostname",
        Honoured(
            "Host rewrite: by default to the target virtual service's hostname; defaultTargetHostname DISABLED keeps the client's",
        ),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.action.rewrite.path",
        Honoured(
            "with match.path.exact: the path is sent on as rewrite.path.exact (the query stays), also through a router, whose routes see the new path; refused with another match",
        ),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.action.rewrite.prefix",
        Honoured(
            "prefix rewrite: by default the matched prefix becomes /; defaultPrefix DISABLED keeps it, value replaces it",
        ),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.action.target",
        Honoured("the target virtual service"),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.action.target.port",
        Honoured(GATEWAY_TARGET_PORT),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.action.target.virtualService",
        Honoured(
            "the target: its node's cluster, or each of its router's routes combined with this match",
        ),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.action.target.virtualService.virtualServiceARN",
        Identity(ARN),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.action.target.virtualService.virtualServiceRef",
        Honoured("the target VirtualService (namespace defaults to the route's)"),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.match",
        Honoured("the route's match: path (prefix or path) and every other condition given"),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.match.headers",
        Honoured("header matches: all must hold"),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.match.headers[].invert",
        Honoured("the match holds when the rule does not"),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.match.headers[].match",
        Honoured(
            "exact, prefix, suffix, whole-value regex or integer range [start, end); without a rule, presence",
        ),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.match.headers[].name",
        Honoured("the header name"),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.match.hostname",
        Honoured("served on a virtual host for the exact hostname or *.suffix (case-insensitive)"),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.match.method",
        Honoured("route match on the request method"),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.match.path",
        Honoured(
            "route match on the exact path or a whole-path regex; through a router, only with its routes that take any path",
        ),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.match.port",
        Honoured(GATEWAY_MATCH_PORT),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.match.prefix",
        Honoured(
            "route match on the request path prefix (combined with the target router's routes)",
        ),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.match.queryParameters",
        Honoured("query parameter matches: all must hold"),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.match.queryParameters[].match",
        Honoured("exact value; without it, presence"),
    ),
    (
        GatewayRoute,
        "spec.httpRoute.match.queryParameters[].name",
        Honoured("the query parameter name"),
    ),
    (GatewayRoute, "spec.meshRef", Honoured(MESH_REF)),
    (GatewayRoute, "spec.meshRef.name", Honoured(MESH_REF)),
    (GatewayRoute, "spec.meshRef.uid", Identity(UID)),
    (
        GatewayRoute,
        "spec.priority",
        Honoured("gateway route order: lower first, unset last (then by name)"),
    ),
    (
        GatewayRoute,
        "spec.virtualGatewayRef",
        Honoured(
            "the VirtualGateway serving the route, whatever the gateways' selectors; without it, every gateway of the route's mesh whose namespaceSelector selects the route's namespace (a gateway without one: of the route's namespace) and whose gatewayRouteSelector, if set, selects its labels",
        ),
    ),
    (
        GatewayRoute,
        "spec.virtualGatewayRef.name",
        Honoured("the gateway's name"),
    ),
    (
        GatewayRoute,
        "spec.virtualGatewayRef.namespace",
        Honoured("the gateway's namespace (defaults to the route's)"),
    ),
    (GatewayRoute, "spec.virtualGatewayRef.uid", Identity(UID)),
    // ---- Trellis additions: fields the typed model accepts beyond App Mesh's CRDs, honoured as
    // described. Each is checked by the typed model, not by the App Mesh schema.
    (
        VirtualService,
        "spec.hostname",
        Honoured(
            "Trellis addition: the hostname callers reach the service at (before awsName, then <name>.<namespace>)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.retryPolicy.backoff",
        Honoured(
            "Trellis addition: exponential backoff with full jitter between retries (baseInterval default 25ms, maxInterval default 10 x base)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.retryPolicy.budget",
        Honoured(
            "Trellis addition: a retry budget (retryPercent of the route's requests over 10 s, plus minRetriesPerSecond)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.retryPolicy.grpcRetryEvents",
        Honoured("Trellis addition: retries on these grpc-status values in the response headers"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.retryPolicy.retriableStatusCodes",
        Honoured("Trellis addition: response status codes retried besides the events"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.retryPolicy.backoff",
        Honoured(
            "Trellis addition: exponential backoff with full jitter between retries (baseInterval default 25ms, maxInterval default 10 x base)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.retryPolicy.budget",
        Honoured(
            "Trellis addition: a retry budget (retryPercent of the route's requests over 10 s, plus minRetriesPerSecond)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.retryPolicy.grpcRetryEvents",
        Honoured("Trellis addition: retries on these grpc-status values in the response headers"),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.retryPolicy.retriableStatusCodes",
        Honoured("Trellis addition: response status codes retried besides the events"),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.retryPolicy.backoff",
        Honoured(
            "Trellis addition: exponential backoff with full jitter between retries (baseInterval default 25ms, maxInterval default 10 x base)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.retryPolicy.budget",
        Honoured(
            "Trellis addition: a retry budget (retryPercent of the route's requests over 10 s, plus minRetriesPerSecond)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.retryPolicy.retriableStatusCodes",
        Honoured("Trellis addition: response status codes retried besides the events"),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.requestHeaders",
        Honoured(
            "Trellis addition: headers set, added and removed on the request before it goes to the target ({set: [{name, value}], add: [{name, value}], remove: [name]}; values may use %ROUTE_NAME%, %PEER_IDENTITY%, %DOWNSTREAM_REMOTE_ADDRESS%, %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%; hop-by-hop, framing, host and x-forwarded-client-cert cannot be named)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.responseHeaders",
        Honoured(
            "Trellis addition: headers set, added and removed on the response before it goes back to the caller (as requestHeaders)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.requestHeaders",
        Honoured(
            "Trellis addition: headers set, added and removed on the request before it goes to the target ({set: [{name, value}], add: [{name, value}], remove: [name]}; values may use %ROUTE_NAME%, %PEER_IDENTITY%, %DOWNSTREAM_REMOTE_ADDRESS%, %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%; hop-by-hop, framing, host and x-forwarded-client-cert cannot be named)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.responseHeaders",
        Honoured(
            "Trellis addition: headers set, added and removed on the response before it goes back to the caller (as requestHeaders)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.requestHeaders",
        Honoured(
            "Trellis addition: headers set, added and removed on the request before it goes to the target ({set: [{name, value}], add: [{name, value}], remove: [name]}; values may use %ROUTE_NAME%, %PEER_IDENTITY%, %DOWNSTREAM_REMOTE_ADDRESS%, %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%; hop-by-hop, framing, host and x-forwarded-client-cert cannot be named)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.responseHeaders",
        Honoured(
            "Trellis addition: headers set, added and removed on the response before it goes back to the caller (as requestHeaders)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.fault",
        Honoured(
            "Trellis addition: faults injected at the caller's sidecar before forwarding: delay {fixedDelay, percentage} and abort {httpStatus, grpcStatus, percentage}, for requests matching headers (all when empty)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.fault",
        Honoured(
            "Trellis addition: faults injected at the caller's sidecar before forwarding: delay {fixedDelay, percentage} and abort {httpStatus, grpcStatus, percentage}, for requests matching headers (all when empty)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.fault",
        Honoured(
            "Trellis addition: faults injected at the caller's sidecar before forwarding: delay {fixedDelay, percentage} and abort {httpStatus, grpcStatus, percentage}, for requests matching headers (all when empty)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.rateLimit",
        Honoured(
            "Trellis addition: requests admitted at most at a rate at the caller's sidecar (a token bucket: {requests, per, burst, key: {header | peerIdentity}}); beyond it 429 rate_limited with retry-after",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.rateLimit",
        Honoured(
            "Trellis addition: requests admitted at most at a rate at the caller's sidecar (a token bucket: {requests, per, burst, key: {header | peerIdentity}}); beyond it 429 rate_limited with retry-after",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.rateLimit",
        Honoured(
            "Trellis addition: requests admitted at most at a rate at the caller's sidecar (a token bucket: {requests, per, burst, key: {header | peerIdentity}}); beyond it 429 rate_limited with retry-after",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.retryPolicy.hedgeOnPerRetryTimeout",
        Honoured(
            "Trellis addition: hedging — an attempt that reaches perRetryTimeout is not cancelled; the next starts beside it on another instance and the first usable response wins (idempotent requests without a body: GET, HEAD, OPTIONS, TRACE, PUT, DELETE; others are retried as without it)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.retryPolicy.hedgeOnPerRetryTimeout",
        Honoured(
            "Trellis addition: hedging — an attempt that reaches perRetryTimeout is not cancelled; the next starts beside it on another instance and the first usable response wins (idempotent requests without a body: GET, HEAD, OPTIONS, TRACE, PUT, DELETE; others are retried as without it)",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.retryPolicy.hedgeOnPerRetryTimeout",
        Refused(
            "Trellis addition on httpRoute and http2Route only: a gRPC call is a POST with a body, which hedging never sends twice",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.mirror",
        Honoured(
            "Trellis addition: a share of the route's requests copied at the caller's sidecar to a VirtualNode ({virtualNodeRef, port, percentage, maxBodyBytes}), fire and forget: a copy goes once its body has arrived whole (bodies up to maxBodyBytes, default 64 KiB, at most 16 MiB), with -shadow appended to its host, its response discarded; the route's requests never wait for a copy",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.mirror",
        Honoured(
            "Trellis addition: a share of the route's requests copied at the caller's sidecar to a VirtualNode ({virtualNodeRef, port, percentage, maxBodyBytes}), fire and forget: a copy goes once its body has arrived whole (bodies up to maxBodyBytes, default 64 KiB, at most 16 MiB), with -shadow appended to its host, its response discarded; the route's requests never wait for a copy",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].grpcRoute.mirror",
        Honoured(
            "Trellis addition: a share of the route's requests copied at the caller's sidecar to a VirtualNode ({virtualNodeRef, port, percentage, maxBodyBytes}), fire and forget: a copy goes once its body has arrived whole (bodies up to maxBodyBytes, default 64 KiB, at most 16 MiB), with -shadow appended to its host, its response discarded; the route's requests never wait for a copy",
        ),
    ),
    (
        VirtualNode,
        "spec.rateLimit",
        Honoured(
            "Trellis addition: requests to the node admitted at most at a rate at its sidecar (one bucket over its listeners; key by header or the caller's verified identity); beyond it 429 rate_limited with retry-after",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].httpRoute.rewrite",
        Honoured(
            "Trellis addition: the path and host the route's requests are sent with: one of prefix (replacing match.prefix), path (the whole path) or regex {pattern, substitution} ($1: groups), and hostname; the query stays; through a gateway, after the gateway route's rewrites",
        ),
    ),
    (
        VirtualRouter,
        "spec.routes[].http2Route.rewrite",
        Honoured(
            "Trellis addition: the path and host the route's requests are sent with: one of prefix (replacing match.prefix), path (the whole path) or regex {pattern, substitution} ($1: groups), and hostname; the query stays; through a gateway, after the gateway route's rewrites",
        ),
    ),
    (
        VirtualNode,
        "spec.requestHeaders",
        Honoured(
            "Trellis addition: headers set, added and removed on requests arriving at the node, at its sidecar before the app (as a route's requestHeaders; needs an HTTP listener)",
        ),
    ),
    (
        VirtualNode,
        "spec.responseHeaders",
        Honoured(
            "Trellis addition: headers set, added and removed on the app's responses at its sidecar (e.g. remove: [server])",
        ),
    ),
    (
        VirtualNode,
        "spec.loadBalancer",
        Honoured(
            "Trellis addition: how callers balance over the node's endpoints: policy ROUND_ROBIN (default), LEAST_REQUEST (power of two choices), RANDOM, PEAK_EWMA (power of two choices on latency × load), RING_HASH or MAGLEV (consistent hashing on hashKey {header | cookie | sourceIp}: a key keeps its instance, an instance leaving moves only its keys); slowStart {window, aggression, minWeightPercent} ramps a new instance's share over the window (not with RING_HASH or MAGLEV); zoneAware {minEndpoints} keeps a caller that knows its zone (trellis-proxy --zone) to the instances of that zone (AVAILABILITY_ZONE attribute) while at least minEndpoints (default 1) are in service",
        ),
    ),
    (
        VirtualNode,
        "spec.serviceDiscovery.registry",
        Honoured(
            "Trellis addition: the Trellis registry, read as awsCloudMap is (attributes also as a {key: value} map)",
        ),
    ),
    (
        Mesh,
        "spec.tracing",
        Honoured(
            "Trellis addition: distributed tracing by the mesh's proxies — {collector: HOST:PORT (OTLP/gRPC), samplingPercent (new traces sampled, default 1)}; W3C traceparent and B3 propagated, a span per request at each proxy",
        ),
    ),
    (
        Mesh,
        "spec.appMeshDefaults",
        Honoured(
            "Trellis addition: ENABLED (default) or DISABLED; whether App Mesh's hidden defaults (its default retry policy) apply to the mesh's resources applied with appmesh.k8s.aws/v1beta2",
        ),
    ),
    (
        VirtualNode,
        "spec.allowedCallers",
        Honoured(
            "Trellis addition: callers the node's sidecar admits under mTLS STRICT besides those the mesh graph declares: virtualNodeRef, virtualGatewayRef (their identities) or spiffeId (a workload outside the mesh's resources with a certificate from its CA)",
        ),
    ),
    (
        Mesh,
        "spec.mtls",
        Honoured(
            "Trellis addition: STRICT, PERMISSIVE or DISABLED; mTLS between the mesh's sidecars with Trellis-issued identities, and under STRICT only the callers the mesh graph declares (unset: STRICT when the control plane requires identities, else DISABLED)",
        ),
    ),
];
