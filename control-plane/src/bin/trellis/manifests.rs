//! The colorapp demo's manifests (`examples/colorapp/`), for `trellis demo` and (included by
//! path) the config-propagation benchmark.

/// `examples/colorapp/mesh.yaml`.
pub(crate) const MESH: &str = include_str!("../../../../examples/colorapp/mesh.yaml");

/// The colorapp VirtualRouter from `examples/colorapp/mesh.yaml` with blue/green/red weights.
pub(crate) fn router_manifest(weights: (u32, u32, u32)) -> String {
    let router = MESH
        .split("\n---\n")
        .find(|d| d.contains("kind: VirtualRouter"))
        .unwrap_or_default();
    router
        .replacen("weight: 100", &format!("weight: {}", weights.0), 1)
        .replacen(
            "name: green }\n              weight: 0",
            &format!("name: green }}\n              weight: {}", weights.1),
            1,
        )
        .replacen(
            "name: red }\n              weight: 0",
            &format!("name: red }}\n              weight: {}", weights.2),
            1,
        )
}
