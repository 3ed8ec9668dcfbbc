//! The client-side HTTP/1.1 server's request-head parser (`trellis_proxy::downstream::read_request`),
//! which reads every byte a client sends before the proxy sees a request.
//!
//! It runs as the connection drives it: after each read, on what has accumulated. Properties:
//! a head parsed from the input whole is parsed the same from any split of it into reads (a
//! byte at a time included); a refusal of the whole is a refusal (or a head still incomplete)
//! in pieces; what a head leaves in the buffer is exactly what followed it; the framing,
//! keep-alive, `100-continue` and upgrade decisions agree with the fields they come from.

use bytes::BytesMut;
use http::{HeaderMap, Method, Version, header};
use trellis_proxy::fuzzing::{BodyLength, MAX_REQUEST_HEAD, Refusal, RequestHead, read_request};

/// Tokens the mutations insert: request-line and framing syntax.
pub const DICTIONARY: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"CONNECT ",
    b"OPTIONS * ",
    b"PRI * HTTP/2.0",
    b" HTTP/1.1\r\n",
    b" HTTP/1.0\r\n",
    b" /",
    b"http://a.test/",
    b"a.test:443",
    b"host: ",
    b"content-length: ",
    b"Content-Length",
    b"transfer-encoding: ",
    b"chunked",
    b"gzip, chunked",
    b"connection: ",
    b"close",
    b"keep-alive",
    b"upgrade",
    b"upgrade: websocket\r\n",
    b"expect: 100-continue\r\n",
    b"te: trailers\r\n",
    b": ",
    b", ",
    b" ",
    b"\t",
    b"18446744073709551615",
    b"99999999999999999999",
    b"\x00",
    b"\x7f",
    b"\xff",
];

/// What reading a request head came to.
#[derive(Debug, PartialEq)]
enum Outcome {
    Head {
        method: Method,
        uri: String,
        version: Version,
        headers: HeaderMap,
        body: BodyLength,
        keep_alive: bool,
        expect_continue: bool,
        upgrade: bool,
        trailers: bool,
        /// Bytes taken off the stream.
        consumed: usize,
    },
    Refused(Refusal),
    Partial,
}

fn read<'a>(reads: impl Iterator<Item = &'a [u8]>) -> Outcome {
    let mut buf = BytesMut::new();
    let (mut fed, mut incomplete) = (0, 0);
    for read in reads {
        buf.extend_from_slice(read);
        fed += read.len();
        match read_request(&mut buf, &mut incomplete) {
            Ok(Some(head)) => {
                let consumed = fed - buf.len();
                return outcome(head, consumed);
            }
            Ok(None) => assert!(buf.len() <= fed, "bytes appeared from nowhere"),
            Err(refusal) => return Outcome::Refused(refusal),
        }
    }
    Outcome::Partial
}

fn outcome(head: RequestHead, consumed: usize) -> Outcome {
    let RequestHead {
        request,
        body,
        keep_alive,
        expect_continue,
        upgrade,
        trailers,
    } = head;
    let (parts, ()) = request.into_parts();
    let out = Outcome::Head {
        uri: parts.uri.to_string(),
        method: parts.method,
        version: parts.version,
        headers: parts.headers,
        body,
        keep_alive,
        expect_continue,
        upgrade,
        trailers,
        consumed,
    };
    check(&out);
    out
}

/// What a parsed head must satisfy, whatever the bytes.
fn check(outcome: &Outcome) {
    let Outcome::Head {
        method,
        version,
        headers,
        body,
        keep_alive,
        expect_continue,
        upgrade,
        consumed,
        ..
    } = outcome
    else {
        return;
    };
    assert!(*consumed <= MAX_REQUEST_HEAD, "a head of {consumed} bytes");
    assert!(matches!(*version, Version::HTTP_10 | Version::HTTP_11));
    let has = |name| headers.contains_key(name);
    match body {
        BodyLength::Chunked => {
            assert!(has(header::TRANSFER_ENCODING) && !has(header::CONTENT_LENGTH));
            assert_eq!(*version, Version::HTTP_11, "chunked in HTTP/1.0");
        }
        BodyLength::Length(n) => {
            assert!(*n > 0, "an empty body is Empty");
            assert!(has(header::CONTENT_LENGTH) && !has(header::TRANSFER_ENCODING));
        }
        BodyLength::Empty => {}
    }
    if *method == Method::CONNECT {
        assert_eq!(
            *body,
            BodyLength::Empty,
            "a CONNECT's bytes are the tunnel's"
        );
        assert!(upgrade);
    } else if *upgrade {
        assert!(has(header::UPGRADE));
    }
    if *expect_continue {
        assert_ne!(*body, BodyLength::Empty);
    }
    if *version == Version::HTTP_10 && !has(header::CONNECTION) {
        assert!(!keep_alive, "HTTP/1.0 keeps the connection only when asked");
    }
}

/// The request-head parser: on the input whole, then split into reads.
pub fn target(data: &[u8]) {
    let whole = read(std::iter::once(data));
    if let Outcome::Head { consumed, .. } = &whole {
        assert!(*consumed <= data.len());
    }
    let mut splits = vec![read(crate::pieces(data, 64))];
    if data.len() <= 512 {
        splits.push(read(data.chunks(1)));
    }
    for split in splits {
        match (&whole, &split) {
            (Outcome::Head { .. }, _) | (Outcome::Partial, _) => assert_eq!(
                whole, split,
                "the outcome depends on how the head was split into reads"
            ),
            // Refused bytes may be found later in pieces (once a blank line or twice the
            // bytes have come), but never found to be something else.
            (Outcome::Refused(_), Outcome::Partial) => {}
            (Outcome::Refused(_), _) => assert_eq!(whole, split, "refused differently in pieces"),
        }
    }
}
