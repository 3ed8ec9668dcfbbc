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

/// The CLI against the TLS control plane `url` (trusting `ca`) as the operator of `token`.
fn as_admin(url: &str, ca: &str, token: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(crate::CLI)
        .args(["--server", url, "--ca-file", ca])
        .args(args)
        .env("TRELLIS_CONFIG", "/nonexistent/trellis-config.json")
        .env("TRELLIS_TOKEN", token)
        .output()
        .unwrap()
}

/// With `--auth` (and `--tls`, as beyond loopback) the config stream wants a join token or a
/// certificate: an anonymous proxy gets no snapshot and is not in status. `trellis identity
/// revoke` closes the node's streams and its certificates no longer admit it; a new join token
/// does; the revocation is audited.
#[tokio::test]
async fn a_revoked_identity_needs_a_new_join_token() {
    let data = tempfile::tempdir().unwrap();
    let control =
        ControlProcess::start_with(CONTROL, data.path(), "127.0.0.1:0", &["--tls", "--auth"]).await;
    let url = format!("https://{}", control.addr);
    let ca = data.path().join("ca.pem");
    let ca = ca.to_str().unwrap();
    let admin = std::fs::read_to_string(data.path().join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let run = |args: &[&str]| {
        let out = as_admin(&url, ca, &admin, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, MESH).unwrap();
    run(&["apply", "-f", file.to_str().unwrap()]);
    let proxies = || -> Vec<serde_json::Value> {
        let s: serde_json::Value = serde_json::from_str(&run(&["status", "-o", "json"])).unwrap();
        s["proxies"].as_array().cloned().unwrap_or_default()
    };
    let synced = |want: usize| {
        let n = proxies()
            .iter()
            .filter(|p| p["desiredVersion"].is_string() && p["desiredVersion"] == p["ackedVersion"])
            .count();
        if n == want {
            Ok(())
        } else {
            Err(format!("{n} in sync, want {want}"))
        }
    };
    let logged = |p: &ProxyProcess, what: &str| {
        let logs = p.logs();
        if logs.contains(what) {
            Ok(())
        } else {
            Err(logs)
        }
    };

    let token = run(&["token", "create", "--node", "default/front", "--uses", "1"]);
    let proxy_dir = tempfile::tempdir().unwrap();
    let front = ProxyProcess::sidecar_with(
        proxy_bin(),
        &url,
        "default/front",
        proxy_dir.path(),
        &["--token", token.trim(), "--control-plane-ca", ca],
    )
    .await;
    eventually(Duration::from_secs(10), "front in sync", || async {
        synced(1)
    })
    .await;

    let anonymous_dir = tempfile::tempdir().unwrap();
    let anonymous = ProxyProcess::sidecar_with(
        proxy_bin(),
        &url,
        "default/front",
        anonymous_dir.path(),
        &["--control-plane-ca", ca],
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "an anonymous proxy refused",
        || async { logged(&anonymous, "requires a join token") },
    )
    .await;
    assert_eq!(proxies().len(), 1, "only the admitted proxy is in status");
    drop(anonymous);

    let out = run(&["identity", "revoke", "--node", "default/front"]);
    assert!(
        out.contains("revoked the identity of node default/front"),
        "{out}"
    );
    // Its stream is closed; its certificate (the token is spent) no longer admits it.
    eventually(
        Duration::from_secs(10),
        "the revoked proxy refused",
        || async {
            logged(
                &front,
                "the client certificate of VirtualNode default/front was revoked",
            )?;
            if proxies().is_empty() {
                Ok(())
            } else {
                Err("still connected".into())
            }
        },
    )
    .await;
    logged(
        &front,
        "the identity of VirtualNode default/front was revoked",
    )
    .unwrap();
    drop(front);

    let token = run(&["token", "create", "--node", "default/front", "--uses", "1"]);
    let _again = ProxyProcess::sidecar_with(
        proxy_bin(),
        &url,
        "default/front",
        proxy_dir.path(),
        &["--token", token.trim(), "--control-plane-ca", ca],
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "admitted by the new token",
        || async { synced(1) },
    )
    .await;

    let log: serde_json::Value = serde_json::from_str(&run(&["audit", "-o", "json"])).unwrap();
    assert!(
        log.as_array().unwrap().iter().any(|e| e["who"] == "admin"
            && e["action"] == "POST /v1/revocations"
            && e["what"] == "revoked node default/front"),
        "{log:#}"
    );
}

/// Over TLS, the control plane follows a root rotation: after it finishes (the old root gone
/// from every bundle), the CLI trusting the rewritten `DATA_DIR/ca.pem` reaches it, and a
/// restarted proxy given the old CA file is admitted by its certificate from the new root —
/// the control plane's certificate now comes from the new root, which the proxy's kept bundle
/// trusts.
#[tokio::test]
async fn the_control_planes_tls_follows_a_root_rotation() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start_with(
        CONTROL,
        data.path(),
        "127.0.0.1:0",
        &["--tls", "--require-identity"],
    )
    .await;
    let url = format!("https://{}", control.addr);
    let ca_path = data.path().join("ca.pem");
    let ca = ca_path.to_str().unwrap();
    let old_ca_copy = data.path().join("old-ca.pem");
    std::fs::copy(&ca_path, &old_ca_copy).unwrap();
    let old_ca = old_ca_copy.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, MESH).unwrap();
    let run = |args: &[&str]| {
        let mut all = vec!["--ca-file", ca];
        all.extend(args);
        cli(&url, &all)
    };
    let out = run(&["apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["token", "create", "--node", "default/front", "--uses", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_string();
    let proxy_dir = tempfile::tempdir().unwrap();
    let first = ProxyProcess::sidecar_with(
        proxy_bin(),
        &url,
        "default/front",
        proxy_dir.path(),
        &["--token", &token, "--control-plane-ca", old_ca],
    )
    .await;
    let step = |name: &'static str| {
        let url = url.clone();
        async move {
            eventually(Duration::from_secs(15), name, || async {
                let out = cli(&url, &["--ca-file", ca, "ca", name]);
                if out.status.success() {
                    Ok(())
                } else {
                    Err(stderr(&out))
                }
            })
            .await;
        }
    };
    let root = |what: &str| {
        let out = run(&["ca", "status", "-o", "json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        s["rotation"][what].as_str().map(str::to_string)
    };
    eventually(Duration::from_secs(10), "a certificate", || async {
        let out = run(&["ca", "status", "-o", "json"]);
        let s: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        if s["proxies"][0]["certificateRoot"].is_string() {
            Ok(())
        } else {
            Err(format!("{s}\n{}", first.logs()))
        }
    })
    .await;
    let old = root("current").unwrap();
    step("rotate").await;
    let next = root("next").unwrap();
    step("promote").await;
    step("finish").await;
    assert_eq!(root("current").as_deref(), Some(next.as_str()));
    assert_ne!(old, next);
    // The CLI with the rewritten CA file (the new root only) reaches the control plane, whose
    // certificate comes from the new root; with the old file it does not.
    let bundle = std::fs::read_to_string(&ca_path).unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1);
    let out = run(&["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&url, &["--ca-file", old_ca, "status"]);
    assert!(
        !out.status.success(),
        "the old root still verifies the control plane"
    );

    // Restarted without a token, with the old CA file: its kept bundle trusts the control
    // plane, and its certificate from the new root admits it.
    let cert = proxy_dir.path().join("identity/cert.pem");
    eventually(
        Duration::from_secs(10),
        "the proxy's certificate from the new root",
        || async {
            let out = run(&["ca", "status", "-o", "json"]);
            let s: serde_json::Value =
                serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            if s["proxies"][0]["certificateRoot"] == next.as_str() && cert.exists() {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    drop(first);
    let restarted = ProxyProcess::sidecar_with(
        proxy_bin(),
        &url,
        "default/front",
        proxy_dir.path(),
        &["--control-plane-ca", old_ca],
    )
    .await;
    eventually(
        Duration::from_secs(15),
        "readmitted by certificate",
        || async {
            let out = run(&["status", "-o", "json"]);
            let s: serde_json::Value =
                serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            let p = &s["proxies"][0];
            if p["desiredVersion"].is_string() && p["desiredVersion"] == p["ackedVersion"] {
                Ok(())
            } else {
                Err(format!("{s}\n{}", restarted.logs()))
            }
        },
    )
    .await;
}
