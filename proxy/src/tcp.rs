//! TCP: listeners that forward bytes to a weighted cluster, and the splice used by them, CONNECT
//! tunnels and upgraded (WebSocket) connections.

use std::{io, sync::Arc, time::Duration};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{
    balance::WeightedTargets,
    error::ProxyError,
    limit::ConnPermit,
    snapshot::TcpRoute,
    tls::Stream,
    upstream::{Cluster, EndpointState, Protocol},
};

/// A TCP connection to an endpoint, counted against a TCP cluster's connection limit while the
/// permit lives.
pub(crate) type Connected = (Arc<EndpointState>, Stream, Option<ConnPermit>);

/// Connects to an endpoint of `cluster`, trying the others (up to three in all) when a connect
/// fails. A TCP cluster at its connection limit refuses at once (overflow). `key`: the
/// connection's hash on a RING_HASH or MAGLEV cluster.
pub(crate) async fn connect_any(
    cluster: &Cluster,
    key: Option<u64>,
) -> Result<Connected, ProxyError> {
    let permit = match (&cluster.limits, cluster.protocol) {
        (Some(limits), Protocol::Tcp) => limits.try_connection().map_err(|_| {
            cluster.metrics.overflows.inc();
            ProxyError::Overflow(cluster.name.clone())
        })?,
        _ => None,
    };
    let mut tried: Vec<Arc<EndpointState>> = Vec::new();
    let tries = cluster.healthy.len().clamp(1, 3);
    let mut last = None;
    for _ in 0..tries {
        let Some(endpoint) = cluster.pick(&tried, key) else {
            break;
        };
        match endpoint.connect(cluster.connect_timeout).await {
            Ok(stream) => {
                cluster.observe(&endpoint, false);
                return Ok((endpoint, stream, permit));
            }
            Err(e) => {
                cluster.observe(&endpoint, true);
                cluster.metrics.connect_errors.inc();
                tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.addr, error = %e.source, "connect failed");
                last = Some(ProxyError::Upstream {
                    endpoint: endpoint.addr.clone(),
                    failure: e.failure,
                });
                tried.push(endpoint);
            }
        }
    }
    Err(last.unwrap_or_else(|| ProxyError::NoHealthyEndpoint(cluster.name.clone())))
}

/// How a TCP listener's connection went, for the access log.
#[derive(Debug, Default)]
pub(crate) struct TcpOutcome {
    pub cluster: Option<Arc<str>>,
    pub endpoint: Option<Arc<str>>,
    /// Bytes from the client, and to it.
    pub received: u64,
    pub sent: u64,
    pub error: Option<&'static str>,
}

impl TcpOutcome {
    /// Fills `log` with how the connection went (it took `duration`) and writes it.
    pub(crate) fn log(
        self,
        access_log: &crate::access_log::AccessLog,
        log: Option<crate::access_log::LogRecord>,
        duration: Duration,
    ) {
        if let Some(mut log) = log {
            log.duration = duration;
            log.cluster = self.cluster;
            log.endpoint = self.endpoint;
            log.bytes_received = self.received;
            log.bytes_sent = self.sent;
            log.error = self.error;
            access_log.write(Box::new(log));
        }
    }
}

/// Forwards one accepted connection of a TCP listener.
pub(crate) async fn forward(route: &TcpRoute, client: Stream) -> TcpOutcome {
    forward_to(&route.targets, route.idle, client).await
}

/// Forwards a client connection to one of `targets`, ended after `idle` without a byte.
pub(crate) async fn forward_to(
    targets: &WeightedTargets,
    idle: Option<Duration>,
    client: Stream,
) -> TcpOutcome {
    let mut outcome = TcpOutcome::default();
    let Some(target) = targets.pick() else {
        outcome.error = Some("no_route");
        return outcome;
    };
    let cluster = &target.cluster;
    outcome.cluster = Some(cluster.name.clone());
    // A hashing cluster's key here can only be the client's address.
    let key = cluster.hashing.as_deref().and_then(|h| {
        h.key
            .hash(&http::HeaderMap::new(), client.tcp().peer_addr().ok())
    });
    match connect_any(cluster, key).await {
        Ok((endpoint, upstream, _permit)) => {
            let _in_flight = endpoint.begin_request();
            outcome.endpoint = Some(endpoint.addr.clone());
            let mut counts = (0, 0);
            let result = splice(client, upstream, idle, &mut counts).await;
            (outcome.received, outcome.sent) = counts;
            if let Err(e) = result {
                tracing::debug!(cluster = %cluster.name, error = %e, "tcp connection ended");
                outcome.error = Some(if e.kind() == io::ErrorKind::TimedOut {
                    "idle_timeout"
                } else {
                    "upstream_reset"
                });
            }
        }
        Err(e) => {
            tracing::debug!(cluster = %cluster.name, error = %e, "tcp connection refused");
            outcome.error = Some(e.kind());
        }
    }
    outcome
}

/// Copies bytes both ways until both sides are done, half-closing as each side finishes. With
/// `idle`, gives up after that long without a byte in either direction. `counts` holds the bytes
/// copied from `a` to `b` and from `b` to `a`, also when it fails.
pub(crate) async fn splice<A, B>(
    mut a: A,
    mut b: B,
    idle: Option<Duration>,
    counts: &mut (u64, u64),
) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let Some(idle) = idle else {
        return tokio::io::copy_bidirectional(&mut a, &mut b)
            .await
            .map(|c| *counts = c);
    };
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let mut abuf = vec![0u8; 16 * 1024];
    let mut bbuf = vec![0u8; 16 * 1024];
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        tokio::select! {
            n = ar.read(&mut abuf), if a_open => match n? {
                0 => { a_open = false; bw.shutdown().await?; }
                n => { bw.write_all(&abuf[..n]).await?; counts.0 += n as u64; }
            },
            n = br.read(&mut bbuf), if b_open => match n? {
                0 => { b_open = false; aw.shutdown().await?; }
                n => { aw.write_all(&bbuf[..n]).await?; counts.1 += n as u64; }
            },
            () = tokio::time::sleep(idle) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, format!("idle for {idle:?}")));
            }
        }
    }
    Ok(())
}
