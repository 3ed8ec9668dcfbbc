//! mTLS between sidecars (issue 12): a mesh's `spec.mtls`, the identities the mesh's CA issues,
//! and the mesh graph as authorization — real proxies, real TLS, and certificates the test mints
//! from the root it gave the control plane (for callers the mesh does not declare, and expired
//! ones).

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use http_body_util::BodyExt as _;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use trellis_testkit::{
    ProxyProcess, TcpEchoServer, TestServer, client::Client, eventually, process::ControlProcess,
};

use crate::{CONTROL, apply, cli, proxy_bin, stderr, stdout, wait_synced};

pub(crate) fn id(node: &str) -> String {
    format!("spiffe://trellis.local/ns/default/vn/{node}")
}

/// A root CA whose key the test holds: given to the control plane, and used to mint
/// certificates of the test's own.
pub(crate) struct Root {
    pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Root {
    pub(crate) fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let key_pem = key.serialize_pem();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let pem = params.self_signed(&key).unwrap().pem();
        let issuer = Issuer::from_ca_cert_pem(&pem, key).unwrap();
        Self {
            pem,
            key_pem,
            issuer,
        }
    }

    /// Writes the root's certificate and key into `dir`: the control plane's flags for them.
    pub(crate) fn flags(&self, dir: &Path) -> [String; 4] {
        let (cert, key) = (dir.join("root.pem"), dir.join("root-key.pem"));
        std::fs::write(&cert, &self.pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        [
            "--ca-cert".into(),
            cert.display().to_string(),
            "--ca-key".into(),
            key.display().to_string(),
        ]
    }

    /// A certificate naming `spiffe_id`, valid from `from` to `to` seconds from now.
    pub(crate) fn leaf(
        &self,
        spiffe_id: &str,
        (from, to): (i64, i64),
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
        // An empty subject, as the mesh's CA issues: rcgen's default is the root's own name,
        // which BoringSSL (Envoy) takes for a self-signed certificate.
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(to);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (vec![cert.der().clone()], key)
    }
}

/// Takes whatever certificate the server shows: these tests look at what the server does with
/// the client's.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS connection to `addr` presenting `cert` (none: no client certificate).
pub(crate) async fn tls_connect(
    addr: SocketAddr,
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    if !alpn.is_empty() {
        config.alpn_protocols = vec![alpn.to_vec()];
    }
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("mesh.invalid").unwrap(), tcp)
        .await?;
    // TLS 1.3: the server judges the client's certificate after the client's side of the
    // handshake is done; a refusal arrives with the first read.
    tls.flush().await?;
    Ok(tls)
}

/// A GET over TLS to a sidecar's ingress presenting `cert`: status, `x-trellis-error` and the
/// `x-forwarded-client-cert` the app saw; an error when the connection is refused.
pub(crate) async fn tls_get(
    addr: SocketAddr,
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<(u16, Option<String>, Option<String>), String> {
    let tls = tls_connect(addr, cert, b"http/1.1")
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", "blue.default")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let out = (
        resp.status().as_u16(),
        header("x-trellis-error"),
        header("x-seen-client-cert"),
    );
    let _ = resp.into_body().collect().await;
    Ok(out)
}

/// A mesh of `mode` (flow YAML for the Mesh's spec): node `blue` (HTTP/1.1), `h2` (HTTP/2) and
/// `db` (TCP), each with a VirtualService of its name, found in the registry; `front` declares
/// the three as backends, `stranger` declares none.
pub(crate) fn mesh(mesh_spec: &str, blue: u16, h2: u16, db: u16) -> String {
    let api = "apiVersion: mesh.trellis.dev/v1beta1";
    let node = |name: &str, port: u16, protocol: &str| {
        format!(
            "{api}\nkind: VirtualNode\nmetadata: {{ name: {name} }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: {port}, protocol: {protocol} }} }}]\n  \
             serviceDiscovery: {{ registry: {{ namespaceName: test, serviceName: {name} }} }}\n---\n\
             {api}\nkind: VirtualService\nmetadata: {{ name: {name} }}\nspec:\n  \
             provider: {{ virtualNode: {{ virtualNodeRef: {{ name: {name} }} }} }}\n---\n"
        )
    };
    format!(
        "{api}\nkind: Mesh\nmetadata: {{ name: m }}\nspec: {mesh_spec}\n---\n{}{}{}\
         {api}\nkind: VirtualNode\nmetadata: {{ name: front }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: 1, protocol: http }} }}]\n  backends:\n{}---\n\
         {api}\nkind: VirtualNode\nmetadata: {{ name: stranger }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: 1, protocol: http }} }}]\n",
        node("blue", blue, "http"),
        node("h2", h2, "http2"),
        node("db", db, "tcp"),
        ["blue", "h2", "db"]
            .map(|b| format!("    - virtualService: {{ virtualServiceRef: {{ name: {b} }} }}\n"))
            .concat(),
    )
}

fn register(server: &str, service: &str, id: &str, addr: SocketAddr) {
    crate::register_instance(server, ("test", service), id, addr, &[]);
}

/// A sidecar for `default/NODE` with a join token (`token: false`: without one).
pub(crate) async fn sidecar(server: &str, node: &str, dir: &Path, token: bool) -> ProxyProcess {
    let node = format!("default/{node}");
    if !token {
        return ProxyProcess::sidecar(proxy_bin(), server, &node, dir).await;
    }
    let out = cli(server, &["token", "create", "--node", &node]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_string();
    ProxyProcess::sidecar_with(proxy_bin(), server, &node, dir, &["--token", &token]).await
}

/// Waits until the proxy holds its workload certificate.
pub(crate) async fn wait_identity(proxy: &ProxyProcess) {
    eventually(
        Duration::from_secs(10),
        "a workload certificate",
        || async {
            let (_, dump) = proxy.admin("/config_dump").await;
            let dump: serde_json::Value = serde_json::from_str(&dump).map_err(|e| e.to_string())?;
            if dump["identity"].is_string() {
                Ok(())
            } else {
                Err(proxy.logs())
            }
        },
    )
    .await;
}

/// Reads a CONNECT response head and the first line after it.
pub(crate) async fn connect_through(egress: SocketAddr, authority: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(egress).await.unwrap();
    let connect = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    s.write_all(connect.as_bytes()).await.unwrap();
    let mut reader = tokio::io::BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        head.push_str(&line);
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    let mut first = String::new();
    let _ = reader.read_line(&mut first).await;
    (head, first)
}

/// Under STRICT every hop between sidecars is mTLS — HTTP/1.1, HTTP/2 and TCP —, the app sees its
/// caller's verified identity (never one a client wrote), and an ingress refuses plaintext,
/// callers the mesh graph does not declare (403 `unauthorized`; TCP: closed), expired
/// certificates, and a client refuses a server proving another node's identity.
#[tokio::test]
async fn strict_mtls_carries_identities_and_the_mesh_graph_authorizes() {
    let root = Root::new();
    let data = tempfile::tempdir().unwrap();
    let flags = root.flags(data.path());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let control = ControlProcess::start_with(CONTROL, data.path(), "127.0.0.1:0", &flags).await;
    let url = control.url.clone();
    let (blue_app, h2_app, db_app) = (
        TestServer::start("blue").await,
        TestServer::start("h2").await,
        TcpEchoServer::start("db").await,
    );
    let yaml = mesh(
        "{ mtls: STRICT }",
        blue_app.addr.port(),
        h2_app.addr.port(),
        db_app.addr.port(),
    );
    apply(&url, &yaml);
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let front = sidecar(&url, "front", dirs[0].path(), true).await;
    let blue = sidecar(&url, "blue", dirs[1].path(), true).await;
    let h2 = sidecar(&url, "h2", dirs[2].path(), true).await;
    let db = sidecar(&url, "db", dirs[3].path(), true).await;
    register(&url, "blue", "blue-1", blue.ingress);
    register(&url, "h2", "h2-1", h2.ingress);
    register(&url, "db", "db-1", db.ingress);
    wait_synced(&url, 4).await;
    for p in [&front, &blue, &h2, &db] {
        wait_identity(p).await;
    }

    // HTTP/1.1: the app sees who called, as its sidecar verified it; a header the client
    // wrote is replaced.
    let mut c = Client::h1(front.egress).await.unwrap();
    let req = http::Request::get("http://blue.default/")
        .header("host", "blue.default")
        .header("x-forwarded-client-cert", "URI=spiffe://evil/ns/x/vn/y")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "blue".to_string()));
    let seen = format!("By={};URI={}", id("blue"), id("front"));
    assert_eq!(r.header("x-seen-client-cert"), Some(seen.as_str()));
    // HTTP/2 to the app of an http2 listener, over mTLS (ALPN h2).
    let r = c.get("h2.default", "/").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "h2".to_string()));
    let seen_h2 = format!("By={};URI={}", id("h2"), id("front"));
    assert_eq!(r.header("x-seen-client-cert"), Some(seen_h2.as_str()));
    // TCP (CONNECT to the tcp node's service), over mTLS.
    let (head, greeting) =
        connect_through(front.egress, &format!("db.default:{}", db_app.addr.port())).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(greeting, "db\n");

    // Plaintext to a STRICT ingress: closed before any HTTP.
    let plain = async {
        let mut c = Client::h1(blue.ingress).await?;
        c.get("blue.default", "/").await
    };
    assert!(plain.await.is_err(), "plaintext answered");
    // Counted once the proxy's side of the handshake ends (the client may see the close first).
    eventually(
        Duration::from_secs(10),
        "the failed handshake counted",
        || async {
            let failed = blue
                .metric(
                    "trellis_proxy_tls_handshake_failures_total",
                    &[("listener", "ingress")],
                )
                .await;
            if failed >= 1.0 {
                Ok(())
            } else {
                Err(format!("{failed}"))
            }
        },
    )
    .await;
    // No client certificate: refused.
    assert!(tls_get(blue.ingress, None).await.is_err());

    // Certificates the test mints from the mesh's root: front's identity is admitted (the
    // mesh graph declares it), a node that declares no backend reaching blue gets 403, an
    // expired certificate is refused at the handshake.
    let (status, _, seen_by_app) = tls_get(blue.ingress, Some(root.leaf(&id("front"), (-60, 600))))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(seen_by_app.as_deref(), Some(seen.as_str()));
    let stranger = tls_get(blue.ingress, Some(root.leaf(&id("stranger"), (-60, 600))))
        .await
        .unwrap();
    assert_eq!(stranger, (403, Some("unauthorized".into()), None));
    assert_eq!(
        blue.metric(
            "trellis_proxy_unauthorized_total",
            &[("listener", "ingress"), ("source", &id("stranger"))]
        )
        .await,
        1.0
    );
    let expired = tls_get(blue.ingress, Some(root.leaf(&id("front"), (-7200, -3600)))).await;
    assert!(expired.is_err(), "an expired certificate: {expired:?}");

    // Callers outside the graph the node allows itself: a node, and a workload that is no mesh
    // resource, by its SPIFFE ID.
    let ops = "spiffe://trellis.local/ns/ops/vn/debug";
    let allowing = yaml.replace(
        "serviceName: blue } }\n",
        &format!(
            "serviceName: blue }} }}\n  allowedCallers: [{{ virtualNodeRef: {{ name: stranger }} }}, {{ spiffeId: \"{ops}\" }}]\n"
        ),
    );
    assert_ne!(allowing, yaml);
    apply(&url, &allowing);
    eventually(
        Duration::from_secs(10),
        "the allowed caller admitted",
        || async {
            match tls_get(blue.ingress, Some(root.leaf(&id("stranger"), (-60, 600)))).await {
                Ok((200, _, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let (status, _, _) = tls_get(blue.ingress, Some(root.leaf(ops, (-60, 600))))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, _, _) = tls_get(
        blue.ingress,
        Some(root.leaf("spiffe://trellis.local/ns/ops/vn/other", (-60, 600))),
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "only the allowed ones");
    apply(&url, &yaml);
    // TCP: a caller the graph does not declare is closed without a byte of the app's.
    let mut tls = tls_connect(
        db.ingress,
        Some(root.leaf(&id("stranger"), (-60, 600))),
        b"",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let read = tls.read_to_end(&mut buf).await;
    assert!(
        buf.is_empty(),
        "the app answered: {:?} {read:?}",
        String::from_utf8_lossy(&buf)
    );

    // The only instance of blue's service now is h2's sidecar: it proves h2's identity, not
    // blue's, and the caller refuses it.
    let out = cli(
        &url,
        &[
            "instances",
            "deregister",
            "--namespace",
            "test",
            "--service",
            "blue",
            "--id",
            "blue-1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    register(&url, "blue", "impostor", h2.ingress);
    eventually(
        Duration::from_secs(10),
        "another node's certificate refused",
        || async {
            let mut c = Client::h1(front.egress).await.map_err(|e| e.to_string())?;
            let r = c
                .get("blue.default", "/")
                .await
                .map_err(|e| e.to_string())?;
            match (r.status.as_u16(), r.header("x-trellis-error")) {
                (503, Some("tls_failure")) => Ok(()),
                other => Err(format!("{other:?} {}", r.text())),
            }
        },
    )
    .await;
    assert_eq!(h2_app.requests(), 1, "the impostor's app was never reached");

    // A revoked identity (`trellis identity revoke`): sidecars refuse its certificates issued
    // before the revocation (the CA backdates notBefore by 5 minutes: one from 10 minutes ago
    // was issued before), not one issued after.
    let (status, _, _) = tls_get(blue.ingress, Some(root.leaf(&id("front"), (-600, 600))))
        .await
        .unwrap();
    assert_eq!(status, 200, "not revoked yet");
    let out = cli(&url, &["identity", "revoke", "--node", "default/front"]);
    assert!(out.status.success(), "{}", stderr(&out));
    eventually(
        Duration::from_secs(10),
        "the revocation reaches blue",
        || async {
            match tls_get(blue.ingress, Some(root.leaf(&id("front"), (-600, 600)))).await {
                Err(_) => Ok(()),
                Ok(answer) => Err(format!("{answer:?}")),
            }
        },
    )
    .await;
    // One issued after the revocation (notBefore a minute ago: issued 4 minutes from now, as
    // the CA counts) is not revoked.
    let (status, _, _) = tls_get(blue.ingress, Some(root.leaf(&id("front"), (-60, 600))))
        .await
        .unwrap();
    assert_eq!(status, 200, "a certificate issued after the revocation");
}

/// PERMISSIVE: sidecars with identities call each other over mTLS, a sidecar without one calls
/// in plaintext, and the ingress takes both (and callers without a sidecar), authorizing nobody
/// by identity.
#[tokio::test]
async fn permissive_takes_mtls_and_plaintext() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let blue_app = TestServer::start("blue").await;
    let db_app = TcpEchoServer::start("db").await;
    apply(
        &url,
        &mesh(
            "{ mtls: PERMISSIVE }",
            blue_app.addr.port(),
            1,
            db_app.addr.port(),
        ),
    );
    let (d1, d2, d3, d4) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let front = sidecar(&url, "front", d1.path(), true).await;
    let blue = sidecar(&url, "blue", d2.path(), true).await;
    let db = sidecar(&url, "db", d4.path(), true).await;
    register(&url, "blue", "blue-1", blue.ingress);
    wait_synced(&url, 3).await;

    // A plaintext client of a protocol whose server speaks first (it sends nothing): taken for
    // plaintext after a short wait, and greeted.
    let plain = tokio::net::TcpStream::connect(db.ingress).await.unwrap();
    let mut reader = tokio::io::BufReader::new(plain);
    let mut greeting = String::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut greeting))
        .await
        .expect("the server's greeting")
        .unwrap();
    assert_eq!(greeting, "db\n");
    wait_identity(&front).await;
    wait_identity(&blue).await;

    let mut c = Client::h1(front.egress).await.unwrap();
    let r = c.get("blue.default", "/").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "blue".to_string()));
    let seen = format!("By={};URI={}", id("blue"), id("front"));
    assert_eq!(r.header("x-seen-client-cert"), Some(seen.as_str()), "mTLS");

    // A caller without a sidecar, in plaintext.
    let mut c = Client::h1(blue.ingress).await.unwrap();
    let r = c.get("blue.default", "/").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "blue".to_string()));
    assert_eq!(r.header("x-seen-client-cert"), None);

    // A sidecar without an identity (no token) calls in plaintext rather than not at all.
    let mut front = front;
    front.kill().await;
    let plain_front = sidecar(&url, "front", d3.path(), false).await;
    wait_synced(&url, 3).await;
    let mut c = Client::h1(plain_front.egress).await.unwrap();
    let r = c.get("blue.default", "/").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "blue".to_string()));
    assert_eq!(r.header("x-seen-client-cert"), None, "plaintext");
}

/// Under STRICT, gRPC (with the node's gRPC health check probing through the sidecar over mTLS),
/// WebSocket and a gateway's traffic work, each caller known by its identity: the gateway's is
/// `/vg/`, admitted because it routes to the node.
#[tokio::test]
async fn grpc_websocket_health_checks_and_gateways_over_strict_mtls() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    use trellis_testkit::{WsEchoServer, grpc};

    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let (rpc_app, ws_app, web_app) = (
        grpc::GrpcServer::start("rpc").await,
        WsEchoServer::start("ws").await,
        TestServer::start("web").await,
    );
    let edge = trellis_testkit::free_port();
    let api = "apiVersion: mesh.trellis.dev/v1beta1";
    let node = |name: &str, port: u16, protocol: &str, extra: &str| {
        format!(
            "{api}\nkind: VirtualNode\nmetadata: {{ name: {name} }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: {port}, protocol: {protocol} }}{extra} }}]\n  \
             serviceDiscovery: {{ registry: {{ namespaceName: test, serviceName: {name} }} }}\n---\n\
             {api}\nkind: VirtualService\nmetadata: {{ name: {name} }}\nspec:\n  \
             provider: {{ virtualNode: {{ virtualNodeRef: {{ name: {name} }} }} }}\n---\n"
        )
    };
    let yaml = format!(
        "{api}\nkind: Mesh\nmetadata: {{ name: m }}\nspec: {{ mtls: STRICT }}\n---\n{}{}{}\
         {api}\nkind: VirtualNode\nmetadata: {{ name: front }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: 1, protocol: http }} }}]\n  backends:\n    \
         - virtualService: {{ virtualServiceRef: {{ name: rpc }} }}\n    \
         - virtualService: {{ virtualServiceRef: {{ name: ws }} }}\n---\n\
         {api}\nkind: VirtualGateway\nmetadata: {{ name: gw }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: {edge}, protocol: http }} }}]\n---\n\
         {api}\nkind: GatewayRoute\nmetadata: {{ name: to-web }}\nspec:\n  \
         httpRoute:\n    match: {{ prefix: / }}\n    \
         action: {{ target: {{ virtualService: {{ virtualServiceRef: {{ name: web }} }} }} }}\n",
        node(
            "rpc",
            rpc_app.addr.port(),
            "grpc",
            ", healthCheck: { protocol: grpc, healthyThreshold: 2, unhealthyThreshold: 2, \
             intervalMillis: 5000, timeoutMillis: 2000 }"
        ),
        node("ws", ws_app.addr.port(), "http", ""),
        node("web", web_app.addr.port(), "http", ""),
    );
    apply(&url, &yaml);
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let front = sidecar(&url, "front", dirs[0].path(), true).await;
    let rpc = sidecar(&url, "rpc", dirs[1].path(), true).await;
    let ws = sidecar(&url, "ws", dirs[2].path(), true).await;
    let web = sidecar(&url, "web", dirs[3].path(), true).await;
    let out = cli(
        &url,
        &["token", "create", "--node", "default/gw", "--gateway"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let gw_token = stdout(&out).trim().to_string();
    let gw = ProxyProcess::gateway_with(
        proxy_bin(),
        &url,
        "default/gw",
        dirs[4].path(),
        &["--token", &gw_token],
    )
    .await;
    register(&url, "rpc", "rpc-1", rpc.ingress);
    register(&url, "ws", "ws-1", ws.ingress);
    register(&url, "web", "web-1", web.ingress);
    wait_synced(&url, 5).await;
    for p in [&front, &rpc, &ws, &web, &gw] {
        wait_identity(p).await;
    }

    // The health check probes reach the app through its sidecar, over mTLS.
    eventually(
        Duration::from_secs(10),
        "health probes answered",
        || async {
            let ok = front
                .metric(
                    "trellis_proxy_health_checks_total",
                    &[("cluster", "default/rpc"), ("result", "success")],
                )
                .await;
            if ok >= 1.0 && rpc_app.health_checks() >= 1 {
                Ok(())
            } else {
                Err(format!("{ok} successes\n{}", front.logs()))
            }
        },
    )
    .await;
    let mut client = grpc::client_via(front.egress, "rpc.default").await.unwrap();
    let reply = client
        .unary(grpc::EchoRequest {
            message: "hi".into(),
        })
        .await
        .unwrap();
    let reply = reply.into_inner();
    assert_eq!(
        (reply.message.as_str(), reply.server.as_str()),
        ("hi", "rpc")
    );

    let stream = tokio::net::TcpStream::connect(front.egress).await.unwrap();
    let (mut socket, resp) = tokio_tungstenite::client_async("ws://ws.default/chat", stream)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    socket.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap(),
        Message::text("ws:hello")
    );
    socket.close(None).await.unwrap();

    let edge_addr = gw.listener_addr(&format!("gateway:{edge}")).await;
    let mut c = Client::h1(edge_addr).await.unwrap();
    let r = c.get("anything.example", "/").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "web".to_string()));
    let seen = format!(
        "By={};URI=spiffe://trellis.local/ns/default/vg/gw",
        id("web")
    );
    assert_eq!(r.header("x-seen-client-cert"), Some(seen.as_str()));
}

/// A certificate for `names` (DNS SANs) from `root`, written as `NAME_cert_chain.pem` and
/// `NAME_key.pem` in `dir`: App Mesh's walkthrough layout.
fn write_cert(root: &Root, dir: &Path, file: &str, names: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    // Not rcgen's default subject, the root's own: BoringSSL (Envoy) takes that for self-signed.
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &root.issuer).unwrap();
    let chain = dir.join(format!("{file}_cert_chain.pem"));
    let key_file = dir.join(format!("{file}_key.pem"));
    std::fs::write(&chain, format!("{}{}", cert.pem(), root.pem)).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    (chain.display().to_string(), key_file.display().to_string())
}

/// The files of App Mesh's mutual-TLS walkthrough: a CA, the colorteller's (blue's) and front's
/// certificates from it, and the mesh using them.
pub(crate) struct AppMeshTls {
    pub(crate) certs: tempfile::TempDir,
    pub(crate) ca: Root,
    pub(crate) other_ca: Root,
    ca_file: String,
    pub(crate) blue: (String, String),
    pub(crate) front: (String, String),
}

impl AppMeshTls {
    pub(crate) fn new() -> Self {
        let certs = tempfile::tempdir().unwrap();
        let (ca, other_ca) = (Root::new(), Root::new());
        let ca_file = certs.path().join("ca_1_cert.pem");
        std::fs::write(&ca_file, &ca.pem).unwrap();
        let ca_file = ca_file.display().to_string();
        let blue = write_cert(
            &ca,
            certs.path(),
            "colorteller",
            &["colorteller.howto.svc.cluster.local"],
        );
        let front = write_cert(
            &ca,
            certs.path(),
            "front",
            &["front.howto.svc.cluster.local"],
        );
        Self {
            certs,
            ca,
            other_ca,
            ca_file,
            blue,
            front,
        }
    }

    /// The mesh, as App Mesh's API group writes it: blue's listener (the app on `port`) serves
    /// its certificate and requires front's; front's client policy presents it and expects
    /// `server_name` on the server's.
    pub(crate) fn yaml(&self, port: u16, server_name: &str) -> String {
        let api = "apiVersion: appmesh.k8s.aws/v1beta2";
        let ((blue_chain, blue_key), (front_chain, front_key)) = (&self.blue, &self.front);
        let ca_file = &self.ca_file;
        format!(
            "{api}\nkind: Mesh\nmetadata: {{ name: howto }}\nspec: {{}}\n---\n\
             {api}\nkind: VirtualNode\nmetadata: {{ name: blue, namespace: howto }}\nspec:\n  \
             listeners:\n    - portMapping: {{ port: {port}, protocol: http }}\n      tls:\n        \
             mode: STRICT\n        certificate:\n          file:\n            \
             certificateChain: {blue_chain}\n            privateKey: {blue_key}\n        \
             validation:\n          trust:\n            file:\n              \
             certificateChain: {ca_file}\n          subjectAlternativeNames:\n            \
             match:\n              exact: [front.howto.svc.cluster.local]\n  \
             serviceDiscovery:\n    awsCloudMap: {{ namespaceName: howto, serviceName: color }}\n---\n\
             {api}\nkind: VirtualService\nmetadata: {{ name: color, namespace: howto }}\nspec:\n  \
             provider: {{ virtualNode: {{ virtualNodeRef: {{ name: blue }} }} }}\n---\n\
             {api}\nkind: VirtualNode\nmetadata: {{ name: front, namespace: howto }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: 1, protocol: http }} }}]\n  \
             backends: [{{ virtualService: {{ virtualServiceRef: {{ name: color }} }} }}]\n  \
             backendDefaults:\n    clientPolicy:\n      tls:\n        enforce: true\n        \
             certificate:\n          file:\n            certificateChain: {front_chain}\n            \
             privateKey: {front_key}\n        validation:\n          trust:\n            \
             file: {{ certificateChain: {ca_file} }}\n          subjectAlternativeNames:\n            \
             match: {{ exact: [{server_name}] }}\n",
        )
    }

    /// A certificate chain and key read from PEM files.
    pub(crate) fn pem_pair(
        chain: &str,
        key: &str,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        use rustls::pki_types::pem::PemObject as _;
        let chain = CertificateDer::pem_file_iter(chain)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        (chain, PrivateKeyDer::from_pem_file(key).unwrap())
    }

    /// Certificates blue's listener must refuse: another CA's for front's name, and this CA's
    /// for another name.
    pub(crate) fn intruders(&self) -> [(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>); 2] {
        let (c2, k2) = write_cert(
            &self.other_ca,
            self.certs.path(),
            "intruder",
            &["front.howto.svc.cluster.local"],
        );
        let (c3, k3) = write_cert(
            &self.ca,
            self.certs.path(),
            "other",
            &["other.howto.svc.cluster.local"],
        );
        [Self::pem_pair(&c2, &k2), Self::pem_pair(&c3, &k3)]
    }
}

/// App Mesh's TLS fields, as its mutual-TLS walkthrough writes them (file certificates, a CA
/// file, SAN matches), applied with App Mesh's API group: the colorteller's listener serves its
/// certificate and requires front's, front's client policy presents it and checks the server's
/// name; plaintext, another CA's or another name's certificates are refused, and a client
/// policy expecting another name fails the calls.
#[tokio::test]
async fn app_mesh_tls_fields_run_as_app_mesh_documented() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let app = TestServer::start("blue").await;
    let files = AppMeshTls::new();
    let yaml = |server_name: &str| files.yaml(app.addr.port(), server_name);
    apply(&url, &yaml("colorteller.howto.svc.cluster.local"));
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let front = ProxyProcess::sidecar(proxy_bin(), &url, "howto/front", d1.path()).await;
    let blue = ProxyProcess::sidecar(proxy_bin(), &url, "howto/blue", d2.path()).await;
    crate::register_instance(&url, ("howto", "color"), "blue-1", blue.ingress, &[]);
    wait_synced(&url, 2).await;

    let mut c = Client::h1(front.egress).await.unwrap();
    let r = c.get("color.howto", "/").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (200, "blue".to_string()),
        "{:?}\n{}",
        r.header("x-trellis-error"),
        front.logs()
    );

    // The listener: plaintext, no certificate, another CA's, another name's: refused.
    let plain = async {
        let mut c = Client::h1(blue.ingress).await?;
        c.get("color.howto", "/").await
    };
    assert!(plain.await.is_err(), "plaintext answered");
    assert!(tls_get(blue.ingress, None).await.is_err());
    let (ok, _, _) = tls_get(
        blue.ingress,
        Some(AppMeshTls::pem_pair(&files.front.0, &files.front.1)),
    )
    .await
    .unwrap();
    assert_eq!(ok, 200, "front's certificate is admitted");
    for intruder in files.intruders() {
        assert!(tls_get(blue.ingress, Some(intruder)).await.is_err());
    }

    // A client policy expecting another server name: the caller refuses blue's certificate.
    apply(&url, &yaml("teal.howto.svc.cluster.local"));
    eventually(
        Duration::from_secs(10),
        "the server's name checked",
        || async {
            let mut c = Client::h1(front.egress).await.map_err(|e| e.to_string())?;
            let r = c.get("color.howto", "/").await.map_err(|e| e.to_string())?;
            match (r.status.as_u16(), r.header("x-trellis-error")) {
                (503, Some("tls_failure")) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // A certificate file the proxy cannot read: its snapshot is refused with the field named,
    // and it keeps running the one it has.
    let missing = yaml("colorteller.howto.svc.cluster.local")
        .replace(&files.front.0, "/nonexistent/front_cert_chain.pem");
    apply(&url, &missing);
    eventually(Duration::from_secs(10), "the NACK", || async {
        let out = cli(&url, &["status", "-o", "json"]);
        let text = stdout(&out);
        if text.contains("/nonexistent/front_cert_chain.pem") {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
}

/// A root rotation under continuous load fails no request: the new root joins every proxy's
/// trust bundle first, signs only once every proxy trusts it (its certificates renewed then,
/// under load), and the old root leaves once every proxy has a certificate from the new one.
/// Blue's sidecar closes idle connections quickly, so new mTLS handshakes keep happening.
#[tokio::test]
async fn a_root_rotation_under_load_fails_no_request() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    let url = control.url.clone();
    let blue_app = TestServer::start("blue").await;
    apply(&url, &mesh("{ mtls: STRICT }", blue_app.addr.port(), 1, 2));
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let front = sidecar(&url, "front", d1.path(), true).await;
    let token = {
        let out = cli(&url, &["token", "create", "--node", "default/blue"]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().to_string()
    };
    let blue = ProxyProcess::sidecar_with(
        proxy_bin(),
        &url,
        "default/blue",
        d2.path(),
        &["--token", &token, "--idle-timeout", "50ms"],
    )
    .await;
    register(&url, "blue", "blue-1", blue.ingress);
    wait_synced(&url, 2).await;
    wait_identity(&front).await;
    wait_identity(&blue).await;
    let ca = |args: &[&str]| {
        let mut all = vec!["ca"];
        all.extend(args);
        cli(&url, &all)
    };
    let status = || -> serde_json::Value {
        let out = ca(&["status", "-o", "json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let old_root = status()["rotation"]["current"]
        .as_str()
        .unwrap()
        .to_string();

    // Load: one request after another, with pauses past blue's idle timeout now and then.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let egress = front.egress;
    let load = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                i += 1;
                let answer = async {
                    let mut c = Client::h1(egress).await?;
                    c.get("blue.default", "/").await
                };
                match answer.await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => failed.push(format!("{} {:?}", r.status, r.header("x-trellis-error"))),
                    Err(e) => failed.push(e.to_string()),
                }
                if i.is_multiple_of(2) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            (ok, failed)
        }
    });

    let out = ca(&["rotate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let next = status()["rotation"]["next"].as_str().unwrap().to_string();
    assert_ne!(next, old_root);
    // Every proxy trusts both roots before the new one signs anything.
    eventually(
        Duration::from_secs(15),
        "both roots in every bundle",
        || async {
            for dir in [d1.path(), d2.path()] {
                let bundle =
                    std::fs::read_to_string(dir.join("identity/bundle.pem")).unwrap_or_default();
                if bundle.matches("BEGIN CERTIFICATE").count() != 2 {
                    return Err(bundle);
                }
            }
            Ok(())
        },
    )
    .await;
    // Promoting waits for every proxy to trust the new root.
    eventually(Duration::from_secs(15), "the new root promoted", || async {
        let out = ca(&["promote"]);
        if out.status.success() {
            Ok(())
        } else {
            Err(stderr(&out))
        }
    })
    .await;
    // Every proxy gets a certificate from it, under load.
    eventually(
        Duration::from_secs(15),
        "certificates from the new root",
        || async {
            let s = status();
            let proxies = s["proxies"].as_array().cloned().unwrap_or_default();
            if proxies.len() == 2
                && proxies
                    .iter()
                    .all(|p| p["certificateRoot"] == next.as_str())
            {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    let out = ca(&["finish"]);
    assert!(out.status.success(), "{}", stderr(&out));
    eventually(
        Duration::from_secs(15),
        "bundles without the old root",
        || async {
            let s = status();
            let proxies = s["proxies"].as_array().cloned().unwrap_or_default();
            let only_new = serde_json::json!([next]);
            if proxies.len() == 2 && proxies.iter().all(|p| p["trustRoots"] == only_new) {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    // More handshakes after the old root is gone.
    let before = blue_app.requests();
    eventually(
        Duration::from_secs(10),
        "more requests after the rotation",
        || async {
            if blue_app.requests() >= before + 20 {
                Ok(())
            } else {
                Err(format!("{}", blue_app.requests()))
            }
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed of {}: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );
    assert!(ok >= 20, "only {ok} requests");
    // And the proxies keep only the new root.
    for dir in [d1.path(), d2.path()] {
        let bundle = std::fs::read_to_string(dir.join("identity/bundle.pem")).unwrap();
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1, "{bundle}");
    }
}
