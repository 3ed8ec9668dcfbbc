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
        "args": [
            "--control-plane", injector.control_plane,
            "--node", format!("{}/{}", key.namespace, key.name),
            "--data-dir", "/var/run/trellis",
            "--ingress-addr", "0.0.0.0:15000",
            "--egress-addr", "127.0.0.1:15001",
            "--ipv6-ingress-addr", "[::]:15000",
            "--ipv6-egress-addr", "[::1]:15001",
            "--admin-addr", "0.0.0.0:9901",
            "--token-file", format!("{TOKEN_DIR}/token"),
        ],
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
        "resources": { "requests": { "cpu": "10m", "memory": "32Mi" } },
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
