//! The proxy's workload identity: its own key (generated here, kept in the data dir, never sent),
//! the certificate signing requests it sends over the config stream, and the certificate and
//! trust bundle the control plane's CA answers with.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use trellis_proto::v1 as pb;

const DIR: &str = "identity";
const KEY: &str = "key.pem";
const CHAIN: &str = "cert.pem";
const BUNDLE: &str = "bundle.pem";
/// The least time between renewals: however short the certificate's life (or skewed the
/// clocks), the proxy never asks again sooner (the control plane refuses sooner ones too).
pub const MIN_RENEWAL_DELAY: Duration = Duration::from_secs(30);

/// The proxy's key and what was issued for it.
#[derive(Debug)]
pub struct Identity {
    dir: PathBuf,
    key: KeyPair,
    node: String,
}

impl Identity {
    /// The key kept in `data_dir`, or a new one written there (readable by the proxy's user
    /// only).
    pub fn load_or_create(data_dir: &Path, node: &str) -> std::io::Result<Self> {
        let dir = data_dir.join(DIR);
        let path = dir.join(KEY);
        let key = match std::fs::read_to_string(&path) {
            Ok(pem) => KeyPair::from_pem(&pem).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate().map_err(std::io::Error::other)?;
                std::fs::create_dir_all(&dir)?;
                write_private(&path, key.serialize_pem().as_bytes())?;
                key
            }
            Err(e) => return Err(e),
        };
        Ok(Self {
            dir,
            key,
            node: node.to_string(),
        })
    }

    /// A certificate signing request for the key (PEM); the CA decides the names.
    pub fn csr(&self) -> Result<String, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, self.node.clone());
        params.distinguished_name = name;
        params.serialize_request(&self.key)?.pem()
    }

    /// The key, PEM (for the proxy's own TLS; it is never sent).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Loads a certificate kept from an earlier run into `credentials`, if there is one.
    pub fn restore(&self, credentials: &crate::tls::Credentials) -> bool {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).ok();
        match (read(CHAIN), read(BUNDLE)) {
            (Some(chain), Some(bundle)) => {
                credentials.set(&chain, &self.key_pem(), &bundle).is_ok()
            }
            _ => false,
        }
    }

    /// Keeps what the CA issued; returns when to renew it (half its life from now, never
    /// sooner than [`MIN_RENEWAL_DELAY`]).
    pub fn store(&self, issued: &pb::Identity) -> std::io::Result<Duration> {
        std::fs::create_dir_all(&self.dir)?;
        write_atomic(&self.dir.join(CHAIN), issued.certificate_chain.as_bytes())?;
        write_atomic(&self.dir.join(BUNDLE), issued.trust_bundle.as_bytes())?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(renewal_delay(issued.not_after, now))
    }
}

/// When to renew a certificate valid until `not_after` at `now` (Unix seconds): at half its
/// remaining life, and at least [`MIN_RENEWAL_DELAY`] from now.
fn renewal_delay(not_after: i64, now: u64) -> Duration {
    let left = u64::try_from(not_after).unwrap_or(0).saturating_sub(now);
    Duration::from_secs(left / 2).max(MIN_RENEWAL_DELAY)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{
        io::Write as _,
        os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // The mode applies only to a file created now: one left by an earlier run is made private
    // before the key is written in it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Half the remaining life, never sooner than 30 s, never 0 (a past or 1-second
    /// certificate does not make the proxy and the control plane loop).
    #[test]
    fn renewals_wait_half_the_life_and_at_least_30s() {
        let now = 1_000_000;
        assert_eq!(
            renewal_delay(now as i64 + 3600, now),
            Duration::from_secs(1800)
        );
        assert_eq!(renewal_delay(now as i64 + 1, now), MIN_RENEWAL_DELAY);
        assert_eq!(renewal_delay(now as i64 - 10, now), MIN_RENEWAL_DELAY);
        assert_eq!(renewal_delay(-1, now), MIN_RENEWAL_DELAY);
    }

    /// A key.tmp left (world-readable) by an interrupted run does not leave the key readable.
    #[test]
    fn a_leftover_temporary_key_file_is_made_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let ident = dir.path().join(DIR);
        std::fs::create_dir_all(&ident).unwrap();
        let tmp = ident.join(KEY).with_extension("tmp");
        std::fs::write(&tmp, b"old").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        Identity::load_or_create(dir.path(), "default/front").unwrap();
        let mode = std::fs::metadata(ident.join(KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn the_key_is_kept_private_and_reused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path(), "default/front").unwrap();
        let mode = std::fs::metadata(dir.path().join(DIR).join(KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Identity::load_or_create(dir.path(), "default/front").unwrap();
        assert_eq!(a.key.serialize_pem(), b.key.serialize_pem());
        assert!(
            a.csr()
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
        );
    }
}
