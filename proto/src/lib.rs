//! The Trellis config-distribution API.
//!
//! [`v1::Snapshot`] is everything one proxy runs. It is the message the control plane pushes and
//! the document `trellis-proxy --snapshot FILE` reads (protobuf JSON mapping, in YAML or JSON).

#![allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all
)]

pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/trellis.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/trellis.v1.serde.rs"));
}

/// Durations as used in the API.
pub use pbjson_types::Duration;
