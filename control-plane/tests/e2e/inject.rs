//! The sidecar injection webhook (issue 13), over real HTTPS with AdmissionReviews built from a
//! real Deployment (the App Mesh walkthrough's, applied unchanged): the JSONPatch returned is
//! applied and the pod it gives validated against Kubernetes' schema (PyPI
//! kubernetes-validate, which `./scripts/test` installs).

use std::sync::Arc;

use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use trellis_testkit::process::ControlProcess;

use crate::{CONTROL, cli, stderr};

const HOWTO: &str = include_str!("../../../examples/appmesh/howto.yaml");

/// POSTs `body` to `path` of the control plane at `addr` over TLS, trusting `ca_pem`.
async fn post_tls(addr: std::net::SocketAddr, ca_pem: &str, path: &str, body: &Value) -> Value {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            serde_json::to_vec(body).unwrap(),
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

/// The pod the walkthrough's Deployment `name` makes, with `annotations`.
fn pod(name: &str, annotations: Value) -> Value {
    let deployment = serde_yaml_ng::Deserializer::from_str(HOWTO)
        .map(|d| serde_json::to_value(serde_yaml_ng::Value::deserialize(d).unwrap()).unwrap())
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == name)
        .unwrap();
    let template = &deployment["spec"]["template"];
    let mut metadata = template["metadata"].clone();
    metadata["annotations"] = annotations;
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": template["spec"],
    })
}

fn review(uid: &str, pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "howto",
            "operation": "CREATE",
            "object": pod,
        },
    })
}

/// Applies an RFC 6902 patch of `add` operations (what the injector returns).
fn apply_patch(doc: &mut Value, patch: &Value) {
    for op in patch.as_array().unwrap() {
        assert_eq!(op["op"], "add", "{op}");
        let path = op["path"].as_str().unwrap();
        let (parent, last) = path.rsplit_once('/').unwrap();
        let target = doc.pointer_mut(parent).unwrap();
        match target {
            Value::Array(items) if last == "-" => items.push(op["value"].clone()),
            Value::Array(items) => items.insert(last.parse().unwrap(), op["value"].clone()),
            Value::Object(map) => {
                map.insert(last.to_string(), op["value"].clone());
            }
            other => panic!("cannot add under {other}"),
        }
    }
}

fn patched(answer: &Value, pod: &Value) -> Value {
    let response = &answer["response"];
    assert_eq!(response["allowed"], true, "{answer}");
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        response["patch"].as_str().unwrap(),
    )
    .unwrap();
    let patch: Value = serde_json::from_slice(&patch).unwrap();
    let mut pod = pod.clone();
    apply_patch(&mut pod, &patch);
    pod
}

use serde::Deserialize as _;

/// A pod of the walkthrough's `blue` Deployment, in its `enabled` namespace, gets the capture
/// init container and the proxy as a native sidecar for its VirtualNode (found by podSelector),
/// and the pod validates against Kubernetes' schema; a pod annotated `disabled` or already
/// injected is left alone; one that matches no node in an `enabled` namespace is refused.
#[tokio::test]
async fn the_webhook_injects_the_walkthroughs_pods() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start_with(
        CONTROL,
        data.path(),
        "127.0.0.1:0",
        &[
            "--tls",
            "--inject-image",
            "ghcr.io/trellis-mesh/trellis-proxy:0.1.0",
            "--inject-control-plane",
            "https://trellis-control.trellis:7070",
        ],
    )
    .await;
    let url = format!("https://{}", control.addr);
    let ca_path = data.path().join("ca.pem");
    let ca = std::fs::read_to_string(&ca_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("howto.yaml");
    std::fs::write(&file, HOWTO).unwrap();
    let out = cli(
        &url,
        &[
            "--ca-file",
            ca_path.to_str().unwrap(),
            "apply",
            "-f",
            file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let blue = pod("blue", json!({}));
    let answer = post_tls(
        control.addr,
        &ca,
        "/v1/webhooks/inject",
        &review("u1", &blue),
    )
    .await;
    assert_eq!(answer["response"]["uid"], "u1");
    let injected = patched(&answer, &blue);
    let inits = injected["spec"]["initContainers"].as_array().unwrap();
    let names: Vec<&str> = inits.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["trellis-init", "trellis-proxy"]);
    let init_args = inits[0]["args"].to_string();
    for want in [
        "\"init\"",
        "\"--app-ports\",\"8080\"",
        "\"--proxy-uid\",\"1337\"",
        "169.254.169.254",
    ] {
        assert!(init_args.contains(want), "{want} not in {init_args}");
    }
    assert!(
        inits[0]["securityContext"]["capabilities"]["add"]
            .as_array()
            .unwrap()
            .contains(&json!("NET_ADMIN"))
    );
    let proxy = &inits[1];
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    let args = proxy["args"].to_string();
    assert!(args.contains("\"--node\",\"howto/blue\""), "{args}");
    assert!(
        args.contains("https://trellis-control.trellis:7070"),
        "{args}"
    );
    // It proves its node with the pod's projected service-account token, and trusts the
    // control plane's CA (the bundle it serves with).
    assert!(
        args.contains("\"--token-file\",\"/var/run/secrets/trellis/token\""),
        "{args}"
    );
    let token = injected["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "trellis-token")
        .unwrap_or_else(|| panic!("no token volume: {injected}"));
    let source = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(source["audience"], "trellis", "{token}");
    let ca_pem = proxy["env"][0]["value"].as_str().unwrap_or_default();
    assert_eq!(
        proxy["env"][0]["name"],
        "TRELLIS_PROXY_CONTROL_PLANE_CA_PEM"
    );
    let served = std::fs::read_to_string(data.path().join("ca.pem")).unwrap_or_default();
    assert!(
        ca_pem.contains("BEGIN CERTIFICATE") && ca_pem.trim() == served.trim(),
        "the CA given is the control plane's: {ca_pem}"
    );
    assert_eq!(
        injected["spec"]["containers"], blue["spec"]["containers"],
        "the app untouched"
    );
    // The pod it gives is a valid Pod for Kubernetes.
    let pod_file = dir.path().join("pod.json");
    std::fs::write(&pod_file, serde_json::to_vec(&injected).unwrap()).unwrap();
    let validated = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys, kubernetes_validate\nkubernetes_validate.validate(json.load(open(sys.argv[1])), '1.33.0', strict=True)",
            pod_file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        validated.status.success(),
        "{}",
        String::from_utf8_lossy(&validated.stderr)
    );

    // Ports from the pod's annotation; disabled by annotation; already injected: left alone.
    let ported = pod("blue", json!({ "appmesh.k8s.aws/ports": "8080,9090" }));
    let answer = post_tls(
        control.addr,
        &ca,
        "/v1/webhooks/inject",
        &review("u2", &ported),
    )
    .await;
    let injected = patched(&answer, &ported);
    assert!(
        injected["spec"]["initContainers"][0]["args"]
            .to_string()
            .contains("\"8080,9090\"")
    );
    let off = pod(
        "blue",
        json!({ "appmesh.k8s.aws/sidecarInjectorWebhook": "disabled" }),
    );
    let answer = post_tls(
        control.addr,
        &ca,
        "/v1/webhooks/inject",
        &review("u3", &off),
    )
    .await;
    assert_eq!(answer["response"], json!({ "uid": "u3", "allowed": true }));
    let answer = post_tls(
        control.addr,
        &ca,
        "/v1/webhooks/inject",
        &review("u4", &injected),
    )
    .await;
    assert_eq!(answer["response"], json!({ "uid": "u4", "allowed": true }));

    // No node matches, in an enabled namespace: refused, saying why.
    let mut stray = pod("blue", json!({}));
    stray["metadata"]["labels"] = json!({ "app": "stray" });
    let answer = post_tls(
        control.addr,
        &ca,
        "/v1/webhooks/inject",
        &review("u5", &stray),
    )
    .await;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("no VirtualNode"),
        "{answer}"
    );

    // App Mesh's annotations naming another node or mesh than the pod's: refused, saying why;
    // naming its own: injected.
    for (uid, annotations, refused) in [
        (
            "u6",
            json!({ "appmesh.k8s.aws/virtualNode": "red" }),
            Some("names \"red\""),
        ),
        (
            "u7",
            json!({ "appmesh.k8s.aws/mesh": "other-mesh" }),
            Some("names \"other-mesh\""),
        ),
        (
            "u8",
            json!({ "appmesh.k8s.aws/virtualNode": "blue", "appmesh.k8s.aws/mesh": "howto-mesh" }),
            None,
        ),
        (
            "u9",
            json!({ "appmesh.k8s.aws/sidecarEnv": "DEBUG=1" }),
            Some("appmesh.k8s.aws/sidecarEnv is not supported by Trellis"),
        ),
    ] {
        let named = pod("blue", annotations);
        let answer = post_tls(
            control.addr,
            &ca,
            "/v1/webhooks/inject",
            &review(uid, &named),
        )
        .await;
        match refused {
            Some(why) => {
                assert_eq!(answer["response"]["allowed"], false, "{answer}");
                let message = answer["response"]["status"]["message"].as_str().unwrap();
                assert!(message.contains(why), "{message}");
            }
            None => assert_eq!(answer["response"]["patchType"], "JSONPatch", "{answer}"),
        }
    }

    // The proxy's resources and IPv6 from App Mesh's annotations.
    let tuned = pod(
        "blue",
        json!({
            "appmesh.k8s.aws/cpuRequest": "50m", "appmesh.k8s.aws/memoryLimit": "128Mi",
            "appmesh.k8s.aws/ipv6": "disabled",
        }),
    );
    let answer = post_tls(
        control.addr,
        &ca,
        "/v1/webhooks/inject",
        &review("u10", &tuned),
    )
    .await;
    let injected = patched(&answer, &tuned);
    let inits = injected["spec"]["initContainers"].as_array().unwrap();
    let proxy = inits.iter().find(|c| c["name"] == "trellis-proxy").unwrap();
    assert_eq!(
        proxy["resources"],
        json!({ "requests": { "cpu": "50m", "memory": "32Mi" }, "limits": { "memory": "128Mi" } })
    );
    assert!(
        !proxy["args"].to_string().contains("--ipv6-egress-addr"),
        "{}",
        proxy["args"]
    );
    let init = inits.iter().find(|c| c["name"] == "trellis-init").unwrap();
    assert!(
        init["args"].to_string().contains("\"--ipv6\",\"off\""),
        "{}",
        init["args"]
    );
}
