//! Operators of the API: bearer tokens with a role (`admin` writes, `viewer` reads), kept in the
//! store as SHA-256 hashes, and the audit log of every write (who, what, when).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::store::{Expect, Op, Store, StoreError};

pub const OPERATOR_PREFIX: &str = "operators/";
pub const AUDIT_PREFIX: &str = "audit/";
/// The file the first admin token is written to, in the data dir.
pub const BOOTSTRAP_FILE: &str = "admin-token";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads and writes.
    Admin,
    /// Reads.
    Viewer,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operator {
    pub name: String,
    pub role: Role,
    pub created: String,
}

/// One write, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    pub time: String,
    /// The operator's name (`anonymous` while authentication is off, or for a write refused
    /// for want of a known token).
    pub who: String,
    /// The operator's id (as `trellis operator list` shows it), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_id: Option<String>,
    /// `METHOD /path`.
    pub action: String,
    /// What changed (the resources an apply created or configured, ...), or the outcome.
    pub what: String,
    pub status: u16,
}

fn sha256(token: &str) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    hash.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// A new operator token: the token (shown once) and the operator.
pub async fn create_operator(
    store: &dyn Store,
    name: &str,
    role: Role,
) -> Result<(String, Operator), StoreError> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| StoreError::Backend("no randomness".into()))?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let token = format!("trellis-op-{secret}");
    let operator = Operator {
        name: name.to_string(),
        role,
        created: now(),
    };
    let value = serde_json::to_vec(&operator).map_err(|e| StoreError::Backend(e.to_string()))?;
    store
        .apply(vec![Op::Put {
            key: format!("{OPERATOR_PREFIX}{}", sha256(&token)),
            value,
            expect: Expect::Absent,
            lease: None,
        }])
        .await?;
    Ok((token, operator))
}

/// The operator a bearer token belongs to, with its id.
pub async fn authenticate(
    store: &dyn Store,
    token: &str,
) -> Result<Option<ListedOperator>, StoreError> {
    let hash = sha256(token);
    let Some(kv) = store.get(&format!("{OPERATOR_PREFIX}{hash}")).await? else {
        return Ok(None);
    };
    Ok(serde_json::from_slice(&kv.value)
        .ok()
        .map(|operator| ListedOperator {
            id: hash.chars().take(12).collect(),
            operator,
        }))
}

/// With no operator yet, creates the first admin and writes its token to `data_dir` (mode
/// 0600): the path, or None when operators exist.
pub async fn bootstrap(
    store: &dyn Store,
    data_dir: &std::path::Path,
) -> Result<Option<std::path::PathBuf>, Box<dyn std::error::Error + Send + Sync>> {
    if !store.list(OPERATOR_PREFIX).await?.items.is_empty() {
        return Ok(None);
    }
    let (token, _) = create_operator(store, "admin", Role::Admin).await?;
    let path = data_dir.join(BOOTSTRAP_FILE);
    use std::{
        io::Write as _,
        os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    // The mode above applies only to a file created now: a file left there is made private
    // before the token is written in it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(format!("{token}\n").as_bytes())?;
    Ok(Some(path))
}

/// Records a write.
pub async fn record(store: &dyn Store, entry: AuditEntry) -> Result<(), StoreError> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let value = serde_json::to_vec(&entry).map_err(|e| StoreError::Backend(e.to_string()))?;
    store
        .apply(vec![Op::Put {
            // Ordered by time; the random part keeps two writes of one nanosecond apart.
            key: format!("{AUDIT_PREFIX}{nanos:039}-{:08x}", fastrand::u32(..)),
            value,
            expect: Expect::Absent,
            lease: None,
        }])
        .await
        .map(drop)
}

/// Forgets audit entries recorded before `before`, and the oldest beyond `keep` entries:
/// how many went.
pub async fn prune_audit(
    store: &dyn Store,
    before: SystemTime,
    keep: usize,
) -> Result<usize, StoreError> {
    let cutoff = before
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let listing = store.list(AUDIT_PREFIX).await?;
    let excess = listing.items.len().saturating_sub(keep);
    let old: Vec<Op> = listing
        .items
        .iter()
        .enumerate()
        .filter(|(i, kv)| {
            // Keys are ordered by time: the nanoseconds, then a random part.
            let nanos = kv
                .key
                .strip_prefix(AUDIT_PREFIX)
                .and_then(|k| k.split('-').next())
                .and_then(|n| n.parse::<u128>().ok())
                .unwrap_or(0);
            *i < excess || nanos < cutoff
        })
        .map(|(_, kv)| Op::Delete {
            key: kv.key.clone(),
            expect: Expect::Any,
        })
        .collect();
    let n = old.len();
    // In batches: one transaction stays small.
    for batch in old.chunks(500) {
        store.apply(batch.to_vec()).await?;
    }
    Ok(n)
}

/// The last `limit` writes, oldest first.
pub async fn audit(store: &dyn Store, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
    let listing = store.list(AUDIT_PREFIX).await?;
    let mut entries: Vec<AuditEntry> = listing
        .items
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect();
    let skip = entries.len().saturating_sub(limit);
    Ok(entries.split_off(skip))
}

/// An operator as listed: its id (the first 12 hex digits of its token's hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedOperator {
    pub id: String,
    #[serde(flatten)]
    pub operator: Operator,
}

pub async fn list_operators(store: &dyn Store) -> Result<Vec<ListedOperator>, StoreError> {
    let listing = store.list(OPERATOR_PREFIX).await?;
    Ok(listing
        .items
        .iter()
        .filter_map(|kv| {
            let hash = kv.key.strip_prefix(OPERATOR_PREFIX)?;
            Some(ListedOperator {
                id: hash.chars().take(12).collect(),
                operator: serde_json::from_slice(&kv.value).ok()?,
            })
        })
        .collect())
}

/// Why an operator cannot be revoked.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("give at least 8 hex digits of the operator's id (trellis operator list)")]
    BadId,
    #[error("no operator has id {0}")]
    NotFound(String),
    #[error("{0} names several operators: give more of it")]
    Ambiguous(String),
    #[error("{0} is the last admin: create another admin first")]
    LastAdmin(String),
    #[error("the operators changed while revoking (another revocation?): list them and try again")]
    Concurrent,
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Revokes the operator whose id starts with `id`; never the last admin.
pub async fn revoke_operator(store: &dyn Store, id: &str) -> Result<Operator, RevokeError> {
    if id.len() < 8 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RevokeError::BadId);
    }
    let id = id.to_ascii_lowercase();
    let all = store.list(OPERATOR_PREFIX).await?;
    let matching: Vec<_> = all
        .items
        .iter()
        .filter(|kv| kv.key[OPERATOR_PREFIX.len()..].starts_with(&id))
        .collect();
    let kv = match matching.as_slice() {
        [] => return Err(RevokeError::NotFound(id)),
        [kv] => *kv,
        _ => return Err(RevokeError::Ambiguous(id)),
    };
    let operator: Operator =
        serde_json::from_slice(&kv.value).map_err(|e| StoreError::Backend(e.to_string()))?;
    let admins = all
        .items
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Operator>(&kv.value).ok())
        .filter(|o| o.role == Role::Admin)
        .count();
    if operator.role == Role::Admin && admins <= 1 {
        return Err(RevokeError::LastAdmin(operator.name));
    }
    // Revoked at the revision it was read at: a concurrent change is a conflict, not a miss.
    let mut ops = vec![Op::Delete {
        key: kv.key.clone(),
        expect: Expect::Revision(kv.mod_revision),
    }];
    // Revoking an admin, the admins that remain are those counted above, in the same
    // transaction: two admins revoked at once each guard the other, so one of the two fails
    // and an admin always remains.
    if operator.role == Role::Admin {
        ops.extend(
            all.items
                .iter()
                .filter(|other| other.key != kv.key)
                .filter(|other| {
                    serde_json::from_slice::<Operator>(&other.value)
                        .is_ok_and(|o| o.role == Role::Admin)
                })
                .map(|other| Op::Put {
                    key: other.key.clone(),
                    value: other.value.clone(),
                    expect: Expect::Revision(other.mod_revision),
                    lease: other.lease,
                }),
        );
    }
    match store.apply(ops).await {
        Ok(_) => Ok(operator),
        Err(StoreError::Conflict { .. }) => Err(RevokeError::Concurrent),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries past the retention, and the oldest beyond the count kept, are forgotten; the
    /// rest stay in order.
    #[tokio::test]
    async fn the_audit_log_keeps_its_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let day = std::time::Duration::from_secs(24 * 3600);
        let now = SystemTime::now();
        for (i, age) in [100, 50, 3, 2, 1].iter().enumerate() {
            let at = (now - day * *age)
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let entry = serde_json::json!({ "n": i });
            store
                .apply(vec![Op::Put {
                    key: format!("{AUDIT_PREFIX}{at:039}-{i:08x}"),
                    value: serde_json::to_vec(&entry).unwrap(),
                    expect: Expect::Absent,
                    lease: None,
                }])
                .await
                .unwrap();
        }
        let keys = |store: &crate::store::embedded::EmbeddedStore| {
            let store = store.clone();
            async move {
                store
                    .list(AUDIT_PREFIX)
                    .await
                    .unwrap()
                    .items
                    .into_iter()
                    .map(|kv| kv.key.rsplit('-').next().unwrap().to_string())
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(prune_audit(&store, now - day * 90, 100).await.unwrap(), 1);
        assert_eq!(
            keys(&store).await,
            ["00000001", "00000002", "00000003", "00000004"]
        );
        assert_eq!(prune_audit(&store, now - day * 90, 2).await.unwrap(), 2);
        assert_eq!(keys(&store).await, ["00000003", "00000004"]);
    }
}
