//! The chunked transfer coding (RFC 9112 §7.1), decoded from a read buffer: for response
//! bodies from upstreams (`h1`) and request bodies from clients (`downstream`).

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

/// A chunk-size line (with extensions) longer than this is a protocol error.
pub(crate) const MAX_CHUNK_LINE: usize = 4096;
/// A trailer block larger than this is a protocol error.
const MAX_TRAILERS: usize = 64 * 1024 - 1;
const MAX_HEADERS: usize = 100;

/// Where the chunked decoder is: [`decode_chunked`] starts at `Size`.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    Size,
    Data(u64),
    DataEnd,
    /// The trailer block; the bytes so far searched for its end without finding it.
    Trailers(usize),
}

/// What [`decode_chunked`] took off the buffer.
#[doc(hidden)]
#[derive(Debug)]
pub enum Step {
    /// Bytes of a chunk's data.
    Data(Bytes),
    /// The trailer block: the body is complete.
    Trailers(HeaderMap),
    /// The last chunk without trailers: the body is complete.
    End,
    /// More bytes are needed.
    More,
}

/// Decodes a chunked body from the start of `buf` (the read buffer), taking off what it used,
/// until it has data or the end to give or needs more bytes. After `Trailers` or `End` the body
/// is complete and `buf` holds only what follows it.
#[doc(hidden)]
pub fn decode_chunked(state: &mut Chunked, buf: &mut BytesMut) -> Result<Step, &'static str> {
    loop {
        match *state {
            // A size line starts with a hex digit and ends at its first line feed, after a
            // carriage return (httparse alone takes a line without digits as size 0, and a bare
            // line feed inside an extension): stricter than that, a client could frame its body
            // one way here and another way at a proxy in front.
            Chunked::Size if buf.first().is_some_and(|b| !b.is_ascii_hexdigit()) => {
                return Err("invalid chunk size line");
            }
            Chunked::Size => match httparse::parse_chunk_size(buf) {
                // The limit holds however the line arrived: whole in one read or in pieces.
                Ok(httparse::Status::Complete((used, _)))
                    if !buf[..used].ends_with(b"\r\n") || buf[..used - 2].contains(&b'\n') =>
                {
                    return Err("invalid chunk size line");
                }
                Ok(httparse::Status::Complete((used, size))) if used <= MAX_CHUNK_LINE => {
                    buf.advance(used);
                    *state = if size == 0 {
                        Chunked::Trailers(0)
                    } else {
                        Chunked::Data(size)
                    };
                }
                Ok(httparse::Status::Partial) if buf.len() <= MAX_CHUNK_LINE => {
                    return Ok(Step::More);
                }
                _ => return Err("invalid chunk size line"),
            },
            Chunked::Data(n) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                let data = buf.split_to(take).freeze();
                let left = n - take as u64;
                *state = if left == 0 {
                    Chunked::DataEnd
                } else {
                    Chunked::Data(left)
                };
                return Ok(Step::Data(data));
            }
            Chunked::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::More);
                }
                if !buf.starts_with(b"\r\n") {
                    return Err("chunk data not followed by CRLF");
                }
                buf.advance(2);
                *state = Chunked::Size;
            }
            Chunked::Trailers(searched) => {
                if buf.starts_with(b"\r\n") {
                    buf.advance(2);
                    return Ok(Step::End);
                }
                // Only what arrived since the last search is searched (with the 3 bytes before
                // it): a block trickling in a byte at a time costs linear work, not quadratic.
                let from = searched.saturating_sub(3);
                let found = buf[from..].windows(4).position(|w| w == b"\r\n\r\n");
                let Some(end) = found.map(|i| from + i) else {
                    if buf.len() > MAX_TRAILERS {
                        return Err("trailers too large");
                    }
                    *state = Chunked::Trailers(buf.len());
                    return Ok(Step::More);
                };
                if end + 4 > MAX_TRAILERS {
                    return Err("trailers too large");
                }
                let block = buf.split_to(end + 4);
                return match parse_trailers(&block) {
                    Some(trailers) => Ok(Step::Trailers(trailers)),
                    None => Err("malformed trailers"),
                };
            }
        }
    }
}

/// The trailer block up to and with its blank line. Every line must end in CRLF and the block
/// must be read whole: httparse also ends a block at a bare LF, and what followed it within the
/// block (a pipelined request, to a peer that ends lines at a bare LF) would be dropped unread.
fn parse_trailers(block: &[u8]) -> Option<HeaderMap> {
    let bare_lf = block
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || block[i - 1] != b'\r'));
    if bare_lf {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let httparse::Status::Complete((used, parsed)) =
        httparse::parse_headers(block, &mut headers).ok()?
    else {
        return None;
    };
    if used != block.len() {
        return None;
    }
    let mut map = HeaderMap::with_capacity(parsed.len());
    for h in parsed {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        map.append(name, value);
    }
    Some(map)
}

/// A chunk's size line: `n` in hexadecimal, written into `out`.
pub(crate) fn hex_len(mut n: usize, out: &mut [u8; 16]) -> &[u8] {
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &out[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_lines_without_digits_or_with_bare_line_feeds_are_refused() {
        for bad in [&b"\r\n"[..], b";x\r\n", b" \r\n", b"5;a\nXXXXX\r\n", b"5\n"] {
            let mut buf = BytesMut::from(bad);
            let got = decode_chunked(&mut Chunked::Size, &mut buf);
            assert!(got.is_err(), "{:?}: {got:?}", String::from_utf8_lossy(bad));
        }
        let mut buf = BytesMut::from(&b"5;ext=1\r\nhello\r\n0\r\n\r\nNEXT"[..]);
        let mut state = Chunked::Size;
        assert!(matches!(decode_chunked(&mut state, &mut buf), Ok(Step::Data(d)) if d == "hello"));
        assert!(matches!(
            decode_chunked(&mut state, &mut buf),
            Ok(Step::End)
        ));
        assert_eq!(&buf[..], b"NEXT");
    }

    /// A trailer block is CRLF lines read whole: a bare LF (which would end the block early and
    /// drop a pipelined request behind it) is refused, and good trailers are kept.
    #[test]
    fn trailers_end_only_at_crlf_and_are_read_whole() {
        for bad in [
            &b"0\r\nx: y\n\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"0\r\nx: y\nz: w\r\n\r\n",
            b"0\r\n\nGET / HTTP/1.1\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(bad);
            let mut state = Chunked::Size;
            let got = decode_chunked(&mut state, &mut buf);
            assert!(
                matches!(got, Err("malformed trailers")),
                "{:?}: {got:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut buf = BytesMut::from(&b"0\r\nx: y\r\nz: w\r\n\r\nNEXT"[..]);
        let mut state = Chunked::Size;
        let Ok(Step::Trailers(t)) = decode_chunked(&mut state, &mut buf) else {
            panic!("trailers refused")
        };
        assert_eq!(
            (t["x"].as_bytes(), t["z"].as_bytes()),
            (&b"y"[..], &b"w"[..])
        );
        assert_eq!(&buf[..], b"NEXT");
    }
}
