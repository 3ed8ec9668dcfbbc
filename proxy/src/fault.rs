//! Fault injection: a route's `fault` delays some of its requests or answers them with an
//! error instead of forwarding them, so that callers' retries and timeouts can be tested. Drawn
//! per request; a route without one pays one `Option` test.

use std::time::Duration;

use http::{HeaderMap, StatusCode};

use crate::{error::ProxyError, matching::HeaderMatch, metrics::ProxyMetrics};

#[derive(Debug)]
pub struct Fault {
    pub(crate) headers: Box<[HeaderMatch]>,
    pub(crate) delay: Option<Delay>,
    pub(crate) abort: Option<Abort>,
}

#[derive(Debug)]
pub struct Delay {
    pub duration: Duration,
    pub share: Share,
}

#[derive(Debug)]
pub struct Abort {
    pub status: StatusCode,
    /// For gRPC requests: the grpc-status answered (with HTTP 200).
    pub grpc_status: Option<u8>,
    pub share: Share,
}

/// A share of requests, in millionths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share(u32);

impl Share {
    const WHOLE: u32 = 1_000_000;

    /// From a percentage (0 to 100, fractions allowed).
    pub fn from_percent(p: f64) -> Option<Self> {
        (p.is_finite() && (0.0..=100.0).contains(&p)).then(|| {
            // In range: the product is at most 1,000,000.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Self((p * 10_000.0).round() as u32)
        })
    }

    /// Drawn for one request.
    pub(crate) fn hit(self) -> bool {
        self.0 >= Self::WHOLE || (self.0 > 0 && fastrand::u32(..Self::WHOLE) < self.0)
    }
}

impl Fault {
    /// Whether the request is one the fault applies to.
    fn applies(&self, headers: &HeaderMap) -> bool {
        self.headers.iter().all(|h| h.matches(headers))
    }

    /// Draws the request's faults: how long to delay it, and whether to fail it after. No
    /// await: a request the fault spares, or fails at once, allocates nothing.
    pub fn draw(&self, headers: &HeaderMap, metrics: &ProxyMetrics) -> Drawn {
        if !self.applies(headers) {
            return Drawn::default();
        }
        let delay = self
            .delay
            .as_ref()
            .filter(|d| d.share.hit())
            .map(|d| d.duration);
        if delay.is_some() {
            metrics.fault("delay");
        }
        let abort = self.abort.as_ref().filter(|a| a.share.hit()).map(|a| {
            metrics.fault("abort");
            ProxyError::FaultAbort {
                status: a.status,
                grpc_status: a.grpc_status,
            }
        });
        Drawn { delay, abort }
    }
}

/// A request's faults, as drawn.
#[derive(Debug, Default)]
pub struct Drawn {
    pub delay: Option<Duration>,
    pub abort: Option<ProxyError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares() {
        assert_eq!(Share::from_percent(100.0), Some(Share(1_000_000)));
        assert_eq!(Share::from_percent(0.5), Some(Share(5_000)));
        assert_eq!(Share::from_percent(-1.0), None);
        assert_eq!(Share::from_percent(100.5), None);
        assert_eq!(Share::from_percent(f64::NAN), None);
        assert!(Share(1_000_000).hit());
        assert!(!Share(0).hit());
        let hits = (0..100_000).filter(|_| Share(250_000).hit()).count();
        assert!((23_000..27_000).contains(&hits), "{hits}");
    }
}
