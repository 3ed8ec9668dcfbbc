//! Test support shared by every Trellis crate: real upstream servers on 127.0.0.1 (HTTP/1.1 and
//! h2c, gRPC, WebSocket, TCP), a guard for a `trellis-proxy` process, HTTP clients, and
//! [`eventually`] for polling with a deadline instead of sleeping.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

pub mod client;
pub mod etcd;
pub mod grpc;
pub mod h2raw;
pub mod otlp;
pub mod process;
pub mod raw;
pub mod upstream;

use std::{future::Future, time::Duration};

pub use process::ProxyProcess;
pub use raw::{RawHttpServer, RawReply, RawResponse};
pub use tonic;
pub use upstream::{TcpEchoServer, TestServer, WsEchoServer};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A port on 127.0.0.1 nothing listens on now, for configs that must name one before the
/// process binds it (a VirtualGateway's listener ports): the OS picks it, as with port 0.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port for a process that binds it later (an Envoy's listeners): drawn at random below
/// the ephemeral range, which outbound connections take ports from — a port picked there may be
/// taken by one before the process binds it.
pub fn free_listen_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let from = low.saturating_sub(12_000).max(1024);
    for _ in 0..1000 {
        let port = from + fastrand::u16(..low - from);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    free_port()
}

/// Polls `check` until it returns `Ok`, or panics with its last error after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("{what}: not true within {timeout:?}: {e}")
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
    }
}
