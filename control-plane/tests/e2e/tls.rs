//! The control plane over TLS: a certificate from the mesh's CA, trusted by the CLI and the
//! proxies through the CA file it writes.

use std::time::Duration;

use trellis_testkit::{ProxyProcess, eventually, process::ControlProcess};

use crate::{CONTROL, cli, proxy_bin, stderr, stdout};

const MESH: &str = "apiVersion: mesh.trellis.dev/v1beta1\nkind: Mesh\nmetadata: { name: m }\n---\n\
    apiVersion: mesh.trellis.dev/v1beta1\nkind: VirtualNode\nmetadata: { name: front }\nspec:\n  \
    listeners: [{ portMapping: { port: 8080, protocol: http } }]\n";

/// With `--tls`: the CLI reaches the API with the CA file the control plane wrote, not without
/// it, not with another CA, not in the clear; a proxy follows the config stream over TLS.
#[tokio::test]
async fn the_api_and_the_config_stream_are_served_over_tls() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start_with(CONTROL, data.path(), "127.0.0.1:0", &["--tls"]).await;
    let url = format!("https://{}", control.addr);
    let ca = data.path().join("ca.pem");
    let ca = ca.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, MESH).unwrap();

    let out = cli(
        &url,
        &["--ca-file", ca, "apply", "-f", file.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&url, &["get", "meshes"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("needs its CA"), "{}", stderr(&out));
    let other_data = tempfile::tempdir().unwrap();
    let _other =
        ControlProcess::start_with(CONTROL, other_data.path(), "127.0.0.1:0", &["--tls"]).await;
    let other_ca = other_data.path().join("ca.pem");
    let out = cli(
        &url,
        &["--ca-file", other_ca.to_str().unwrap(), "get", "meshes"],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("TLS"), "{}", stderr(&out));
    let out = cli(&format!("http://{}", control.addr), &["get", "meshes"]);
    assert!(
        !out.status.success(),
        "plaintext to the TLS port: {}",
        stdout(&out)
    );

    let token = {
        let out = cli(
            &url,
            &[
                "--ca-file",
                ca,
                "token",
                "create",
                "--node",
                "default/front",
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().to_string()
    };
    let proxy_dir = tempfile::tempdir().unwrap();
    let front = ProxyProcess::sidecar_with(
        proxy_bin(),
        &url,
        "default/front",
        proxy_dir.path(),
        &["--token", &token, "--control-plane-ca", ca],
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the proxy in sync over TLS",
        || async {
            let out = cli(&url, &["--ca-file", ca, "status", "-o", "json"]);
            let s: serde_json::Value =
                serde_json::from_str(&stdout(&out)).map_err(|e| e.to_string())?;
            let p = &s["proxies"][0];
            if p["desiredVersion"].is_string() && p["desiredVersion"] == p["ackedVersion"] {
                Ok(())
            } else {
                Err(format!("{s}\n{}", front.logs()))
            }
        },
    )
    .await;
}

/// Over TLS a proxy that has its workload certificate is admitted by it — a single-use token
/// gets it started, its restarts need none —, and a certificate for another node is refused.
#[tokio::test]
async fn a_workload_certificate_admits_its_proxy_after_the_token() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start_with(
        CONTROL,
        data.path(),
        "127.0.0.1:0",
        &["--tls", "--require-identity"],
    )
    .await;
    let url = format!("https://{}", control.addr);
    let ca = data.path().join("ca.pem");
    let ca = ca.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, format!("{MESH}---\napiVersion: mesh.trellis.dev/v1beta1\nkind: VirtualNode\nmetadata: {{ name: other }}\nspec:\n  listeners: [{{ portMapping: {{ port: 8080, protocol: http }} }}]\n")).unwrap();
    let out = cli(
        &url,
        &["--ca-file", ca, "apply", "-f", file.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(
        &url,
        &[
            "--ca-file",
            ca,
            "token",
            "create",
            "--node",
            "default/front",
            "--uses",
            "1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_string();
    let synced = |n: usize| {
        let url = url.clone();
        async move {
            eventually(
                Duration::from_secs(10),
                "proxies in sync over TLS",
                || async {
                    let out = cli(&url, &["--ca-file", ca, "status", "-o", "json"]);
                    let s: serde_json::Value =
                        serde_json::from_str(&stdout(&out)).map_err(|e| e.to_string())?;
                    let proxies = s["proxies"].as_array().cloned().unwrap_or_default();
                    let in_sync = proxies
                        .iter()
                        .filter(|p| {
                            p["desiredVersion"].is_string()
                                && p["desiredVersion"] == p["ackedVersion"]
                        })
                        .count();
                    if proxies.len() == n && in_sync == n {
                        Ok(())
                    } else {
                        Err(s.to_string())
                    }
                },
            )
            .await
        }
    };

    let proxy_dir = tempfile::tempdir().unwrap();
    let first = ProxyProcess::sidecar_with(
        proxy_bin(),
        &url,
        "default/front",
        proxy_dir.path(),
        &["--token", &token, "--control-plane-ca", ca],
    )
    .await;
    synced(1).await;
    eventually(Duration::from_secs(10), "a certificate", || async {
        if proxy_dir.path().join("identity/cert.pem").exists() {
            Ok(())
        } else {
            Err(first.logs())
        }
    })
    .await;
    drop(first);
    synced(0).await;

    // Restarted without a token (the single-use one is spent): admitted by its certificate,
    // which is renewed on that stream as well.
    let before = std::fs::read_to_string(proxy_dir.path().join("identity/cert.pem")).unwrap();
    let restarted = ProxyProcess::sidecar_with(
        proxy_bin(),
        &url,
        "default/front",
        proxy_dir.path(),
        &["--control-plane-ca", ca],
    )
    .await;
    synced(1).await;
    eventually(
        Duration::from_secs(10),
        "a certificate issued on the certificate's stream",
        || async {
            let now = std::fs::read_to_string(proxy_dir.path().join("identity/cert.pem"))
                .unwrap_or_default();
            if now != before {
                Ok(())
            } else {
                Err(restarted.logs())
            }
        },
    )
    .await;

    // Front's certificate does not admit a proxy claiming another node.
    let stolen = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(stolen.path().join("identity")).unwrap();
    for f in ["cert.pem", "key.pem", "bundle.pem"] {
        std::fs::copy(
            proxy_dir.path().join("identity").join(f),
            stolen.path().join("identity").join(f),
        )
        .unwrap();
    }
    let impostor = ProxyProcess::sidecar_with(
        proxy_bin(),
        &url,
        "default/other",
        stolen.path(),
        &["--control-plane-ca", ca],
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "another node's certificate refused",
        || async {
            let logs = impostor.logs();
            if logs.contains(
                "the client certificate is for spiffe://trellis.local/ns/default/vn/front",
            ) {
                Ok(())
            } else {
                Err(logs)
            }
        },
    )
    .await;
    drop(restarted);
}
