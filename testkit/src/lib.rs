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
/// taken by one before the process binds it — and claimed for this test process's lifetime, so
/// that tests running in parallel never hand out the same one (two draws of one port, each
/// free when checked, once made an Envoy refuse a listener with "Address already in use").
pub fn free_listen_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let from = low.saturating_sub(20_000).max(1024);
    for _ in 0..1000 {
        let port = from + fastrand::u16(..low - from);
        if claim(port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    free_port()
}

/// Claims `port` among this machine's test processes until this one exits: an exclusive lock on
/// a file named by the port, which the OS releases with the process. False if another process
/// (or an earlier draw of this one) holds it; true, with no claim, where files cannot be locked.
fn claim(port: u16) -> bool {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("trellis-test-ports");
    let file = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
    });
    let Ok(file) = file else { return true };
    match file.try_lock() {
        Ok(()) => {
            HELD.lock().unwrap().push(file);
            true
        }
        Err(std::fs::TryLockError::WouldBlock) => false,
        Err(std::fs::TryLockError::Error(_)) => true,
    }
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
