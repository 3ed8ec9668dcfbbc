//! trellis-control: the registry, the mesh API, validation, translation to per-proxy snapshots
//! and the config stream that pushes them.

pub mod auth;
pub mod canary;
pub mod compat;
pub mod controller;
pub mod dashboard;
pub mod diff;
pub mod envoy;
pub mod identity;
pub mod import;
pub mod inject;
pub mod kubernetes;
pub mod leader;
pub mod measure;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod push;
pub mod registry;
pub mod server;
pub mod status;
pub mod store;
pub mod translate;
pub mod validate;
pub mod verify;
pub mod view;
pub mod xds;
