//! Captured connections: what `trellis-proxy init`'s rules redirect to the egress. The kernel
//! keeps where the client meant to connect (`SO_ORIGINAL_DST`); the first bytes tell HTTP from
//! anything else. HTTP is routed by its authority as usual, then by the original destination
//! (`proxy::route_request`); other bytes go to the TCP route of the virtual host whose domains
//! name the original destination, else where the client connected (`egressFilter: ALLOW_ALL`)
//! or nowhere (`DROP_ALL`: closed).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{HeaderMap, Method};
use tokio::{net::TcpStream, time::Instant};

use crate::{
    access_log::LogRecord,
    proxy::Services,
    route::MatchInput,
    snapshot::{ListenerKind, Runtime, Slot, Unmatched},
    tls::Stream,
};

/// How long a captured client may stay silent before its connection is taken for a protocol
/// whose server speaks first (SMTP, MySQL, …), as PERMISSIVE mTLS waits for a first byte.
pub(crate) const DETECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Bytes looked at: enough for any HTTP/1 method and a space, and for HTTP/2's preface start.
const SNIFF: usize = 16;

/// Where `stream`'s client meant to connect, when traffic capture redirected it here (the
/// original destination differs from the socket's own address). None for connections made to
/// the egress directly, and where the kernel keeps no original destination.
pub(crate) fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let sock = socket2::SockRef::from(stream);
    let original = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (original != local).then_some(original)
}

/// What a captured connection's first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detected {
    Http,
    Opaque,
}

/// Looks at the first bytes without taking them: an HTTP/1 request line's method and space, or
/// HTTP/2's preface, is HTTP; anything else, a close, or silence for `DETECT_TIMEOUT`, is not.
pub(crate) async fn detect(stream: &TcpStream) -> Detected {
    let deadline = Instant::now() + DETECT_TIMEOUT;
    let mut buf = [0u8; SNIFF];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Detected::Opaque,
        };
        match classify(&buf[..n]) {
            Some(detected) => return detected,
            // A method cut short by the segment: the rest follows at once from any HTTP client.
            None => {
                if Instant::now() >= deadline {
                    return Detected::Opaque;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// HTTP when `bytes` start with a token of capitals followed by a space (every registered
/// method; HTTP/2's preface starts `PRI `); not when any byte before the space says otherwise;
/// None while only capitals have arrived.
fn classify(bytes: &[u8]) -> Option<Detected> {
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b' ' if i > 0 => return Some(Detected::Http),
            b'A'..=b'Z' | b'-' | b'_' if i + 1 < SNIFF => {}
            _ => return Some(Detected::Opaque),
        }
    }
    None
}

/// Forwards a captured connection that is not HTTP, by its original destination.
pub(crate) async fn forward_opaque(
    services: &Arc<Services>,
    runtime: &Runtime,
    stream: TcpStream,
    peer: SocketAddr,
    original: SocketAddr,
) {
    let Some(listener) = runtime.listener(&Slot::Egress) else {
        return;
    };
    let mut log = services
        .access_log
        .sink(runtime.access_log.as_ref())
        .map(|sink| {
            let mut log = LogRecord::tcp(sink.clone(), Slot::Egress.name());
            (log.peer, log.local) = (Some(peer), Some(original));
            log.authority = original.to_string().into();
            log
        });
    let start = Instant::now();
    let route = match &listener.kind {
        ListenerKind::Http(table) => table.host_at(original).and_then(|host| {
            let headers = HeaderMap::new();
            host.route(&MatchInput {
                method: &Method::CONNECT,
                path: "",
                query: None,
                headers: &headers,
                port: Some(original.port()),
                scheme: None,
            })
        }),
        ListenerKind::Tcp(_) => None,
    };
    let passthrough;
    let (targets, idle) = match (route, &listener.unmatched) {
        (Some(route), _) => (&route.targets, route.timeouts.idle),
        (None, Unmatched::Passthrough(p)) => match p.route(&original.to_string()) {
            Ok(route) => {
                passthrough = route;
                (&passthrough.targets, None)
            }
            Err(e) => {
                tracing::debug!(%original, error = %e, "no passthrough route to the original destination");
                services.metrics.error(e.kind());
                return;
            }
        },
        (None, Unmatched::Deny | Unmatched::NotFound) => {
            tracing::debug!(%original, "captured connection to a destination the mesh does not allow");
            services.metrics.error("egress_denied");
            if let Some(mut log) = log.take() {
                log.error = Some("egress_denied");
                services.access_log.write(Box::new(log));
            }
            return;
        }
    };
    let outcome = crate::tcp::forward_to(targets, idle, Stream::Plain(stream)).await;
    outcome.log(&services.access_log, log, start.elapsed());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_told_from_other_bytes() {
        for http in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PRI * HTTP/2.0",
            b"M-SEARCH * HTTP/1.1",
        ] {
            assert_eq!(classify(http), Some(Detected::Http), "{http:?}");
        }
        for opaque in [
            &b"\x16\x03\x01\x02\x00"[..], // a TLS ClientHello
            b"*1\r\n$4\r\nPING\r\n",      // Redis
            b"PING\r\n",
            b"get / HTTP/1.1",
            b" GET",
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ ",
        ] {
            assert_eq!(classify(opaque), Some(Detected::Opaque), "{opaque:?}");
        }
        assert_eq!(classify(b"GE"), None, "a method cut short waits for more");
    }
}
