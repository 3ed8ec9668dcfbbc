//! Workload identity: the mesh's certificate authority and the join tokens proxies bootstrap with.
//!
//! The CA's root is created at first start (or is the operator's, from PEM files) and kept in the
//! store, so every control plane on the store signs with it. A proxy sends a certificate signing
//! request (its key never leaves it) with a join token naming its node; the CA signs a short-lived
//! certificate whose only name is the node's SPIFFE ID,
//! `spiffe://TRUST-DOMAIN/ns/NAMESPACE/vn/NAME` (`/vg/` for a gateway).

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};

use crate::{
    model::{Kind, ResourceKey},
    store::{Expect, Op, Store, StoreError},
};

/// Where the root is kept.
pub const CA_KEY: &str = "meta/ca";
/// Where join tokens are kept, by the SHA-256 of the token.
pub const TOKEN_PREFIX: &str = "tokens/";
pub const DEFAULT_TRUST_DOMAIN: &str = "trellis.local";
/// How long a workload certificate lives (proxies renew it at half-life).
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// The shortest workload certificate life trellis-control accepts: renewals at half-life stay
/// well apart from the proxies' and the control plane's 30 s floor.
pub const MIN_WORKLOAD_TTL: Duration = Duration::from_secs(10 * 60);
/// The least time between two renewals on one config stream (the control plane refuses more
/// frequent ones; proxies never ask sooner).
pub const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(30);
/// How long a root created here lives.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Clock skew allowed between the control plane and proxies.
pub const SKEW: Duration = Duration::from_secs(5 * 60);

/// Where node revocations are kept: `meta/revoked/NAMESPACE/vn|vg/NAME`, the time (Unix
/// milliseconds) before which that node's certificates no longer count.
pub const REVOKED_PREFIX: &str = "meta/revoked/";

/// The workload certificate a TLS client of the control plane presented (verified against the
/// mesh's roots in the handshake), in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Its SPIFFE ID.
    pub spiffe_id: std::sync::Arc<str>,
    /// Its public key (the subject public key's bits).
    pub public_key: std::sync::Arc<[u8]>,
    /// When it was issued (Unix seconds: its notBefore plus the skew the CA allows).
    pub issued: u64,
}

impl PeerIdentity {
    /// What a client certificate (DER) says; None without a SPIFFE ID.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        let spiffe_id = san.value.general_names.iter().find_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })?;
        let not_before = u64::try_from(cert.validity().not_before.timestamp()).unwrap_or(0);
        Some(Self {
            spiffe_id: spiffe_id.into(),
            public_key: cert.public_key().subject_public_key.data.as_ref().into(),
            issued: not_before.saturating_add(SKEW.as_secs()),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("certificate authority: {0}")]
    Ca(String),
    #[error("certificate signing request: {0}")]
    Csr(String),
    /// The proxy did not prove who it is.
    #[error("{0}")]
    Unauthenticated(String),
    /// It did, but may not act for the node it names.
    #[error("{0}")]
    Denied(String),
}

#[derive(Serialize, Deserialize)]
struct StoredCa {
    certificate: String,
    key: String,
    /// A rotation begun: the next root, in the trust bundle, not issuing yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next: Option<StoredRoot>,
    /// A rotation promoted: the roots before the current one, still in the trust bundle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    previous: Vec<String>,
}

#[derive(Clone, Serialize, Deserialize)]
struct StoredRoot {
    certificate: String,
    key: String,
}

/// The mesh's certificate authority.
pub struct Ca {
    trust_domain: String,
    workload_ttl: Duration,
    /// The roots: swapped whole by a rotation's steps.
    roots: parking_lot::RwLock<Arc<Roots>>,
    /// The root is the operator's (`--ca-cert`): not rotated here.
    supplied: bool,
    /// Counts the rotation's steps: streams and TLS listeners follow it.
    changes: tokio::sync::watch::Sender<u64>,
    /// A file kept holding the trust bundle (the control plane's `DATA_DIR/ca.pem`).
    bundle_file: parking_lot::Mutex<Option<std::path::PathBuf>>,
}

/// The roots at one step of a rotation.
struct Roots {
    /// The root that signs.
    current: String,
    issuer: Issuer<'static, KeyPair>,
    stored: StoredCa,
    /// Every root proxies trust (PEM): the current one, the next, the previous ones.
    bundle: String,
}

impl Roots {
    fn new(stored: StoredCa) -> Result<Self, IdentityError> {
        let key =
            KeyPair::from_pem(&stored.key).map_err(|e| IdentityError::Ca(format!("key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(&stored.certificate, key)
            .map_err(|e| IdentityError::Ca(format!("certificate: {e}")))?;
        let mut bundle = stored.certificate.clone();
        for pem in stored
            .next
            .iter()
            .map(|n| &n.certificate)
            .chain(&stored.previous)
        {
            if !bundle.ends_with('\n') {
                bundle.push('\n');
            }
            bundle.push_str(pem);
        }
        Ok(Self {
            current: stored.certificate.clone(),
            issuer,
            stored,
            bundle,
        })
    }
}

/// Where a root rotation stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    /// `none`, `begun` (the next root is trusted, not issuing), `promoted` (the new root issues,
    /// the previous ones are still trusted).
    pub stage: String,
    /// Fingerprint of the root that signs.
    pub current: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<String>,
}

/// A root's fingerprint: the start of the SHA-256 of its DER, hex.
pub fn fingerprint(pem: &str) -> String {
    let der = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .map(|p| p.contents)
        .unwrap_or_default();
    let digest = ring::digest::digest(&ring::digest::SHA256, &der);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fingerprint of the root a chain (leaf first, root last) ends with.
pub fn chain_root(chain_pem: &str) -> Option<String> {
    let last = x509_parser::pem::Pem::iter_from_buffer(chain_pem.as_bytes())
        .filter_map(Result::ok)
        .last()?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &last.contents);
    Some(
        digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// A workload certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate, then the root (PEM).
    pub chain_pem: String,
    pub spiffe_id: String,
    pub not_after: SystemTime,
    /// The certified public key (the subject public key's bits).
    pub public_key: Vec<u8>,
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl Ca {
    /// The operator's root (`supplied`: certificate and key, PEM), else the store's, else a new
    /// one created and kept in the store (a race with another control plane keeps the first).
    pub async fn load_or_create(
        store: &dyn Store,
        trust_domain: &str,
        supplied: Option<(String, String)>,
        workload_ttl: Duration,
    ) -> Result<Self, IdentityError> {
        if let Some((certificate, key)) = supplied {
            let stored = StoredCa {
                certificate,
                key,
                next: None,
                previous: Vec::new(),
            };
            return Self::new(trust_domain, stored, workload_ttl, true);
        }
        for _ in 0..3 {
            if let Some(kv) = store.get(CA_KEY).await? {
                let stored: StoredCa = serde_json::from_slice(&kv.value).map_err(|e| {
                    IdentityError::Ca(format!("the stored root is unreadable: {e}"))
                })?;
                return Self::new(trust_domain, stored, workload_ttl, false);
            }
            let (certificate, key) = new_root(trust_domain)?;
            let value = serde_json::to_vec(&StoredCa {
                certificate,
                key,
                next: None,
                previous: Vec::new(),
            })
            .map_err(|e| IdentityError::Ca(e.to_string()))?;
            let put = Op::Put {
                key: CA_KEY.into(),
                value,
                expect: Expect::Absent,
                lease: None,
            };
            match store.apply(vec![put]).await {
                Ok(_) => tracing::info!(trust_domain, "created the mesh's root certificate"),
                // Another control plane created one first: use it.
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(IdentityError::Ca("cannot create or read the root".into()))
    }

    fn new(
        trust_domain: &str,
        stored: StoredCa,
        workload_ttl: Duration,
        supplied: bool,
    ) -> Result<Self, IdentityError> {
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            workload_ttl,
            roots: parking_lot::RwLock::new(Arc::new(Roots::new(stored)?)),
            supplied,
            changes: tokio::sync::watch::Sender::new(0),
            bundle_file: parking_lot::Mutex::new(None),
        })
    }

    fn roots(&self) -> Arc<Roots> {
        self.roots.read().clone()
    }

    /// The roots proxies trust (PEM).
    pub fn trust_bundle(&self) -> String {
        self.roots().bundle.clone()
    }

    /// Keeps `path` holding the trust bundle, now and after each step of a rotation.
    pub fn keep_bundle_file(&self, path: std::path::PathBuf) -> std::io::Result<()> {
        write_replacing(&path, &self.trust_bundle())?;
        *self.bundle_file.lock() = Some(path);
        Ok(())
    }

    /// When the signing root expires (Unix seconds).
    pub fn root_not_after(&self) -> Option<i64> {
        use x509_parser::prelude::{FromDer as _, X509Certificate};
        let pem = self.roots().current.clone();
        let block = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
            .next()?
            .ok()?;
        let (_, cert) = X509Certificate::from_der(&block.contents).ok()?;
        Some(cert.validity().not_after.timestamp())
    }

    /// How many steps of a rotation this CA has taken or adopted.
    pub fn generation(&self) -> u64 {
        *self.changes.borrow()
    }

    /// Changes with each step of a rotation.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether `chain_pem` ends with the root that signs now.
    pub fn issued_by_current(&self, chain_pem: &str) -> bool {
        chain_root(chain_pem) == Some(fingerprint(&self.roots().current))
    }

    /// The fingerprints of the roots in the trust bundle.
    pub fn bundle_roots(&self) -> Vec<String> {
        let r = self.roots();
        let mut out = vec![fingerprint(&r.stored.certificate)];
        out.extend(r.stored.next.iter().map(|n| fingerprint(&n.certificate)));
        out.extend(r.stored.previous.iter().map(|p| fingerprint(p)));
        out
    }

    /// Where a rotation stands.
    pub fn rotation(&self) -> Rotation {
        let r = self.roots();
        let stage = if r.stored.next.is_some() {
            "begun"
        } else if !r.stored.previous.is_empty() {
            "promoted"
        } else {
            "none"
        };
        Rotation {
            stage: stage.into(),
            current: fingerprint(&r.stored.certificate),
            next: r.stored.next.as_ref().map(|n| fingerprint(&n.certificate)),
            previous: r.stored.previous.iter().map(|p| fingerprint(p)).collect(),
        }
    }

    /// Begins a root rotation: a new root joins the trust bundle (it issues nothing yet).
    pub async fn begin_rotation(&self, store: &dyn Store) -> Result<Rotation, IdentityError> {
        self.step(store, |stored, trust_domain| {
            if stored.next.is_some() || !stored.previous.is_empty() {
                return Err(IdentityError::Denied(
                    "a rotation is in progress: promote it, then finish it".into(),
                ));
            }
            let (certificate, key) = new_root(trust_domain)?;
            stored.next = Some(StoredRoot { certificate, key });
            Ok(())
        })
        .await
    }

    /// Promotes the next root: it signs from now on; the current one stays trusted.
    pub async fn promote_rotation(&self, store: &dyn Store) -> Result<Rotation, IdentityError> {
        self.step(store, |stored, _| {
            let Some(next) = stored.next.take() else {
                return Err(IdentityError::Denied("no rotation was begun".into()));
            };
            stored
                .previous
                .push(std::mem::replace(&mut stored.certificate, next.certificate));
            stored.key = next.key;
            Ok(())
        })
        .await
    }

    /// Finishes a promoted rotation: the previous roots leave the trust bundle.
    pub async fn finish_rotation(&self, store: &dyn Store) -> Result<Rotation, IdentityError> {
        self.step(store, |stored, _| {
            if stored.next.is_some() || stored.previous.is_empty() {
                return Err(IdentityError::Denied(
                    "no promoted rotation to finish".into(),
                ));
            }
            stored.previous.clear();
            Ok(())
        })
        .await
    }

    /// One step of a rotation: kept in the store (only if the stored roots are the ones in
    /// use), then used here and announced.
    async fn step(
        &self,
        store: &dyn Store,
        change: impl FnOnce(&mut StoredCa, &str) -> Result<(), IdentityError>,
    ) -> Result<Rotation, IdentityError> {
        if self.supplied {
            return Err(IdentityError::Denied(
                "the root is the operator's (--ca-cert): rotate it by giving the new one".into(),
            ));
        }
        let old = self.roots();
        let mut stored = StoredCa {
            certificate: old.stored.certificate.clone(),
            key: old.stored.key.clone(),
            next: old.stored.next.clone(),
            previous: old.stored.previous.clone(),
        };
        change(&mut stored, &self.trust_domain)?;
        let current = store.get(CA_KEY).await?;
        let in_use = current.as_ref().is_some_and(|kv| {
            serde_json::from_slice::<StoredCa>(&kv.value).is_ok_and(|s| {
                s.certificate == old.stored.certificate
                    && s.next.is_some() == old.stored.next.is_some()
            })
        });
        let Some(kv) = current.filter(|_| in_use) else {
            return Err(IdentityError::Denied(
                "the stored roots changed under this control plane: restart it first".into(),
            ));
        };
        let value = serde_json::to_vec(&stored).map_err(|e| IdentityError::Ca(e.to_string()))?;
        store
            .apply(vec![Op::Put {
                key: CA_KEY.into(),
                value,
                expect: Expect::Revision(kv.mod_revision),
                lease: None,
            }])
            .await?;
        *self.roots.write() = Arc::new(Roots::new(stored)?);
        if let Some(path) = self.bundle_file.lock().as_ref()
            && let Err(e) = write_replacing(path, &self.trust_bundle())
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the trust bundle");
        }
        self.changes.send_modify(|n| *n += 1);
        let rotation = self.rotation();
        tracing::info!(stage = %rotation.stage, current = %rotation.current, "root rotation step");
        Ok(rotation)
    }

    /// Follows the roots in the store, for control planes sharing it: a rotation step taken
    /// through another one is adopted here too (its bundle sent to this one's proxies, its TLS
    /// following), as if taken here.
    pub fn follow_store(self: &Arc<Self>, store: Arc<dyn Store>) {
        if self.supplied {
            // The operator's root (--ca-cert) is the one used, whatever the store holds.
            return;
        }
        let ca = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let revision = match store.get(CA_KEY).await {
                    Ok(Some(kv)) => {
                        let Some(this) = ca.upgrade() else { return };
                        this.adopt(&kv.value);
                        kv.mod_revision
                    }
                    Ok(None) => 0,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the roots from the store");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                };
                match store.watch(CA_KEY, revision).await {
                    Ok(mut changes) => {
                        while let Some(Ok(change)) = changes.recv().await {
                            let Some(this) = ca.upgrade() else { return };
                            for e in change.events.iter().filter(|e| e.kv.key == CA_KEY) {
                                if e.kind == crate::store::EventKind::Put {
                                    this.adopt(&e.kv.value);
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot watch the roots in the store"),
                }
                if ca.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }

    /// Uses the stored roots `value` if they differ from those in use.
    fn adopt(&self, value: &[u8]) {
        let stored = match serde_json::from_slice::<StoredCa>(value) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable roots in the store");
                return;
            }
        };
        let old = self.roots();
        if stored.certificate == old.stored.certificate
            && stored.next.as_ref().map(|n| &n.certificate)
                == old.stored.next.as_ref().map(|n| &n.certificate)
            && stored.previous == old.stored.previous
        {
            return;
        }
        match Roots::new(stored) {
            Ok(roots) => {
                *self.roots.write() = Arc::new(roots);
                if let Some(path) = self.bundle_file.lock().as_ref()
                    && let Err(e) = write_replacing(path, &self.trust_bundle())
                {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the trust bundle");
                }
                self.changes.send_modify(|n| *n += 1);
                let rotation = self.rotation();
                tracing::info!(stage = %rotation.stage, current = %rotation.current, "root rotation step taken through another control plane");
            }
            Err(e) => tracing::warn!(error = %e, "the roots in the store cannot be used"),
        }
    }

    /// The SPIFFE ID of a node or gateway.
    pub fn spiffe_id(&self, node: &ResourceKey) -> String {
        let segment = if node.kind == Kind::VirtualGateway {
            "vg"
        } else {
            "vn"
        };
        format!(
            "spiffe://{}/ns/{}/{segment}/{}",
            self.trust_domain, node.namespace, node.name
        )
    }

    /// Signs `csr_pem` for `node`: whatever names the request asks for, the certificate's only
    /// name is the node's SPIFFE ID; it is for TLS clients and servers, not a CA. With
    /// `same_key`, the request must be for that public key (a renewal keeps its key: a new key
    /// needs a join token). Each certificate has a random serial number.
    pub fn issue(
        &self,
        csr_pem: &str,
        node: &ResourceKey,
        same_key: Option<&[u8]>,
    ) -> Result<Issued, IdentityError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| IdentityError::Csr(e.to_string()))?;
        let public_key = rcgen::PublicKeyData::der_bytes(&csr.public_key).to_vec();
        if same_key.is_some_and(|k| k != public_key.as_slice()) {
            return Err(IdentityError::Denied(format!(
                "the certificate signing request for {node} is for another key than its certificate's: a renewal keeps the key, a new key needs a join token"
            )));
        }
        let mut serial = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
            .map_err(|_| IdentityError::Ca("no randomness".into()))?;
        // Positive and 16 bytes long (RFC 5280: at most 20 octets, positive).
        serial[0] = (serial[0] & 0x7f) | 0x40;
        csr.params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let spiffe_id = self.spiffe_id(node);
        let now = SystemTime::now();
        let not_after = now + self.workload_ttl;
        let uri = spiffe_id
            .clone()
            .try_into()
            .map_err(|e| IdentityError::Csr(format!("{spiffe_id}: {e}")))?;
        let params = &mut csr.params;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = offset(now - SKEW);
        params.not_after = offset(not_after);
        params.use_authority_key_identifier_extension = true;
        let roots = self.roots();
        let certificate = csr
            .signed_by(&roots.issuer)
            .map_err(|e| IdentityError::Csr(e.to_string()))?;
        Ok(Issued {
            chain_pem: format!("{}{}", certificate.pem(), roots.current),
            spiffe_id,
            not_after,
            public_key,
        })
    }
}

impl Ca {
    /// How long workload certificates are valid (`--workload-ttl`).
    pub fn workload_ttl(&self) -> Duration {
        self.workload_ttl
    }

    /// A workload certificate for `node` with a key made here, for a proxy that cannot make
    /// its own (an Envoy, given both over its authenticated ADS stream, as App Mesh's SDS did):
    /// the certificate and the key (PEM).
    pub fn issue_with_key(&self, node: &ResourceKey) -> Result<(Issued, String), IdentityError> {
        let key = KeyPair::generate().map_err(|e| IdentityError::Ca(e.to_string()))?;
        let csr = CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(&key))
            .and_then(|r| r.pem())
            .map_err(|e| IdentityError::Ca(e.to_string()))?;
        Ok((self.issue(&csr, node, None)?, key.serialize_pem()))
    }

    /// A certificate and key (PEM) for the control plane's own TLS listener, for `names` (DNS
    /// names or IP addresses); valid 90 days, made anew at each start.
    pub fn issue_server(&self, names: &[String]) -> Result<(String, String), IdentityError> {
        let ca = |e: rcgen::Error| IdentityError::Ca(e.to_string());
        let key = KeyPair::generate().map_err(ca)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(ca)?;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName).map_err(ca),
            })
            .collect::<Result<_, _>>()?;
        params
            .distinguished_name
            .push(DnType::CommonName, "trellis-control");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        params.not_before = offset(now - SKEW);
        params.not_after = offset(now + Duration::from_secs(90 * 24 * 3600));
        params.use_authority_key_identifier_extension = true;
        let roots = self.roots();
        let certificate = params.signed_by(&key, &roots.issuer).map_err(ca)?;
        Ok((
            format!("{}{}", certificate.pem(), roots.current),
            key.serialize_pem(),
        ))
    }
}

/// Writes a file whole or not at all (a reader never sees half of it).
fn write_replacing(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// A new root: (certificate, key), PEM.
fn new_root(trust_domain: &str) -> Result<(String, String), IdentityError> {
    let ca = |e: rcgen::Error| IdentityError::Ca(e.to_string());
    let key = KeyPair::generate().map_err(ca)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(ca)?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Trellis root CA {trust_domain}"),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Trellis");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = offset(now - SKEW);
    params.not_after = offset(now + ROOT_TTL);
    let certificate = params.self_signed(&key).map_err(ca)?;
    Ok((certificate.pem(), key.serialize_pem()))
}

/// A join token as stored (under the SHA-256 of the token; the token itself is not kept).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Token {
    /// `NAMESPACE/NAME` of the node (or gateway) it admits.
    pub node: String,
    pub gateway: bool,
    /// Unix seconds.
    pub expires: u64,
    /// Admissions left; None: any number until it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_left: Option<u32>,
    /// Unix milliseconds (0 for tokens kept before this was): a revocation of the node's
    /// identity at or after it ends the token too.
    #[serde(default)]
    pub created_ms: u64,
}

fn digest(token: &str) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    hash.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Creates a join token for `node`: the token (shown once) and what is kept.
pub async fn create_token(
    store: &dyn Store,
    node: &str,
    gateway: bool,
    ttl: Duration,
    uses: Option<u32>,
) -> Result<(String, Token), IdentityError> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| IdentityError::Ca("no randomness".into()))?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let token = format!("trellis-join-{secret}");
    let stored = Token {
        node: node.to_string(),
        gateway,
        expires: unix_now().saturating_add(ttl.as_secs()),
        uses_left: uses,
        created_ms: unix_ms(),
    };
    let value = serde_json::to_vec(&stored).map_err(|e| IdentityError::Ca(e.to_string()))?;
    store
        .apply(vec![Op::Put {
            key: format!("{TOKEN_PREFIX}{}", digest(&token)),
            value,
            expect: Expect::Absent,
            lease: None,
        }])
        .await?;
    Ok((token, stored))
}

/// Admits a proxy presenting `token` for `node`: the token must exist, be unexpired, have a
/// use left (one is spent), name that node and be newer than the node's identity's revocation
/// (a multi-use token — an Envoy's — is as revoked as the certificates it got).
pub async fn admit(
    store: &dyn Store,
    token: &str,
    node: &ResourceKey,
) -> Result<(), IdentityError> {
    let key = format!("{TOKEN_PREFIX}{}", digest(token));
    let wanted = format!("{}/{}", node.namespace, node.name);
    let gateway = node.kind == Kind::VirtualGateway;
    // Spending a use races other proxies' admissions: compare-and-set, a few times.
    for _ in 0..8 {
        let Some(kv) = store.get(&key).await? else {
            return Err(IdentityError::Unauthenticated(
                "unknown or used-up join token".into(),
            ));
        };
        let stored: Token = serde_json::from_slice(&kv.value)
            .map_err(|_| IdentityError::Unauthenticated("unreadable join token".into()))?;
        if stored.expires <= unix_now() {
            return Err(IdentityError::Unauthenticated("expired join token".into()));
        }
        if stored.node != wanted || stored.gateway != gateway {
            return Err(IdentityError::Denied(format!(
                "the join token is for {} {}, not {wanted}",
                if stored.gateway { "gateway" } else { "node" },
                stored.node
            )));
        }
        if let Some(kv) = store.get(&revocation_key(node)).await?
            && serde_json::from_slice::<Revocation>(&kv.value)
                .is_ok_and(|r| r.revoked_ms >= stored.created_ms)
        {
            return Err(IdentityError::Denied(format!(
                "the join token was made before the identity of {wanted} was revoked (trellis identity revoke): a new join token is needed"
            )));
        }
        let op = match stored.uses_left {
            None => return Ok(()),
            Some(0 | 1) => Op::Delete {
                key: key.clone(),
                expect: Expect::Revision(kv.mod_revision),
            },
            Some(n) => Op::Put {
                key: key.clone(),
                value: serde_json::to_vec(&Token {
                    uses_left: Some(n - 1),
                    ..stored
                })
                .map_err(|e| IdentityError::Ca(e.to_string()))?,
                expect: Expect::Revision(kv.mod_revision),
                lease: None,
            },
        };
        match store.apply(vec![op]).await {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(IdentityError::Unauthenticated(
        "the join token is being used concurrently; try again".into(),
    ))
}

/// A join token as listed: its id (the first 12 hex digits of its hash) and what it admits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedToken {
    pub id: String,
    #[serde(flatten)]
    pub token: Token,
}

/// The join tokens kept (never the tokens themselves).
pub async fn list_tokens(store: &dyn Store) -> Result<Vec<ListedToken>, StoreError> {
    let listing = store.list(TOKEN_PREFIX).await?;
    Ok(listing
        .items
        .iter()
        .filter_map(|kv| {
            let hash = kv.key.strip_prefix(TOKEN_PREFIX)?;
            Some(ListedToken {
                id: hash.chars().take(12).collect(),
                token: serde_json::from_slice(&kv.value).ok()?,
            })
        })
        .collect())
}

/// Revokes the join token whose id starts with `id` (at least 8 hex digits, naming one token):
/// the node it named, or None when none matches.
pub async fn revoke_token(store: &dyn Store, id: &str) -> Result<Option<String>, IdentityError> {
    if id.len() < 8 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(IdentityError::Denied(
            "give at least 8 hex digits of the token's id (trellis token list)".into(),
        ));
    }
    let listing = store
        .list(&format!("{TOKEN_PREFIX}{}", id.to_ascii_lowercase()))
        .await?;
    match listing.items.as_slice() {
        [] => Ok(None),
        [kv] => {
            let node = serde_json::from_slice::<Token>(&kv.value)
                .map(|t| t.node)
                .unwrap_or_default();
            store
                .apply(vec![Op::Delete {
                    key: kv.key.clone(),
                    expect: Expect::Any,
                }])
                .await?;
            Ok(Some(node))
        }
        _ => Err(IdentityError::Denied(format!(
            "{id} names several tokens: give more of it"
        ))),
    }
}

/// Waits for the next change `watch` (of [`watch_revocation`]) sees; whether it revokes
/// `node` — or the watch ended or failed, so the stream it guards must go (its proxy
/// reconnects and is checked). Without a watch, never.
pub async fn next_revocation(watch: Option<&mut crate::store::Watch>, node: &ResourceKey) -> bool {
    let Some(watch) = watch else {
        return std::future::pending().await;
    };
    match watch.recv().await {
        Some(Ok(change)) => change
            .events
            .iter()
            .any(|e| e.kind == crate::store::EventKind::Put && is_revocation_of(&e.kv.key, node)),
        Some(Err(_)) | None => true,
    }
}

/// Whether the store key `key` is `node`'s revocation (a watch of it sees every key it starts).
pub fn is_revocation_of(key: &str, node: &ResourceKey) -> bool {
    key == revocation_key(node)
}

/// Where the revocation of `node` is kept.
fn revocation_key(node: &ResourceKey) -> String {
    let segment = if node.kind == Kind::VirtualGateway {
        "vg"
    } else {
        "vn"
    };
    format!("{REVOKED_PREFIX}{}/{segment}/{}", node.namespace, node.name)
}

/// A node's revocation as kept.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    /// Unix milliseconds: certificates of the node issued up to this time's second, and config
    /// streams admitted before it, no longer count.
    pub revoked_ms: u64,
}

impl Revocation {
    /// Whether a certificate issued at `issued` (Unix seconds) is revoked: issued up to the
    /// second of the revocation (certificates carry seconds; one issued in that same second
    /// after the revocation is refused too, the safe side).
    pub fn covers_certificate(&self, issued: u64) -> bool {
        issued <= self.revoked_ms / 1000
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Revokes `node`'s identity now: its certificates issued until now are refused when they
/// try to admit a proxy or be renewed, and its open config streams are closed. A proxy of
/// the node then needs a new join token.
pub async fn revoke_node(
    store: &dyn Store,
    node: &ResourceKey,
) -> Result<Revocation, IdentityError> {
    let revocation = Revocation {
        revoked_ms: unix_ms(),
    };
    let value = serde_json::to_vec(&revocation).map_err(|e| IdentityError::Ca(e.to_string()))?;
    store
        .apply(vec![Op::Put {
            key: revocation_key(node),
            value,
            expect: Expect::Any,
            lease: None,
        }])
        .await?;
    Ok(revocation)
}

/// `node`'s revocation, if it was revoked, and the store's revision (to watch from).
pub async fn revocation(
    store: &dyn Store,
    node: &ResourceKey,
) -> Result<(Option<Revocation>, u64), IdentityError> {
    let listing = store.list(&revocation_key(node)).await?;
    let key = revocation_key(node);
    let found = listing
        .items
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| serde_json::from_slice(&kv.value).ok());
    Ok((found, listing.revision))
}

/// Changes to `node`'s revocation after `revision`.
pub async fn watch_revocation(
    store: &dyn Store,
    node: &ResourceKey,
    revision: u64,
) -> Result<crate::store::Watch, IdentityError> {
    Ok(store.watch(&revocation_key(node), revision).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> Ca {
        let (certificate, key) = new_root(DEFAULT_TRUST_DOMAIN).unwrap();
        let stored = StoredCa {
            certificate,
            key,
            next: None,
            previous: Vec::new(),
        };
        Ca::new(DEFAULT_TRUST_DOMAIN, stored, DEFAULT_WORKLOAD_TTL, false).unwrap()
    }

    /// A rotation's steps: the next root joins the bundle without signing, then signs with the
    /// old one still trusted, then the old one leaves; each step is kept in the store (a
    /// restart resumes it) and out-of-order steps are refused.
    /// A revocation ends the node's join tokens made up to it (a multi-use one too); one made
    /// after admits, and other nodes' are untouched.
    #[tokio::test]
    async fn a_revocation_ends_the_nodes_earlier_join_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let (front, back) = (
            ResourceKey::new(Kind::VirtualNode, "default", "front"),
            ResourceKey::new(Kind::VirtualNode, "default", "back"),
        );
        let ttl = Duration::from_secs(3600);
        let (before, _) = create_token(&store, "default/front", false, ttl, None)
            .await
            .unwrap();
        let (other, _) = create_token(&store, "default/back", false, ttl, None)
            .await
            .unwrap();
        admit(&store, &before, &front).await.unwrap();
        revoke_node(&store, &front).await.unwrap();
        let refused = admit(&store, &before, &front).await.unwrap_err();
        assert!(
            matches!(&refused, IdentityError::Denied(why) if why.contains("made before the identity of default/front was revoked")),
            "{refused:?}"
        );
        admit(&store, &other, &back).await.unwrap();
        // Tokens carry milliseconds: one made in the revocation's millisecond is refused too.
        let after = loop {
            let (token, stored) = create_token(&store, "default/front", false, ttl, None)
                .await
                .unwrap();
            let (revoked, _) = revocation(&store, &front).await.unwrap();
            if stored.created_ms > revoked.unwrap().revoked_ms {
                break token;
            }
            tokio::task::yield_now().await;
        };
        admit(&store, &after, &front).await.unwrap();
    }

    #[tokio::test]
    async fn a_rotation_steps_through_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let ca = Ca::load_or_create(&store, DEFAULT_TRUST_DOMAIN, None, DEFAULT_WORKLOAD_TTL)
            .await
            .unwrap();
        let node = ResourceKey::new(Kind::VirtualNode, "default", "front");
        let key = KeyPair::generate().unwrap();
        let old = ca.rotation().current;
        assert!(matches!(
            ca.promote_rotation(&store).await,
            Err(IdentityError::Denied(_))
        ));
        let begun = ca.begin_rotation(&store).await.unwrap();
        let next = begun.next.clone().unwrap();
        assert_eq!(
            (begun.stage.as_str(), begun.current.as_str()),
            ("begun", old.as_str())
        );
        assert_eq!(ca.bundle_roots(), [old.clone(), next.clone()]);
        let issued = ca.issue(&csr(&key), &node, None).unwrap();
        assert_eq!(chain_root(&issued.chain_pem).as_deref(), Some(old.as_str()));
        assert!(ca.issued_by_current(&issued.chain_pem));
        assert!(matches!(
            ca.begin_rotation(&store).await,
            Err(IdentityError::Denied(_))
        ));

        let promoted = ca.promote_rotation(&store).await.unwrap();
        assert_eq!(promoted.current, next);
        assert_eq!(promoted.previous, std::slice::from_ref(&old));
        assert!(!ca.issued_by_current(&issued.chain_pem), "the old root's");
        let renewed = ca.issue(&csr(&key), &node, None).unwrap();
        assert_eq!(
            chain_root(&renewed.chain_pem).as_deref(),
            Some(next.as_str())
        );
        // A restart resumes where the rotation stands.
        let again = Ca::load_or_create(&store, DEFAULT_TRUST_DOMAIN, None, DEFAULT_WORKLOAD_TTL)
            .await
            .unwrap();
        assert_eq!(again.rotation(), promoted);

        let finished = ca.finish_rotation(&store).await.unwrap();
        assert_eq!(finished.stage, "none");
        assert_eq!(ca.bundle_roots(), [next]);
        assert_eq!(ca.trust_bundle().matches("BEGIN CERTIFICATE").count(), 1);
    }

    fn csr(key: &KeyPair) -> String {
        CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(key)
            .unwrap()
            .pem()
            .unwrap()
    }

    fn leaf_der(issued: &Issued) -> Vec<u8> {
        use rustls::pki_types::{CertificateDer, pem::PemObject as _};
        CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    }

    /// A renewal bound to a key signs that key only; the certificate says which key it
    /// certifies, and when it was issued.
    #[test]
    fn a_renewal_keeps_the_certificates_key() {
        let ca = ca();
        let node = ResourceKey::new(Kind::VirtualNode, "default", "front");
        let key = KeyPair::generate().unwrap();
        let first = ca.issue(&csr(&key), &node, None).unwrap();
        let peer = PeerIdentity::from_der(&leaf_der(&first)).unwrap();
        assert_eq!(
            &*peer.spiffe_id,
            "spiffe://trellis.local/ns/default/vn/front"
        );
        assert_eq!(&*peer.public_key, first.public_key.as_slice());
        let now = unix_now();
        assert!(peer.issued.abs_diff(now) <= 1, "{} {now}", peer.issued);

        ca.issue(&csr(&key), &node, Some(&peer.public_key)).unwrap();
        let other = KeyPair::generate().unwrap();
        let refused = ca.issue(&csr(&other), &node, Some(&peer.public_key));
        assert!(
            matches!(&refused, Err(IdentityError::Denied(why)) if why.contains("another key")),
            "{refused:?}"
        );
    }

    /// Renewals of one key get distinct serial numbers.
    #[test]
    fn serial_numbers_are_random() {
        use x509_parser::prelude::{FromDer as _, X509Certificate};
        let ca = ca();
        let node = ResourceKey::new(Kind::VirtualNode, "default", "front");
        let key = KeyPair::generate().unwrap();
        let serial = |issued: &Issued| {
            let der = leaf_der(issued);
            let (_, cert) = X509Certificate::from_der(&der).unwrap();
            cert.raw_serial().to_vec()
        };
        let a = serial(&ca.issue(&csr(&key), &node, None).unwrap());
        let b = serial(&ca.issue(&csr(&key), &node, None).unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn a_revocation_covers_certificates_issued_up_to_its_second() {
        let r = Revocation {
            revoked_ms: 1_000_500,
        };
        assert!(r.covers_certificate(999));
        assert!(r.covers_certificate(1000));
        assert!(!r.covers_certificate(1001));
    }
}
