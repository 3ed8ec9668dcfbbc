//! The client's socket as the HTTP servers read it: half-closes handled for HTTP/1.x, the
//! connection's protocol noted from its first bytes.

use std::{
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
};

use crate::{activity::ConnActivity, tls::Stream};

/// The client's socket as hyper reads it, with half-closes handled here rather than by hyper's
/// `half_close` option, which stops reading while a response is pending (a client that resets
/// its connection while it waits would go unnoticed). An HTTP/1.x end of stream (FIN) that
/// arrives with requests in flight and no request body left to read is held back until those
/// requests are over: a client that shuts down its sending side after its request still gets
/// the response (RFC 9112 §9.6). A reset still ends the connection at once, an end of stream in
/// the middle of a request body is still the client leaving, and HTTP/2 connections see every
/// end of stream as it comes. Once the connection is a tunnel (CONNECT, WebSocket), its end of
/// stream passes through to the upstream, one held before included. Per read, this costs a
/// length check.
#[derive(Debug)]
pub(crate) struct ClientIo {
    pub(crate) stream: Stream,
    pub(crate) activity: Arc<ConnActivity>,
    pub(crate) kind: IoKind,
    pub(crate) held: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoKind {
    /// Nothing read yet.
    Unknown,
    Http1,
    Http2,
}

impl ClientIo {
    /// A connection whose protocol is known (its first bytes were read by the server).
    pub(crate) fn new(stream: Stream, activity: Arc<ConnActivity>, kind: IoKind) -> Self {
        Self {
            stream,
            activity,
            kind,
            held: false,
        }
    }

    /// Ready when a read may find something: for plaintext, once the socket is readable, so an
    /// idle connection needs no read buffer; at once for TLS (its session may hold decrypted
    /// bytes already) and for an end of stream held back.
    pub(crate) fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &self.stream {
            Stream::Plain(s) if !self.held => s.poll_read_ready(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    /// The end of stream, once no request is in flight or the connection is a tunnel.
    fn poll_held(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let activity = &self.activity;
        if activity.releases_eof() {
            return Poll::Ready(Ok(()));
        }
        activity.reader.register(cx.waker());
        if activity.releases_eof() {
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

impl tokio::io::AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.held {
            return this.poll_held(cx);
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        if this.kind == IoKind::Unknown && !read.is_empty() {
            // The HTTP/2 connection preface starts with a method HTTP/1.x does not have.
            this.kind = if read.starts_with(b"PRI") {
                IoKind::Http2
            } else {
                IoKind::Http1
            };
        }
        if read.is_empty()
            && buf.remaining() > 0
            && this.kind == IoKind::Http1
            && this.activity.bodies.load(Ordering::SeqCst) == 0
            && !this.activity.releases_eof()
        {
            tracing::debug!("client half-closed its connection; responses in flight go on");
            this.held = true;
            this.activity.held_eof.store(true, Ordering::SeqCst);
            return this.poll_held(cx);
        }
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
