//! The HTTP/1.1 client for upstream requests.
//!
//! One exchange at a time on a pooled connection, driven by the request's own task: the send
//! future writes the request and reads the response head, and the response body ([`IncomingBody`])
//! reads the rest (and finishes sending a request body the upstream answered early) and puts the
//! connection back in its pool when the exchange ended cleanly. There is no connection task and no
//! channel between the request and its connection, which is what a general-purpose client
//! (hyper's) needs and a proxy that owns the exchange does not.
//!
//! Framing follows RFC 9112: requests carry `content-length` when their length is known and are
//! chunked otherwise; responses are read by `transfer-encoding: chunked` (with trailers),
//! `content-length`, or until the connection closes. `1xx` interim responses are skipped.
//! Upgrades (WebSocket) go through hyper on a connection of their own, not through here.

use std::{
    io,
    mem::MaybeUninit,
    pin::Pin,
    task::{Context, Poll, Waker, ready},
    time::Duration,
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version, header,
    request::Parts,
};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;

#[cfg(test)]
use crate::chunked::MAX_CHUNK_LINE;
use crate::chunked::hex_len;
pub use crate::chunked::{Chunked, Step, decode_chunked};
use crate::head::{ends_head, parse_length};
use crate::{
    BoxError,
    error::{AttemptError, UpstreamFailure},
    outbound::{Outbound, RequestBody},
    tls::Stream,
};

/// Read buffer grown by this much when it runs low.
const READ_CHUNK: usize = 4096;
/// A response head (or a trailer block) larger than this is a protocol error. Offsets into a
/// head fit in a `u16`.
const MAX_HEAD: usize = 64 * 1024 - 1;
const MAX_HEADERS: usize = 100;
/// Spare room in a response's header map for fields added on the way back.
const RESPONSE_FIELDS_ADDED: usize = 2;
/// Body bytes gathered before they are written.
const WRITE_BATCH: usize = 64 * 1024;

/// An open connection to an endpoint, between exchanges.
#[derive(Debug)]
pub struct Conn {
    io: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Counts the connection against its cluster's connection limit while it is open.
    permit: Option<crate::limit::ConnPermit>,
}

/// Where a connection goes when its exchange has ended cleanly.
pub trait Release: Send + Sync + std::fmt::Debug {
    fn release(&self, conn: Box<Conn>, idle_timeout: Duration);
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "upstream closed the connection",
    )
}

impl Conn {
    pub fn new(io: Stream) -> Self {
        Self {
            io,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            permit: None,
        }
    }

    /// A connection counted against a cluster's connection limit until it closes.
    pub fn with_permit(mut self, permit: Option<crate::limit::ConnPermit>) -> Self {
        self.permit = permit;
        self
    }

    pub fn permit(&self) -> Option<&crate::limit::ConnPermit> {
        self.permit.as_ref()
    }

    /// True when the connection can take another exchange: the upstream has neither closed it
    /// nor sent anything unasked. Costs no system call unless the socket has become readable.
    pub fn is_reusable(&mut self) -> bool {
        self.io.is_idle_open()
    }

    /// Reads more of the response into the read buffer; `Ok(0)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf)
    }

    /// Reads more of the response; the end of the stream is an error here.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(self.poll_fill(cx)) {
            Ok(0) => Poll::Ready(Err(closed())),
            Ok(_) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Writes what the write buffer holds.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wbuf.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wbuf.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Sends the request and reads the response head; the body comes through the response.
    /// When the exchange ends cleanly the connection goes to `pool`.
    pub async fn send(
        mut self: Box<Self>,
        out: Outgoing<'_>,
        body: Option<RequestBody>,
        pool: std::sync::Arc<dyn Release>,
        idle_timeout: Duration,
    ) -> Result<Response<IncomingBody>, AttemptError> {
        self.wbuf.clear();
        out.encode_head(&mut self.wbuf);
        let body = body.filter(|b| !b.is_end_stream());
        let mut writer = Writer::new(body, out.framing);
        let mut received = false;
        // Kept across wakes: a head trickling in is parsed again only as `read_head` says.
        let mut incomplete = 0;
        let head = std::future::poll_fn(|cx| {
            // Send the request while watching for the response: an upstream may answer (an
            // error, say) before it has read the whole body.
            writer.poll(&mut self, cx);
            if let Some(e) = writer.take_body_error() {
                return Poll::Ready(Err(AttemptError::new(UpstreamFailure::Protocol, e)));
            }
            self.poll_head(
                cx,
                out.parts.method == Method::HEAD,
                &mut received,
                &mut incomplete,
            )
        })
        .await
        .map_err(|mut e| {
            if e.failure == UpstreamFailure::Reset && !received {
                // The write error, when there was one, says more than the read's EOF.
                if let Some(Failed::Io(w)) = writer.failed.take() {
                    e.source = w.into();
                }
            }
            e
        })?;
        let Head {
            status,
            version,
            headers,
            framing,
            keep_alive,
        } = head;
        // Kept only while part of the request is still to be written.
        let writer = (!writer.finished()).then(|| Box::new(writer));
        let mut response = Response::new(IncomingBody {
            conn: Some(self),
            writer,
            framing,
            keep_alive,
            pool: Some((pool, idle_timeout)),
        });
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        if response.body().framing == Framing::Done {
            response.body_mut().end();
        }
        Ok(response)
    }

    /// Reads until a final (non-1xx) response head is complete; `incomplete` is
    /// [`read_head`]'s, kept by the caller from one wake to the next.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
        received: &mut bool,
        incomplete: &mut usize,
    ) -> Poll<Result<Head, AttemptError>> {
        loop {
            if let Some(head) = read_head(&mut self.rbuf, head_request, incomplete, false)? {
                return Poll::Ready(Ok(head));
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    // A head left unparsed for want of a blank line is judged now: malformed, or
                    // cut short.
                    if let Some(head) = read_head(&mut self.rbuf, head_request, incomplete, true)? {
                        return Poll::Ready(Ok(head));
                    }
                    return Poll::Ready(Err(AttemptError::io(closed(), !*received)));
                }
                Ok(_) => *received = true,
                Err(e) => return Poll::Ready(Err(AttemptError::io(e, !*received))),
            }
        }
    }
}

/// Reads the final response head from what has accumulated in `buf`, skipping interim (1xx)
/// heads: `None` while it is incomplete. `incomplete` (0 at first) is how much of `buf` held no
/// complete head at the last parse: the head is parsed again only once a blank line has arrived
/// after it, the buffer has doubled, or at the end of the stream (`eof`), so one trickling in a
/// byte at a time costs linear work, not quadratic. (A malformed head is then found at its blank
/// line, or at the end of the stream, rather than at its first bad byte.)
#[doc(hidden)]
pub fn read_head(
    buf: &mut BytesMut,
    head_request: bool,
    incomplete: &mut usize,
    eof: bool,
) -> Result<Option<Head>, AttemptError> {
    while !buf.is_empty() {
        let due = *incomplete == 0
            || eof
            || buf.len() >= MAX_HEAD
            || buf.len() >= 2 * *incomplete
            || ends_head(buf, *incomplete);
        if !due {
            return Ok(None);
        }
        match parse_head(buf, head_request)? {
            Parsed::Final(head) => return Ok(Some(head)),
            Parsed::Interim => *incomplete = 0,
            Parsed::Partial => {
                *incomplete = buf.len();
                return Ok(None);
            }
        }
    }
    Ok(None)
}

/// Parses a response head at the start of `buf` (the read buffer): a complete head, final or
/// interim, is taken off it; a partial one leaves it as it was.
#[doc(hidden)]
pub fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Parsed, AttemptError> {
    // Offsets into the buffer (a head is under 64 KiB), so the values can be cut from it
    // without copying once the parser's borrow ends.
    let mut spans = [[0u16; 4]; MAX_HEADERS];
    let (len, code, minor, count) = {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            buf,
            &mut headers,
        ) {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => {
                let base = buf.as_ptr() as usize;
                let offset = |p: *const u8| (p as usize - base) as u16;
                let mut count = 0;
                for (span, h) in spans.iter_mut().zip(res.headers.iter()) {
                    let name = offset(h.name.as_ptr());
                    let value = offset(h.value.as_ptr());
                    *span = [
                        name,
                        name + h.name.len() as u16,
                        value,
                        value + h.value.len() as u16,
                    ];
                    count += 1;
                }
                (len, res.code.unwrap_or(0), res.version.unwrap_or(1), count)
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {
                return Ok(Parsed::Partial);
            }
            Ok(_) => return Err(AttemptError::protocol("response head too large")),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(AttemptError::protocol("too many response headers"));
            }
            Err(_) => return Err(AttemptError::protocol("malformed response head")),
        }
    };
    let status = StatusCode::from_u16(code)
        .map_err(|_| AttemptError::protocol("invalid response status"))?;
    if status.is_informational() {
        buf.advance(len);
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(AttemptError::protocol(
                "101 Switching Protocols without an upgrade",
            ));
        }
        return Ok(Parsed::Interim);
    }
    let head = buf.split_to(len).freeze();
    // Room for fields added on the way back (`date`, when the upstream sent none): a map made
    // full is regrown by the first `entry` or `insert`, even of a field it holds (~1,000
    // instructions per h2c response: hyper looks up `date` with `entry`). Measured with the
    // benchmark's two-field responses: 32,736 instructions per h2c request with no room,
    // 30,822 with room for one, 30,257 for two.
    let mut headers = HeaderMap::with_capacity(count + RESPONSE_FIELDS_ADDED);
    // The framing headers are read as they go into the map: one pass, no lookups.
    let mut framing = FramingHeaders::default();
    for &[ns, ne, vs, ve] in &spans[..count] {
        let [ns, ne, vs, ve] = [ns, ne, vs, ve].map(usize::from);
        let name = HeaderName::from_bytes(&head[ns..ne])
            .map_err(|_| AttemptError::protocol("invalid response header name"))?;
        framing.note(&name, &head[vs..ve])?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
            .map_err(|_| AttemptError::protocol("invalid response header value"))?;
        headers.append(name, value);
    }
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let (framing, keep_alive) = framing.decide(status, version, head_request);
    Ok(Parsed::Final(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// What [`parse_head`] found.
#[doc(hidden)]
#[derive(Debug)]
pub enum Parsed {
    Final(Head),
    /// A 1xx response, skipped.
    Interim,
    /// More bytes are needed.
    Partial,
}

/// A final response head.
#[doc(hidden)]
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    pub keep_alive: bool,
}

/// What a response's framing headers say (RFC 9112 §6): `content-length`, the last
/// `transfer-encoding`, and `connection` tokens.
#[derive(Debug, Default)]
struct FramingHeaders {
    length: Option<u64>,
    /// Whether the last transfer coding is `chunked`.
    transfer_coding: Option<bool>,
    close: bool,
    keep: bool,
}

impl FramingHeaders {
    #[inline]
    fn note(&mut self, name: &HeaderName, value: &[u8]) -> Result<(), AttemptError> {
        if name == header::CONTENT_LENGTH {
            for v in value.split(|&b| b == b',') {
                let n = parse_length(v.trim_ascii())
                    .ok_or_else(|| AttemptError::protocol("invalid response content-length"))?;
                if self.length.is_some_and(|l| l != n) {
                    return Err(AttemptError::protocol(
                        "conflicting response content-lengths",
                    ));
                }
                self.length = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            if let Some(last) = value
                .rsplit(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .find(|t| !t.is_empty())
            {
                self.transfer_coding = Some(last.eq_ignore_ascii_case(b"chunked"));
            }
        } else if name == header::CONNECTION {
            for t in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                self.close |= t.eq_ignore_ascii_case(b"close");
                self.keep |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        Ok(())
    }

    /// How the body is framed, and whether the connection can be reused after it.
    #[inline]
    fn decide(self, status: StatusCode, version: Version, head_request: bool) -> (Framing, bool) {
        let keep_alive = match version {
            Version::HTTP_10 => self.keep && !self.close,
            _ => !self.close,
        };
        let no_body =
            head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        let framing = if no_body {
            Framing::Done
        } else {
            match (self.transfer_coding, self.length) {
                (Some(true), _) => Framing::Chunked(Chunked::Size),
                (Some(false), _) | (None, None) => Framing::Close,
                (None, Some(0)) => Framing::Done,
                (None, Some(n)) => Framing::Length(n),
            }
        };
        (framing, keep_alive && framing != Framing::Close)
    }
}

/// How a request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// A request ready to go out, borrowed: the same request can be sent again (a retry) without
/// a copy, its head encoded anew for each connection.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    parts: &'a Parts,
    framing: BodyFraming,
    /// The `host` line to write besides the headers, when they do not carry it.
    host: Option<&'a str>,
}

impl<'a> Outgoing<'a> {
    /// `body` is `None`, or end-of-stream already, for a request without one; `fallback_host`
    /// is the endpoint's address, the `host` of a request that names no authority.
    pub fn new(out: &'a Outbound, body: Option<&RequestBody>, fallback_host: &'a str) -> Self {
        let parts = out.parts();
        let framing = match body.filter(|b| !b.is_end_stream()) {
            Some(b) => match b.size_hint().exact() {
                Some(n) => BodyFraming::Length(n),
                None => BodyFraming::Chunked,
            },
            None => {
                let declared = parts.headers.contains_key(header::CONTENT_LENGTH)
                    || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
                if declared {
                    BodyFraming::Length(0)
                } else {
                    BodyFraming::None
                }
            }
        };
        Self {
            parts,
            framing,
            host: out.host_line(fallback_host),
        }
    }

    /// A request without a body can be sent again as it is.
    pub fn replayable(&self) -> bool {
        matches!(self.framing, BodyFraming::None | BodyFraming::Length(0))
    }

    /// Safe to send twice (RFC 9110 §9.2.2).
    pub fn idempotent(&self) -> bool {
        self.parts.method.is_idempotent()
    }

    fn encode_head(&self, buf: &mut BytesMut) {
        let p = &self.parts;
        let path = p.uri.path_and_query().map_or("/", |pq| pq.as_str());
        buf.reserve(64 + path.len() + 32 * p.headers.len());
        buf.put_slice(p.method.as_str().as_bytes());
        buf.put_u8(b' ');
        buf.put_slice(path.as_bytes());
        buf.put_slice(b" HTTP/1.1\r\n");
        if let Some(host) = self.host {
            // An HTTP/2 or absolute-form request: its authority becomes the Host header.
            buf.put_slice(b"host: ");
            buf.put_slice(host.as_bytes());
            buf.put_slice(b"\r\n");
        }
        for (name, value) in &p.headers {
            if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
                continue;
            }
            buf.put_slice(name.as_str().as_bytes());
            buf.put_slice(b": ");
            buf.put_slice(value.as_bytes());
            buf.put_slice(b"\r\n");
        }
        match self.framing {
            BodyFraming::None => {}
            BodyFraming::Length(n) => {
                buf.put_slice(b"content-length: ");
                buf.put_slice(itoa::Buffer::new().format(n).as_bytes());
                buf.put_slice(b"\r\n");
            }
            BodyFraming::Chunked => buf.put_slice(b"transfer-encoding: chunked\r\n"),
        }
        buf.put_slice(b"\r\n");
    }
}

#[derive(Debug)]
enum Failed {
    /// The connection failed while writing.
    Io(io::Error),
    /// The request body (from the client) failed.
    Body(BoxError),
}

/// Writes the request body after the head, framed.
#[derive(Debug)]
struct Writer {
    body: Option<RequestBody>,
    framing: BodyFraming,
    /// Bytes the declared content-length still expects.
    remaining: u64,
    trailers: Option<Box<HeaderMap>>,
    /// Everything, head and body, is written.
    done: bool,
    failed: Option<Failed>,
}

impl Writer {
    fn new(body: Option<RequestBody>, framing: BodyFraming) -> Self {
        Self {
            body,
            framing,
            remaining: match framing {
                BodyFraming::Length(n) => n,
                _ => 0,
            },
            trailers: None,
            done: false,
            failed: None,
        }
    }

    /// True once the request is completely written.
    fn finished(&self) -> bool {
        self.done && self.failed.is_none()
    }

    /// Makes progress writing; failures are kept in `failed` and stop the writing.
    fn poll(&mut self, conn: &mut Conn, cx: &mut Context<'_>) {
        if self.done {
            return;
        }
        loop {
            let mut body_pending = false;
            while conn.wbuf.len() < WRITE_BATCH {
                let Some(body) = self.body.as_mut() else {
                    break;
                };
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => {
                            if let Err(e) = self.push_data(&mut conn.wbuf, &data) {
                                return self.fail(Failed::Body(e.into()));
                            }
                        }
                        Err(frame) => {
                            if let Ok(t) = frame.into_trailers() {
                                self.trailers.get_or_insert_default().extend(t);
                            }
                        }
                    },
                    Poll::Ready(Some(Err(e))) => return self.fail(Failed::Body(e)),
                    Poll::Ready(None) => {
                        self.body = None;
                        if let Err(e) = self.end_body(&mut conn.wbuf) {
                            return self.fail(Failed::Body(e.into()));
                        }
                    }
                    Poll::Pending => {
                        body_pending = true;
                        break;
                    }
                }
            }
            match conn.poll_flush(cx) {
                Poll::Ready(Ok(())) if self.body.is_none() => {
                    self.done = true;
                    return;
                }
                // Written out and the body is waiting for the client (its waker is set).
                Poll::Ready(Ok(())) if body_pending => return,
                // A full batch went out: gather the next.
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return self.fail(Failed::Io(e)),
                Poll::Pending => return,
            }
        }
    }

    /// Takes a failure of the client's request body, which ends the exchange.
    fn take_body_error(&mut self) -> Option<BoxError> {
        match self.failed.take() {
            Some(Failed::Body(e)) => Some(e),
            other => {
                self.failed = other;
                None
            }
        }
    }

    fn fail(&mut self, failed: Failed) {
        self.body = None;
        self.done = true;
        self.failed = Some(failed);
    }

    fn push_data(&mut self, buf: &mut BytesMut, data: &Bytes) -> Result<(), &'static str> {
        if data.is_empty() {
            return Ok(());
        }
        match self.framing {
            BodyFraming::Chunked => {
                let mut size = [0u8; 16];
                let hex = hex_len(data.len(), &mut size);
                buf.put_slice(hex);
                buf.put_slice(b"\r\n");
                buf.put_slice(data);
                buf.put_slice(b"\r\n");
            }
            BodyFraming::Length(_) => {
                let n = data.len() as u64;
                if n > self.remaining {
                    return Err("request body longer than its content-length");
                }
                self.remaining -= n;
                buf.put_slice(data);
            }
            BodyFraming::None => return Err("request body where none was declared"),
        }
        Ok(())
    }

    fn end_body(&mut self, buf: &mut BytesMut) -> Result<(), &'static str> {
        match self.framing {
            BodyFraming::Chunked => {
                buf.put_slice(b"0\r\n");
                for (name, value) in self.trailers.iter().flat_map(|t| t.iter()) {
                    buf.put_slice(name.as_str().as_bytes());
                    buf.put_slice(b": ");
                    buf.put_slice(value.as_bytes());
                    buf.put_slice(b"\r\n");
                }
                buf.put_slice(b"\r\n");
                Ok(())
            }
            BodyFraming::Length(_) if self.remaining > 0 => {
                Err("request body shorter than its content-length")
            }
            _ => Ok(()),
        }
    }
}

/// How a response body is framed, and how far it has been read.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked(Chunked),
    /// Until the upstream closes the connection.
    Close,
    Done,
}

/// A response body read from an HTTP/1.1 connection, which it returns to its pool at the end.
#[derive(Debug)]
pub struct IncomingBody {
    conn: Option<Box<Conn>>,
    writer: Option<Box<Writer>>,
    framing: Framing,
    keep_alive: bool,
    pool: Option<(std::sync::Arc<dyn Release>, Duration)>,
}

impl IncomingBody {
    /// The response is complete: the connection goes back to its pool when nothing is left
    /// half-done on it.
    fn end(&mut self) {
        self.framing = Framing::Done;
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let written = self.writer.as_mut().is_none_or(|w| {
            // The upstream answered before it had the whole request; try to finish sending.
            let mut cx = Context::from_waker(Waker::noop());
            w.poll(&mut conn, &mut cx);
            w.finished()
        });
        if self.keep_alive
            && written
            && conn.rbuf.is_empty()
            && let Some((pool, idle)) = self.pool.take()
        {
            if conn.wbuf.capacity() > WRITE_BATCH {
                conn.wbuf = BytesMut::new();
            }
            pool.release(conn, idle);
        }
    }

    fn read_error(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.framing = Framing::Done;
        Poll::Ready(Some(Err(e.into())))
    }

    fn protocol_error(
        &mut self,
        what: &'static str,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.framing = Framing::Done;
        Poll::Ready(Some(Err(what.into())))
    }
}

impl Body for IncomingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if let Some(w) = &mut this.writer {
                w.poll(conn, cx);
            }
            match &mut this.framing {
                Framing::Done => {
                    this.end();
                    return Poll::Ready(None);
                }
                Framing::Length(n) => {
                    if conn.rbuf.is_empty()
                        && let Err(e) = ready!(conn.poll_more(cx))
                    {
                        return this.read_error(e);
                    }
                    let take = conn
                        .rbuf
                        .len()
                        .min(usize::try_from(*n).unwrap_or(usize::MAX));
                    let data = conn.rbuf.split_to(take).freeze();
                    *n -= take as u64;
                    if *n == 0 {
                        this.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close => {
                    if conn.rbuf.is_empty() {
                        match ready!(conn.poll_fill(cx)) {
                            Ok(0) => {
                                this.keep_alive = false;
                                this.end();
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(e) => return this.read_error(e),
                        }
                    }
                    let data = conn.rbuf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) => match decode_chunked(state, &mut conn.rbuf) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::Trailers(trailers)) => {
                        this.end();
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(Step::End) => {
                        this.end();
                        return Poll::Ready(None);
                    }
                    Ok(Step::More) => {
                        if let Err(e) = ready!(conn.poll_more(cx)) {
                            return this.read_error(e);
                        }
                    }
                    Err(what) => return this.protocol_error(what),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_lengths() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"1234"), Some(1234));
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_length(b"+1"), None);
        assert_eq!(parse_length(b"1 2"), None);
        assert_eq!(parse_length(b"99999999999999999999"), None, "overflow");
    }

    /// Decodes a chunked body fed in reads of `read` bytes, as `poll_frame` drives the decoder:
    /// the data, and whether trailers came.
    fn decode_in_reads(body: &[u8], read: usize) -> Result<(Vec<u8>, bool), &'static str> {
        let (mut state, mut buf, mut data) = (Chunked::Size, BytesMut::new(), Vec::new());
        for piece in body.chunks(read) {
            buf.extend_from_slice(piece);
            loop {
                match decode_chunked(&mut state, &mut buf)? {
                    Step::Data(d) => data.extend_from_slice(&d),
                    Step::Trailers(_) => return Ok((data, true)),
                    Step::End => return Ok((data, false)),
                    Step::More => break,
                }
            }
        }
        Err("incomplete")
    }

    #[test]
    fn chunked_limits_hold_however_the_body_arrives() {
        // A chunk-size line over MAX_CHUNK_LINE and a trailer block over MAX_HEAD used to pass
        // when they arrived in one read and failed in several (the h1_chunked fuzz target).
        let line = |ext: usize| {
            [
                b"5;".as_slice(),
                &vec![b'x'; ext],
                b"\r\nhello\r\n0\r\n\r\n",
            ]
            .concat()
        };
        let trailers = |value: usize| {
            [
                b"5\r\nhello\r\n0\r\nx: ".as_slice(),
                &vec![b'y'; value],
                b"\r\n\r\n",
            ]
            .concat()
        };
        // "5;" + extension + CRLF; "x: " + value + CRLF CRLF.
        let longest_line = MAX_CHUNK_LINE - 4;
        let largest_trailers = MAX_HEAD - 7;
        for read in [1 << 20, 1000] {
            assert_eq!(
                decode_in_reads(&line(longest_line), read),
                Ok((b"hello".to_vec(), false))
            );
            assert_eq!(
                decode_in_reads(&line(longest_line + 1), read),
                Err("invalid chunk size line"),
                "read {read}"
            );
            assert_eq!(
                decode_in_reads(&trailers(largest_trailers), read),
                Ok((b"hello".to_vec(), true))
            );
            assert_eq!(
                decode_in_reads(&trailers(largest_trailers + 1), read),
                Err("trailers too large"),
                "read {read}"
            );
        }
    }

    /// A large head (and trailer block) arriving a few bytes at a time is read whole, and a
    /// malformed one is found at its blank line or at the end of the stream, whichever comes
    /// first. (Each read is searched from where the last one ended, so this is linear work.)
    #[test]
    fn trickled_heads_and_trailers() {
        let mut head = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..90 {
            head.extend_from_slice(format!("x-h{i}: {}\r\n", "v".repeat(600)).as_bytes());
        }
        head.extend_from_slice(b"content-length: 0\r\n\r\n");
        let (mut buf, mut incomplete, mut got) = (BytesMut::new(), 0, None);
        for piece in head.chunks(7) {
            buf.extend_from_slice(piece);
            assert!(got.is_none(), "a head before its end");
            got = read_head(&mut buf, false, &mut incomplete, false).unwrap();
        }
        let got = got.expect("the whole head");
        assert_eq!((got.status, got.headers.len()), (StatusCode::OK, 91));
        assert!(buf.is_empty());

        // Malformed: at the blank line, else at the end of the stream.
        let bad = b"HTTP/1.1 200 OK\r\nbad header\r\nx: y\r\n";
        let (mut buf, mut incomplete) = (BytesMut::new(), 0);
        for piece in bad.chunks(3) {
            buf.extend_from_slice(piece);
            if read_head(&mut buf, false, &mut incomplete, false).is_err() {
                break;
            }
        }
        assert!(read_head(&mut buf, false, &mut incomplete, true).is_err());

        let mut trailers = BytesMut::new();
        let mut state = Chunked::Trailers(0);
        let block: Vec<u8> = (0..90)
            .flat_map(|i| format!("x-t{i}: {}\r\n", "w".repeat(200)).into_bytes())
            .chain(*b"\r\n")
            .collect();
        let mut out = None;
        for piece in block.chunks(5) {
            trailers.extend_from_slice(piece);
            match decode_chunked(&mut state, &mut trailers).unwrap() {
                Step::More => {}
                Step::Trailers(t) => out = Some(t),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(out.expect("the trailers").len(), 90);
    }

    #[test]
    fn hex_lengths() {
        let mut b = [0u8; 16];
        assert_eq!(hex_len(0, &mut b), b"0");
        assert_eq!(hex_len(255, &mut b), b"ff");
        assert_eq!(hex_len(4096, &mut b), b"1000");
    }
}
