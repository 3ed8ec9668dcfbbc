//! Retry policy: which outcomes are retried, backoff with jitter, the retry budget, and the
//! request body kept for replay.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use parking_lot::Mutex;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tower::retry::budget::{Budget, TpsBudget};

use crate::{BoxError, error::UpstreamFailure};

pub const DEFAULT_BUFFER_LIMIT: usize = 64 * 1024;
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
/// How long a request counts towards the budget.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// What may be retried. Events are App Mesh's `httpRetryEvents` / `grpcRetryEvents` plus
/// Envoy's `connect-failure`, `refused-stream` and `retriable-status-codes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub server_error: bool,
    pub gateway_error: bool,
    pub connect_failure: bool,
    pub reset: bool,
    pub refused_stream: bool,
}

impl RetryOn {
    /// Sets the flag for an HTTP retry event name; false when the name is unknown.
    /// `retriable-status-codes` is accepted and needs no flag: the codes are listed separately.
    pub fn enable(&mut self, event: &str) -> bool {
        match event {
            "server-error" | "5xx" => self.server_error = true,
            "gateway-error" => self.gateway_error = true,
            "connect-failure" => self.connect_failure = true,
            "reset" | "stream-error" => self.reset = true,
            "refused-stream" => self.refused_stream = true,
            "retriable-status-codes" => {}
            _ => return false,
        }
        true
    }
}

/// The most retries a policy may ask for (App Mesh's limit), here and in the control plane.
pub const MAX_RETRIES: u32 = 25;

/// App Mesh's `grpcRetryEvents` and the gRPC status codes they retry: the one list the control
/// plane validates against and the proxy compiles.
pub const GRPC_EVENTS: [(&str, u32); 5] = [
    ("cancelled", 1),
    ("deadline-exceeded", 4),
    ("internal", 13),
    ("resource-exhausted", 8),
    ("unavailable", 14),
];

/// gRPC status code for an App Mesh `grpcRetryEvents` name.
pub fn grpc_event_code(event: &str) -> Option<u32> {
    GRPC_EVENTS
        .iter()
        .find(|(name, _)| *name == event)
        .map(|(_, code)| *code)
}

/// The names of [`GRPC_EVENTS`], for messages.
pub fn grpc_event_names() -> String {
    GRPC_EVENTS.map(|(name, _)| name).join(", ")
}

#[derive(Debug)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    pub status_codes: Box<[u16]>,
    pub grpc_codes: Box<[u32]>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub buffer_limit: usize,
    /// None: retries are limited by `max_retries` only.
    pub budget: Option<TpsBudget>,
    /// Idempotent requests without a body: attempts past the per-try timeout go on beside the
    /// next (hedging).
    pub hedge: bool,
}

impl RetryPolicy {
    /// Whether a response with this status and headers should be retried.
    pub fn retry_response(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let code = status.as_u16();
        if self.on.server_error && status.is_server_error()
            || self.on.gateway_error && matches!(code, 502..=504)
            || self.status_codes.contains(&code)
        {
            return true;
        }
        // gRPC: a trailers-only response carries grpc-status in the headers.
        !self.grpc_codes.is_empty()
            && headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
                .is_some_and(|c| self.grpc_codes.contains(&c))
    }

    /// Whether an attempt that failed this way should be retried.
    pub fn retry_failure(&self, failure: &UpstreamFailure) -> bool {
        // As in Envoy, server-error and gateway-error include failures with no response at all.
        let any_5xx = self.on.server_error || self.on.gateway_error;
        match failure {
            UpstreamFailure::Connect | UpstreamFailure::ConnectTimeout | UpstreamFailure::Tls => {
                self.on.connect_failure || any_5xx
            }
            UpstreamFailure::RefusedStream => self.on.refused_stream || self.on.reset || any_5xx,
            UpstreamFailure::Reset => self.on.reset || any_5xx,
            UpstreamFailure::PerTryTimeout => true,
            // Overflow is the circuit breaker's answer: retrying would defeat it.
            UpstreamFailure::Protocol | UpstreamFailure::Overflow => false,
        }
    }

    /// Delay before retry number `retry` (1-based): full jitter over the exponential ceiling.
    pub fn backoff(&self, retry: u32) -> Duration {
        backoff(self.backoff_base, self.backoff_max, retry, Jitter::Full)
    }

    /// Records a request in the budget.
    pub fn deposit(&self) {
        if let Some(b) = &self.budget {
            b.deposit();
        }
    }

    /// Takes a retry from the budget; false when the budget is spent.
    pub fn withdraw(&self) -> bool {
        self.budget.as_ref().is_none_or(Budget::withdraw)
    }
}

pub fn backoff_ceiling(base: Duration, max: Duration, retry: u32) -> Duration {
    let exp = retry.saturating_sub(1).min(30);
    base.saturating_mul(1 << exp).min(max)
}

/// How far below the exponential ceiling a backoff delay may fall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in [0, ceiling] ("full jitter"): request retries.
    Full,
    /// Uniform in [ceiling/2, ceiling]: control-plane reconnects, which should never come back
    /// at once.
    Half,
}

/// The delay before attempt `n` (1-based) after failures: the ceiling min(max, base·2ⁿ⁻¹),
/// jittered. The one backoff of Trellis: request retries, reconnects to the control plane, and
/// the control plane's writes that raced another.
pub fn backoff(base: Duration, max: Duration, n: u32, jitter: Jitter) -> Duration {
    let ceiling = u64::try_from(backoff_ceiling(base, max, n).as_nanos()).unwrap_or(u64::MAX);
    let floor = match jitter {
        Jitter::Full => 0,
        Jitter::Half => ceiling / 2,
    };
    Duration::from_nanos(fastrand::u64(floor..=ceiling))
}

/// The budget as configured: `ratio` of requests may be retried, plus `min_per_second`.
pub fn budget(ratio: f64, min_per_second: u32) -> TpsBudget {
    // TpsBudget asserts 0 <= ratio <= 1000; compile rejects anything outside 0..=10.
    TpsBudget::new(BUDGET_WINDOW, min_per_second, ratio as f32)
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// A request body that can be sent more than once.
///
/// Every attempt gets a [`ReplayBody`] handle. A handle first replays what earlier attempts read,
/// then reads on from the original body, recording frames until `limit` bytes; past the limit the
/// body is no longer replayable and the request is not retried. Starting a new attempt retires
/// the older handles, so a stale attempt still held by a connection cannot steal frames.
#[derive(Debug, Clone)]
pub struct Replay {
    shared: Arc<Mutex<Shared>>,
}

#[derive(Debug)]
struct Shared {
    source: Option<BoxBody>,
    recorded: Vec<Bytes>,
    recorded_len: usize,
    limit: usize,
    overflowed: bool,
    trailers: Option<HeaderMap>,
    generation: u64,
    source_hint: SizeHint,
}

impl Replay {
    pub fn new(body: BoxBody, limit: usize) -> Self {
        let source_hint = body.size_hint();
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source: Some(body),
                recorded: Vec::new(),
                recorded_len: 0,
                limit,
                overflowed: false,
                trailers: None,
                generation: 0,
                source_hint,
            })),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Shared> {
        self.shared.lock()
    }

    /// Whether another attempt could send the whole body again.
    pub fn can_replay(&self) -> bool {
        !self.lock().overflowed
    }

    /// A body for the next attempt; handles from earlier attempts end.
    pub fn attempt(&self) -> ReplayBody {
        let mut shared = self.lock();
        shared.generation += 1;
        ReplayBody {
            shared: self.shared.clone(),
            generation: shared.generation,
            position: 0,
            trailers_sent: false,
        }
    }
}

#[derive(Debug)]
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    generation: u64,
    /// Index of the next recorded chunk to replay.
    position: usize,
    trailers_sent: bool,
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut shared = this.shared.lock();
        if shared.generation != this.generation {
            return Poll::Ready(Some(Err("request body taken by a newer attempt".into())));
        }
        if let Some(chunk) = shared.recorded.get(this.position) {
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        let Some(source) = shared.source.as_mut() else {
            // The source ended: replay its trailers once, then end.
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = shared.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.source = None;
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        if !shared.overflowed {
                            let frames = crate::limit::max_kept_frames(
                                u64::try_from(shared.limit).unwrap_or(u64::MAX),
                            );
                            if shared.recorded_len + data.len() <= shared.limit
                                && shared.recorded.len() < frames
                            {
                                shared.recorded_len += data.len();
                                shared.recorded.push(crate::limit::kept(&data));
                                this.position += 1;
                            } else {
                                shared.overflowed = true;
                                shared.recorded = Vec::new();
                            }
                        }
                        Frame::data(data)
                    }
                    Err(frame) => {
                        if let Some(t) = frame.trailers_ref() {
                            shared.trailers = Some(t.clone());
                            this.trailers_sent = true;
                        }
                        frame
                    }
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock();
        shared.source.is_none()
            && self.position >= shared.recorded.len()
            && (self.trailers_sent || shared.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared.lock();
        if shared.source.is_none() && !shared.overflowed && shared.trailers.is_none() {
            let rest: usize = shared
                .recorded
                .iter()
                .skip(self.position)
                .map(Bytes::len)
                .sum();
            return SizeHint::with_exact(rest as u64);
        }
        if self.position == 0 {
            return shared.source_hint;
        }
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    fn policy(on: RetryOn) -> RetryPolicy {
        RetryPolicy {
            max_retries: 2,
            per_try_timeout: None,
            on,
            status_codes: Box::new([409]),
            grpc_codes: Box::new([14]),
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            buffer_limit: 16,
            budget: None,
            hedge: false,
        }
    }

    #[test]
    fn events_select_responses() {
        let none = HeaderMap::new();
        let mut grpc = HeaderMap::new();
        grpc.insert("grpc-status", "14".parse().unwrap());
        let mut gw = RetryOn::default();
        assert!(gw.enable("gateway-error"));
        assert!(!gw.enable("bogus"));
        let p = policy(gw);
        assert!(p.retry_response(StatusCode::BAD_GATEWAY, &none));
        assert!(p.retry_response(StatusCode::GATEWAY_TIMEOUT, &none));
        assert!(!p.retry_response(StatusCode::INTERNAL_SERVER_ERROR, &none));
        assert!(
            p.retry_response(StatusCode::CONFLICT, &none),
            "listed status code"
        );
        assert!(
            p.retry_response(StatusCode::OK, &grpc),
            "listed grpc status"
        );
        assert!(!p.retry_response(StatusCode::OK, &none));
        assert!(p.retry_failure(&UpstreamFailure::Connect));
        assert!(!p.retry_failure(&UpstreamFailure::Protocol));

        let mut se = RetryOn::default();
        se.enable("server-error");
        let p = policy(se);
        assert!(p.retry_response(StatusCode::INTERNAL_SERVER_ERROR, &none));
        assert!(p.retry_failure(&UpstreamFailure::Connect));
        assert!(p.retry_failure(&UpstreamFailure::Reset));
        assert!(!p.retry_failure(&UpstreamFailure::Protocol));
        let p = policy(RetryOn::default());
        assert!(
            !p.retry_failure(&UpstreamFailure::Connect),
            "no events, no retries"
        );
        let mut cf = RetryOn::default();
        cf.enable("connect-failure");
        cf.enable("refused-stream");
        let p = policy(cf);
        assert!(p.retry_failure(&UpstreamFailure::ConnectTimeout));
        assert!(p.retry_failure(&UpstreamFailure::RefusedStream));
        assert!(!p.retry_failure(&UpstreamFailure::Reset));
    }

    #[test]
    fn grpc_event_names() {
        assert_eq!(grpc_event_code("unavailable"), Some(14));
        assert_eq!(grpc_event_code("deadline-exceeded"), Some(4));
        assert_eq!(grpc_event_code("nope"), None);
    }

    #[test]
    fn backoff_grows_exponentially_capped_with_jitter() {
        let base = Duration::from_millis(25);
        let max = Duration::from_millis(250);
        assert_eq!(backoff_ceiling(base, max, 1), Duration::from_millis(25));
        assert_eq!(backoff_ceiling(base, max, 2), Duration::from_millis(50));
        assert_eq!(backoff_ceiling(base, max, 4), Duration::from_millis(200));
        assert_eq!(backoff_ceiling(base, max, 5), max);
        assert_eq!(backoff_ceiling(base, max, 1000), max);
        let p = policy(RetryOn::default());
        // Reconnects: never below half the ceiling.
        for n in [1, 3, 40] {
            let ceiling = backoff_ceiling(base, max, n);
            for _ in 0..100 {
                let d = backoff(base, max, n, Jitter::Half);
                assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} for {n}");
            }
        }
        let samples: Vec<Duration> = (0..200).map(|_| p.backoff(3)).collect();
        assert!(samples.iter().all(|d| *d <= Duration::from_millis(100)));
        let distinct: std::collections::HashSet<_> = samples.iter().collect();
        assert!(distinct.len() > 100, "jitter spreads the delays");
    }

    #[test]
    fn budget_caps_retries_at_ratio_plus_floor() {
        let p = RetryPolicy {
            budget: Some(budget(0.2, 1)),
            ..policy(RetryOn::default())
        };
        for _ in 0..1000 {
            p.deposit();
        }
        let allowed = (0..1000).take_while(|_| p.withdraw()).count();
        // 20% of 1000 plus the floor of 1/s over the 10 s window.
        assert!((200..=211).contains(&allowed), "allowed {allowed}");
    }

    async fn collect(body: ReplayBody) -> Result<(Bytes, Option<HeaderMap>), BoxError> {
        let c = body.collect().await?;
        let trailers = c.trailers().cloned();
        Ok((c.to_bytes(), trailers))
    }

    /// A body of the given frames, each returned by its own poll.
    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn chunks(parts: &[&'static str], trailers: bool) -> BoxBody {
        let mut frames: std::collections::VecDeque<_> = parts
            .iter()
            .map(|p| Frame::data(Bytes::from_static(p.as_bytes())))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            frames.push_back(Frame::trailers(t));
        }
        Frames(frames).boxed()
    }

    #[tokio::test]
    async fn replays_whole_body_and_trailers() {
        let replay = Replay::new(chunks(&["ab", "cd"], true), 16);
        let (first, t1) = collect(replay.attempt()).await.unwrap();
        assert_eq!(first, "abcd");
        assert!(replay.can_replay());
        let (second, t2) = collect(replay.attempt()).await.unwrap();
        assert_eq!(second, "abcd");
        assert_eq!(t1, t2);
        assert!(t2.is_some());
    }

    #[tokio::test]
    async fn retry_mid_body_replays_then_continues() {
        let replay = Replay::new(chunks(&["ab", "cd", "ef"], false), 16);
        let mut first = replay.attempt();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        let second = replay.attempt();
        assert!(first.frame().await.unwrap().is_err(), "stale handle ends");
        let (all, _) = collect(second).await.unwrap();
        assert_eq!(all, "abcdef");
    }

    #[tokio::test]
    async fn larger_body_is_sent_once_and_not_replayable() {
        let replay = Replay::new(
            Full::new(Bytes::from(vec![7u8; 100]))
                .map_err(Into::into)
                .boxed(),
            16,
        );
        let (first, _) = collect(replay.attempt()).await.unwrap();
        assert_eq!(first.len(), 100, "the whole body still goes through once");
        assert!(!replay.can_replay());
    }

    /// A body of tiny frames within the byte limit but over the frame allowance is sent once
    /// and not kept (each kept frame costs far more than its byte); one just within is kept.
    #[tokio::test]
    async fn a_body_of_too_many_tiny_frames_is_not_kept() {
        let limit = 64 * 1024;
        let allowed = crate::limit::max_kept_frames(limit as u64);
        let body = |n: usize| {
            let frames = (0..n)
                .map(|_| Frame::data(Bytes::from_static(b"x")))
                .collect();
            Frames(frames).boxed()
        };
        let replay = Replay::new(body(allowed), limit);
        let (first, _) = collect(replay.attempt()).await.unwrap();
        assert_eq!(first.len(), allowed);
        assert!(replay.can_replay());
        let replay = Replay::new(body(allowed + 1), limit);
        let (first, _) = collect(replay.attempt()).await.unwrap();
        assert_eq!(
            first.len(),
            allowed + 1,
            "the whole body still goes through once"
        );
        assert!(!replay.can_replay());
    }
}
