//! The instance registry (Cloud Map-like): namespaces → services → instances, each with an
//! address callers dial (off Kubernetes, its sidecar's ingress), attributes for selection, a
//! status (healthy or draining) and an optional TTL kept by heartbeats.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    pub namespace: String,
    pub service: String,
    pub id: String,
    pub address: String,
    pub port: u16,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub status: InstanceStatus,
    /// Seconds without a heartbeat before the instance is removed; none: until deregistered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// Set by the control plane: the store lease holding the TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceStatus {
    #[default]
    Healthy,
    /// Gets no new requests; in-flight ones finish.
    Draining,
}

impl InstanceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Draining => "draining",
        }
    }
}

pub const PREFIX: &str = "instances/";

impl Instance {
    pub fn store_key(&self) -> String {
        key(&self.namespace, &self.service, &self.id)
    }

    /// Whether every `selector` attribute is set to the same value on this instance.
    pub fn matches(&self, namespace: &str, service: &str, selector: &[(&str, &str)]) -> bool {
        self.namespace == namespace
            && self.service == service
            && selector
                .iter()
                .all(|(k, v)| self.attributes.get(*k).is_some_and(|have| have == v))
    }

    /// Checks the fields a registration must have.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let name_ok =
            |s: &str| !s.is_empty() && !s.contains('/') && !s.contains(char::is_whitespace);
        for (field, value) in [
            ("namespace", &self.namespace),
            ("service", &self.service),
            ("id", &self.id),
        ] {
            if !name_ok(value) {
                return Err((
                    field.into(),
                    format!("{value:?} must be non-empty without '/' or spaces"),
                ));
            }
        }
        if self.address.is_empty() || self.address.contains(['/', ' ']) {
            return Err((
                "address".into(),
                format!("{:?} is not an IP or host name", self.address),
            ));
        }
        if self.port == 0 {
            return Err(("port".into(), "must be 1..=65535".into()));
        }
        if self.ttl_seconds == Some(0) {
            return Err(("ttlSeconds".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

pub fn key(namespace: &str, service: &str, id: &str) -> String {
    format!("{PREFIX}{namespace}/{service}/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_by_attributes() {
        let i = Instance {
            namespace: "ns".into(),
            service: "ct".into(),
            id: "1".into(),
            address: "127.0.0.1".into(),
            port: 8080,
            attributes: [("version".to_string(), "blue".to_string())].into(),
            status: InstanceStatus::Healthy,
            ttl_seconds: None,
            lease: None,
        };
        assert!(i.matches("ns", "ct", &[]));
        assert!(i.matches("ns", "ct", &[("version", "blue")]));
        assert!(!i.matches("ns", "ct", &[("version", "red")]));
        assert!(!i.matches("ns", "other", &[]));
        assert!(i.validate().is_ok());
        let bad = Instance { port: 0, ..i };
        assert_eq!(
            bad.validate().unwrap_err(),
            ("port".into(), "must be 1..=65535".into())
        );
    }
}
