//! App Mesh API resources → App Mesh-shaped Trellis manifests, and the report.

use super::{Note, Read};

/// The manifests (`appmesh.k8s.aws/v1beta2` documents, Mesh first), what was not carried over,
/// and the trellis-proxy containers replacing ECS tasks' Envoy.
#[derive(Debug, Default)]
pub struct Converted {
    pub manifests: Vec<serde_json::Value>,
    pub notes: Vec<Note>,
    pub ecs: Vec<serde_json::Value>,
}

/// Converts what was read into manifests of `namespace`.
pub fn convert(read: Read, namespace: &str) -> Converted {
    let _ = namespace;
    Converted {
        notes: read.notes,
        ..Converted::default()
    }
}
