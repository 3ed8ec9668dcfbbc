//! Request mirroring: a route's `mirror` copies a share of its requests to another cluster,
//! fire and forget. The copy is its own task: the route's request never waits for it and never
//! fails because of it. A request with a body is copied once the body has arrived whole
//! (the primary reads it; the copy keeps its frames, shared, up to a bound): a larger one is not
//! copied. A route without a mirror pays one `Option` test.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;

use bytes::Bytes;
use http::header;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tokio::sync::oneshot;

use crate::{
    BoxError,
    fault::Share,
    limit::{Held, MirrorBudget, Slot},
    metrics::ProxyMetrics,
    outbound::Outbound,
    outbound::RequestBody as OutboundBody,
    upstream::Cluster,
};

/// The body bound when the route names none.
pub const DEFAULT_MAX_BODY: u64 = 64 * 1024;

/// The largest body bound a route may name.
pub const MAX_BODY_LIMIT: u64 = 16 * 1024 * 1024;

/// How long a copy may take (to the end of its response) when its route has no request timeout:
/// Envoy's default route timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub struct Mirror {
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) share: Share,
    pub(crate) max_body: u64,
    /// The route's request timeout, else [`DEFAULT_TIMEOUT`]: from the request's start to the
    /// end of the copy's response.
    pub(crate) timeout: Duration,
    budget: Arc<MirrorBudget>,
}

/// Where a copied request's body goes while the primary reads it: handed to the copy's task
/// when it is whole, dropped (no copy) when it grows beyond the bound or does not arrive whole.
#[derive(Debug)]
pub struct TeeSink {
    tx: Option<oneshot::Sender<Frames>>,
    frames: VecDeque<Frame<Bytes>>,
    /// The frames' bytes, reserved from the proxy's budget.
    held: Held,
    limit: u64,
    metrics: ProxyMetrics,
}

impl Mirror {
    pub(crate) fn new(
        cluster: Arc<Cluster>,
        share: Share,
        max_body: u64,
        timeout: Duration,
        budget: Arc<MirrorBudget>,
    ) -> Self {
        Self {
            cluster,
            share,
            max_body,
            timeout,
            budget,
        }
    }

    /// Draws whether `out` is copied. A request without a body (`has_body` false) is sent at
    /// once; for one with a body, the returned sink collects it as the primary reads it (see
    /// [`Tee`]) and the copy goes when it is whole.
    pub fn start(
        &self,
        out: &Outbound,
        has_body: bool,
        metrics: &ProxyMetrics,
    ) -> Option<Box<TeeSink>> {
        if !self.share.hit() {
            return None;
        }
        if has_body {
            let declared = out
                .parts()
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > self.max_body) {
                metrics.mirror("body_too_large");
                return None;
            }
        }
        let Some(slot) = Slot::take(&self.budget) else {
            metrics.mirror("busy");
            return None;
        };
        let key = self
            .cluster
            .hashing
            .as_deref()
            .and_then(|h| h.key.hash(&out.parts().headers, None));
        let deadline = Instant::now() + self.timeout;
        let copy = Copy {
            cluster: self.cluster.clone(),
            key,
            out: out.shadow(),
            deadline,
            metrics: metrics.clone(),
            _slot: slot,
        };
        if !has_body {
            tokio::spawn(copy.send(None));
            return None;
        }
        let (tx, rx) = oneshot::channel::<Frames>();
        tokio::spawn(async move {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(frames)) => copy.send(Some(frames.boxed())).await,
                // The sink dropped without sending: it said why.
                Ok(Err(_)) => {}
                // The body did not arrive whole in time; the sink sees the channel closed.
                Err(_) => copy.metrics.mirror("incomplete"),
            }
        });
        Some(Box::new(TeeSink {
            tx: Some(tx),
            frames: VecDeque::new(),
            held: Held {
                budget: self.budget.clone(),
                bytes: 0,
            },
            limit: self.max_body,
            metrics: metrics.clone(),
        }))
    }
}

/// A copy on its way: sent to one of the cluster's endpoints, its response read and discarded.
struct Copy {
    cluster: Arc<Cluster>,
    /// Its key on a hashing cluster (a header's or a cookie's).
    key: Option<u64>,
    out: Outbound,
    /// The request's start + the timeout: to the end of the copy's response.
    deadline: Instant,
    metrics: ProxyMetrics,
    _slot: Slot,
}

impl Copy {
    async fn send(mut self, body: Option<OutboundBody>) {
        let outcome = tokio::time::timeout_at(self.deadline, self.exchange(body)).await;
        let outcome = outcome.unwrap_or_else(|_| Err("no response within the timeout".into()));
        match outcome {
            Ok(()) => self.metrics.mirror("sent"),
            Err(e) => {
                tracing::debug!(cluster = %self.cluster.name, error = %e, "mirrored request failed");
                self.metrics.mirror("failed");
            }
        }
    }

    /// The copy's exchange, to the end of its response body. Outlier detection counts it as
    /// any request to the cluster.
    async fn exchange(&mut self, body: Option<OutboundBody>) -> Result<(), BoxError> {
        let cluster = &*self.cluster;
        let endpoint = cluster.pick(&[], self.key).ok_or("no healthy endpoint")?;
        let _in_flight = cluster.begin_request(&endpoint)?;
        let response = match endpoint.send(cluster, &mut self.out, body, true).await {
            Ok(response) => response,
            Err(e) => {
                if e.failure != crate::error::UpstreamFailure::Overflow {
                    cluster.observe(&endpoint, true);
                }
                return Err(e.source);
            }
        };
        cluster.observe(&endpoint, response.status().is_server_error());
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            frame?;
        }
        Ok(())
    }
}

impl TeeSink {
    /// A frame the primary read: kept (shared, not copied) while the body stays within the
    /// bound.
    fn keep(&mut self, frame: &Frame<Bytes>) {
        let Some(tx) = &self.tx else { return };
        if tx.is_closed() {
            // The copy's time ran out while the body came (its task said so).
            self.tx = None;
            self.release();
            return;
        }
        if let Some(data) = frame.data_ref() {
            let n = data.len() as u64;
            if self.held.bytes + n > self.limit
                || self.frames.len() >= crate::limit::max_kept_frames(self.limit)
            {
                self.give_up("body_too_large");
                return;
            }
            if !self.held.reserve(n) {
                self.give_up("busy");
                return;
            }
            self.frames.push_back(Frame::data(crate::limit::kept(data)));
        } else if let Some(trailers) = frame.trailers_ref() {
            self.frames.push_back(Frame::trailers(trailers.clone()));
        }
    }

    /// The body arrived whole: the copy goes (with the bytes it holds).
    fn complete(&mut self) {
        if let Some(tx) = self.tx.take() {
            let held = Held {
                budget: self.held.budget.clone(),
                bytes: std::mem::take(&mut self.held.bytes),
            };
            let frames = Frames(std::mem::take(&mut self.frames), held);
            // The copy's task is gone only if the runtime is shutting down.
            let _ = tx.send(frames);
        }
    }

    fn give_up(&mut self, why: &'static str) {
        if self.tx.take().is_some() {
            self.metrics.mirror(why);
            self.release();
        }
    }

    /// The frames kept go, and their bytes back to the budget.
    fn release(&mut self) {
        self.frames.clear();
        let held = std::mem::take(&mut self.held.bytes);
        self.held.budget.bytes.fetch_sub(held, Ordering::AcqRel);
    }
}

impl Drop for TeeSink {
    /// The primary stopped reading before the end of the body (a failed attempt, a client that
    /// went away): nothing whole to copy.
    fn drop(&mut self) {
        self.give_up("incomplete");
    }
}

pin_project_lite::pin_project! {
    /// A request body that hands what the primary reads to a mirror's copy too.
    pub struct Tee<B> {
        #[pin]
        inner: B,
        sink: Box<TeeSink>,
    }
}

impl<B> Tee<B> {
    pub fn new(inner: B, sink: Box<TeeSink>) -> Self {
        Self { inner, sink }
    }
}

impl<B> Body for Tee<B>
where
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let mut inner = this.inner;
        let polled = inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.sink.keep(frame);
                // A body that knows it is over (its length reached) may not be polled again
                // by the upstream's writer: the copy goes now.
                if inner.is_end_stream() {
                    this.sink.complete();
                }
            }
            Poll::Ready(None) => this.sink.complete(),
            Poll::Ready(Some(Err(_))) => this.sink.give_up("incomplete"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A copied body: the frames the primary read, in order, and the budget they hold (given back
/// when the body is dropped).
#[derive(Debug)]
struct Frames(VecDeque<Frame<Bytes>>, #[allow(dead_code)] Held);

impl Body for Frames {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.0.iter().any(|f| f.is_trailers()) {
            return SizeHint::default();
        }
        let n = self
            .0
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        SizeHint::with_exact(n)
    }
}
