//! The sidecar injector (issue 13): a mutating admission webhook for Pods (AdmissionReview v1).
//! A pod is injected when its VirtualNode is found — the one node of its namespace whose
//! `podSelector` matches its labels — and injection is on for it: App Mesh's
//! `appmesh.k8s.aws/sidecarInjectorWebhook` (or `trellis.dev/inject`), a pod annotation over
//! its namespace's label. `enabled`: the pod must match a node, or it is refused (a pod never
//! starts silently unmeshed); `disabled`: not injected; otherwise injected when it matches.
//!
//! What is added, as App Mesh's injector did with Envoy: an init container running
//! `trellis-proxy init` (NET_ADMIN) with the capture rules for the node's listener ports (or the
//! pod's `appmesh.k8s.aws/ports`), App Mesh's ignored egress (`egressIgnoredPorts`, default 22;
//! `egressIgnoredIPs`, default 169.254.169.254), then the proxy as a native sidecar (an init
//! container with `restartPolicy: Always` and a startup probe on its `/ready`: the app starts
//! once the proxy is ready, and the proxy outlives it), running as UID 1337, with an emptyDir
//! for its data.

use serde_json::{Value, json};

use crate::{
    model::{Kind, Spec},
    validate::State,
};

/// What injected pods get: the proxy image and the control plane URL proxies follow.
#[derive(Debug, Clone)]
pub struct Injector {
    pub image: String,
    pub control_plane: String,
    /// The trust bundle an `https://` control plane's certificate chains to, given to the
    /// proxy as PEM (`TRELLIS_PROXY_CONTROL_PLANE_CA_PEM`); set per review, as it rotates.
    pub control_plane_ca: Option<String>,
}

/// The audience of the proxy's projected service-account token: the control plane asks the API
/// server to review it for this audience, so a token for the API server or another service
/// admits nothing.
pub const TOKEN_AUDIENCE: &str = "trellis";

/// Where the proxy's projected service-account token is mounted: it proves the pod's node to
/// the control plane.
const TOKEN_DIR: &str = "/var/run/secrets/trellis";

const PROXY: &str = "trellis-proxy";
const INIT: &str = "trellis-init";
const PROXY_UID: i64 = 1337;

/// App Mesh's pod annotations that configured Envoy, its X-Ray daemon or App Mesh's CNI mode,
/// and why Trellis has none of them.
const UNSUPPORTED: [(&str, &str); 13] = [
    (
        "appmeshCNI",
        "capture is the trellis-init container's; ECS and Fargate tasks use ECS's proxyConfiguration",
    ),
    ("proxyIngressPort", "the ingress is always 15000"),
    ("proxyEgressPort", "the egress is always 15001"),
    ("ignoredUID", "the proxy always runs as 1337"),
    (
        "ignoredGID",
        "the proxy's UID, not its group, is left out of capture",
    ),
    ("preview", "App Mesh preview features"),
    (
        "sds",
        "workload certificates come from the control plane, not an SDS socket",
    ),
    ("secretMounts", "the proxy reads no files of the pod's"),
    ("volumeMounts", "the proxy reads no files of the pod's"),
    ("sidecarEnv", "Envoy's environment"),
    ("sidecarEnvJson", "Envoy's environment"),
    ("xrayAgentConfigMount", "X-Ray: tracing is issue 16's"),
    (
        "virtualGatewaySkipImageOverride",
        "gateway pods are not injected",
    ),
];
const ANNOTATIONS: [&str; 2] = [
    "appmesh.k8s.aws/sidecarInjectorWebhook",
    "trellis.dev/inject",
];

/// Answers an AdmissionReview: allowed with a JSONPatch (or none), or refused with the reason.
pub fn review(state: &State, injector: &Injector, review: &Value) -> Value {
    let request = &review["request"];
    let uid = request["uid"].clone();
    let response = match decide(state, injector, request) {
        Ok(None) => json!({ "uid": uid, "allowed": true }),
        Ok(Some(patch)) => {
            let patch = serde_json::to_vec(&patch).unwrap_or_default();
            json!({
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, patch),
            })
        }
        Err(why) => json!({
            "uid": uid,
            "allowed": false,
            "status": { "code": 403, "message": why },
        }),
    };
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    })
}

/// The patch for the pod of `request`, None to leave it as it is, or why it is refused.
fn decide(state: &State, injector: &Injector, request: &Value) -> Result<Option<Value>, String> {
    if request["kind"]["kind"] != "Pod" || request["operation"] != "CREATE" {
        return Ok(None);
    }
    let pod = &request["object"];
    let namespace = request["namespace"]
        .as_str()
        .or_else(|| pod["metadata"]["namespace"].as_str())
        .unwrap_or("default");
    let annotation = |key: &str| pod["metadata"]["annotations"][key].as_str();
    let namespace_labels = state
        .get(&crate::model::ResourceKey::new(
            Kind::Namespace,
            "",
            namespace,
        ))
        .map(|r| r.metadata.labels.clone())
        .unwrap_or_default();
    let mode = ANNOTATIONS
        .iter()
        .find_map(|k| annotation(k))
        .or_else(|| {
            ANNOTATIONS
                .iter()
                .find_map(|k| namespace_labels.get(*k).map(String::as_str))
        })
        .unwrap_or("")
        .to_ascii_lowercase();
    if mode == "disabled" {
        return Ok(None);
    }
    let has = |list: &str, name: &str| {
        pod["spec"][list]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["name"] == name))
    };
    if has("initContainers", PROXY)
        || has("containers", "envoy")
        || has("initContainers", "proxyinit")
    {
        return Ok(None);
    }
    let labels: std::collections::BTreeMap<String, String> = pod["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let nodes: Vec<_> = state
        .iter()
        .filter(|(k, _)| k.kind == Kind::VirtualNode && k.namespace == namespace)
        .filter_map(|(k, r)| match &r.spec {
            Spec::VirtualNode(n) => Some((k, n)),
            _ => None,
        })
        .filter(|(_, n)| n.pod_selector.as_ref().is_some_and(|s| s.matches(&labels)))
        .collect();
    let (key, node) = match nodes.as_slice() {
        [one] => *one,
        [] if mode == "enabled" => {
            return Err(format!(
                "no VirtualNode of namespace {namespace} has a podSelector matching the pod's labels, and injection is enabled: the pod would run outside the mesh"
            ));
        }
        [] => return Ok(None),
        many => {
            let names: Vec<String> = many.iter().map(|(k, _)| k.name.clone()).collect();
            return Err(format!(
                "the pod's labels match several VirtualNodes of namespace {namespace}: {}",
                names.join(", ")
            ));
        }
    };
    // App Mesh's annotations Trellis has no counterpart for: refused by name, never ignored
    // (a pod would run without what it asked for).
    for (name, why) in UNSUPPORTED {
        if annotation(&format!("appmesh.k8s.aws/{name}")).is_some() {
            return Err(format!(
                "the pod's annotation appmesh.k8s.aws/{name} is not supported by Trellis ({why}): remove it"
            ));
        }
    }
    // App Mesh's annotations naming the node and its mesh: the node is found by podSelector,
    // and a pod that names another is refused rather than meshed as what it did not ask for.
    if let Some(named) = annotation("appmesh.k8s.aws/virtualNode") {
        let name = named.rsplit('/').next().unwrap_or(named);
        if name != key.name {
            return Err(format!(
                "the pod's annotation appmesh.k8s.aws/virtualNode names {named:?}, but its labels select VirtualNode {}/{}",
                key.namespace, key.name
            ));
        }
    }
    if let Some(mesh) = annotation("appmesh.k8s.aws/mesh") {
        let of = state
            .get(key)
            .and_then(|r| crate::validate::mesh_of(state, r))
            .unwrap_or_default();
        if mesh != of {
            return Err(format!(
                "the pod's annotation appmesh.k8s.aws/mesh names {mesh:?}, but VirtualNode {}/{} is of mesh {of:?}",
                key.namespace, key.name
            ));
        }
    }
    let ports = annotation("appmesh.k8s.aws/ports").map_or_else(
        || {
            node.listeners
                .iter()
                .map(|l| l.port_mapping.port.to_string())
                .collect::<Vec<_>>()
                .join(",")
        },
        str::to_string,
    );
    let ignored_ports = annotation("appmesh.k8s.aws/egressIgnoredPorts").unwrap_or("22");
    let ignored_ips = annotation("appmesh.k8s.aws/egressIgnoredIPs").unwrap_or("169.254.169.254");
    // appmesh.k8s.aws/ipv6: only `disabled` meant anything to App Mesh.
    let ipv6 =
        !annotation("appmesh.k8s.aws/ipv6").is_some_and(|v| v.eq_ignore_ascii_case("disabled"));
    // The proxy's resources: App Mesh's annotations, else 10m / 32Mi requested, no limits.
    let mut resources = json!({ "requests": { "cpu": "10m", "memory": "32Mi" } });
    for (name, kind, resource) in [
        ("cpuRequest", "requests", "cpu"),
        ("memoryRequest", "requests", "memory"),
        ("cpuLimit", "limits", "cpu"),
        ("memoryLimit", "limits", "memory"),
    ] {
        if let Some(v) = annotation(&format!("appmesh.k8s.aws/{name}")) {
            resources[kind][resource] = json!(v);
        }
    }
    let mut init_args = vec![
        json!("init"),
        json!("--proxy-uid"),
        json!(PROXY_UID.to_string()),
        json!("--egress-ignored-ports"),
        json!(ignored_ports),
        json!("--egress-ignored-ips"),
        json!(ignored_ips),
    ];
    if !ports.is_empty() {
        init_args.extend([json!("--app-ports"), json!(ports)]);
    }
    if !ipv6 {
        init_args.extend([json!("--ipv6"), json!("off")]);
    }
    let mut proxy_args = vec![
        json!("--control-plane"),
        json!(injector.control_plane),
        json!("--node"),
        json!(format!("{}/{}", key.namespace, key.name)),
        json!("--data-dir"),
        json!("/var/run/trellis"),
        json!("--ingress-addr"),
        json!("0.0.0.0:15000"),
        json!("--egress-addr"),
        json!("127.0.0.1:15001"),
        json!("--admin-addr"),
        json!("0.0.0.0:9901"),
        json!("--token-file"),
        json!(format!("{TOKEN_DIR}/token")),
    ];
    if ipv6 {
        proxy_args.extend([
            json!("--ipv6-ingress-addr"),
            json!("[::]:15000"),
            json!("--ipv6-egress-addr"),
            json!("[::1]:15001"),
        ]);
    }
    let init = json!({
        "name": INIT,
        "image": injector.image,
        "command": ["trellis-proxy"],
        "args": init_args,
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
        },
    });
    let proxy = json!({
        "name": PROXY,
        "image": injector.image,
        "restartPolicy": "Always",
        "command": ["trellis-proxy"],
        "args": proxy_args,
        "env": injector.control_plane_ca.as_ref().map(|pem| json!([
            { "name": "TRELLIS_PROXY_CONTROL_PLANE_CA_PEM", "value": pem },
        ])).unwrap_or_else(|| json!([])),
        "ports": [{ "name": "trellis-admin", "containerPort": 9901, "protocol": "TCP" }],
        "startupProbe": {
            "httpGet": { "path": "/ready", "port": 9901 },
            "periodSeconds": 1,
            "failureThreshold": 120,
        },
        "readinessProbe": { "httpGet": { "path": "/ready", "port": 9901 }, "periodSeconds": 5 },
        "resources": resources,
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
        },
        "volumeMounts": [
            { "name": "trellis-data", "mountPath": "/var/run/trellis" },
            { "name": "trellis-token", "mountPath": TOKEN_DIR, "readOnly": true },
        ],
    });
    let volumes = [
        json!({ "name": "trellis-data", "emptyDir": {} }),
        // The pod's service-account token for the control plane only, rotated by the kubelet.
        json!({ "name": "trellis-token", "projected": { "sources": [{ "serviceAccountToken": {
            "audience": TOKEN_AUDIENCE,
            "expirationSeconds": 3600,
            "path": "token",
        } }] } }),
    ];
    let mut patch = Vec::new();
    // The capture rules first, then the proxy, both ahead of the pod's own init containers.
    if pod["spec"]["initContainers"].as_array().is_some() {
        patch.push(json!({ "op": "add", "path": "/spec/initContainers/0", "value": proxy }));
        patch.push(json!({ "op": "add", "path": "/spec/initContainers/0", "value": init }));
    } else {
        patch.push(json!({ "op": "add", "path": "/spec/initContainers", "value": [init, proxy] }));
    }
    if pod["spec"]["volumes"].as_array().is_some() {
        for volume in volumes {
            patch.push(json!({ "op": "add", "path": "/spec/volumes/-", "value": volume }));
        }
    } else {
        patch.push(json!({ "op": "add", "path": "/spec/volumes", "value": volumes }));
    }
    Ok(Some(Value::Array(patch)))
}
