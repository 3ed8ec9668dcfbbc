//! Every failure the proxy reports, and the one place that maps them to responses.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::{
    BoxError,
    body::{ClientBodyError, ResponseBody},
};

/// How an upstream attempt failed; decides retries and the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamFailure {
    #[error("connection refused or failed")]
    Connect,
    #[error("connect timed out")]
    ConnectTimeout,
    /// The TLS handshake failed (mTLS: the peer's certificate, or this proxy's, was refused).
    #[error("TLS handshake failed")]
    Tls,
    #[error("connection or stream reset")]
    Reset,
    #[error("stream refused")]
    RefusedStream,
    #[error("attempt timed out")]
    PerTryTimeout,
    #[error("protocol error")]
    Protocol,
    /// The cluster's connection pool is full (circuit breaking): no attempt was made.
    #[error("connection pool overflow")]
    Overflow,
}

/// Why one attempt at an upstream failed: the class decides retries and the response, the
/// source is for logs. Every protocol's client reports this one type.
#[derive(Debug)]
pub struct AttemptError {
    pub failure: UpstreamFailure,
    pub source: BoxError,
    /// Nothing of a response arrived before the connection failed: on a reused connection this
    /// is the upstream having closed it while idle, and a request that is safe to repeat can be
    /// sent again on another.
    pub stale: bool,
}

impl AttemptError {
    pub fn new(failure: UpstreamFailure, source: impl Into<BoxError>) -> Self {
        Self {
            failure,
            source: source.into(),
            stale: false,
        }
    }

    /// The upstream broke the protocol.
    pub fn protocol(what: &'static str) -> Self {
        Self::new(UpstreamFailure::Protocol, what)
    }

    /// The connection failed; `stale` when no byte of a response had arrived.
    pub fn io(e: std::io::Error, stale: bool) -> Self {
        Self {
            failure: UpstreamFailure::Reset,
            source: e.into(),
            stale,
        }
    }
}

/// Status recorded for a request whose client left before the response (nginx's 499).
pub const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => StatusCode::BAD_REQUEST,
};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no snapshot applied yet")]
    NotReady,
    #[error("no route matches the request")]
    NoRoute,
    /// The mesh allows no egress to the request's authority (its egressFilter is DROP_ALL).
    #[error("egress to this destination is not allowed by the mesh")]
    EgressDenied,
    /// Under mTLS: the caller's identity may not call this listener (the mesh graph declares no
    /// such backend).
    #[error("the caller is not authorized")]
    Unauthorized,
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    /// The client's request body failed: malformed framing, or the client went away mid-body.
    #[error("{0}")]
    ClientBody(#[from] ClientBodyError),
    #[error("cluster {0:?}: no healthy endpoint")]
    NoHealthyEndpoint(Arc<str>),
    /// A connection pool limit of the cluster (circuit breaking) is reached.
    #[error("cluster {0:?}: connection pool overflow")]
    Overflow(Arc<str>),
    #[error("request timed out after {0:?}")]
    RequestTimeout(Duration),
    #[error("upstream {endpoint}: {failure}")]
    Upstream {
        endpoint: Arc<str>,
        failure: UpstreamFailure,
    },
    /// The route's (or the node's) rate limit: admitted again after this long.
    #[error("rate limited")]
    RateLimited(Duration),
    /// The route's fault injection answered instead of forwarding.
    #[error("fault injected")]
    FaultAbort {
        status: StatusCode,
        grpc_status: Option<u8>,
    },
}

impl ProxyError {
    /// The bounded error kind used in `x-trellis-error`, metrics and the access log.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotReady => "not_ready",
            Self::NoRoute => "no_route",
            Self::EgressDenied => "egress_denied",
            Self::Unauthorized => "unauthorized",
            Self::BadRequest(_) => "bad_request",
            Self::ClientBody(e) => match e {
                ClientBodyError::Malformed(_) => "bad_request",
                ClientBodyError::Reset(_) => "downstream_reset",
                ClientBodyError::Timeout(_) => "request_body_timeout",
            },
            Self::NoHealthyEndpoint(_) => "no_healthy_endpoint",
            Self::Overflow(_) => "overflow",
            Self::RequestTimeout(_) => "request_timeout",
            Self::FaultAbort { .. } => "fault_injected",
            Self::RateLimited(_) => "rate_limited",
            Self::Upstream { failure, .. } => match failure {
                UpstreamFailure::Connect => "connect_failure",
                UpstreamFailure::Tls => "tls_failure",
                UpstreamFailure::ConnectTimeout => "connect_timeout",
                UpstreamFailure::Reset => "upstream_reset",
                UpstreamFailure::RefusedStream => "refused_stream",
                UpstreamFailure::PerTryTimeout => "per_try_timeout",
                UpstreamFailure::Protocol => "upstream_protocol_error",
                UpstreamFailure::Overflow => "overflow",
            },
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::EgressDenied | Self::Unauthorized => StatusCode::FORBIDDEN,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::ClientBody(e) => match e {
                ClientBodyError::Malformed(_) => StatusCode::BAD_REQUEST,
                ClientBodyError::Reset(_) => CLIENT_CLOSED,
                ClientBodyError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            },
            Self::NotReady | Self::NoHealthyEndpoint(_) | Self::Overflow(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::RequestTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::FaultAbort { status, .. } => *status,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Upstream { failure, .. } => match failure {
                UpstreamFailure::Connect
                | UpstreamFailure::ConnectTimeout
                | UpstreamFailure::Tls
                | UpstreamFailure::RefusedStream
                | UpstreamFailure::Overflow => StatusCode::SERVICE_UNAVAILABLE,
                UpstreamFailure::PerTryTimeout => StatusCode::GATEWAY_TIMEOUT,
                UpstreamFailure::Reset | UpstreamFailure::Protocol => StatusCode::BAD_GATEWAY,
            },
        }
    }

    /// The gRPC status for a gRPC request.
    fn grpc_status(&self) -> &'static str {
        const CODES: [&str; 17] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
            "16",
        ];
        if let Self::FaultAbort {
            grpc_status,
            status,
        } = self
        {
            return match grpc_status {
                Some(code) => CODES.get(usize::from(*code)).copied().unwrap_or("2"),
                // The gRPC spec's HTTP-to-gRPC mapping.
                None => match status.as_u16() {
                    400 => "13",
                    401 => "16",
                    403 => "7",
                    404 => "12",
                    429 | 502 | 503 | 504 => "14",
                    _ => "2",
                },
            };
        }
        match self.status() {
            StatusCode::TOO_MANY_REQUESTS => "8", // RESOURCE_EXHAUSTED
            StatusCode::NOT_FOUND => "12",        // UNIMPLEMENTED
            StatusCode::FORBIDDEN => "7",         // PERMISSION_DENIED
            StatusCode::BAD_REQUEST => "13",      // INTERNAL
            StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => "4", // DEADLINE_EXCEEDED
            CLIENT_CLOSED => "1",                 // CANCELLED
            _ => "14",                            // UNAVAILABLE
        }
    }

    /// The response the client sees: the mapped status (or, for gRPC, 200 with grpc-status),
    /// `x-trellis-error: <kind>` and the message.
    pub fn to_response<U>(&self, grpc: bool) -> Response<ResponseBody<U>> {
        let kind = HeaderValue::from_static(self.kind());
        let message = self.to_string();
        let mut builder = Response::builder().header("x-trellis-error", kind);
        if let Self::RateLimited(wait) = self {
            // Whole seconds, rounded up: at least 1.
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            builder = builder.header(header::RETRY_AFTER, seconds.max(1));
        }
        if grpc {
            builder = builder
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/grpc")
                .header("grpc-status", self.grpc_status());
            if let Ok(v) = HeaderValue::from_str(&message) {
                builder = builder.header("grpc-message", v);
            }
            return builder
                .body(ResponseBody::empty())
                .unwrap_or_else(|_| fallback());
        }
        builder
            .status(self.status())
            .header(header::CONTENT_TYPE, "text/plain")
            .body(ResponseBody::full(Bytes::from(message + "\n")))
            .unwrap_or_else(|_| fallback())
    }
}

fn fallback<U>() -> Response<ResponseBody<U>> {
    let mut r = Response::new(ResponseBody::empty());
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_kinds() {
        let up = |failure| ProxyError::Upstream {
            endpoint: "127.0.0.1:1".into(),
            failure,
        };
        let cases = [
            (ProxyError::NoRoute, 404, "no_route", "12"),
            (ProxyError::EgressDenied, 403, "egress_denied", "7"),
            (ProxyError::BadRequest("x"), 400, "bad_request", "13"),
            (
                ProxyError::NoHealthyEndpoint("c".into()),
                503,
                "no_healthy_endpoint",
                "14",
            ),
            (
                ProxyError::RequestTimeout(Duration::from_secs(1)),
                504,
                "request_timeout",
                "4",
            ),
            (up(UpstreamFailure::Connect), 503, "connect_failure", "14"),
            (ProxyError::Overflow("c".into()), 503, "overflow", "14"),
            (up(UpstreamFailure::Overflow), 503, "overflow", "14"),
            (
                up(UpstreamFailure::ConnectTimeout),
                503,
                "connect_timeout",
                "14",
            ),
            (up(UpstreamFailure::Reset), 502, "upstream_reset", "14"),
            (
                up(UpstreamFailure::RefusedStream),
                503,
                "refused_stream",
                "14",
            ),
            (
                up(UpstreamFailure::PerTryTimeout),
                504,
                "per_try_timeout",
                "4",
            ),
            (
                up(UpstreamFailure::Protocol),
                502,
                "upstream_protocol_error",
                "14",
            ),
        ];
        let client = |e| ProxyError::ClientBody(e);
        let cases = cases.into_iter().chain([
            (
                client(ClientBodyError::Malformed("bad chunk".into())),
                400,
                "bad_request",
                "13",
            ),
            (
                client(ClientBodyError::Reset("eof".into())),
                499,
                "downstream_reset",
                "1",
            ),
            (
                client(ClientBodyError::Timeout(Duration::from_secs(1))),
                408,
                "request_body_timeout",
                "4",
            ),
        ]);
        for (err, status, kind, grpc) in cases {
            let r = err.to_response::<()>(false);
            assert_eq!(r.status().as_u16(), status, "{err}");
            assert_eq!(r.headers()["x-trellis-error"], kind);
            let g = err.to_response::<()>(true);
            assert_eq!(g.status(), StatusCode::OK);
            assert_eq!(g.headers()["grpc-status"], grpc, "{err}");
            assert_eq!(g.headers()["x-trellis-error"], kind);
        }
    }
}
