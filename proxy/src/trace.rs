//! Distributed tracing: the proxy joins a request's trace (W3C `traceparent`, or B3 for
//! X-Ray/Zipkin-era apps), or starts one for a share of the requests that carry none; a request
//! in a sampled trace gets a span of its own (SERVER at a sidecar's ingress, CLIENT elsewhere),
//! forwarded as the parent of what comes next, and exported over OTLP/gRPC to the snapshot's
//! collector in batches. Without tracing in the snapshot a request pays one `Option` test.

use std::{sync::Arc, time::SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::{Span, Status, span::SpanKind, status::StatusCode},
};

use crate::{
    fault::Share,
    span_export::{SpanQueue, string},
};

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// A snapshot's tracing: where spans go, what share of new traces is sampled, and the name
/// this proxy reports as (`service.name`).
#[derive(Debug)]
pub struct Tracer {
    share: Share,
    /// Where its spans go: shared with the tracers of the snapshots before and after it while
    /// they export to the same collector as the same service (one connection across pushes).
    queue: Arc<SpanQueue>,
    dropped: prometheus::IntCounter,
}

/// A request's place in its trace, as it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    pub trace_id: [u8; 16],
    /// The caller's span, if the request carried one.
    pub parent: Option<[u8; 8]>,
    pub sampled: bool,
}

/// A sampled request's span, open until the request ends.
#[derive(Debug)]
pub struct ActiveSpan {
    tracer: Arc<Tracer>,
    span: Span,
}

impl Tracer {
    pub fn new(queue: Arc<SpanQueue>, share: Share, dropped: prometheus::IntCounter) -> Self {
        Self {
            share,
            queue,
            dropped,
        }
    }

    /// Joins or starts the request's trace. A sampled request gets its span, and its headers
    /// name that span as the parent of what follows (`traceparent`, and B3 where the request
    /// used B3); an unsampled one goes on as it came.
    pub fn start(
        self: &Arc<Self>,
        headers: &mut HeaderMap,
        name: String,
        server: bool,
        attributes: &[(&str, &str)],
    ) -> Option<Box<ActiveSpan>> {
        let cx = match extract(headers) {
            Some(Found::Context(cx)) => cx,
            // A caller's decision without a trace (B3's lone `0`, `1` or `d`): a new trace, as
            // decided.
            Some(Found::Decision(sampled)) => Context {
                trace_id: random_trace_id(),
                parent: None,
                sampled,
            },
            None => {
                // A new trace (a malformed context's state goes with it), decided here once:
                // an unsampled one goes on marked so (`-00`), so that the proxies after this
                // one do not draw again.
                headers.remove(TRACESTATE);
                let cx = Context {
                    trace_id: random_trace_id(),
                    parent: None,
                    sampled: self.share.hit(),
                };
                if !cx.sampled {
                    let unsampled = format!(
                        "00-{}-{}-00",
                        to_hex(&cx.trace_id),
                        to_hex(&random_span_id())
                    );
                    if let Ok(v) = HeaderValue::from_str(&unsampled) {
                        headers.insert(TRACEPARENT, v);
                    }
                }
                cx
            }
        };
        if !cx.sampled {
            return None;
        }
        let span_id = random_span_id();
        inject(headers, &cx, span_id);
        let span = Span {
            trace_id: cx.trace_id.to_vec(),
            span_id: span_id.to_vec(),
            parent_span_id: cx.parent.map(|p| p.to_vec()).unwrap_or_default(),
            name,
            attributes: attributes
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| string(k, v))
                .collect(),
            kind: if server {
                SpanKind::Server
            } else {
                SpanKind::Client
            } as i32,
            start_time_unix_nano: unix_nanos(SystemTime::now()),
            ..Default::default()
        };
        Some(Box::new(ActiveSpan {
            tracer: self.clone(),
            span,
        }))
    }

    fn send(&self, span: Span) {
        if !self.queue.send(span) {
            self.dropped.inc();
        }
    }
}

impl ActiveSpan {
    /// Ends the span with the response's status, and an error status for a 5xx or a failure
    /// (`error`: the proxy's error kind).
    pub fn end(mut self: Box<Self>, status: http::StatusCode, error: Option<&str>) {
        self.span.end_time_unix_nano = unix_nanos(SystemTime::now());
        let attrs = &mut self.span.attributes;
        attrs.push(KeyValue {
            key: "http.response.status_code".into(),
            value: Some(AnyValue {
                value: Some(Value::IntValue(i64::from(status.as_u16()))),
            }),
        });
        if let Some(e) = error {
            attrs.push(string("error.type", e));
        }
        if status.is_server_error() || error.is_some() {
            self.span.status = Some(Status {
                code: StatusCode::Error as i32,
                message: error.unwrap_or_default().to_string(),
            });
        }
        let Self { tracer, span } = *self;
        tracer.send(span);
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn random_trace_id() -> [u8; 16] {
    loop {
        let id = fastrand::u128(..).to_be_bytes();
        if id != [0; 16] {
            return id;
        }
    }
}

fn random_span_id() -> [u8; 8] {
    loop {
        let id = fastrand::u64(..).to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

/// What a request's trace headers say: its place in a trace, or only a sampling decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Context(Context),
    Decision(bool),
}

/// The request's trace context: W3C `traceparent` first, else B3 (single `b3` header, or the
/// `x-b3-*` headers). Malformed headers are none (the request starts a trace).
pub fn extract(headers: &HeaderMap) -> Option<Found> {
    if let Some(cx) = headers
        .get(TRACEPARENT)
        .and_then(|v| traceparent(v.as_bytes()))
    {
        return Some(Found::Context(cx));
    }
    if let Some(v) = headers.get(B3) {
        return b3_single(v.to_str().ok()?);
    }
    let sampled = match (headers.get(B3_SAMPLED), headers.get(B3_FLAGS)) {
        (_, Some(f)) if f == "1" => Some(true),
        (Some(s), _) => Some(s == "1" || s == "true"),
        (None, _) => None,
    };
    let ids = headers
        .get(B3_TRACE)
        .zip(headers.get(B3_SPAN))
        .and_then(|(t, s)| Some((t.to_str().ok()?, s.to_str().ok()?)));
    let Some((trace, span)) = ids else {
        return sampled.map(Found::Decision);
    };
    Some(Found::Context(Context {
        trace_id: b3_trace_id(trace)?,
        parent: Some(hex::<8>(span)?),
        // No decision: B3 defers it downstream; taken as sampled, as Envoy does.
        sampled: sampled.unwrap_or(true),
    }))
}

/// `00-{32 hex trace}-{16 hex parent}-{2 hex flags}` (version 00; a later version's first four
/// fields are read alike).
fn traceparent(v: &[u8]) -> Option<Context> {
    let v = std::str::from_utf8(v).ok()?;
    let mut parts = v.split('-');
    let version = parts.next()?;
    let (trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if hex::<1>(version).is_none() || version == "ff" || (version == "00" && parts.next().is_some())
    {
        return None;
    }
    let trace_id = hex::<16>(trace)?;
    let parent = hex::<8>(parent)?;
    let flags = hex::<1>(flags)?[0];
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some(Context {
        trace_id,
        parent: Some(parent),
        sampled: flags & 1 == 1,
    })
}

/// `{trace}-{span}[-{sampled}[-{parent}]]`, or a lone sampling decision (`0`, `1`, `d`).
fn b3_single(v: &str) -> Option<Found> {
    match v {
        "0" => return Some(Found::Decision(false)),
        "1" | "d" => return Some(Found::Decision(true)),
        _ => {}
    }
    let mut parts = v.split('-');
    let trace = parts.next()?;
    let span = parts.next()?;
    let sampled = !matches!(parts.next(), Some("0"));
    Some(Found::Context(Context {
        trace_id: b3_trace_id(trace)?,
        parent: Some(hex::<8>(span)?),
        sampled,
    }))
}

/// A B3 trace id: 32 hex digits, or 16 (the high half zero).
fn b3_trace_id(s: &str) -> Option<[u8; 16]> {
    let id = match s.len() {
        32 => hex::<16>(s)?,
        16 => {
            let low = hex::<8>(s)?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    (id != [0; 16]).then_some(id)
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let mut out = [0; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Names `span` as the parent of what follows the request: `traceparent` always, and the B3
/// headers the request used.
fn inject(headers: &mut HeaderMap, cx: &Context, span: [u8; 8]) {
    let trace = to_hex(&cx.trace_id);
    let span_hex = to_hex(&span);
    let set = |headers: &mut HeaderMap, name: HeaderName, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    set(headers, TRACEPARENT, format!("00-{trace}-{span_hex}-01"));
    if headers.contains_key(B3) {
        let parent = cx
            .parent
            .map(|p| format!("-{}", to_hex(&p)))
            .unwrap_or_default();
        set(headers, B3, format!("{trace}-{span_hex}-1{parent}"));
    }
    if headers.contains_key(B3_TRACE) {
        set(headers, B3_TRACE, trace);
        set(headers, B3_SPAN, span_hex);
        match cx.parent {
            Some(p) => set(headers, B3_PARENT, to_hex(&p)),
            None => {
                headers.remove(B3_PARENT);
            }
        }
        set(headers, B3_SAMPLED, "1".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(h: &HeaderMap) -> Context {
        match extract(h) {
            Some(Found::Context(cx)) => cx,
            other => panic!("{other:?}"),
        }
    }

    /// A new trace the proxy does not sample goes on marked unsampled, its tracestate gone,
    /// so the proxies after it keep the decision; a caller's "do not sample" is kept; B3
    /// decisions without ids are read; a malformed traceparent does not hide valid B3.
    #[test]
    fn decisions_are_kept_downstream() {
        let registry = prometheus::Registry::new();
        let metrics = crate::metrics::ProxyMetrics::new(&registry).unwrap();
        let tracer = |p: f64| {
            Arc::new(Tracer::new(
                Arc::new(SpanQueue::new("127.0.0.1:1".into(), "s".into())),
                Share::from_percent(p).unwrap(),
                metrics.spans_dropped(),
            ))
        };
        let (never, always) = (tracer(0.0), tracer(100.0));
        let mut h = HeaderMap::new();
        h.insert(TRACESTATE, "vendor=x".parse().unwrap());
        assert!(never.start(&mut h, "n".into(), true, &[]).is_none());
        assert!(!h.contains_key(TRACESTATE));
        assert!(!context(&h).sampled);
        assert!(
            always.start(&mut h, "n".into(), true, &[]).is_none(),
            "kept downstream"
        );
        let mut h = HeaderMap::new();
        h.insert(B3, "0".parse().unwrap());
        assert_eq!(extract(&h), Some(Found::Decision(false)));
        assert!(always.start(&mut h, "n".into(), true, &[]).is_none());
        assert_eq!(h[B3], "0");
        let mut h = HeaderMap::new();
        h.insert(B3_SAMPLED, "1".parse().unwrap());
        assert_eq!(extract(&h), Some(Found::Decision(true)));
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, "garbage".parse().unwrap());
        h.insert(
            B3,
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            to_hex(&context(&h).trace_id),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
    }

    #[test]
    fn traceparent_is_read_and_malformed_ones_are_none() {
        let cx = traceparent(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        assert_eq!(to_hex(&cx.trace_id), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(to_hex(&cx.parent.unwrap()), "b7ad6b7169203331");
        assert!(cx.sampled);
        let cx = traceparent(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00").unwrap();
        assert!(!cx.sampled);
        for bad in [
            &b"00-00000000000000000000000000000000-b7ad6b7169203331-01"[..],
            b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            b"garbage",
            b"0g-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert_eq!(traceparent(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn b3_is_read_single_and_multi() {
        let mut h = HeaderMap::new();
        h.insert(
            B3,
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90"
                .parse()
                .unwrap(),
        );
        let cx = context(&h);
        assert_eq!(to_hex(&cx.trace_id), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(to_hex(&cx.parent.unwrap()), "e457b5a2e4d86bd1");
        let mut h = HeaderMap::new();
        h.insert(B3_TRACE, "463ac35c9f6413ad".parse().unwrap());
        h.insert(B3_SPAN, "a2fb4a1d1a96d312".parse().unwrap());
        h.insert(B3_SAMPLED, "0".parse().unwrap());
        let cx = context(&h);
        assert_eq!(to_hex(&cx.trace_id), "0000000000000000463ac35c9f6413ad");
        assert!(!cx.sampled);
    }

    /// A sampled request's headers name its new span as the parent, in W3C and in the B3 form
    /// it came with; the trace id stays.
    #[test]
    fn the_span_is_injected_as_the_parent() {
        let mut h = HeaderMap::new();
        h.insert(
            B3_TRACE,
            "463ac35c9f6413ad463ac35c9f6413ad".parse().unwrap(),
        );
        h.insert(B3_SPAN, "a2fb4a1d1a96d312".parse().unwrap());
        let cx = context(&h);
        inject(&mut h, &cx, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            h[TRACEPARENT],
            "00-463ac35c9f6413ad463ac35c9f6413ad-0102030405060708-01"
        );
        assert_eq!(h[B3_SPAN], "0102030405060708");
        assert_eq!(h[B3_PARENT], "a2fb4a1d1a96d312");
        assert_eq!(h[B3_SAMPLED], "1");
        let next = context(&h);
        assert_eq!(next.trace_id, cx.trace_id);
        assert_eq!(next.parent, Some([1, 2, 3, 4, 5, 6, 7, 8]));
    }
}
