//! trellis-control: the registry, the mesh API, validation, translation to per-proxy snapshots
//! and the config stream that pushes them.

pub mod model;
pub mod registry;
pub mod store;
pub mod translate;
pub mod validate;
