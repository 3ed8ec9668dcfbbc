//! The HTTP/1.1 server side of a client connection.
//!
//! One request at a time, driven by the connection's task: the head is parsed (httparse) into
//! spans of one read buffer and handed to the proxy as a `Request`, the response is written
//! from one buffer, head and body together when the body is ready. A request body is read by
//! whoever reads the [`Incoming`] (the upstream exchange), from the same buffer and socket,
//! shared through a lock that is never contended in the common case (one task).
//!
//! What an idle keep-alive connection holds is the point: no read buffer (a plaintext socket
//! is waited on for readability before a 1 KiB buffer is taken for the next head) and no write
//! buffer (one is taken per response) — where hyper's server keeps a 16 KiB read buffer and an
//! 8 KiB write buffer for the connection's life. The request's future lives in this one's (the
//! caller boxes it once per connection, as hyper boxes its own): no allocation per request.
//!
//! Framing follows RFC 9112: `transfer-encoding: chunked` (the only coding accepted: others get
//! 501, a request with both it and `content-length` 400, as conflicting `content-length`s do),
//! `content-length`, else no body; `Expect: 100-continue` answered when the body is first read;
//! pipelined requests answered in order; HTTP/1.0 keep-alive only when asked for. Responses
//! carry `content-length` when their length is known, are chunked otherwise (close-delimited
//! for HTTP/1.0 clients), and get a `date` when they have none. A head over 64 KiB is refused
//! with 431 (414 when its request line alone is), more than 100 header fields with 431, an
//! unparsable one with 400; each refusal closes the connection.

use std::{
    cell::Cell,
    future::Future,
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
};
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::oneshot,
};

use crate::{
    BoxError,
    chunked::{Chunked, Step, decode_chunked, hex_len},
    client_io::ClientIo,
    head::{ends_head, parse_length},
};

/// A buffer for a request head is taken this large (glibc's malloc serves up to 1,032 bytes from
/// its per-thread cache; a 4 KiB buffer cost ~300 instructions more per request), and grown by
/// at least as much.
const READ_CHUNK: usize = 1024;
/// A request head larger than this is refused (431; Envoy's default limit is 60 KiB).
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// A request body is read in pieces of up to this much.
const BODY_CHUNK: usize = 16 * 1024;
/// Response body bytes gathered before they are written.
const WRITE_BATCH: usize = 64 * 1024;
/// The longest URI the `http` crate takes.
const MAX_URI: usize = u16::MAX as usize - 1;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A request head, parsed.
#[doc(hidden)]
#[derive(Debug)]
pub struct RequestHead {
    pub request: Request<()>,
    pub body: BodyLength,
    /// The connection may take another request after this one.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before it sends its body.
    pub expect_continue: bool,
    /// CONNECT, or a request with an `Upgrade` header: the connection may switch.
    pub upgrade: bool,
    /// The client takes trailers (`TE: trailers`) in a chunked response.
    pub trailers: bool,
}

/// How a request's body is framed.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    Empty,
    Length(u64),
    Chunked,
}

/// A request refused before it reaches the proxy: answered with its status, and the connection
/// closed.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadRequest(&'static str),
    UriTooLong,
    HeadTooLarge,
    /// A transfer coding other than chunked.
    NotImplemented,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::NotImplemented => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// The kind of `trellis_proxy_errors_total` it counts as.
    pub fn kind(self) -> &'static str {
        match self {
            Self::UriTooLong | Self::HeadTooLarge => "request_head_too_large",
            _ => "bad_request",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadRequest(why) => write!(f, "bad request: {why}"),
            Self::UriTooLong => f.write_str("request line too long"),
            Self::HeadTooLarge => f.write_str("request head too large"),
            Self::NotImplemented => f.write_str("transfer coding other than chunked"),
        }
    }
}

/// Reads a request head from what has accumulated in `buf`: `None` while it is incomplete.
/// `incomplete` (0 at first) is how much of `buf` held no complete head at the last parse: the
/// head is parsed again only once a blank line has arrived after it or the buffer has doubled,
/// so one trickling in a byte at a time costs linear work, not quadratic. A complete head is
/// taken off `buf`; what follows it (a body, the next request) stays.
#[doc(hidden)]
pub fn read_request(
    buf: &mut BytesMut,
    incomplete: &mut usize,
) -> Result<Option<RequestHead>, Refusal> {
    if buf.is_empty() {
        return Ok(None);
    }
    let due = *incomplete == 0
        || buf.len() >= 2 * *incomplete
        || buf.len() > MAX_HEAD
        || ends_head(buf, *incomplete);
    if !due {
        return Ok(None);
    }
    match parse_request(buf)? {
        Some(head) => {
            *incomplete = 0;
            Ok(Some(head))
        }
        None if buf.len() > MAX_HEAD => {
            // The request line alone over the limit: its target is too long.
            let line_ends = buf[..MAX_HEAD].contains(&b'\n');
            Err(if line_ends {
                Refusal::HeadTooLarge
            } else {
                Refusal::UriTooLong
            })
        }
        None => {
            *incomplete = buf.len();
            Ok(None)
        }
    }
}

/// A span of the read buffer: offset and length.
type Span = (u32, u32);

fn span_of(base: usize, part: &[u8]) -> Span {
    // httparse's slices are into the buffer, which is under 4 GiB (checked by the caller).
    ((part.as_ptr() as usize - base) as u32, part.len() as u32)
}

/// Parses a request head at the start of `buf`; a complete one is taken off it.
fn parse_request(buf: &mut BytesMut) -> Result<Option<RequestHead>, Refusal> {
    let mut spans = [((0u32, 0u32), (0u32, 0u32)); MAX_HEADERS];
    let (len, method, path, minor, count) = {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        // Never more than the limit (and a little over it) is parsed.
        let input = &buf[..buf.len().min(MAX_HEAD + 1)];
        let len = match req.parse_with_uninit_headers(input, &mut headers) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
            // httparse does not tell `HTTP/2.0` from garbage where the version goes: 400, as
            // hyper answers.
            Err(httparse::Error::Version) => return Err(Refusal::BadRequest("invalid version")),
            Err(httparse::Error::Token) => return Err(Refusal::BadRequest("invalid token")),
            Err(_) => return Err(Refusal::BadRequest("malformed request head")),
        };
        if len > MAX_HEAD {
            return Err(Refusal::HeadTooLarge);
        }
        let base = input.as_ptr() as usize;
        let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
            return Err(Refusal::BadRequest("incomplete request line"));
        };
        for (slot, h) in spans.iter_mut().zip(req.headers.iter()) {
            *slot = (span_of(base, h.name.as_bytes()), span_of(base, h.value));
        }
        (
            len,
            span_of(base, method.as_bytes()),
            span_of(base, path.as_bytes()),
            minor,
            req.headers.len(),
        )
    };
    let head = buf.split_to(len).freeze();
    let bytes = |(at, n): Span| &head[at as usize..(at + n) as usize];
    let shared = |(at, n): Span| head.slice(at as usize..(at + n) as usize);

    let method =
        Method::from_bytes(bytes(method)).map_err(|_| Refusal::BadRequest("invalid method"))?;
    // httparse reads only `HTTP/1.0` and `HTTP/1.1` (others: `Error::Version`, a 400 as hyper).
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    if path.1 as usize > MAX_URI {
        return Err(Refusal::UriTooLong);
    }
    let uri = Uri::from_maybe_shared(shared(path))
        .map_err(|_| Refusal::BadRequest("invalid request target"))?;

    let mut headers = HeaderMap::with_capacity(count);
    let mut length: Option<u64> = None;
    let mut codings = Codings::None;
    let mut transfer_encoding = false;
    let (mut close, mut keep_alive) = (false, false);
    let (mut expect_continue, mut upgrade, mut trailers) = (false, false, false);
    let mut connection = false;
    for &(name, value) in &spans[..count] {
        let name = HeaderName::from_bytes(bytes(name))
            .map_err(|_| Refusal::BadRequest("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(shared(value))
            .map_err(|_| Refusal::BadRequest("invalid header value"))?;
        if name == header::CONTENT_LENGTH {
            for item in value.as_bytes().split(|&b| b == b',') {
                let n = parse_length(item.trim_ascii())
                    .ok_or(Refusal::BadRequest("invalid content-length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(Refusal::BadRequest("conflicting content-length"));
                }
                length = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
            for coding in tokens(&value) {
                codings = codings.then(coding);
            }
        } else if name == header::CONNECTION {
            connection = true;
            for token in tokens(&value) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == header::EXPECT {
            expect_continue = value
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"100-continue");
        } else if name == header::UPGRADE {
            upgrade = true;
        } else if name == header::TE {
            trailers |= tokens(&value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
        }
        headers.append(name, value);
    }
    if connection {
        // What it lists goes now, before the proxy adds headers of its own.
        crate::steps::strip_connection_listed(&mut headers);
    }
    let body = match codings {
        // A `transfer-encoding` that names no coding is no framing to go by (and a
        // `content-length` beside it is not to be trusted either).
        Codings::None if transfer_encoding => {
            return Err(Refusal::BadRequest("empty transfer-encoding"));
        }
        Codings::None => match length {
            None | Some(0) => BodyLength::Empty,
            Some(n) => BodyLength::Length(n),
        },
        _ if version == Version::HTTP_10 => {
            return Err(Refusal::BadRequest(
                "transfer-encoding in an HTTP/1.0 request",
            ));
        }
        _ if length.is_some() => {
            return Err(Refusal::BadRequest(
                "both transfer-encoding and content-length",
            ));
        }
        Codings::Chunked => BodyLength::Chunked,
        Codings::Other => return Err(Refusal::NotImplemented),
        Codings::NotChunkedLast => {
            return Err(Refusal::BadRequest(
                "chunked is not the final transfer coding",
            ));
        }
    };
    let connect = method == Method::CONNECT;
    // A CONNECT's content has no meaning: the bytes after its head are the tunnel's.
    let body = if connect { BodyLength::Empty } else { body };
    let keep_alive = match version {
        Version::HTTP_11 => !close,
        _ => keep_alive && !close,
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(RequestHead {
        request,
        body,
        keep_alive,
        expect_continue: expect_continue
            && version == Version::HTTP_11
            && body != BodyLength::Empty,
        upgrade: connect || (upgrade && version == Version::HTTP_11),
        trailers,
    }))
}

/// The transfer codings of a request, as they are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codings {
    None,
    /// Exactly `chunked`.
    Chunked,
    /// `chunked` last, after another coding.
    Other,
    /// A coding after `chunked`, or none of them `chunked`.
    NotChunkedLast,
}

impl Codings {
    fn then(self, coding: &[u8]) -> Self {
        let chunked = coding.eq_ignore_ascii_case(b"chunked");
        match (self, chunked) {
            (Self::None, true) => Self::Chunked,
            // Chunked twice is as wrong as a coding after it (RFC 9112 §6.1).
            (Self::Chunked | Self::Other, _) => Self::NotChunkedLast,
            (Self::NotChunkedLast, true) => Self::Other,
            (_, false) => Self::NotChunkedLast,
        }
    }
}

/// The comma-separated tokens of a header value, trimmed, empty ones skipped.
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Why a connection ended other than cleanly.
#[derive(Debug)]
pub enum Error {
    /// A request refused (and answered) before it reached the proxy.
    Refused(Refusal),
    Io(io::Error),
    /// The response body failed after its head was sent.
    Body(BoxError),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(r) => write!(f, "request refused: {r}"),
            Self::Io(e) => write!(f, "connection failed: {e}"),
            Self::Body(e) => write!(f, "response body failed: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// A request body's failure, as its reader sees it.
#[derive(Debug)]
pub enum BodyError {
    /// The body's framing is broken (400).
    Malformed(&'static str),
    /// The client left, or its connection failed (499).
    Reset(io::Error),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed(what) => write!(f, "malformed request body: {what}"),
            Self::Reset(e) => write!(f, "request body cut short: {e}"),
        }
    }
}

impl std::error::Error for BodyError {}

/// A client's request body: from hyper's server (HTTP/2), from this one (HTTP/1.x), or none.
#[derive(Debug)]
pub enum Incoming {
    Hyper(hyper::body::Incoming),
    H1(H1Body),
    Empty,
}

impl Body for Incoming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut polled = match self.get_mut() {
            Self::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Self::H1(b) => Pin::new(b).poll_frame(cx),
            Self::Empty => Poll::Ready(None),
        };
        // A client's trailers lose what no header rule may name either (framing, hop-by-hop,
        // the authority, the caller's identity the proxy vouches for): an upstream that merges
        // trailers into the header section must not find a forged `x-forwarded-client-cert`.
        if let Poll::Ready(Some(Ok(frame))) = &mut polled
            && let Some(trailers) = frame.trailers_mut()
        {
            for name in crate::header_rules::NEVER {
                trailers.remove(name);
            }
            // As at the head: the spelling CGI-style servers read as the same.
            trailers.remove("x_forwarded_client_cert");
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(b) => b.is_end_stream(),
            Self::H1(b) => b.done,
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Hyper(b) => b.size_hint(),
            Self::H1(b) => b.size_hint(),
            Self::Empty => SizeHint::with_exact(0),
        }
    }
}

/// What the connection and the body of its current request share.
#[derive(Debug)]
struct Shared {
    /// `None` once the connection has switched protocols.
    io: Option<ClientIo>,
    /// Bytes read and not yet used: the rest of a body, the next request.
    rbuf: BytesMut,
    /// Which request the body being read belongs to.
    request: u64,
    body: BodyState,
    /// How much of `100 Continue` is written, while it is due.
    continue_at: Option<usize>,
    /// The client's end of stream was read.
    eof: bool,
    /// The connection's task, waiting for the request body to be over (read by another task,
    /// for an HTTP/2 upstream) before it watches the socket again.
    watcher: Option<std::task::Waker>,
}

impl Shared {
    /// The request body is over (read whole, or failed): the connection watches the socket again.
    fn end_body(&mut self, state: BodyState) {
        self.body = state;
        if let Some(w) = self.watcher.take() {
            w.wake();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Length(u64),
    Chunked(Chunked),
    Done,
    /// Failed (or left unread): the connection cannot take another request.
    Broken,
}

/// A request body read from the client's HTTP/1.x connection.
#[derive(Debug)]
pub struct H1Body {
    shared: Arc<Mutex<Shared>>,
    request: u64,
    done: bool,
    size: SizeHint,
}

impl H1Body {
    fn fail(
        &mut self,
        s: &mut Shared,
        e: BodyError,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        s.end_body(BodyState::Broken);
        Poll::Ready(Some(Err(e.into())))
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let shared = this.shared.clone();
        let mut guard = shared.lock();
        let s = &mut *guard;
        if s.request != this.request {
            // The connection has moved on: this body was given up.
            let e = io::Error::new(io::ErrorKind::ConnectionAborted, "request body abandoned");
            this.done = true;
            return Poll::Ready(Some(Err(BodyError::Reset(e).into())));
        }
        let Some(io) = s.io.as_mut() else {
            let e = io::Error::new(io::ErrorKind::ConnectionAborted, "connection switched");
            return this.fail(s, BodyError::Reset(e));
        };
        while let Some(at) = s.continue_at {
            match Pin::new(&mut *io).poll_write(cx, &CONTINUE[at..]) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    s.continue_at = (at + n < CONTINUE.len()).then_some(at + n);
                    if s.continue_at.is_none() {
                        // Through TLS's buffer to the socket.
                        if let Poll::Ready(Err(e)) = Pin::new(&mut *io).poll_flush(cx) {
                            return this.fail(s, BodyError::Reset(e));
                        }
                    }
                }
                Poll::Ready(Ok(_)) => {
                    return this.fail(s, BodyError::Reset(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Err(e)) => return this.fail(s, BodyError::Reset(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        loop {
            match &mut s.body {
                BodyState::Done => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                BodyState::Broken => {
                    this.done = true;
                    let e = io::Error::new(io::ErrorKind::ConnectionAborted, "request body failed");
                    return Poll::Ready(Some(Err(BodyError::Reset(e).into())));
                }
                BodyState::Length(n) => {
                    if !s.rbuf.is_empty() {
                        let take = s.rbuf.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
                        let data = s.rbuf.split_to(take).freeze();
                        *n -= take as u64;
                        if *n == 0 {
                            s.end_body(BodyState::Done);
                            this.done = true;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                BodyState::Chunked(state) => match decode_chunked(state, &mut s.rbuf) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::Trailers(trailers)) => {
                        s.end_body(BodyState::Done);
                        this.done = true;
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(Step::End) => {
                        s.end_body(BodyState::Done);
                        this.done = true;
                        return Poll::Ready(None);
                    }
                    Ok(Step::More) => {}
                    Err(what) => return this.fail(s, BodyError::Malformed(what)),
                },
            }
            if s.rbuf.capacity() - s.rbuf.len() < READ_CHUNK / 4 {
                s.rbuf.reserve(BODY_CHUNK);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, &mut s.rbuf) {
                Poll::Ready(Ok(0)) => {
                    s.eof = true;
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "client closed the connection in the middle of the request body",
                    );
                    return this.fail(s, BodyError::Reset(e));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.fail(s, BodyError::Reset(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        self.size
    }
}

/// A client connection with what was read of it already put back in front: handed over once a
/// request's switch (101, or 2xx to CONNECT) is written, or to the HTTP/2 server after the
/// preface was recognised.
#[derive(Debug)]
pub struct Rewound {
    read: Bytes,
    io: ClientIo,
}

impl Rewound {
    pub(crate) fn new(read: Bytes, io: ClientIo) -> Self {
        Self { read, io }
    }
}

impl AsyncRead for Rewound {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            if this.read.is_empty() {
                // The buffer it was read into is released.
                this.read = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The request's side of a switch: resolves once the response that switches is written.
#[derive(Debug, Clone)]
struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Rewound>>>>);

/// A client connection switched to another protocol (WebSocket) or a tunnel (CONNECT).
#[derive(Debug)]
pub enum ClientUpgraded {
    Hyper(hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>),
    H1(Rewound),
}

impl AsyncRead for ClientUpgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Hyper(io) => Pin::new(io).poll_read(cx, buf),
            Self::H1(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientUpgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Hyper(io) => Pin::new(io).poll_write(cx, buf),
            Self::H1(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Hyper(io) => Pin::new(io).poll_flush(cx),
            Self::H1(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Hyper(io) => Pin::new(io).poll_shutdown(cx),
            Self::H1(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// Whether the request may switch protocols (it came with `Upgrade`, or is a CONNECT): the
/// handle [`on_upgrade`] takes is there.
pub(crate) fn wants_upgrade<B>(req: &Request<B>) -> bool {
    let ext = req.extensions();
    ext.get::<OnUpgrade>().is_some() || ext.get::<hyper::upgrade::OnUpgrade>().is_some()
}

/// The client's connection once the response that switches it is written.
pub(crate) fn on_upgrade<B>(
    req: &mut Request<B>,
) -> impl Future<Output = Result<ClientUpgraded, BoxError>> + Send + 'static {
    let ours = req
        .extensions_mut()
        .remove::<OnUpgrade>()
        .and_then(|o| o.0.lock().take());
    let theirs = ours.is_none().then(|| hyper::upgrade::on(req));
    async move {
        match (ours, theirs) {
            (Some(rx), _) => rx
                .await
                .map(ClientUpgraded::H1)
                .map_err(|_| "the connection did not switch".into()),
            (None, Some(hyper)) => hyper
                .await
                .map(|u| ClientUpgraded::Hyper(hyper_util::rt::TokioIo::new(u)))
                .map_err(Into::into),
            (None, None) => Err("no upgrade".into()),
        }
    }
}

/// Serves an HTTP/1.x client connection until it closes: `first` holds what was read of it
/// already. `closing` asks for the connection to end after the request in progress (or at once
/// when there is none), as a drain or the idle timeout does. `service` answers each request.
pub(crate) async fn serve<S, F, B>(
    io: ClientIo,
    first: BytesMut,
    closing: &AtomicBool,
    mut service: S,
) -> Result<(), Error>
where
    S: FnMut(Request<Incoming>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let shared = Arc::new(Mutex::new(Shared {
        io: Some(io),
        rbuf: first,
        request: 0,
        body: BodyState::Done,
        continue_at: None,
        eof: false,
        watcher: None,
    }));
    let mut incomplete = 0;
    loop {
        let head =
            std::future::poll_fn(|cx| poll_head(&shared, &mut incomplete, closing, cx)).await;
        let head = match head {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(()),
            Err(Error::Refused(refusal)) => {
                let mut out = BytesMut::with_capacity(128);
                refusal_response(refusal, &mut out);
                let _ = std::future::poll_fn(|cx| poll_flush(&shared, &mut out, cx)).await;
                let _ = std::future::poll_fn(|cx| poll_shutdown(&shared, cx)).await;
                // What the client is still sending is read and dropped until it closes (the
                // idle timeout bounds it): closing with unread bytes would reset the connection,
                // and the client could lose the answer.
                let _ = std::future::poll_fn(|cx| poll_linger(&shared, cx)).await;
                return Err(Error::Refused(refusal));
            }
            Err(e) => return Err(e),
        };
        let RequestHead {
            request,
            body,
            keep_alive,
            expect_continue,
            upgrade,
            trailers,
        } = head;
        let (mut parts, ()) = request.into_parts();
        let is_head = parts.method == Method::HEAD;
        let connect = parts.method == Method::CONNECT;
        let version = parts.version;
        let request_id = {
            let mut s = shared.lock();
            s.request += 1;
            s.body = match body {
                BodyLength::Empty => BodyState::Done,
                BodyLength::Length(n) => BodyState::Length(n),
                BodyLength::Chunked => BodyState::Chunked(Chunked::Size),
            };
            s.continue_at = expect_continue.then_some(0);
            s.request
        };
        let incoming = match body {
            BodyLength::Empty => Incoming::Empty,
            BodyLength::Length(n) => Incoming::H1(H1Body {
                shared: shared.clone(),
                request: request_id,
                done: false,
                size: SizeHint::with_exact(n),
            }),
            BodyLength::Chunked => Incoming::H1(H1Body {
                shared: shared.clone(),
                request: request_id,
                done: false,
                size: SizeHint::default(),
            }),
        };
        let switch = upgrade.then(|| {
            let (tx, rx) = oneshot::channel();
            parts
                .extensions
                .insert(OnUpgrade(Arc::new(Mutex::new(Some(rx)))));
            tx
        });
        // In a block of its own: the request's future (most of this one's size) is dead once
        // its response is taken, so the response's writing can use the same room.
        let response = {
            let mut answer = std::pin::pin!(service(Request::from_parts(parts, incoming)));
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                    return Poll::Ready(Ok(r));
                }
                watch_client(&shared, cx).map(Err)
            })
            .await?
        };

        let (parts, mut body) = response.into_parts();
        let status = parts.status;
        let switching = switch.is_some()
            && (status == StatusCode::SWITCHING_PROTOCOLS || (connect && status.is_success()));
        let mut keep = keep_alive && !switching && !closing.load(Ordering::Acquire);
        let bodiless = is_head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || (connect && status.is_success());
        let framing = if bodiless {
            Framing::None
        } else if body.is_end_stream() {
            Framing::Length(0)
        } else if let Some(n) = body.size_hint().exact() {
            Framing::Length(n)
        } else if version == Version::HTTP_11 {
            Framing::Chunked
        } else {
            keep = false;
            Framing::Close
        };
        let mut out = BytesMut::with_capacity(256 + 32 * parts.headers.len());
        if expect_continue {
            // The answer came first: `100 Continue` is not sent any more (a part of it already
            // written is finished first).
            if let Some(at) = shared.lock().continue_at.take().filter(|&at| at > 0) {
                out.put_slice(&CONTINUE[at..]);
            }
        }
        encode_head(
            &parts, framing, keep, version, switching, bodiless, &mut out,
        );
        let mut writer = Writer {
            framing,
            remaining: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            trailers,
            done: matches!(framing, Framing::None | Framing::Length(0)),
        };
        if writer.done {
            drop(body);
            std::future::poll_fn(|cx| poll_flush(&shared, &mut out, cx))
                .await
                .map_err(Error::Io)?;
        } else {
            std::future::poll_fn(|cx| writer.poll(&shared, &mut body, &mut out, cx)).await?;
            drop(body);
        }

        if let Some(tx) = switch
            && switching
        {
            let mut s = shared.lock();
            if let Some(io) = s.io.take() {
                let read = std::mem::take(&mut s.rbuf).freeze();
                // The request's future is gone when nobody waits: the connection closes.
                let _ = tx.send(Rewound { read, io });
            }
            return Ok(());
        }

        let close = {
            let mut s = shared.lock();
            if s.body != BodyState::Done {
                // Left unread: what has arrived of it is passed over; if that is not all of it,
                // the connection cannot be read any further.
                let discarded = discard(&mut s);
                s.request += 1;
                keep &= discarded;
            }
            let close = writer.framing == Framing::Close
                || !keep
                || (s.eof && s.rbuf.is_empty())
                || closing.load(Ordering::Acquire);
            if !close && s.rbuf.is_empty() {
                // Idle: no buffer is held until the next request arrives.
                s.rbuf = BytesMut::new();
            }
            close
        };
        if close {
            let _ = std::future::poll_fn(|cx| poll_shutdown(&shared, cx)).await;
            return Ok(());
        }
        incomplete = 0;
    }
}

/// Reads until a request head is complete; `None` when the connection is over (the client
/// closed it, or `closing` with no request begun).
fn poll_head(
    shared: &Mutex<Shared>,
    incomplete: &mut usize,
    closing: &AtomicBool,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<RequestHead>, Error>> {
    let mut guard = shared.lock();
    let s = &mut *guard;
    loop {
        match read_request(&mut s.rbuf, incomplete) {
            Ok(Some(head)) => return Poll::Ready(Ok(Some(head))),
            Ok(None) => {}
            Err(refusal) => return Poll::Ready(Err(Error::Refused(refusal))),
        }
        if s.eof || (s.rbuf.is_empty() && closing.load(Ordering::Acquire)) {
            // A head cut short by the end of stream gets no answer, as with hyper.
            return Poll::Ready(Ok(None));
        }
        let Some(io) = s.io.as_mut() else {
            return Poll::Ready(Ok(None));
        };
        if s.rbuf.capacity() == 0 {
            // Idle: wait for the socket before taking a buffer.
            if let Err(e) = ready!(io.poll_readable(cx)) {
                return Poll::Ready(Err(Error::Io(e)));
            }
        }
        if s.rbuf.capacity() - s.rbuf.len() < READ_CHUNK / 4 {
            s.rbuf.reserve(READ_CHUNK.max(s.rbuf.len()));
        }
        match ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut s.rbuf)) {
            Ok(0) => s.eof = true,
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(Error::Io(e))),
        }
    }
}

/// While a request is answered: reads what the client sends once its body is read (the next
/// request, pipelined, or its end of stream), to see the client leave. Ready with the error
/// that ends the connection.
fn watch_client(shared: &Mutex<Shared>, cx: &mut Context<'_>) -> Poll<Error> {
    let mut guard = shared.lock();
    let s = &mut *guard;
    loop {
        if matches!(s.body, BodyState::Length(_) | BodyState::Chunked(_)) {
            // Read by the request: woken when it is over.
            if !s.watcher.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                s.watcher = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        if s.body == BodyState::Broken || s.eof || s.rbuf.len() >= MAX_HEAD {
            return Poll::Pending;
        }
        let Some(io) = s.io.as_mut() else {
            return Poll::Pending;
        };
        if s.rbuf.capacity() == s.rbuf.len() {
            if let Err(e) = ready!(io.poll_readable(cx)) {
                return Poll::Ready(Error::Io(e));
            }
            s.rbuf.reserve(READ_CHUNK);
        }
        match ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut s.rbuf)) {
            // The end of stream reaches here only when nothing is in flight any more, or the
            // connection has become a tunnel: the answer still goes out.
            Ok(0) => s.eof = true,
            Ok(_) => {}
            Err(e) => return Poll::Ready(Error::Io(e)),
        }
    }
}

/// Passes over the rest of an unread request body that has arrived already; true when that was
/// all of it.
fn discard(s: &mut Shared) -> bool {
    loop {
        match &mut s.body {
            BodyState::Done => return true,
            BodyState::Broken => return false,
            BodyState::Length(n) => {
                let Ok(left) = usize::try_from(*n) else {
                    return false;
                };
                if s.rbuf.len() < left {
                    return false;
                }
                s.rbuf.advance(left);
                s.body = BodyState::Done;
            }
            BodyState::Chunked(state) => match decode_chunked(state, &mut s.rbuf) {
                Ok(Step::Data(_)) => {}
                Ok(Step::Trailers(_) | Step::End) => s.body = BodyState::Done,
                Ok(Step::More) | Err(_) => return false,
            },
        }
    }
}

/// Closes the sending side.
fn poll_shutdown(shared: &Mutex<Shared>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    let mut s = shared.lock();
    match s.io.as_mut() {
        Some(io) => Pin::new(io).poll_shutdown(cx),
        None => Poll::Ready(Ok(())),
    }
}

/// Reads and drops what the client sends until it closes (1 MiB per wake at most).
fn poll_linger(shared: &Mutex<Shared>, cx: &mut Context<'_>) -> Poll<()> {
    const LINGER_LIMIT: usize = 1 << 20;
    let mut guard = shared.lock();
    let s = &mut *guard;
    let Some(io) = s.io.as_mut() else {
        return Poll::Ready(());
    };
    let mut scratch = [0u8; 4096];
    let mut read = 0;
    while read < LINGER_LIMIT {
        let mut buf = tokio::io::ReadBuf::new(&mut scratch);
        match ready!(Pin::new(&mut *io).poll_read(cx, &mut buf)) {
            Ok(()) if !buf.filled().is_empty() => read += buf.filled().len(),
            _ => return Poll::Ready(()),
        }
    }
    // Yield to the other tasks, and go on.
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Writes `out` whole.
fn poll_flush(
    shared: &Mutex<Shared>,
    out: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    let mut s = shared.lock();
    let Some(io) = s.io.as_mut() else {
        return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
    };
    while !out.is_empty() {
        let n = ready!(Pin::new(&mut *io).poll_write(cx, out))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        out.advance(n);
    }
    // TLS takes plaintext into its own buffer: flushed, it reaches the socket now.
    Pin::new(io).poll_flush(cx)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

/// Writes a response body after its head.
#[derive(Debug)]
struct Writer {
    framing: Framing,
    /// Bytes the declared content-length still expects.
    remaining: u64,
    /// Trailers are sent (the client said it takes them).
    trailers: bool,
    done: bool,
}

impl Writer {
    fn poll<B>(
        &mut self,
        shared: &Mutex<Shared>,
        body: &mut B,
        out: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Error>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        loop {
            let mut pending = false;
            while !self.done && out.len() < WRITE_BATCH {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => self.push(&data, out)?,
                        Err(frame) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                self.end(Some(&trailers), out)?;
                            }
                        }
                    },
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Error::Body(e.into()))),
                    Poll::Ready(None) => self.end(None, out)?,
                    Poll::Pending => {
                        pending = true;
                        break;
                    }
                }
            }
            ready!(poll_flush(shared, out, cx)).map_err(Error::Io)?;
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if pending {
                // A client that resets its connection while the body is quiet (a stream of
                // events, a long poll) is seen now, not at the next write.
                if let Poll::Ready(e) = watch_client(shared, cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Pending;
            }
        }
    }

    fn push(&mut self, data: &Bytes, out: &mut BytesMut) -> Result<(), Error> {
        if data.is_empty() {
            return Ok(());
        }
        match self.framing {
            Framing::Chunked => {
                let mut size = [0u8; 16];
                out.put_slice(hex_len(data.len(), &mut size));
                out.put_slice(b"\r\n");
                out.put_slice(data);
                out.put_slice(b"\r\n");
            }
            Framing::Length(_) => {
                let n = data.len() as u64;
                if n > self.remaining {
                    return Err(Error::Body(
                        "response body longer than its content-length".into(),
                    ));
                }
                self.remaining -= n;
                out.put_slice(data);
            }
            Framing::Close => out.put_slice(data),
            Framing::None => {}
        }
        Ok(())
    }

    fn end(&mut self, trailers: Option<&HeaderMap>, out: &mut BytesMut) -> Result<(), Error> {
        self.done = true;
        match self.framing {
            Framing::Chunked => {
                out.put_slice(b"0\r\n");
                if self.trailers {
                    for (name, value) in trailers.into_iter().flatten() {
                        put_field(out, name, value);
                    }
                }
                out.put_slice(b"\r\n");
            }
            Framing::Length(_) if self.remaining > 0 => {
                return Err(Error::Body(
                    "response body shorter than its content-length".into(),
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

fn put_field(out: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    out.put_slice(name.as_str().as_bytes());
    out.put_slice(b": ");
    out.put_slice(value.as_bytes());
    out.put_slice(b"\r\n");
}

fn status_line(status: StatusCode, out: &mut BytesMut) {
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
}

/// The response head: the response's fields (its own framing fields replaced by the body's
/// framing, unless it has none to frame), `date` when it has none, `connection` as needed.
fn encode_head(
    parts: &http::response::Parts,
    framing: Framing,
    keep: bool,
    version: Version,
    switching: bool,
    bodiless: bool,
    out: &mut BytesMut,
) {
    status_line(parts.status, out);
    // A HEAD or 304 answer keeps the framing fields of the body it stands for.
    let keeps_framing = bodiless
        && parts.status != StatusCode::NO_CONTENT
        && !parts.status.is_informational()
        && !(parts.status.is_success() && switching);
    let mut has_date = false;
    for (name, value) in &parts.headers {
        if (name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING) && !keeps_framing {
            continue;
        }
        if name == header::CONNECTION && !switching {
            continue;
        }
        has_date |= name == header::DATE;
        put_field(out, name, value);
    }
    match framing {
        Framing::Length(n) => {
            out.put_slice(b"content-length: ");
            out.put_slice(itoa::Buffer::new().format(n).as_bytes());
            out.put_slice(b"\r\n");
        }
        Framing::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None | Framing::Close => {}
    }
    if !has_date {
        out.put_slice(b"date: ");
        with_date(|d| out.put_slice(d));
        out.put_slice(b"\r\n");
    }
    if !switching {
        if !keep {
            out.put_slice(b"connection: close\r\n");
        } else if version == Version::HTTP_10 {
            out.put_slice(b"connection: keep-alive\r\n");
        }
    }
    out.put_slice(b"\r\n");
}

fn refusal_response(refusal: Refusal, out: &mut BytesMut) {
    status_line(refusal.status(), out);
    out.put_slice(b"content-length: 0\r\nconnection: close\r\ndate: ");
    with_date(|d| out.put_slice(d));
    out.put_slice(b"\r\n\r\n");
}

/// The current `date` value (IMF-fixdate), formatted once a second per thread.
fn with_date(f: impl FnOnce(&[u8])) {
    const LEN: usize = 29;
    thread_local! {
        static DATE: Cell<(u64, [u8; LEN])> = const { Cell::new((0, [0; LEN])) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let (at, mut text) = cell.get();
        if at != secs || text[0] == 0 {
            let formatted = httpdate::fmt_http_date(now);
            let bytes = formatted.as_bytes();
            if bytes.len() == LEN {
                text.copy_from_slice(bytes);
                cell.set((secs, text));
            } else {
                return f(bytes);
            }
        }
        f(&text);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<RequestHead>, Refusal> {
        let mut buf = BytesMut::from(raw);
        read_request(&mut buf, &mut 0)
    }

    #[test]
    fn a_simple_request_is_parsed_into_spans_of_its_buffer() {
        let mut buf =
            BytesMut::from(&b"GET /a?b=1 HTTP/1.1\r\nHost: svc\r\nX-Y: z\r\n\r\nNEXT"[..]);
        let head = read_request(&mut buf, &mut 0).unwrap().unwrap();
        assert_eq!(head.request.method(), Method::GET);
        assert_eq!(head.request.uri(), "/a?b=1");
        assert_eq!(head.request.version(), Version::HTTP_11);
        assert_eq!(head.request.headers()["host"], "svc");
        assert_eq!(head.request.headers()["x-y"], "z");
        assert_eq!(head.body, BodyLength::Empty);
        assert!(head.keep_alive);
        assert!(!head.upgrade);
        assert_eq!(&buf[..], b"NEXT", "what follows the head stays");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let body = |raw: &[u8]| parse(raw).map(|h| h.map(|h| h.body));
        assert_eq!(
            body(b"POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n"),
            Ok(Some(BodyLength::Length(5)))
        );
        assert_eq!(
            body(b"POST / HTTP/1.1\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n"),
            Ok(Some(BodyLength::Length(5)))
        );
        assert_eq!(
            body(b"POST / HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n"),
            Ok(Some(BodyLength::Chunked))
        );
        assert_eq!(
            body(b"POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n"),
            Ok(Some(BodyLength::Empty))
        );
        for (raw, want) in [
            (&b"POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n"[..], 400),
            (b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked, gzip\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: \r\nContent-Length: 6\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\n\r\n", 400),
            (b"NOT A REQUEST\r\n\r\n", 400),
        ] {
            let got = parse(raw).map(|_| ()).map_err(Refusal::status);
            assert_eq!(got, Err(StatusCode::from_u16(want).unwrap()), "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn connection_semantics() {
        let head = |raw: &[u8]| parse(raw).unwrap().unwrap();
        assert!(!head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!head(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        let ws = head(b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(ws.upgrade);
        let connect = head(b"CONNECT a:443 HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc");
        assert!(connect.upgrade);
        assert_eq!(
            connect.body,
            BodyLength::Empty,
            "bytes after a CONNECT are the tunnel's"
        );
        let expect = head(b"PUT / HTTP/1.1\r\nExpect: 100-Continue\r\ncontent-length: 1\r\n\r\n");
        assert!(expect.expect_continue);
        let no_body = head(b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n");
        assert!(!no_body.expect_continue, "nothing to wait for");
        assert!(head(b"GET / HTTP/1.1\r\nTE: trailers\r\n\r\n").trailers);
    }

    #[test]
    fn heads_over_the_limit_are_refused_whole_or_in_pieces() {
        let long_line = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD));
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "x-a: b\r\n".repeat(MAX_HEADERS + 1)
        );
        let large = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "x-filler: 0123456789abcdef\r\n".repeat(3000)
        );
        for (raw, want) in [
            (long_line, Refusal::UriTooLong),
            (many, Refusal::HeadTooLarge),
            (large, Refusal::HeadTooLarge),
        ] {
            assert_eq!(parse(raw.as_bytes()).map(|_| ()), Err(want));
            // Read in pieces of 1000 bytes.
            let (mut buf, mut incomplete) = (BytesMut::new(), 0);
            let mut got = Ok(None);
            for piece in raw.as_bytes().chunks(1000) {
                buf.extend_from_slice(piece);
                got = read_request(&mut buf, &mut incomplete);
                if !matches!(got, Ok(None)) {
                    break;
                }
            }
            assert_eq!(got.map(|_| ()), Err(want));
        }
    }

    #[test]
    fn a_head_trickling_in_is_parsed_once_complete() {
        let raw = b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n";
        let (mut buf, mut incomplete) = (BytesMut::new(), 0);
        for (i, b) in raw.iter().enumerate() {
            buf.put_u8(*b);
            let got = read_request(&mut buf, &mut incomplete).unwrap();
            assert_eq!(got.is_some(), i == raw.len() - 1, "at byte {i}");
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn dates_are_imf_fixdate() {
        let mut got = Vec::new();
        with_date(|d| got.extend_from_slice(d));
        let text = String::from_utf8(got).unwrap();
        assert!(httpdate::parse_http_date(&text).is_ok(), "{text}");
        assert!(text.ends_with(" GMT"), "{text}");
    }
}
