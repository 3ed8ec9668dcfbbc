//! [`H2Raw`]: a prior-knowledge HTTP/2 client that writes frames by hand, for the malformed
//! requests a well-behaved client library refuses to send (whitespace around field values, a
//! `host` that contradicts `:authority`, pseudo-header fields in trailers, CONNECT without
//! `:authority`, a client PUSH_PROMISE). Header blocks are HPACK literals without indexing (new
//! names, no Huffman), which every decoder must accept; responses are read far enough to tell a
//! status, a stream reset or a connection error apart.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// HTTP/2 error code PROTOCOL_ERROR.
pub const PROTOCOL_ERROR: u32 = 0x1;

/// How the server answered a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers with this `:status` (0 when the status could not be decoded).
    Status(u16),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code: a connection error.
    GoAway(u32),
    /// The connection closed without either.
    Closed,
}

#[derive(Debug)]
pub struct H2Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// An HPACK integer with an `n`-bit prefix whose other bits are `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of literal fields without indexing, new names, raw (non-Huffman) strings.
pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// Decodes the digits of a Huffman-coded status ('0'-'9' only, RFC 7541 Appendix B).
fn huffman_digits(bytes: &[u8]) -> Option<u16> {
    let bit = |i: usize| (bytes[i / 8] >> (7 - i % 8)) & 1;
    let total = bytes.len() * 8;
    let (mut i, mut n, mut digits) = (0, 0u16, 0);
    while digits < 3 && i + 5 <= total {
        let five = (0..5).fold(0u8, |a, k| a << 1 | bit(i + k));
        if five <= 0b00010 {
            n = n * 10 + u16::from(five);
            i += 5;
        } else if i + 6 <= total {
            let six = five << 1 | bit(i + 5);
            if !(0b011001..=0b011111).contains(&six) {
                return None;
            }
            n = n * 10 + u16::from(six - 0b011001 + 3);
            i += 6;
        } else {
            return None;
        }
        digits += 1;
    }
    (digits == 3).then_some(n)
}

/// The `:status` at the start of a response header block, for the forms an encoder uses for it.
fn decode_status(block: &[u8]) -> u16 {
    // Static-table indexed statuses (RFC 7541 Appendix A, indices 8-14).
    const INDEXED: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    let Some(&first) = block.first() else {
        return 0;
    };
    if first & 0x80 != 0 {
        let index = usize::from(first & 0x7f);
        return INDEXED.get(index.wrapping_sub(8)).copied().unwrap_or(0);
    }
    // A literal with the indexed name `:status` (index 8), with or without indexing.
    let name_index = if first & 0xc0 == 0x40 {
        first & 0x3f
    } else {
        first & 0x0f
    };
    if name_index != 8 || block.len() < 2 {
        return 0;
    }
    let huffman = block[1] & 0x80 != 0;
    let len = usize::from(block[1] & 0x7f);
    let Some(value) = block.get(2..2 + len) else {
        return 0;
    };
    if huffman {
        huffman_digits(value).unwrap_or(0)
    } else {
        std::str::from_utf8(value)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

impl H2Raw {
    /// Connects, sends the preface and empty SETTINGS.
    pub async fn connect(addr: SocketAddr) -> Self {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        stream.write_all(PREFACE).await.unwrap();
        let mut c = Self {
            stream,
            buf: Vec::new(),
        };
        c.frame(SETTINGS, 0, 0, &[]).await;
        c
    }

    /// Writes one frame.
    pub async fn frame(&mut self, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
        f.extend_from_slice(payload);
        // The server may have closed the connection already; the outcome tells.
        let _ = self.stream.write_all(&f).await;
    }

    /// A HEADERS frame (END_HEADERS set) carrying `fields` as literals.
    pub async fn headers(&mut self, stream_id: u32, fields: &[(&str, &str)], end_stream: bool) {
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        self.frame(HEADERS, flags, stream_id, &header_block(fields))
            .await;
    }

    /// A DATA frame.
    pub async fn data(&mut self, stream_id: u32, data: &[u8], end_stream: bool) {
        let flags = if end_stream { END_STREAM } else { 0 };
        self.frame(DATA, flags, stream_id, data).await;
    }

    /// A PUSH_PROMISE frame on `stream_id` promising `promised`, as only servers may send.
    pub async fn push_promise(&mut self, stream_id: u32, promised: u32, fields: &[(&str, &str)]) {
        let mut payload = promised.to_be_bytes().to_vec();
        payload.extend_from_slice(&header_block(fields));
        self.frame(PUSH_PROMISE, END_HEADERS, stream_id, &payload)
            .await;
    }

    /// Reads one frame: (type, flags, stream id, payload); `None` at the end of the connection.
    async fn read_frame(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        loop {
            if self.buf.len() >= 9 {
                let len = usize::from(self.buf[0]) << 16
                    | usize::from(self.buf[1]) << 8
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let head: Vec<u8> = self.buf.drain(..9).collect();
                    let payload: Vec<u8> = self.buf.drain(..len).collect();
                    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    return Some((head[3], head[4], id, payload));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until the server answers `stream_id` (headers or a reset) or ends the connection
    /// (GOAWAY or close); acknowledges SETTINGS and PINGs on the way. Panics after 10 s.
    pub async fn outcome(&mut self, stream_id: u32) -> Outcome {
        let read = async {
            loop {
                let Some((kind, flags, id, payload)) = self.read_frame().await else {
                    return Outcome::Closed;
                };
                match kind {
                    SETTINGS if flags & ACK == 0 => self.frame(SETTINGS, ACK, 0, &[]).await,
                    PING if flags & ACK == 0 => self.frame(PING, ACK, 0, &payload).await,
                    HEADERS if id == stream_id => {
                        // Skip padding and priority fields when flagged.
                        let mut block = &payload[..];
                        if flags & 0x8 != 0 {
                            let pad = usize::from(block[0]);
                            block = &block[1..block.len() - pad];
                        }
                        if flags & 0x20 != 0 {
                            block = &block[5..];
                        }
                        return Outcome::Status(decode_status(block));
                    }
                    RST_STREAM if id == stream_id => {
                        return Outcome::Reset(u32::from_be_bytes([
                            payload[0], payload[1], payload[2], payload[3],
                        ]));
                    }
                    GOAWAY => {
                        return Outcome::GoAway(u32::from_be_bytes([
                            payload[4], payload[5], payload[6], payload[7],
                        ]));
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the server answered the stream in time")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_and_literals() {
        let mut out = Vec::new();
        hpack_int(&mut out, 0, 5, 10);
        assert_eq!(out, [10]);
        out.clear();
        hpack_int(&mut out, 0, 5, 1337);
        assert_eq!(out, [31, 154, 10], "RFC 7541 C.1.2");
        assert_eq!(header_block(&[("a", "bc")]), [0x00, 1, b'a', 2, b'b', b'c']);
    }

    #[test]
    fn statuses() {
        assert_eq!(decode_status(&[0x8c]), 400);
        assert_eq!(decode_status(&[0x88]), 200);
        assert_eq!(decode_status(&[0x08, 3, b'4', b'0', b'8']), 408);
        // "408" Huffman-coded: 011010 00000 011110, padded with ones.
        assert_eq!(decode_status(&[0x48, 0x83, 0x68, 0x0f, 0x7f]), 408);
        // "302": 011001 00000 00010 (RFC 7541 C.6.1 encodes it as 0x6402).
        assert_eq!(decode_status(&[0x48, 0x82, 0x64, 0x02]), 302);
    }
}
