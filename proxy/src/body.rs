//! The response body the proxy serves: a local one (errors, admin) or an upstream's, with its
//! idle timeout and what ends the exchange (the request path's completion: access log, metrics).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::{BoxError, downstream::Incoming};

/// The body of a response to the client: a local one, or `U`, an upstream's (the request path
/// names it: an [`UpstreamBody`] of its own upstream body and [`Finish`]).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ResponseBody<U> {
    Local(Option<Bytes>),
    /// A local body followed by trailers (a gRPC response the proxy makes itself).
    LocalWithTrailers(Option<Bytes>, Option<Box<http::HeaderMap>>),
    Upstream(U),
}

impl<U> ResponseBody<U> {
    pub fn empty() -> Self {
        Self::Local(None)
    }

    pub fn full(bytes: Bytes) -> Self {
        Self::Local(Some(bytes).filter(|b| !b.is_empty()))
    }

    /// `bytes`, then `trailers`.
    pub fn with_trailers(bytes: Bytes, trailers: http::HeaderMap) -> Self {
        Self::LocalWithTrailers(
            Some(bytes).filter(|b| !b.is_empty()),
            Some(Box::new(trailers)),
        )
    }
}

impl<U> Body for ResponseBody<U>
where
    U: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::LocalWithTrailers(bytes, trailers) => Poll::Ready(
                bytes
                    .take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(|t| Frame::trailers(*t)))
                    .map(Ok),
            ),
            Self::Upstream(up) => Pin::new(up).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Local(bytes) => bytes.is_none(),
            Self::LocalWithTrailers(bytes, trailers) => bytes.is_none() && trailers.is_none(),
            Self::Upstream(up) => up.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Local(bytes) | Self::LocalWithTrailers(bytes, _) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Self::Upstream(up) => up.size_hint(),
        }
    }
}

/// What ends an exchange once its response body is over (the request path's: the endpoint's
/// in-flight count, then the request's metrics and access log). `error` is set when the body
/// failed midway.
pub trait Finish {
    /// The body is over, with `error` if it failed, after `bytes_sent` bytes of data.
    fn finish(self, error: Option<&'static str>, bytes_sent: u64);
}

pin_project_lite::pin_project! {
    /// A response body's idle timeout: its limit and its timer, in one allocation (the body,
    /// which every response carries, stays small).
    #[derive(Debug)]
    struct IdleTimer {
        limit: Duration,
        #[pin]
        sleep: Sleep,
    }
}

/// An upstream response body `B` on its way to the client, with its idle timeout and `F`, what
/// ends the exchange.
#[derive(Debug)]
pub struct UpstreamBody<B, F: Finish> {
    inner: B,
    idle: Option<Pin<Box<IdleTimer>>>,
    done: Option<F>,
    /// Data bytes passed on so far.
    sent: u64,
}

impl<B: Body, F: Finish> UpstreamBody<B, F> {
    pub fn new(inner: B, idle: Option<Duration>, done: F) -> Self {
        let mut body = Self {
            inner,
            idle: idle.map(|limit| {
                Box::pin(IdleTimer {
                    limit,
                    sleep: tokio::time::sleep(limit),
                })
            }),
            done: Some(done),
            sent: 0,
        };
        if body.inner.is_end_stream() {
            body.finish(None);
        }
        body
    }

    /// The exchange is over: the endpoint's in-flight count drops, the request is logged. (An
    /// HTTP/1.1 connection has gone back to its pool already, when the body ended cleanly.)
    fn finish(&mut self, error: Option<&'static str>) {
        if let Some(done) = self.done.take() {
            done.finish(error, self.sent);
        }
    }
}

impl<B, F> Body for UpstreamBody<B, F>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
    F: Finish + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.sent += frame.data_ref().map_or(0, |d| d.len() as u64);
                if let Some(timer) = &mut this.idle {
                    let timer = timer.as_mut().project();
                    timer.sleep.reset(Instant::now() + *timer.limit);
                }
                if this.inner.is_end_stream() {
                    this.finish(None);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish(None);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(Some("upstream_reset"));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => {
                let expired = this.idle.as_mut().and_then(|timer| {
                    let timer = timer.as_mut().project();
                    timer.sleep.poll(cx).is_ready().then_some(*timer.limit)
                });
                if let Some(d) = expired {
                    this.finish(Some("idle_timeout"));
                    return Poll::Ready(Some(Err(format!("no data for {d:?}").into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B, F: Finish> Drop for UpstreamBody<B, F> {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            // The client went away before the end of the body.
            done.finish(Some("downstream_reset"), self.sent);
        }
    }
}

/// Why a client's request body failed: the client's fault, never the upstream's. The body's
/// error, and recorded in its [`BodyState`] for the attempt that sent it.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("malformed request body: {0}")]
    Malformed(#[source] BoxError),
    #[error("the client went away in the middle of its request body: {0}")]
    Reset(#[source] BoxError),
    #[error("no request body data for {0:?}")]
    Timeout(Duration),
}

impl ClientBodyError {
    /// Sorts a failure of the client's body (hyper's): broken HTTP/1.1 framing is malformed;
    /// anything else (end of stream, reset, HTTP/2 stream errors) is the client leaving.
    pub fn from_incoming(e: BoxError) -> Self {
        if let Some(ours) = e.downcast_ref::<crate::downstream::BodyError>() {
            return match ours {
                crate::downstream::BodyError::Malformed(_) => Self::Malformed(e),
                crate::downstream::BodyError::Reset(_) => Self::Reset(e),
            };
        }
        let mut source = std::error::Error::source(&*e);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>()
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
                )
            {
                return Self::Malformed(e);
            }
            source = s.source();
        }
        Self::Reset(e)
    }

    /// A copy (the original is the body's error, the copy goes to the response).
    pub fn to_owned_kind(&self) -> Self {
        match self {
            Self::Malformed(e) => Self::Malformed(e.to_string().into()),
            Self::Reset(e) => Self::Reset(e.to_string().into()),
            Self::Timeout(d) => Self::Timeout(*d),
        }
    }
}

/// What a request body shares with the request path: how the client's body failed, if it did,
/// and whether the response head has arrived. Upstream clients do not all carry a body's error
/// back (hyper's HTTP/2 client only resets the stream), so an attempt that fails looks here
/// before blaming the upstream. Allocated only for requests with a body.
#[derive(Debug, Default)]
pub struct BodyState {
    failure: OnceLock<ClientBodyError>,
    responded: AtomicBool,
    /// Data bytes received from the client, for the access log.
    received: AtomicU64,
}

impl BodyState {
    /// The failure of the client's body, when that is why an attempt failed.
    pub fn failure(&self) -> Option<ClientBodyError> {
        self.failure.get().map(ClientBodyError::to_owned_kind)
    }

    /// Data bytes received from the client so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// The response head has arrived: the request-body timeout stops (the route's stream idle
    /// timeout governs the exchange from here).
    pub fn responded(&self) {
        self.responded.store(true, Ordering::Relaxed);
    }

    /// Records a failure of the body and returns it as the body's error.
    fn fail(&self, e: ClientBodyError) -> BoxError {
        let _ = self.failure.set(e.to_owned_kind());
        e.into()
    }
}

/// What a request with a body carries along with it (none for a request without one).
#[derive(Debug)]
pub struct BodyTracking<O> {
    /// How long the body may go without progress until the response head arrives; `None`: no
    /// limit.
    pub idle: Option<Duration>,
    /// Held until the body ends (the listener's guard: the connection's end of stream then
    /// means the client left).
    pub open: O,
    pub state: Arc<BodyState>,
}

/// A client's request body on its way upstream. Its failures become [`ClientBodyError`]s,
/// recorded in its [`BodyState`], so they are answered as the client's (400, 499) and not
/// charged to the upstream; and a body that makes no progress for `idle` before the response
/// head arrives ends with [`ClientBodyError::Timeout`] (408). Progress is [`MIN_BODY_PROGRESS`]
/// bytes (or the end), so a body trickling a byte at a time is bounded too, as by Kestrel's
/// minimum data rate. The timer is armed when the body is first found waiting after progress
/// (no timer for a body that never waits), so time spent waiting for the upstream to take the
/// body does not count.
#[derive(Debug)]
pub struct ClientBody<O> {
    inner: Incoming,
    tracking: Option<BodyTracking<O>>,
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// Bytes received since the timer last restarted.
    progress: usize,
}

/// How many request body bytes restart its idle timeout: at the default 60 s, a body must
/// arrive at 17 bytes/s or more.
pub const MIN_BODY_PROGRESS: usize = 1024;

impl<O> ClientBody<O> {
    pub fn new(inner: Incoming, tracking: Option<BodyTracking<O>>) -> Self {
        Self {
            inner,
            tracking,
            timer: None,
            armed: false,
            progress: 0,
        }
    }

    /// The body is over: an end of stream on the connection is no longer the client leaving.
    fn end(&mut self) {
        self.tracking = None;
    }

    fn fail(&mut self, e: ClientBodyError) -> BoxError {
        match self.tracking.take() {
            Some(t) => t.state.fail(e),
            None => e.into(),
        }
    }
}

impl<O: Unpin> Body for ClientBody<O> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, Bytes::len);
                this.progress += len;
                if let Some(t) = &this.tracking {
                    t.state.received.fetch_add(len as u64, Ordering::Relaxed);
                }
                if this.progress >= MIN_BODY_PROGRESS {
                    this.armed = false;
                    this.progress = 0;
                }
                if this.inner.is_end_stream() {
                    this.end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.end();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                let e = ClientBodyError::from_incoming(e);
                Poll::Ready(Some(Err(this.fail(e))))
            }
            Poll::Pending => {
                let Some(t) = &mut this.tracking else {
                    return Poll::Pending;
                };
                let Some(idle) = t.idle else {
                    return Poll::Pending;
                };
                if t.state.responded.load(Ordering::Relaxed) {
                    // The response has begun: no request-body timeout from here.
                    t.idle = None;
                    this.timer = None;
                    return Poll::Pending;
                }
                let deadline = || Instant::now() + idle;
                let timer = match &mut this.timer {
                    Some(t) => {
                        if !this.armed {
                            t.as_mut().reset(deadline());
                        }
                        t
                    }
                    None => this
                        .timer
                        .insert(Box::pin(tokio::time::sleep_until(deadline()))),
                };
                this.armed = true;
                if timer.as_mut().poll(cx).is_ready() {
                    let e = this.fail(ClientBodyError::Timeout(idle));
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
