//! The HTTP/1.1 client's response-head parser and chunked body decoder
//! (`trellis_proxy::h1::{parse_head, decode_chunked}`).
//!
//! Both run the way the connection drives them: bytes arrive in reads of any size and the parser
//! is called again on what has accumulated. The main property: the outcome never depends on how
//! the input was split into reads.

use bytes::BytesMut;
use http::{HeaderMap, StatusCode, Version, header};
use trellis_proxy::fuzzing::{
    Chunked, Framing, Head, Step, decode_chunked, read_head as next_head,
};

/// Tokens the mutations insert: framing syntax and the headers that decide framing.
pub const DICTIONARY: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b"HTTP/1.1 ",
    b"HTTP/1.0 ",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n",
    b"200 OK",
    b"204",
    b"304",
    b"content-length: ",
    b"Content-Length",
    b"transfer-encoding: ",
    b"Transfer-Encoding",
    b"chunked",
    b"gzip, chunked",
    b"connection: ",
    b"close",
    b"keep-alive",
    b": ",
    b", ",
    b" ",
    b"\t",
    b"0\r\n\r\n",
    b"0\r\n",
    b";ext=1",
    b";",
    b"ffffffffffffffff",
    b"fffffffffffffffff",
    b"18446744073709551615",
    b"9999999999999999999",
    b"\x00",
    b"\x7f",
    b"\xff",
];

/// What reading a response head came to.
#[derive(Debug, PartialEq)]
enum HeadOutcome {
    Final {
        status: StatusCode,
        version: Version,
        headers: HeaderMap,
        framing: Framing,
        keep_alive: bool,
        /// Bytes taken off the stream, interim heads included.
        consumed: usize,
    },
    Error(String),
    Partial,
}

/// Reads a response head from `reads` as `Conn::poll_head` does (through the same
/// `read_head`): after each read, what has accumulated; at the end of the stream, once more.
fn read_head<'a>(reads: impl Iterator<Item = &'a [u8]>, head_request: bool) -> HeadOutcome {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut incomplete = 0;
    let finish = |head: Head, consumed: usize| {
        let outcome = HeadOutcome::Final {
            status: head.status,
            version: head.version,
            headers: head.headers,
            framing: head.framing,
            keep_alive: head.keep_alive,
            consumed,
        };
        check_head(&outcome, head_request);
        outcome
    };
    for read in reads {
        buf.extend_from_slice(read);
        fed += read.len();
        match next_head(&mut buf, head_request, &mut incomplete, false) {
            Ok(Some(head)) => return finish(head, fed - buf.len()),
            Ok(None) => assert!(buf.len() <= fed, "bytes appeared from nowhere"),
            Err(e) => return HeadOutcome::Error(e.source.to_string()),
        }
    }
    match next_head(&mut buf, head_request, &mut incomplete, true) {
        Ok(Some(head)) => finish(head, fed - buf.len()),
        Ok(None) => HeadOutcome::Partial,
        Err(e) => HeadOutcome::Error(e.source.to_string()),
    }
}

/// What a final head must satisfy, whatever the bytes.
fn check_head(outcome: &HeadOutcome, head_request: bool) {
    let HeadOutcome::Final {
        status,
        headers,
        framing,
        keep_alive,
        ..
    } = outcome
    else {
        return;
    };
    assert!(
        !status.is_informational(),
        "1xx returned as final: {status}"
    );
    if head_request || *status == StatusCode::NO_CONTENT || *status == StatusCode::NOT_MODIFIED {
        assert_eq!(*framing, Framing::Done, "{status} must have no body");
    }
    match framing {
        Framing::Close => assert!(
            !keep_alive,
            "a body read to close cannot keep the connection"
        ),
        Framing::Chunked(state) => {
            assert_eq!(*state, Chunked::Size);
            assert!(headers.contains_key(header::TRANSFER_ENCODING));
        }
        Framing::Length(n) => {
            assert!(*n > 0, "an empty body is Done");
            assert!(headers.contains_key(header::CONTENT_LENGTH));
        }
        Framing::Done => {}
    }
}

/// The response-head parser: on the input whole, then split into reads; for a GET and a HEAD.
pub fn head(data: &[u8]) {
    for head_request in [false, true] {
        let whole = read_head(std::iter::once(data), head_request);
        if let HeadOutcome::Final { consumed, .. } = &whole {
            assert!(
                *consumed <= data.len(),
                "consumed {consumed} of {}",
                data.len()
            );
        }
        let split = read_head(crate::pieces(data, 64), head_request);
        assert_eq!(
            whole, split,
            "the outcome depends on how the head was split into reads"
        );
        if data.len() <= 512 {
            let bytewise = read_head(data.chunks(1), head_request);
            assert_eq!(whole, bytewise, "the outcome differs read a byte at a time");
        }
    }
}

/// What decoding a chunked body came to.
#[derive(Debug, PartialEq)]
enum BodyOutcome {
    /// The body ended, with these trailers, after this many bytes of the stream.
    End {
        trailers: Option<HeaderMap>,
        consumed: usize,
    },
    Error(&'static str),
    /// The input ended first.
    Incomplete,
}

/// Decodes a chunked body from `reads` as `IncomingBody::poll_frame` does: decode what has
/// accumulated until it asks for more, then read.
fn decode<'a>(reads: impl Iterator<Item = &'a [u8]>) -> (Vec<u8>, BodyOutcome) {
    let mut state = Chunked::Size;
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut fed = 0;
    for read in reads {
        buf.extend_from_slice(read);
        fed += read.len();
        loop {
            let before = buf.len();
            match decode_chunked(&mut state, &mut buf) {
                Ok(Step::Data(bytes)) => {
                    assert!(!bytes.is_empty(), "an empty data frame");
                    assert!(buf.len() < before);
                    data.extend_from_slice(&bytes);
                }
                Ok(Step::Trailers(trailers)) => {
                    let consumed = fed - buf.len();
                    let trailers = Some(trailers);
                    return (data, BodyOutcome::End { trailers, consumed });
                }
                Ok(Step::End) => {
                    let consumed = fed - buf.len();
                    let trailers = None;
                    return (data, BodyOutcome::End { trailers, consumed });
                }
                Ok(Step::More) => break,
                Err(what) => return (data, BodyOutcome::Error(what)),
            }
        }
    }
    (data, BodyOutcome::Incomplete)
}

/// Trailer blocks the round trip appends, picked by the input.
const TRAILERS: [&[u8]; 3] = [
    b"\r\n",
    b"grpc-status: 0\r\n\r\n",
    b"x-checksum: abc\r\nx-count:  3 \r\n\r\n",
];

/// The chunked decoder: the input as a body, whole and split into reads; and the input as data,
/// chunked and decoded back.
pub fn chunked(data: &[u8]) {
    let whole = decode(std::iter::once(data));
    if let BodyOutcome::End { consumed, .. } = &whole.1 {
        assert!(*consumed <= data.len());
    }
    assert!(whole.0.len() <= data.len(), "more data than input");
    // Data frames may be cut differently; what they add up to may not.
    let split = decode(crate::pieces(data, 64));
    assert_eq!(
        whole, split,
        "the outcome depends on how the body was split into reads"
    );
    if data.len() <= 512 {
        assert_eq!(
            whole,
            decode(data.chunks(1)),
            "the outcome differs read a byte at a time"
        );
    }

    // Round trip: any bytes, chunked in pieces the input decides, with an extension now and then
    // and trailers, decode to themselves.
    let mut rng = fastrand::Rng::with_seed(crate::fnv1a(data));
    let mut body = Vec::with_capacity(data.len() * 2 + 64);
    for chunk in crate::pieces(data, 300) {
        body.extend_from_slice(format!("{:x}", chunk.len()).as_bytes());
        if rng.u8(..4) == 0 {
            body.extend_from_slice(b";name=\"va\\\"lue\"");
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(chunk);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n");
    let trailers = TRAILERS[rng.usize(..TRAILERS.len())];
    body.extend_from_slice(trailers);
    let end = body.len();
    body.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    let (decoded, outcome) = decode(crate::pieces(&body, 97));
    assert_eq!(decoded, data, "a chunked body did not decode to its data");
    match outcome {
        BodyOutcome::End {
            trailers: t,
            consumed,
        } => {
            assert_eq!(
                consumed, end,
                "the decoder stopped elsewhere than the body's end"
            );
            assert_eq!(t.is_some(), trailers != b"\r\n");
        }
        other => panic!("a valid chunked body decoded to {other:?}"),
    }
}
