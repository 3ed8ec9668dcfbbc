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

    /// Checks a registration as strictly as a proxy checks the endpoint it becomes, so that no
    /// registration can make a proxy reject its snapshot. Errors are (field, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (field, value) in [
            ("namespace", &self.namespace),
            ("service", &self.service),
            ("id", &self.id),
        ] {
            if !valid_name(value) {
                return Err((field.into(), format!("{value:?} {NAME_RULE}")));
            }
        }
        if !trellis_proxy::snapshot::valid_host(&self.address) {
            return Err((
                "address".into(),
                format!(
                    "{:?} is not an IP address or a DNS name (ASCII labels of letters, digits, \
                     '-' and '_', at most 63 bytes each and 253 in all)",
                    self.address
                ),
            ));
        }
        if self.port == 0 {
            return Err(("port".into(), "must be 1..=65535".into()));
        }
        if self.attributes.len() > MAX_ATTRIBUTES {
            return Err((
                "attributes".into(),
                format!(
                    "{} attributes: at most {MAX_ATTRIBUTES} are allowed",
                    self.attributes.len()
                ),
            ));
        }
        for (k, v) in &self.attributes {
            if k.is_empty()
                || k.len() > MAX_ATTRIBUTE_KEY
                || !k.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err((
                    format!("attributes.{k}"),
                    format!(
                        "key {k:?} must be 1 to {MAX_ATTRIBUTE_KEY} printable ASCII characters \
                         without spaces"
                    ),
                ));
            }
            if v.len() > MAX_ATTRIBUTE_VALUE
                || !v.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
            {
                return Err((
                    format!("attributes.{k}"),
                    format!(
                        "the value must be at most {MAX_ATTRIBUTE_VALUE} printable ASCII characters"
                    ),
                ));
            }
        }
        if let Some(ttl) = self.ttl_seconds {
            if !(1..=MAX_TTL_SECONDS).contains(&ttl) {
                return Err((
                    "ttlSeconds".into(),
                    format!("{ttl} is out of range: must be 1..={MAX_TTL_SECONDS}"),
                ));
            }
        }
        Ok(())
    }

    /// The address as a proxy dials it: `host:port`, IPv6 in brackets.
    pub fn endpoint(&self) -> String {
        trellis_proxy::snapshot::host_port(&self.address, self.port)
    }
}

/// At most this many attributes per instance, keys and values at most this long (Cloud Map's
/// limits).
pub const MAX_ATTRIBUTES: usize = 30;
pub const MAX_ATTRIBUTE_KEY: usize = 255;
pub const MAX_ATTRIBUTE_VALUE: usize = 1024;
/// The longest TTL a registration may ask for: one day.
pub const MAX_TTL_SECONDS: u64 = 86_400;

pub const NAME_RULE: &str = "must be 1 to 253 ASCII letters, digits, '-', '_' or '.', \
                         not starting with '-' or '.'";

/// A registry namespace, service or instance id: a resource name, plus the upper case and `_`
/// that Cloud Map allows.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// What a client sends to register an instance. Numbers are read wide so that an out-of-range
/// value is reported with its range, and unknown fields are refused, never ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Registration {
    pub namespace: String,
    pub service: String,
    pub id: String,
    pub address: String,
    pub port: serde_json::Number,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub status: InstanceStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<serde_json::Number>,
}

impl Registration {
    /// The instance it registers, checked with [`Instance::validate`]; IP addresses in their
    /// canonical form and DNS names in lower case, so one endpoint is spelled one way.
    pub fn into_instance(self) -> Result<Instance, (String, String)> {
        let port = self
            .port
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                (
                    "port".to_string(),
                    format!("{} is out of range: must be 1..=65535", self.port),
                )
            })?;
        let ttl_seconds = match &self.ttl_seconds {
            None => None,
            Some(n) => Some(
                n.as_u64()
                    .filter(|t| (1..=MAX_TTL_SECONDS).contains(t))
                    .ok_or_else(|| {
                        (
                            "ttlSeconds".to_string(),
                            format!("{n} is out of range: must be 1..={MAX_TTL_SECONDS}"),
                        )
                    })?,
            ),
        };
        let bare = self
            .address
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .unwrap_or(&self.address);
        let address = match bare.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => self.address.to_ascii_lowercase(),
        };
        let instance = Instance {
            namespace: self.namespace,
            service: self.service,
            id: self.id,
            address,
            port,
            attributes: self.attributes,
            status: self.status,
            ttl_seconds,
            lease: None,
        };
        instance.validate()?;
        Ok(instance)
    }
}

pub fn key(namespace: &str, service: &str, id: &str) -> String {
    format!("{PREFIX}{namespace}/{service}/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(json: &str) -> Result<Instance, (String, String)> {
        let base = r#""namespace": "demo", "service": "ct", "id": "i-1""#;
        let r: Registration = serde_json::from_str(&format!("{{{base}, {json}}}")).unwrap();
        r.into_instance()
    }

    #[test]
    fn registrations_are_checked_as_strictly_as_endpoints() {
        let ok = registration(r#""address": "[::1]", "port": 80"#).unwrap();
        assert_eq!(ok.address, "::1");
        assert_eq!(ok.endpoint(), "[::1]:80");
        let ok =
            registration(r#""address": "Svc.Example", "port": 80, "ttlSeconds": 86400"#).unwrap();
        assert_eq!(ok.endpoint(), "svc.example:80");
        for (json, field) in [
            (r#""address": "ünï.example", "port": 80"#, "address"),
            (r#""address": "bad!host", "port": 80"#, "address"),
            (r#""address": "a\r\nb", "port": 80"#, "address"),
            (r#""address": "-a.example", "port": 80"#, "address"),
            (r#""address": "a..b", "port": 80"#, "address"),
            (r#""address": "10.0.0.1:80", "port": 80"#, "address"),
            (r#""address": "10.0.0.1", "port": 0"#, "port"),
            (r#""address": "10.0.0.1", "port": 65536"#, "port"),
            (r#""address": "10.0.0.1", "port": -1"#, "port"),
            (r#""address": "10.0.0.1", "port": 1.5"#, "port"),
            (
                r#""address": "10.0.0.1", "port": 80, "ttlSeconds": 0"#,
                "ttlSeconds",
            ),
            (
                r#""address": "10.0.0.1", "port": 80, "ttlSeconds": 9223372036854775807"#,
                "ttlSeconds",
            ),
            (
                r#""address": "10.0.0.1", "port": 80, "attributes": {"k": "a\u0000b"}"#,
                "attributes.k",
            ),
        ] {
            let err = registration(json).unwrap_err();
            assert_eq!(err.0, field, "{json}: {err:?}");
        }
        let long = "x".repeat(MAX_ATTRIBUTE_VALUE + 1);
        let err = registration(&format!(
            r#""address": "10.0.0.1", "port": 80, "attributes": {{"k": "{long}"}}"#
        ))
        .unwrap_err();
        assert_eq!(err.0, "attributes.k");
        let unknown = serde_json::from_str::<Registration>(
            r#"{"namespace": "d", "service": "s", "id": "i", "address": "a", "port": 1, "ttl": 3}"#,
        );
        assert!(
            unknown
                .unwrap_err()
                .to_string()
                .contains("unknown field `ttl`")
        );
    }

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
