//! mTLS between sidecars (issue 12): the proxy's credentials — its workload certificate and key
//! and the trust bundle, swapped whole when renewed or rotated —, the server side (a client
//! certificate is required and verified against the bundle) and the client side (the server's
//! certificate verified against the bundle and held to the SPIFFE IDs the cluster expects), and
//! the SPIFFE ID of a verified peer. Handshakes read the credentials in use when they start, so
//! a renewal fails no connection.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use arc_swap::ArcSwapOption;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, ServerConfig,
    SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// ALPN: HTTP/2 first, HTTP/1.1 else.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];
/// What a client offers for one protocol (its listener's server tells HTTP/1.1 and HTTP/2
/// apart by the preface anyway).
pub const ALPN_H2: &[&[u8]] = &[b"h2"];
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];
pub const ALPN_NONE: &[&[u8]] = &[];
/// A TLS handshake's first byte: a handshake record.
const HANDSHAKE_RECORD: u8 = 0x16;
/// How long a PERMISSIVE listener waits for a client's first byte before taking it for a
/// plaintext one (whose protocol has the server speak first).
const PEEK_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// What a handshake uses: the certificate and key, the roots, and a client verifier for them.
struct Loaded {
    certified: Arc<CertifiedKey>,
    roots: Vec<CertificateDer<'static>>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    spiffe_id: String,
}

/// The proxy's credentials, once it has a certificate.
#[derive(Default)]
pub struct Credentials {
    current: ArcSwapOption<Loaded>,
    /// The server side, built once so its session cache lasts (resumed handshakes).
    server: std::sync::OnceLock<Arc<ServerConfig>>,
    /// Revoked identities: certificates naming one with a notBefore at or before this (Unix
    /// seconds) are refused, on either side of a handshake.
    revoked: arc_swap::ArcSwap<std::collections::HashMap<String, i64>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("spiffe_id", &self.spiffe_id())
            .finish()
    }
}

impl Credentials {
    /// Takes a certificate chain (leaf first), its key and the trust bundle, all PEM.
    pub fn set(&self, chain_pem: &str, key_pem: &str, bundle_pem: &str) -> Result<(), String> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("certificate chain: {e}"))?;
        let leaf = chain.first().ok_or("certificate chain: empty")?;
        let spiffe_id = spiffe_id(leaf).ok_or("certificate: no SPIFFE ID")?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("key: {e}"))?;
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("key: {e}"))?;
        let roots: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(bundle_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("trust bundle: {e}"))?;
        let mut store = RootCertStore::empty();
        for root in &roots {
            store
                .add(root.clone())
                .map_err(|e| format!("trust bundle: {e}"))?;
        }
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
                .build()
                .map_err(|e| format!("trust bundle: {e}"))?;
        self.current.store(Some(Arc::new(Loaded {
            certified: Arc::new(CertifiedKey::new(chain, signing)),
            roots,
            client_verifier,
            spiffe_id,
        })));
        Ok(())
    }

    /// The SPIFFE ID of the certificate in use.
    pub fn spiffe_id(&self) -> Option<String> {
        self.current.load().as_ref().map(|l| l.spiffe_id.clone())
    }

    /// The identities revoked now (a snapshot's list).
    pub fn set_revoked(&self, revoked: std::collections::HashMap<String, i64>) {
        self.revoked.store(Arc::new(revoked));
    }

    /// Refuses a peer certificate of a revoked identity.
    fn check_revoked(&self, cert: &CertificateDer<'_>) -> Result<(), Error> {
        let revoked = self.revoked.load();
        if revoked.is_empty() {
            return Ok(());
        }
        use x509_parser::prelude::{FromDer as _, X509Certificate};
        let Some(id) = spiffe_id(cert) else {
            return Ok(());
        };
        let Some(until) = revoked.get(&id) else {
            return Ok(());
        };
        let not_before = X509Certificate::from_der(cert)
            .map(|(_, c)| c.validity().not_before.timestamp())
            .unwrap_or(i64::MIN);
        if not_before <= *until {
            return Err(Error::General(format!(
                "the certificate of {id} is revoked"
            )));
        }
        Ok(())
    }

    /// Verifies a peer's chain (leaf first) against the trust bundle in use, for `usage`.
    fn verify_chain(
        &self,
        chain: &[CertificateDer<'_>],
        usage: webpki::KeyUsage,
    ) -> Result<(), Error> {
        let loaded = self
            .current
            .load_full()
            .ok_or_else(|| Error::General("no workload certificate yet".into()))?;
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| Error::General("no certificate".into()))?;
        chains_to(&loaded.roots, leaf, intermediates, UnixTime::now(), usage)
    }

    /// Whether a certificate is in use.
    pub fn is_set(&self) -> bool {
        self.current.load().is_some()
    }

    /// The server side of mTLS listeners (one for all, with one session cache): a client
    /// certificate from the bundle's roots is required.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, Error> {
        if let Some(config) = self.server.get() {
            return Ok(config.clone());
        }
        let config = self.new_server_config()?;
        Ok(self.server.get_or_init(|| config).clone())
    }

    fn new_server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, Error> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(PeerVerifier(self.clone())))
            .with_cert_resolver(Arc::new(OwnCertificate(self.clone())));
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// The client side toward servers that must prove one of `expected` SPIFFE IDs, offering
    /// `alpn`: mesh mTLS, with the workload certificate and the trust bundle.
    pub fn client_config(
        self: &Arc<Self>,
        expected: Vec<String>,
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, Error> {
        self.client_config_for(Roots::Bundle, expected, ClientCert::Workload, alpn)
    }

    /// The client side: servers' certificates chain to `roots` and carry one of `expected`
    /// (empty: any), this proxy presents `cert`, offering `alpn`.
    pub fn client_config_for(
        self: &Arc<Self>,
        roots: Roots,
        expected: Vec<String>,
        cert: ClientCert,
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, Error> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier {
                credentials: self.clone(),
                roots,
                expected,
            }));
        let mut config = match cert {
            ClientCert::Workload => {
                builder.with_client_cert_resolver(Arc::new(OwnCertificate(self.clone())))
            }
            ClientCert::Fixed(key) => builder.with_client_cert_resolver(Arc::new(Fixed(key))),
            ClientCert::None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// The server side of a listener with its own TLS settings: it serves `cert` (None: the
    /// workload certificate) and, with `clients`, requires client certificates chaining to its
    /// roots and carrying one of its names (empty: any).
    pub fn server_config_for(
        self: &Arc<Self>,
        cert: Option<Arc<CertifiedKey>>,
        clients: Option<(Roots, Vec<String>)>,
    ) -> Result<Arc<ServerConfig>, Error> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match clients {
            None => builder.with_no_client_auth(),
            Some((roots, names)) => {
                let inner: Arc<dyn ClientCertVerifier> = match roots {
                    Roots::Bundle => Arc::new(PeerVerifier(self.clone())),
                    Roots::Fixed(roots) => {
                        let mut store = RootCertStore::empty();
                        for root in roots.iter() {
                            store.add(root.clone())?;
                        }
                        WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
                            .build()
                            .map_err(|e| Error::General(e.to_string()))?
                    }
                };
                builder.with_client_cert_verifier(Arc::new(NamedClients {
                    inner,
                    names,
                    credentials: self.clone(),
                }))
            }
        };
        let mut config = match cert {
            Some(key) => builder.with_cert_resolver(Arc::new(Fixed(key))),
            None => builder.with_cert_resolver(Arc::new(OwnCertificate(self.clone()))),
        };
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// The roots a peer's certificate must chain to.
#[derive(Debug, Clone)]
pub enum Roots {
    /// The mesh's trust bundle in use (it follows rotations).
    Bundle,
    /// Fixed roots (App Mesh's `trust.file`).
    Fixed(Arc<[CertificateDer<'static>]>),
}

/// The certificate a client presents.
#[derive(Debug, Clone)]
pub enum ClientCert {
    /// The workload certificate in use.
    Workload,
    /// A fixed one (App Mesh's `certificate.file`).
    Fixed(Arc<CertifiedKey>),
    None,
}

/// Reads a certificate chain and its key from PEM files.
pub fn load_certified_key(chain: &str, key: &str) -> Result<Arc<CertifiedKey>, String> {
    let chain_pem = std::fs::read(chain).map_err(|e| format!("{chain}: {e}"))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{chain}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{chain}: no certificate"));
    }
    let key_pem = std::fs::read(key).map_err(|e| format!("{key}: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| format!("{key}: {e}"))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("private key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(certs, signing)))
}

/// Reads roots from PEM files.
pub fn load_roots(files: &[String]) -> Result<Arc<[CertificateDer<'static>]>, String> {
    let mut roots = Vec::new();
    for file in files {
        let pem = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
        let before = roots.len();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots.push(cert.map_err(|e| format!("{file}: {e}"))?);
        }
        if roots.len() == before {
            return Err(format!("{file}: no certificate"));
        }
    }
    Ok(roots.into())
}

/// A fixed certificate, for either side.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Clients' certificates verified by `inner`, then held to carrying one of `names` (empty: any).
#[derive(Debug)]
struct NamedClients {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<String>,
    credentials: Arc<Credentials>,
}

impl ClientCertVerifier for NamedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.credentials.check_revoked(end_entity)?;
        if self.names.is_empty() || carries_one_of(end_entity, &self.names) {
            Ok(verified)
        } else {
            Err(Error::General(format!(
                "client certificate names none of {}",
                self.names.join(", ")
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether a certificate carries one of `names` among its subject alternative names (URIs and
/// DNS names, exact).
fn carries_one_of(cert: &CertificateDer<'_>, names: &[String]) -> bool {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(cert) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    // URIs against names with a scheme, DNS names against the others.
    san.value.general_names.iter().any(|n| match n {
        GeneralName::URI(u) => names.iter().any(|x| x.contains("://") && x == u),
        GeneralName::DNSName(d) => names
            .iter()
            .any(|x| !x.contains("://") && x.eq_ignore_ascii_case(d)),
        _ => false,
    })
}

/// mTLS toward a cluster's endpoints.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// The identities expected (joined) and whether plaintext is used without a certificate:
    /// part of the endpoint key.
    pub(crate) key: Arc<str>,
    pub(crate) config: Arc<ClientConfig>,
    credentials: Arc<Credentials>,
    plaintext_without_identity: bool,
    /// Servers are verified against the mesh's trust bundle.
    pub(crate) mesh_trust: bool,
}

impl UpstreamTls {
    /// `key` says everything that makes the client side what it is (an endpoint keeps its
    /// client side for its life: a change of any of it is another endpoint).
    pub(crate) fn new(
        key: String,
        config: Arc<ClientConfig>,
        credentials: Arc<Credentials>,
        plaintext_without_identity: bool,
        mesh_trust: bool,
    ) -> Self {
        Self {
            key: key.into(),
            config,
            credentials,
            plaintext_without_identity,
            mesh_trust,
        }
    }

    /// The client side to open connections with; None: plaintext (this proxy has no
    /// certificate and the cluster allows that).
    /// The proxy's credentials (for the checks of a resumed session).
    pub(crate) fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    pub(crate) fn client(&self) -> Option<&Arc<ClientConfig>> {
        (!self.plaintext_without_identity || self.credentials.is_set()).then_some(&self.config)
    }
}

/// A listener's TLS.
#[derive(Debug, Clone)]
pub struct ServerSide {
    pub mode: ServerMode,
    /// Clients are verified against the mesh's trust bundle: their SPIFFE IDs are the mesh's
    /// identities (not so with roots of the listener's own).
    pub mesh_trust: bool,
    /// Its own settings (App Mesh's listener `tls`); None: the mesh's — the workload
    /// certificate, client certificates from the trust bundle required — with one session cache
    /// for every such listener.
    pub config: Option<Arc<ServerConfig>>,
}

/// How a listener takes connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerMode {
    /// TLS only.
    Strict,
    /// TLS, or plaintext, told apart by the first byte.
    Permissive,
}

/// A connection, in plaintext or TLS (boxed: a TLS session's state is large and rare next to
/// plaintext's).
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s) => s.get_ref().0,
        }
    }

    /// The SPIFFE ID of the verified peer, on TLS.
    pub fn peer_identity(&self) -> Option<String> {
        let Self::Tls(s) = self else { return None };
        let certs = match &**s {
            tokio_rustls::TlsStream::Client(c) => c.get_ref().1.peer_certificates(),
            tokio_rustls::TlsStream::Server(c) => c.get_ref().1.peer_certificates(),
        }?;
        spiffe_id(certs.first()?)
    }

    /// Whether the session was resumed (a handshake without certificates), on TLS.
    pub fn resumed(&self) -> bool {
        let Self::Tls(s) = self else { return false };
        let kind = match &**s {
            tokio_rustls::TlsStream::Client(c) => c.get_ref().1.handshake_kind(),
            tokio_rustls::TlsStream::Server(c) => c.get_ref().1.handshake_kind(),
        };
        kind == Some(rustls::HandshakeKind::Resumed)
    }

    /// True when an idle connection can take another exchange: the peer has neither closed it
    /// nor sent anything unasked (TLS records that carry no data, such as session tickets, are
    /// taken in passing). Costs no system call unless the socket has become readable.
    pub fn is_idle_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self {
            Self::Plain(s) => match s.poll_read_ready(&mut cx) {
                Poll::Pending => true,
                Poll::Ready(Err(_)) => false,
                Poll::Ready(Ok(())) => {
                    let mut probe = [0u8; 1];
                    matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                }
            },
            Self::Tls(s) => {
                if s.get_ref().0.poll_read_ready(&mut cx).is_pending() {
                    return true;
                }
                let mut probe = [0u8; 1];
                let mut buf = tokio::io::ReadBuf::new(&mut probe);
                matches!(
                    Pin::new(&mut **s).poll_read(&mut cx, &mut buf),
                    Poll::Pending
                )
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// Takes an accepted connection's TLS handshake (under `Permissive`, only when the client's
/// first byte starts one), within `timeout`.
pub async fn accept(
    credentials: &Arc<Credentials>,
    side: &ServerSide,
    stream: TcpStream,
    timeout: std::time::Duration,
) -> std::io::Result<Stream> {
    let handshake = async {
        if side.mode == ServerMode::Permissive {
            // A client that says nothing first (a protocol whose server speaks first) is a
            // plaintext one.
            let mut first = [0u8; 1];
            let peeked = tokio::time::timeout(PEEK_TIMEOUT, stream.peek(&mut first)).await;
            match peeked {
                Ok(Ok(1..)) if first[0] == HANDSHAKE_RECORD => {}
                Ok(Err(e)) => return Err(e),
                _ => return Ok(Stream::Plain(stream)),
            }
        }
        let config = match &side.config {
            Some(config) => config.clone(),
            None => credentials.server_config().map_err(std::io::Error::other)?,
        };
        let tls = tokio_rustls::TlsAcceptor::from(config)
            .accept(stream)
            .await?;
        let conn = tls.get_ref().1;
        // A resumed session skips the certificate checks: the certificate it was made with must
        // still be in its validity period.
        if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            let usage = side.mesh_trust.then(webpki::KeyUsage::client_auth);
            resumed_still_valid(credentials, conn.peer_certificates(), usage)?;
        }
        Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls))))
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// Opens TLS on a connection to `addr` (`HOST:PORT`; the name only travels as SNI).
pub async fn connect(
    credentials: &Credentials,
    mesh_trust: bool,
    config: &Arc<ClientConfig>,
    addr: &str,
    stream: TcpStream,
) -> std::io::Result<Stream> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string()).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}"))
    })?;
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, stream)
        .await?;
    let conn = tls.get_ref().1;
    if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        let usage = mesh_trust.then(webpki::KeyUsage::server_auth);
        resumed_still_valid(credentials, conn.peer_certificates(), usage)?;
    }
    Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))))
}

/// A resumed session skips the certificate checks: the peer chain it was made with must still
/// be in its validity period, not revoked since and — verified against the mesh's trust bundle
/// (`mesh_usage`) — still chain to a root of the bundle in use (a rotation may have removed
/// its root).
fn resumed_still_valid(
    credentials: &Credentials,
    peer: Option<&[CertificateDer<'static>]>,
    mesh_usage: Option<webpki::KeyUsage>,
) -> std::io::Result<()> {
    let Some(chain) = peer.filter(|c| !c.is_empty()) else {
        return Ok(());
    };
    let denied = |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
    if !valid_now(&chain[0]) {
        return Err(denied("a resumed session's certificate has expired".into()));
    }
    if let Some(usage) = mesh_usage {
        credentials
            .verify_chain(chain, usage)
            .map_err(|e| denied(format!("a resumed session's {e}")))?;
    }
    credentials
        .check_revoked(&chain[0])
        .map_err(|e| denied(e.to_string()))
}

/// Verifies that `leaf` (with `intermediates`) chains to one of `roots` for `usage` at `now`.
fn chains_to(
    roots: &[CertificateDer<'_>],
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), Error> {
    let anchors: Vec<_> = roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
        .collect();
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| Error::General(format!("certificate: {e}")))?;
    cert.verify_for_usage(
        algorithms().all,
        &anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map(drop)
    .map_err(|e| Error::General(format!("certificate: {e}")))
}

/// Whether a certificate is within its validity period now.
fn valid_now(cert: &CertificateDer<'_>) -> bool {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    X509Certificate::from_der(cert).is_ok_and(|(_, c)| c.validity().is_valid())
}

/// The SPIFFE ID (the `spiffe://` URI SAN) of a certificate.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some((*u).to_string()),
        _ => None,
    })
}

/// The proxy's own certificate, for both sides.
#[derive(Debug)]
struct OwnCertificate(Arc<Credentials>);

impl ResolvesServerCert for OwnCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current.load().as_ref().map(|l| l.certified.clone())
    }
}

impl ResolvesClientCert for OwnCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.current.load().as_ref().map(|l| l.certified.clone())
    }

    fn has_certs(&self) -> bool {
        self.0.current.load().is_some()
    }
}

/// Clients' certificates, verified against the roots in use.
#[derive(Debug)]
struct PeerVerifier(Arc<Credentials>);

impl PeerVerifier {
    fn current(&self) -> Result<Arc<dyn ClientCertVerifier>, Error> {
        self.0
            .current
            .load()
            .as_ref()
            .map(|l| l.client_verifier.clone())
            .ok_or_else(|| Error::General("no workload certificate yet".into()))
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .current()?
            .verify_client_cert(end_entity, intermediates, now)?;
        self.0.check_revoked(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// A server's certificate: chained to the roots in use, for TLS servers, and naming one of the
/// SPIFFE IDs the cluster expects (DNS names play no part).
#[derive(Debug)]
struct ServerVerifier {
    credentials: Arc<Credentials>,
    roots: Roots,
    /// Names the certificate must carry one of (empty: any).
    expected: Vec<String>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let loaded;
        let roots: &[CertificateDer<'static>] = match &self.roots {
            Roots::Bundle => {
                loaded = self
                    .credentials
                    .current
                    .load_full()
                    .ok_or_else(|| Error::General("no workload certificate yet".into()))?;
                &loaded.roots
            }
            Roots::Fixed(roots) => roots,
        };
        chains_to(
            roots,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        self.credentials.check_revoked(end_entity)?;
        if self.expected.is_empty() || carries_one_of(end_entity, &self.expected) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(Error::General(match spiffe_id(end_entity) {
            Some(id) => format!(
                "server identity {id} is not one of {}",
                self.expected.join(", ")
            ),
            None => format!(
                "server certificate names none of {}",
                self.expected.join(", ")
            ),
        }))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A root: its PEM and issuer.
    fn root() -> (String, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let cert = params.self_signed(&key).unwrap();
        let pem = cert.pem();
        (pem.clone(), Issuer::from_ca_cert_pem(&pem, key).unwrap())
    }

    /// Credentials for `id` from `root`, valid from `from` to `to` (seconds from now).
    fn credentials(
        id: &str,
        root: &(String, Issuer<'static, KeyPair>),
        validity: (i64, i64),
    ) -> Arc<Credentials> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(validity.0);
        params.not_after = now + time::Duration::seconds(validity.1);
        let cert = params.signed_by(&key, &root.1).unwrap();
        let c = Arc::new(Credentials::default());
        c.set(
            &format!("{}{}", cert.pem(), root.0),
            &key.serialize_pem(),
            &root.0,
        )
        .unwrap();
        c
    }

    /// A handshake of `client` (expecting `expected`) with `server`, then one byte each way:
    /// each side's view of the other's SPIFFE ID, or the first error.
    async fn handshake(
        client: &Arc<Credentials>,
        expected: &str,
        server: &Arc<Credentials>,
    ) -> Result<(String, String), String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config().unwrap());
        let connector = tokio_rustls::TlsConnector::from(
            client.client_config(vec![expected.into()], &ALPN).unwrap(),
        );
        let serving = tokio::spawn(async move {
            let mut tls = acceptor.accept(b).await.map_err(|e| e.to_string())?;
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| spiffe_id(&c[0]));
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            tls.write_all(&byte).await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(peer.unwrap_or_default())
        });
        let name = ServerName::try_from("mesh.invalid").unwrap();
        let client_side = async {
            let mut tls = connector
                .connect(name, a)
                .await
                .map_err(|e| e.to_string())?;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| spiffe_id(&c[0]));
            tls.write_all(b"x").await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(peer.unwrap_or_default())
        };
        let client_result = tokio::time::timeout(Duration::from_secs(5), client_side)
            .await
            .map_err(|_| "timed out".to_string())?;
        let server_result = serving.await.map_err(|e| e.to_string())?;
        Ok((client_result?, server_result?))
    }

    const A: &str = "spiffe://trellis.local/ns/default/vn/a";
    const B: &str = "spiffe://trellis.local/ns/default/vn/b";

    #[tokio::test]
    async fn peers_of_one_root_see_each_others_identity() {
        let root = root();
        let a = credentials(A, &root, (-60, 3600));
        let b = credentials(B, &root, (-60, 3600));
        assert_eq!(
            handshake(&b, A, &a).await,
            Ok((A.to_string(), B.to_string()))
        );
    }

    #[tokio::test]
    async fn a_server_with_another_identity_is_refused() {
        let root = root();
        let a = credentials(A, &root, (-60, 3600));
        let b = credentials(B, &root, (-60, 3600));
        let err = handshake(&b, B, &a).await.unwrap_err();
        assert!(err.contains("is not one of"), "{err}");
    }

    #[tokio::test]
    async fn another_root_or_an_expired_certificate_is_refused() {
        let root = root();
        let a = credentials(A, &root, (-60, 3600));
        let stranger = credentials(B, &super::tests::root(), (-60, 3600));
        assert!(
            handshake(&stranger, A, &a).await.is_err(),
            "a client of another root"
        );
        assert!(
            handshake(&a, B, &stranger).await.is_err(),
            "a server of another root"
        );
        let expired = credentials(B, &root, (-7200, -3600));
        assert!(
            handshake(&expired, A, &a).await.is_err(),
            "an expired client"
        );
        assert!(
            handshake(&a, B, &expired).await.is_err(),
            "an expired server"
        );
    }

    /// A client's second connection to a server resumes the session of its first (no
    /// certificates exchanged again); both sides keep knowing who the other is.
    #[tokio::test]
    async fn a_second_connection_resumes_the_session() {
        let root = root();
        let a = credentials(A, &root, (-60, 3600));
        let b = credentials(B, &root, (-60, 3600));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let config = b.client_config(vec![A.into()], ALPN_H2).unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            let a = a.clone();
            let serving = async {
                let (tcp, _) = listener.accept().await.unwrap();
                let side = ServerSide {
                    mode: ServerMode::Strict,
                    mesh_trust: true,
                    config: None,
                };
                let mut tls = accept(&a, &side, tcp, Duration::from_secs(5))
                    .await
                    .unwrap();
                let mut byte = [0u8; 1];
                tls.read_exact(&mut byte).await.unwrap();
                tls.write_all(&byte).await.unwrap();
                tls.flush().await.unwrap();
                (tls.resumed(), tls.peer_identity())
            };
            let calling = async {
                let tcp = TcpStream::connect(&addr).await.unwrap();
                let mut tls = connect(&b, true, &config, &addr, tcp).await.unwrap();
                tls.write_all(b"x").await.unwrap();
                let mut byte = [0u8; 1];
                // Reading takes the session tickets that came with the answer.
                tls.read_exact(&mut byte).await.unwrap();
                (tls.resumed(), tls.peer_identity())
            };
            seen.push(tokio::join!(serving, calling));
        }
        let full = ((false, Some(B.into())), (false, Some(A.into())));
        let resumed = ((true, Some(B.into())), (true, Some(A.into())));
        assert_eq!(seen, [full, resumed]);
    }

    /// Renewed credentials are used from the next handshake on.
    #[tokio::test]
    async fn renewed_credentials_take_the_next_handshake() {
        let root = root();
        let a = credentials(A, &root, (-60, 3600));
        let b = credentials(B, &root, (-60, 3600));
        let renewed = credentials(A, &root, (-60, 7200));
        let loaded = renewed.current.load_full().unwrap();
        a.current.store(Some(loaded));
        assert_eq!(
            handshake(&b, A, &a).await,
            Ok((A.to_string(), B.to_string()))
        );
        // A client with no certificate yet is refused by the server.
        let empty = Arc::new(Credentials::default());
        assert!(handshake(&empty, A, &a).await.is_err());
    }
}
