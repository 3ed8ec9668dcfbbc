//! trellis-control: the registry, the mesh API, validation, translation to per-proxy snapshots
//! and the config stream that pushes them.

pub mod store;
