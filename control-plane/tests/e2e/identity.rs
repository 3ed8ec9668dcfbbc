//! Workload identity: join tokens, certificates issued from the proxies' CSRs, renewal.

use std::{path::Path, time::Duration};

use trellis_testkit::{ProxyProcess, eventually, process::ControlProcess};

use crate::{CONTROL, apply, cli, proxy_bin, status, stderr, stdout, wait_synced};

const MESH: &str = "apiVersion: mesh.trellis.dev/v1beta1\nkind: Mesh\nmetadata: { name: m }\n---\n\
    apiVersion: mesh.trellis.dev/v1beta1\nkind: VirtualNode\nmetadata: { name: front }\nspec:\n  \
    listeners: [{ portMapping: { port: 8080, protocol: http } }]\n---\n\
    apiVersion: mesh.trellis.dev/v1beta1\nkind: VirtualNode\nmetadata: { name: other }\nspec:\n  \
    listeners: [{ portMapping: { port: 8080, protocol: http } }]\n";

/// `trellis token create` with `args`: the token.
fn token(server: &str, args: &[&str]) -> String {
    let mut all = vec!["token", "create"];
    all.extend(args);
    let out = cli(server, &all);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// The certificates of a proxy's `cert.pem` (leaf first) and its trust bundle's root, DER.
fn issued(data_dir: &Path) -> Option<(Vec<Vec<u8>>, Vec<u8>)> {
    let der = |text: &str| -> Vec<Vec<u8>> {
        x509_parser::pem::Pem::iter_from_buffer(text.as_bytes())
            .filter_map(Result::ok)
            .map(|p| p.contents)
            .collect()
    };
    let chain = der(&std::fs::read_to_string(data_dir.join("identity/cert.pem")).ok()?);
    let bundle = der(&std::fs::read_to_string(data_dir.join("identity/bundle.pem")).ok()?);
    Some((chain, bundle.into_iter().next()?))
}

/// The leaf's URI SANs, after checking it is signed by `root`.
fn spiffe_ids(leaf: &[u8], root: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let (_, leaf) = X509Certificate::from_der(leaf).unwrap();
    let (_, root) = X509Certificate::from_der(root).unwrap();
    leaf.verify_signature(Some(root.public_key()))
        .expect("the leaf is signed by the trust bundle's root");
    assert!(!leaf.is_ca());
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => u.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

/// A proxy presenting a join token for its node gets a certificate for that node's SPIFFE ID
/// (signed by the mesh's root, for its own key: the key stays in its data dir), and status
/// shows the identity and its expiry.
#[tokio::test]
async fn a_join_token_gets_the_proxy_its_nodes_certificate() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    apply(&control.url, MESH);
    let token = token(&control.url, &["--node", "default/front", "--ttl", "10m"]);
    assert!(token.starts_with("trellis-join-"), "{token}");
    let dir = tempfile::tempdir().unwrap();
    let front = ProxyProcess::sidecar_with(
        proxy_bin(),
        &control.url,
        "default/front",
        dir.path(),
        &["--token", &token],
    )
    .await;
    wait_synced(&control.url, 1).await;
    let (chain, root) = eventually(Duration::from_secs(10), "a certificate", || async {
        issued(dir.path()).ok_or_else(|| "none yet".to_string())
    })
    .await;
    assert_eq!(chain.len(), 2, "the leaf, then the root");
    assert_eq!(chain[1], root);
    assert_eq!(
        spiffe_ids(&chain[0], &root),
        ["spiffe://trellis.local/ns/default/vn/front"]
    );
    let key = std::fs::read_to_string(dir.path().join("identity/key.pem")).unwrap();
    assert!(key.contains("PRIVATE KEY"));
    // The proxy holds it as its TLS credentials.
    eventually(
        Duration::from_secs(10),
        "the proxy's TLS identity",
        || async {
            let (_, dump) = front.admin("/config_dump").await;
            let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
            if dump["identity"] == "spiffe://trellis.local/ns/default/vn/front" {
                Ok(())
            } else {
                Err(format!("{}\n{}", dump["identity"], front.logs()))
            }
        },
    )
    .await;
    let s = status(&control.url);
    let proxy = &s["proxies"][0];
    assert_eq!(
        proxy["identity"],
        "spiffe://trellis.local/ns/default/vn/front"
    );
    assert!(
        proxy["certificateExpires"]
            .as_str()
            .is_some_and(|e| e.ends_with('Z')),
        "{proxy}"
    );
    // The table shows it too.
    let expires = proxy["certificateExpires"].as_str().unwrap();
    let out = cli(&control.url, &["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table.contains("CERT EXPIRES") && table.contains(expires),
        "{table}"
    );
}

/// A token admits only the node it names, and only as often as it says; with
/// `--require-identity` a proxy without one gets nothing.
#[tokio::test]
async fn tokens_admit_their_node_as_often_as_they_say() {
    let data = tempfile::tempdir().unwrap();
    let control =
        ControlProcess::start_with(CONTROL, data.path(), "127.0.0.1:0", &["--require-identity"])
            .await;
    apply(&control.url, MESH);
    let once = token(&control.url, &["--node", "default/front", "--uses", "1"]);

    let other_dir = tempfile::tempdir().unwrap();
    let other = ProxyProcess::sidecar_with(
        proxy_bin(),
        &control.url,
        "default/other",
        other_dir.path(),
        &["--token", &once],
    )
    .await;
    let logged = |p: &ProxyProcess, what: &'static str| {
        let logs = p.logs();
        if logs.contains(what) {
            Ok(())
        } else {
            Err(logs)
        }
    };
    eventually(
        Duration::from_secs(10),
        "another node's token refused",
        || async {
            logged(
                &other,
                "the join token is for node default/front, not default/other",
            )
        },
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let _front = ProxyProcess::sidecar_with(
        proxy_bin(),
        &control.url,
        "default/front",
        dir.path(),
        &["--token", &once],
    )
    .await;
    wait_synced(&control.url, 1).await;
    assert!(issued(dir.path()).is_some());

    let again_dir = tempfile::tempdir().unwrap();
    let again = ProxyProcess::sidecar_with(
        proxy_bin(),
        &control.url,
        "default/front",
        again_dir.path(),
        &["--token", &once],
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "a used-up token refused",
        || async { logged(&again, "unknown or used-up join token") },
    )
    .await;

    let bare_dir = tempfile::tempdir().unwrap();
    let bare =
        ProxyProcess::sidecar(proxy_bin(), &control.url, "default/other", bare_dir.path()).await;
    eventually(Duration::from_secs(10), "no token, no snapshot", || async {
        logged(&bare, "requires a join token")
    })
    .await;
    // Only the admitted proxy is connected.
    assert_eq!(status(&control.url)["proxies"].as_array().unwrap().len(), 1);
}

/// A scripted proxy's config stream, admitted by `token` with a CSR for `key`: the sender of
/// its messages and its pushes.
async fn scripted_stream(
    url: &str,
    token: &str,
    key: &rcgen::KeyPair,
) -> (
    tokio::sync::mpsc::Sender<trellis_proto::v1::ProxyMessage>,
    tonic::Streaming<trellis_proto::v1::SnapshotPush>,
) {
    use trellis_proto::v1::{
        Hello, ProxyMessage, config_stream_client::ConfigStreamClient, hello::Kind as HelloKind,
        proxy_message::Kind as Msg,
    };
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<ProxyMessage>(4);
    tx.send(ProxyMessage {
        kind: Some(Msg::Hello(Hello {
            node: "default/front".into(),
            kind: HelloKind::Sidecar as i32,
            proxy_version: "0.0.1".into(),
            instance: "scripted".into(),
            token: token.into(),
            csr: csr(key),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let inbound = ConfigStreamClient::new(channel)
        .stream(outbound)
        .await
        .unwrap()
        .into_inner();
    (tx, inbound)
}

fn csr(key: &rcgen::KeyPair) -> String {
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

/// The next certificate pushed on `inbound` (snapshots skipped), or the status that ended it.
async fn next_certificate(
    inbound: &mut tonic::Streaming<trellis_proto::v1::SnapshotPush>,
) -> Result<String, tonic::Status> {
    loop {
        let push = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .expect("a push within 10s")?
            .expect("the stream ended without a status");
        if let Some(identity) = push.identity {
            return Ok(identity.certificate_chain);
        }
    }
}

fn renew(key: &rcgen::KeyPair) -> trellis_proto::v1::ProxyMessage {
    trellis_proto::v1::ProxyMessage {
        kind: Some(trellis_proto::v1::proxy_message::Kind::Renew(
            trellis_proto::v1::Renew { csr: csr(key) },
        )),
    }
}

/// A certificate is renewed on the open stream for the key it certifies, with a new serial
/// number; a renewal for another key, or one sooner than 30 s after the last, ends the stream
/// with the reason (so a proxy and a control plane never loop issuing certificates).
#[tokio::test]
async fn renewals_keep_their_key_and_come_at_most_every_30s() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    apply(&control.url, MESH);
    let token = token(&control.url, &["--node", "default/front"]);
    let key = rcgen::KeyPair::generate().unwrap();

    let (tx, mut inbound) = scripted_stream(&control.url, &token, &key).await;
    let first = next_certificate(&mut inbound).await.unwrap();
    tx.send(renew(&key)).await.unwrap();
    let renewed = next_certificate(&mut inbound).await.unwrap();
    assert_ne!(
        first, renewed,
        "a new certificate, with its own serial number"
    );
    tx.send(renew(&key)).await.unwrap();
    let refused = next_certificate(&mut inbound).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    assert!(
        refused.message().contains("at most one every 30s"),
        "{refused}"
    );

    let (tx, mut inbound) = scripted_stream(&control.url, &token, &key).await;
    next_certificate(&mut inbound).await.unwrap();
    tx.send(renew(&rcgen::KeyPair::generate().unwrap()))
        .await
        .unwrap();
    let refused = next_certificate(&mut inbound).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("another key"), "{refused}");
}

/// Certificates shorter-lived than 10 minutes are refused at start, with the flag named.
#[tokio::test]
async fn a_workload_ttl_under_10_minutes_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(CONTROL)
        .kill_on_drop(true)
        .args([
            "--data-dir",
            data.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--workload-ttl",
            "4s",
        ])
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("trellis-control started with --workload-ttl 4s")
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--workload-ttl 4s: must be at least 10m"),
        "{}",
        stderr(&out)
    );
}

/// Join tokens are listed without their secret and revoked by id: a revoked token admits no
/// proxy.
#[tokio::test]
async fn join_tokens_are_listed_and_revoked() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    apply(&control.url, MESH);
    let secret = token(&control.url, &["--node", "default/front", "--uses", "3"]);
    let out = cli(&control.url, &["token", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list = stdout(&out);
    assert!(!list.contains(&secret), "{list}");
    let row = list.lines().find(|l| l.contains("default/front")).unwrap();
    assert!(row.ends_with(" 3"), "{row}");
    let id = row.split_whitespace().next().unwrap();
    let out = cli(&control.url, &["token", "revoke", id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::sidecar_with(
        proxy_bin(),
        &control.url,
        "default/front",
        dir.path(),
        &["--token", &secret],
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "a revoked token refused",
        || async {
            let logs = proxy.logs();
            if logs.contains("unknown or used-up join token") {
                Ok(())
            } else {
                Err(logs)
            }
        },
    )
    .await;
}

/// The store holds the CA's key: its directory is the control plane user's only (0700) and its
/// file too (0600), on a fresh data dir and on one found with looser modes (tightened).
#[tokio::test]
async fn the_store_holding_the_ca_key_is_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("fresh");
    let control = ControlProcess::start(CONTROL, &fresh).await;
    apply(&control.url, MESH);
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(mode(&fresh.join("registry.redb")), 0o600);

    let loose = tmp.path().join("loose");
    std::fs::create_dir(&loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(loose.join("registry.redb"), b"").unwrap();
    std::fs::set_permissions(
        loose.join("registry.redb"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let control = ControlProcess::start(CONTROL, &loose).await;
    apply(&control.url, MESH);
    assert_eq!(mode(&loose), 0o700);
    assert_eq!(mode(&loose.join("registry.redb")), 0o600);
    assert!(
        control.logs().contains("tightened the permissions"),
        "{}",
        control.logs()
    );
}
