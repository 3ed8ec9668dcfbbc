//! `trellis import`: App Mesh configuration kept outside Kubernetes — CloudFormation templates,
//! Terraform, or what the App Mesh API returned (`aws appmesh describe-*`) — turned into
//! App Mesh-shaped Trellis manifests (`appmesh.k8s.aws/v1beta2`), with a report of every field
//! that could not be carried over and why.
//!
//! Each front end reads its format into [`ApiResource`]s: the App Mesh API's own shape (the
//! `spec` of a `describe-*` answer, camelCase), which every source maps onto field by field.
//! [`convert`] turns those into manifests; what the manifests may hold is decided by the one
//! field table of `compat` (a field Trellis refuses is dropped into the report with the table's
//! reason), so the output passes `trellis validate`.

pub mod api_json;
pub mod cloudformation;
mod convert;
pub mod terraform;

use std::fmt;

use serde_json::Value;

pub use convert::{Converted, EcsOptions, EcsReplacement, convert};

/// The App Mesh API's resource kinds. A `Route` is a resource of its own there, folded into its
/// VirtualRouter's `routes[]` by [`convert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ApiKind {
    Mesh,
    VirtualService,
    VirtualRouter,
    Route,
    VirtualNode,
    VirtualGateway,
    GatewayRoute,
}

impl ApiKind {
    pub const ALL: [ApiKind; 7] = [
        Self::Mesh,
        Self::VirtualService,
        Self::VirtualRouter,
        Self::Route,
        Self::VirtualNode,
        Self::VirtualGateway,
        Self::GatewayRoute,
    ];

    /// The name as the App Mesh API (and CloudFormation's `AWS::AppMesh::…`) spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mesh => "Mesh",
            Self::VirtualService => "VirtualService",
            Self::VirtualRouter => "VirtualRouter",
            Self::Route => "Route",
            Self::VirtualNode => "VirtualNode",
            Self::VirtualGateway => "VirtualGateway",
            Self::GatewayRoute => "GatewayRoute",
        }
    }
}

impl fmt::Display for ApiKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One App Mesh resource in the API's shape, whatever format it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResource {
    pub kind: ApiKind,
    /// The mesh it belongs to (`meshName`).
    pub mesh: String,
    /// Its App Mesh name (`virtualNodeName`, `routeName`, ...; for a VirtualService the
    /// hostname clients use).
    pub name: String,
    /// A Route's VirtualRouter, a GatewayRoute's VirtualGateway (their `virtualRouterName`,
    /// `virtualGatewayName`); None for the other kinds.
    pub parent: Option<String>,
    /// `spec` as the App Mesh API returns it (camelCase keys, e.g. `listeners[].portMapping`,
    /// `serviceDiscovery.awsCloudMap`, `backends[].virtualService.virtualServiceName`,
    /// `httpRoute.action.weightedTargets[].virtualNode`). Null when the source gave none.
    pub spec: serde_json::Value,
    /// Where it was read from, for the report: `FILE: Resources.ColorNode`,
    /// `FILE: aws_appmesh_virtual_node.blue`, `FILE: [3]`.
    pub source: String,
}

/// Something the import could not carry over, or had to guess: the resource (its source), the
/// field (a path in the input's own spelling, or in the output manifest's) and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Note {
    pub source: String,
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.source, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.source, self.field, self.reason)
        }
    }
}

/// What a front end read: the resources, what it could not read (unresolved parameters or
/// references, resource types it skipped, ...), and ECS task definitions.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Read {
    pub resources: Vec<ApiResource>,
    pub notes: Vec<Note>,
    pub tasks: Vec<EcsTask>,
}

impl Read {
    pub fn extend(&mut self, other: Read) {
        self.resources.extend(other.resources);
        self.notes.extend(other.notes);
        self.tasks.extend(other.tasks);
    }
}

/// An ECS task definition in the ECS API's shape (camelCase: `containerDefinitions[]` with
/// `name`, `image`, `environment[{name, value}]`, `user`, `portMappings`, ...), as registered or
/// from CloudFormation's `AWS::ECS::TaskDefinition` (keys lowered with [`camel_keys`]).
/// [`convert`] finds the ones that ran App Mesh's Envoy and prints what replaces it.
#[derive(Debug, Clone, PartialEq)]
pub struct EcsTask {
    pub source: String,
    pub task: serde_json::Value,
}

/// CloudFormation's PascalCase keys in the App Mesh API's camelCase, recursively: the leading
/// run of capitals is lowered (`PortMapping` → `portMapping`, `AWSCloudMap` → `awsCloudMap`,
/// `DNS` → `dns`, `HTTP2` → `http2`, `TLS` → `tls`, `CertificateArn` → `certificateArn`). Values
/// are kept as they are.
pub fn camel_keys(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (lower_camel(&k), camel_keys(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(camel_keys).collect()),
        other => other,
    }
}

/// Keys of the App Mesh API's spec whose values are integers.
const INTEGER_KEYS: &[&str] = &[
    "port",
    "ports",
    "weight",
    "priority",
    "maxRetries",
    "healthyThreshold",
    "unhealthyThreshold",
    "intervalMillis",
    "timeoutMillis",
    "maxConnections",
    "maxPendingRequests",
    "maxRequests",
    "maxServerErrors",
    "maxEjectionPercent",
    "start",
    "end",
];

/// Keys of the App Mesh API's spec whose values are booleans.
const BOOLEAN_KEYS: &[&str] = &["enforce", "invert"];

/// CloudFormation and Terraform take a string where the API has a number or a boolean
/// (`Port: "8080"`, a `!Ref` of a `Number` parameter, `port = "8080"`): the API's types, where
/// the string is one.
pub(crate) fn api_types(value: Value) -> Value {
    fn integer(value: Value) -> Value {
        match value {
            Value::String(s) => s
                .trim()
                .parse::<i64>()
                .map_or(Value::String(s), Value::from),
            Value::Array(items) => Value::Array(items.into_iter().map(integer).collect()),
            other => other,
        }
    }
    match value {
        Value::Object(map) => {
            // A duration: {unit, value}.
            let duration = map.contains_key("unit");
            Value::Object(
                map.into_iter()
                    .map(|(key, item)| {
                        let item = if INTEGER_KEYS.contains(&key.as_str())
                            || (duration && key == "value")
                        {
                            integer(item)
                        } else if BOOLEAN_KEYS.contains(&key.as_str()) {
                            match item {
                                Value::String(s) if s == "true" || s == "false" => {
                                    Value::Bool(s == "true")
                                }
                                other => other,
                            }
                        } else {
                            api_types(item)
                        };
                        (key, item)
                    })
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(api_types).collect()),
        other => other,
    }
}

fn lower_camel(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    let capitals = chars.iter().take_while(|c| c.is_ascii_uppercase()).count();
    // The last capital of a run starts the next word when a lower-case letter follows it.
    let lower = if capitals > 1 && chars.get(capitals).is_some_and(char::is_ascii_lowercase) {
        capitals - 1
    } else {
        capitals
    };
    chars
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if i < lower {
                c.to_ascii_lowercase()
            } else {
                *c
            }
        })
        .collect()
}

/// The error of a source that cannot be read at all (not YAML/JSON/HCL, no App Mesh resource).
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {reason}")]
pub struct ReadError {
    pub source_name: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloudformation_keys_become_the_apis() {
        for (cfn, api) in [
            ("PortMapping", "portMapping"),
            ("AWSCloudMap", "awsCloudMap"),
            ("DNS", "dns"),
            ("HTTP2", "http2"),
            ("TLS", "tls"),
            ("GRPC", "grpc"),
            ("CertificateArn", "certificateArn"),
            ("IpPreference", "ipPreference"),
            ("Http2Route", "http2Route"),
            ("ACM", "acm"),
            ("already", "already"),
        ] {
            assert_eq!(lower_camel(cfn), api, "{cfn}");
        }
    }
}
