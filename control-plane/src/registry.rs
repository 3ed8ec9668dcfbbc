//! The instance registry (Cloud Map-like): namespaces → services → instances, each with an
//! address callers dial (off Kubernetes, its sidecar's ingress), attributes for selection, a
//! status (healthy or draining) and an optional TTL kept by heartbeats.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

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

/// The instance attributes naming its zone, first found wins: App Mesh's controller's
/// (`AVAILABILITY_ZONE`, from the node's topology), then Kubernetes' well-known label.
pub const ZONE_ATTRIBUTES: [&str; 2] = ["AVAILABILITY_ZONE", "topology.kubernetes.io/zone"];

impl Instance {
    /// The zone it runs in, if an attribute names one.
    pub fn zone(&self) -> Option<&str> {
        ZONE_ATTRIBUTES
            .iter()
            .find_map(|k| self.attributes.get(*k))
            .map(String::as_str)
            .filter(|z| !z.is_empty())
    }

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
        if let Some(ttl) = self.ttl_seconds
            && !(1..=MAX_TTL_SECONDS).contains(&ttl)
        {
            return Err((
                "ttlSeconds".into(),
                format!("{ttl} is out of range: must be 1..={MAX_TTL_SECONDS}"),
            ));
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
    /// The instance it registers, checked with [`Instance::validate`] and its address with
    /// `policy` ([`AddressPolicy::check`]); IP addresses in their canonical form and DNS names in
    /// lower case, so one endpoint is spelled one way.
    pub fn into_instance(self, policy: &AddressPolicy) -> Result<Instance, (String, String)> {
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
        policy
            .check(&instance.address)
            .map_err(|reason| ("address".to_string(), reason))?;
        Ok(instance)
    }
}

/// An IP range, `ADDRESS/PREFIX`; a bare address is the range of that one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("{input:?} is not a CIDR range: {reason}")]
pub struct CidrError {
    input: String,
    reason: String,
}

impl std::str::FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let fail = |reason: String| CidrError {
            input: s.to_string(),
            reason,
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| fail(format!("{addr:?} is not an IP address")))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| fail(format!("the prefix length must be 0..={max}")))?,
        };
        let cidr = Self { network, prefix };
        let masked = cidr.masked(network);
        if masked != network {
            return Err(fail(format!(
                "bits are set past the prefix length (the range is {masked}/{prefix})"
            )));
        }
        Ok(cidr)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    /// Whether `ip` is in the range; an IPv4 range holds only IPv4 addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.network.is_ipv4() && self.masked(ip) == self.network
    }

    /// `ip` with the bits past the prefix cleared.
    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix.min(32)));
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask.unwrap_or(0)))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix.min(128)));
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask.unwrap_or(0)))
            }
        }
    }
}

/// Which addresses an instance may be registered at. Refused, because no mesh endpoint is ever
/// there and a caller's proxy sent to one would hand it requests and their headers: the
/// unspecified and "this network" addresses (0.0.0.0/8, `::`; dialled, 0.0.0.0 reaches the
/// dialling host), link-local ranges (169.254.0.0/16, fe80::/10: the cloud metadata and
/// credential services answer at 169.254.169.254, 169.254.170.2, 169.254.170.23), multicast
/// (224.0.0.0/4, ff00::/8), the broadcast address, the metadata services outside those ranges
/// (AWS's fd00:ec2::254 and fd00:ec2::23, Alibaba Cloud's 100.100.100.200, Azure's WireServer
/// 168.63.129.16), the IPv6 forms that carry any of the IPv4 ones (IPv4-mapped `::ffff:a.b.c.d`,
/// IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`), the metadata services' DNS names
/// ([`METADATA_NAMES`]), and names the resolver reads as IPv4 addresses (`2852039166`,
/// `0xa9fea9fe`, `169.254.43518`: inet_aton's forms), which must be written in dotted decimal.
/// Loopback (127.0.0.0/8, `::1`) is allowed: sidecars on one machine register 127.0.0.1.
///
/// An operator allows ranges despite the rule ([`AddressPolicy::allowing`],
/// `trellis-control --allow-registration-cidr`); names are refused regardless.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allowed: Vec<Cidr>,
}

/// The metadata services' DNS names: Google Cloud's `metadata.google.internal`, `metadata.goog`
/// and the short `metadata` (resolved through the search domain), and AWS's `instance-data`
/// (likewise) and `instance-data.ec2.internal`; `instance-data.REGION.compute.internal` is refused
/// too. Azure, Alibaba Cloud, Oracle Cloud and OpenStack publish only addresses.
pub const METADATA_NAMES: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
];

impl AddressPolicy {
    /// The rule, with nothing allowed despite it.
    pub const RULE: Self = Self {
        allowed: Vec::new(),
    };

    /// The rule, with the addresses in `allowed` permitted despite it.
    pub fn allowing(allowed: Vec<Cidr>) -> Self {
        Self { allowed }
    }

    pub fn allowed(&self) -> &[Cidr] {
        &self.allowed
    }

    /// Whether `address` (as [`Registration::into_instance`] stores it: an IP in canonical form
    /// or a DNS name in lower case) may be registered; else why not.
    pub fn check(&self, address: &str) -> Result<(), String> {
        let Ok(ip) = address.parse::<IpAddr>() else {
            return match refused_name(address) {
                Some(reason) => Err(format!("{address:?} is {reason}")),
                None => Ok(()),
            };
        };
        let Some(reason) = refused_ip(ip) else {
            return Ok(());
        };
        let carried = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let allowed = self
            .allowed
            .iter()
            .any(|c| c.contains(ip) || carried.is_some_and(|v4| c.contains(v4)));
        if allowed {
            return Ok(());
        }
        Err(format!(
            "{address:?} is {reason}, where no mesh endpoint is: refused (trellis-control \
             --allow-registration-cidr permits a range)"
        ))
    }
}

const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Why a registered IP address must not be an endpoint, if it must not.
pub fn refused_ip(ip: IpAddr) -> Option<String> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4).map(str::to_string),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => refused_v4(v4).map(|why| format!("an IPv6 form of {v4}, {why}")),
            None => refused_v6(v6).map(str::to_string),
        },
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    Some(match ip.octets() {
        _ if ip == METADATA_V4 => "the cloud metadata service (link-local, 169.254.0.0/16)",
        [0, ..] => "unspecified (0.0.0.0/8, \"this network\"; dialled, it is the dialling host)",
        [169, 254, ..] => "link-local (169.254.0.0/16, where cloud metadata services answer)",
        [224..=239, ..] => "multicast (224.0.0.0/4)",
        [255, 255, 255, 255] => "the broadcast address",
        [100, 100, 100, 200] => "Alibaba Cloud's metadata service",
        [168, 63, 129, 16] => "Azure's platform endpoint (WireServer)",
        _ => return None,
    })
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    Some(match s {
        [0, 0, 0, 0, 0, 0, 0, 0] => "unspecified (::)",
        [first, ..] if first & 0xffc0 == 0xfe80 => "link-local (fe80::/10)",
        [first, ..] if first & 0xff00 == 0xff00 => "multicast (ff00::/8)",
        [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254] => "AWS's instance metadata service",
        [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x23] => "AWS's EKS Pod Identity agent",
        _ => return None,
    })
}

/// The IPv4 address an IPv6 one stands for: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`, deprecated but still routed by some stacks; not `::` and `::1`) or NAT64's
/// well-known prefix (`64:ff9b::a.b.c.d`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    let low = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
    match bits >> 32 {
        0xffff | 0x0064_ff9b_0000_0000_0000_0000 => Some(low),
        0 if bits > 1 => Some(low),
        _ => None,
    }
}

/// Why a registered DNS name (lower case) must not be an endpoint, if it must not.
fn refused_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let regional = name
        .strip_prefix("instance-data.")
        .is_some_and(|rest| rest.ends_with(".compute.internal"));
    if METADATA_NAMES.contains(&name) || regional {
        return Some(
            "a cloud metadata service's name: refused (register the instance at its IP \
             address or another name)"
                .into(),
        );
    }
    inet_aton(name).map(|ip| {
        format!(
            "read as the IPv4 address {ip} by the proxies' resolver: register it as {ip}, where \
             it is checked"
        )
    })
}

/// The IPv4 address the C library's resolver reads `s` as, in inet_aton's forms: one to four
/// parts, each decimal, octal (leading `0`) or hexadecimal (`0x`), the last filling the bytes
/// left (`10.1` is 10.0.0.1).
fn inet_aton(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for p in &parts {
        let (digits, radix) = match (
            p.strip_prefix("0x").or(p.strip_prefix("0X")),
            p.strip_prefix('0'),
        ) {
            (Some(hex), _) => (hex, 16),
            (None, Some(octal)) if !octal.is_empty() => (octal, 8),
            _ => (*p, 10),
        };
        if digits.is_empty() && radix == 16 {
            values.push(0);
            continue;
        }
        values.push(u32::from_str_radix(digits, radix).ok()?);
    }
    let (last, init) = values.split_last()?;
    let mut addr: u32 = 0;
    for (i, v) in init.iter().enumerate() {
        if *v > 255 {
            return None;
        }
        addr |= v << (24 - 8 * i);
    }
    let room = 32 - 8 * init.len();
    if room < 32 && u64::from(*last) >> room != 0 {
        return None;
    }
    Some(Ipv4Addr::from(addr | last))
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
        r.into_instance(&AddressPolicy::default())
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

    /// `address` through the registration path, with `allowed` ranges permitted.
    fn registered_at(address: &str, allowed: &[&str]) -> Result<String, (String, String)> {
        let r = Registration {
            namespace: "demo".into(),
            service: "ct".into(),
            id: "i-1".into(),
            address: address.into(),
            port: 80.into(),
            attributes: BTreeMap::new(),
            status: InstanceStatus::Healthy,
            ttl_seconds: None,
        };
        let allowed = allowed.iter().map(|c| c.parse().unwrap()).collect();
        r.into_instance(&AddressPolicy::allowing(allowed))
            .map(|i| i.address)
    }

    #[test]
    fn addresses_no_endpoint_is_at_are_refused() {
        for (address, why) in [
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::", "unspecified"),
            ("[::]", "unspecified"),
            ("169.254.169.254", "metadata"),
            ("169.254.0.1", "link-local"),
            ("169.254.170.2", "link-local"),
            ("169.254.255.255", "link-local"),
            ("fe80::1", "link-local"),
            ("febf:ffff::1", "link-local"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("ff02::1", "multicast"),
            ("ff0e::fb", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("fd00:ec2::254", "AWS"),
            ("fd00:ec2::23", "EKS"),
            ("100.100.100.200", "Alibaba"),
            ("168.63.129.16", "Azure"),
            // IPv6 forms carrying a refused IPv4 address: mapped, compatible, NAT64.
            ("::ffff:169.254.169.254", "an IPv6 form of 169.254.169.254"),
            ("[::ffff:a9fe:a9fe]", "an IPv6 form of 169.254.169.254"),
            ("0:0:0:0:0:ffff:169.254.1.1", "an IPv6 form of 169.254.1.1"),
            ("::ffff:0.0.0.0", "an IPv6 form of 0.0.0.0"),
            ("::ffff:224.0.0.1", "an IPv6 form of 224.0.0.1"),
            ("::ffff:255.255.255.255", "an IPv6 form of 255.255.255.255"),
            ("::169.254.169.254", "an IPv6 form of 169.254.169.254"),
            (
                "64:ff9b::169.254.169.254",
                "an IPv6 form of 169.254.169.254",
            ),
            // Metadata services' names, in any case, with or without the root's dot.
            ("metadata.google.internal", "metadata service's name"),
            ("Metadata.Google.Internal.", "metadata service's name"),
            ("metadata", "metadata service's name"),
            ("metadata.goog", "metadata service's name"),
            ("instance-data", "metadata service's name"),
            ("instance-data.ec2.internal", "metadata service's name"),
            (
                "instance-data.eu-west-1.compute.internal",
                "metadata service's name",
            ),
            // Names the resolver reads as an IPv4 address (inet_aton).
            ("2852039166", "IPv4 address 169.254.169.254"),
            ("0xa9fea9fe", "IPv4 address 169.254.169.254"),
            ("0XA9.0xFE.0xa9.0xfe", "IPv4 address 169.254.169.254"),
            ("0251.0376.0251.0376", "IPv4 address 169.254.169.254"),
            ("169.254.43518", "IPv4 address 169.254.169.254"),
            ("169.16689662", "IPv4 address 169.254.169.254"),
            ("169.254.169.254.", "IPv4 address 169.254.169.254"),
            ("010.0.0.1", "IPv4 address 8.0.0.1"),
            ("0", "IPv4 address 0.0.0.0"),
        ] {
            let (field, reason) = registered_at(address, &[]).unwrap_err();
            assert_eq!(field, "address", "{address}");
            assert!(reason.contains(why), "{address}: {reason}");
        }
        let (_, reason) = registered_at("169.254.169.254", &[]).unwrap_err();
        assert!(
            reason.contains("--allow-registration-cidr"),
            "says how to permit it: {reason}"
        );
    }

    #[test]
    fn endpoint_addresses_are_allowed() {
        for (address, stored) in [
            ("127.0.0.1", "127.0.0.1"),
            ("127.1.2.3", "127.1.2.3"),
            ("::1", "::1"),
            ("10.0.0.1", "10.0.0.1"),
            ("172.16.5.4", "172.16.5.4"),
            ("192.168.1.1", "192.168.1.1"),
            ("100.64.0.1", "100.64.0.1"),
            ("1.0.0.1", "1.0.0.1"),
            ("223.255.255.255", "223.255.255.255"),
            ("240.0.0.1", "240.0.0.1"),
            ("255.255.255.254", "255.255.255.254"),
            ("169.253.255.255", "169.253.255.255"),
            ("169.255.0.1", "169.255.0.1"),
            ("192.0.2.10", "192.0.2.10"),
            ("198.51.100.7", "198.51.100.7"),
            ("203.0.113.9", "203.0.113.9"),
            ("2001:db8::1", "2001:db8::1"),
            ("fd00::1", "fd00::1"),
            ("fd00:ec2::253", "fd00:ec2::253"),
            ("fec0::1", "fec0::1"),
            ("fe7f::1", "fe7f::1"),
            ("::ffff:10.0.0.1", "::ffff:10.0.0.1"),
            ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
            ("64:ff9b::192.0.2.1", "64:ff9b::c000:201"),
            ("svc.example", "svc.example"),
            ("metadata.example.com", "metadata.example.com"),
            ("my-metadata", "my-metadata"),
            ("instance-data.example", "instance-data.example"),
            ("host-1.internal", "host-1.internal"),
            ("1.2.3.4.5", "1.2.3.4.5"),
            ("0xg", "0xg"),
            ("08.1.2.3", "08.1.2.3"),
            ("4294967296", "4294967296"),
            ("1.256.3.4", "1.256.3.4"),
        ] {
            assert_eq!(
                registered_at(address, &[]).as_deref(),
                Ok(stored),
                "{address}"
            );
        }
    }

    #[test]
    fn allowed_ranges_permit_refused_addresses() {
        let link_local = ["169.254.0.0/16"];
        assert!(registered_at("169.254.169.254", &link_local).is_ok());
        assert!(registered_at("169.254.1.1", &link_local).is_ok());
        assert!(
            registered_at("::ffff:169.254.1.1", &link_local).is_ok(),
            "an IPv4 range covers the IPv6 forms of its addresses"
        );
        assert!(registered_at("224.0.0.1", &link_local).is_err());
        assert!(registered_at("fe80::1", &link_local).is_err());
        assert!(registered_at("fe80::1", &["fe80::/10"]).is_ok());
        assert!(registered_at("fe80::1", &["fe80::/64"]).is_ok());
        assert!(registered_at("fe80:0:0:1::1", &["fe80::/64"]).is_err());
        assert!(registered_at("169.254.169.254", &["169.254.169.254"]).is_ok());
        assert!(registered_at("169.254.169.253", &["169.254.169.254/32"]).is_err());
        assert!(registered_at("0.0.0.0", &["0.0.0.0/0"]).is_ok());
        assert!(registered_at("::", &["0.0.0.0/0"]).is_err());
        // Names are refused regardless.
        assert!(registered_at("metadata", &["0.0.0.0/0", "::/0"]).is_err());
        assert!(registered_at("2852039166", &["0.0.0.0/0"]).is_err());
    }

    #[test]
    fn cidrs_parse_strictly() {
        for (input, shown) in [
            ("169.254.0.0/16", "169.254.0.0/16"),
            ("10.1.2.3", "10.1.2.3/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("fe80::/10", "fe80::/10"),
            ("FD00:EC2::254", "fd00:ec2::254/128"),
        ] {
            assert_eq!(input.parse::<Cidr>().unwrap().to_string(), shown);
        }
        for (input, why) in [
            ("169.254.1.0/16", "the range is 169.254.0.0/16"),
            ("10.0.0.0/33", "0..=32"),
            ("fe80::/129", "0..=128"),
            ("10.0.0.0/", "0..=32"),
            ("10.0.0.0/-1", "0..=32"),
            ("example.com/24", "not an IP address"),
            ("", "not an IP address"),
        ] {
            let err = input.parse::<Cidr>().unwrap_err().to_string();
            assert!(err.contains(why), "{input}: {err}");
        }
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
