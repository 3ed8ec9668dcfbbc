//! Workload identity: the mesh's certificate authority and the join tokens proxies bootstrap with.
//!
//! The CA's root is created at first start (or is the operator's, from PEM files) and kept in the
//! store, so every control plane on the store signs with it. A proxy sends a certificate signing
//! request (its key never leaves it) with a join token naming its node; the CA signs a short-lived
//! certificate whose only name is the node's SPIFFE ID,
//! `spiffe://TRUST-DOMAIN/ns/NAMESPACE/vn/NAME` (`/vg/` for a gateway).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
/// How long a root created here lives.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Clock skew allowed between the control plane and proxies.
const SKEW: Duration = Duration::from_secs(5 * 60);

/// The SPIFFE ID of the workload certificate a TLS client of the control plane presented
/// (verified against the mesh's roots), in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub std::sync::Arc<str>);

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
}

/// The mesh's certificate authority.
pub struct Ca {
    trust_domain: String,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
    workload_ttl: Duration,
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
            return Self::from_pem(trust_domain, &certificate, &key, workload_ttl);
        }
        for _ in 0..3 {
            if let Some(kv) = store.get(CA_KEY).await? {
                let stored: StoredCa = serde_json::from_slice(&kv.value).map_err(|e| {
                    IdentityError::Ca(format!("the stored root is unreadable: {e}"))
                })?;
                return Self::from_pem(
                    trust_domain,
                    &stored.certificate,
                    &stored.key,
                    workload_ttl,
                );
            }
            let (certificate, key) = new_root(trust_domain)?;
            let value = serde_json::to_vec(&StoredCa { certificate, key })
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

    fn from_pem(
        trust_domain: &str,
        certificate: &str,
        key: &str,
        workload_ttl: Duration,
    ) -> Result<Self, IdentityError> {
        let key = KeyPair::from_pem(key).map_err(|e| IdentityError::Ca(format!("key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(certificate, key)
            .map_err(|e| IdentityError::Ca(format!("certificate: {e}")))?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            root_pem: certificate.to_string(),
            issuer,
            workload_ttl,
        })
    }

    /// The roots proxies trust (PEM).
    pub fn trust_bundle(&self) -> &str {
        &self.root_pem
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
    /// name is the node's SPIFFE ID; it is for TLS clients and servers, not a CA.
    pub fn issue(&self, csr_pem: &str, node: &ResourceKey) -> Result<Issued, IdentityError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| IdentityError::Csr(e.to_string()))?;
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
        let certificate = csr
            .signed_by(&self.issuer)
            .map_err(|e| IdentityError::Csr(e.to_string()))?;
        Ok(Issued {
            chain_pem: format!("{}{}", certificate.pem(), self.root_pem),
            spiffe_id,
            not_after,
        })
    }
}

impl Ca {
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
        let certificate = params.signed_by(&key, &self.issuer).map_err(ca)?;
        Ok((
            format!("{}{}", certificate.pem(), self.root_pem),
            key.serialize_pem(),
        ))
    }
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
/// use left (one is spent) and name that node.
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
