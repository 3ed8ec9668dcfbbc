//! WebSocket handshakes across HTTP versions: an HTTP/1.1 upgrade (RFC 6455: `GET` with
//! `Upgrade: websocket` and a `Sec-WebSocket-Key`, answered `101` with its `Sec-WebSocket-Accept`)
//! and HTTP/2's extended CONNECT (RFC 8441: `CONNECT` with `:protocol websocket`, answered
//! `200`, no key or accept). The proxy takes either from its client and speaks whichever its
//! cluster speaks; these are the header translations between the two.

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue, header};

pub const SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
pub const SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");
pub const SEC_WEBSOCKET_VERSION: HeaderName = HeaderName::from_static("sec-websocket-version");

/// The GUID RFC 6455 §1.3 appends to a key.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Accept` answering `key`: base64(SHA-1(key + GUID)).
pub fn accept(key: &[u8]) -> HeaderValue {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(GUID);
    let encoded = base64::engine::general_purpose::STANDARD.encode(ctx.finish());
    // Base64 is header-safe.
    HeaderValue::from_str(&encoded).unwrap_or(HeaderValue::from_static(""))
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64.
pub fn new_key() -> HeaderValue {
    let bytes: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    HeaderValue::from_str(&encoded).unwrap_or(HeaderValue::from_static(""))
}

/// An HTTP/1.1 handshake's request headers made HTTP/2's: its connection-level headers and key
/// go (the stream is the connection; HTTP/2 has no key).
pub fn request_to_h2(headers: &mut HeaderMap) {
    for name in [header::UPGRADE, header::CONNECTION, SEC_WEBSOCKET_KEY] {
        headers.remove(name);
    }
}

/// An HTTP/2 handshake's request headers made HTTP/1.1's: `Upgrade` and `Connection`, a fresh
/// key (returned, to check the answer's accept with), and version 13 if the client named none.
pub fn request_to_h1(headers: &mut HeaderMap) -> HeaderValue {
    let key = new_key();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(SEC_WEBSOCKET_KEY, key.clone());
    if !headers.contains_key(SEC_WEBSOCKET_VERSION) {
        headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    }
    key
}

/// An HTTP/2 `200`'s headers made an HTTP/1.1 `101`'s, for a client that sent `key`.
pub fn response_to_h1(headers: &mut HeaderMap, key: Option<&HeaderValue>) {
    // A 1xx has no content (RFC 9110 §8.6).
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(key) = key {
        headers.insert(SEC_WEBSOCKET_ACCEPT, accept(key.as_bytes()));
    }
}

/// An HTTP/1.1 `101`'s headers made an HTTP/2 `200`'s.
pub fn response_to_h2(headers: &mut HeaderMap) {
    let names = [
        header::UPGRADE,
        header::CONNECTION,
        SEC_WEBSOCKET_ACCEPT,
        header::CONTENT_LENGTH,
    ];
    for name in names {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6455 §1.3's example.
    #[test]
    fn accept_answers_the_key() {
        assert_eq!(
            accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn handshakes_translate_both_ways() {
        let mut h = HeaderMap::new();
        h.insert("sec-websocket-protocol", HeaderValue::from_static("chat"));
        let key = request_to_h1(&mut h);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h[SEC_WEBSOCKET_KEY], key);
        assert_eq!(h[SEC_WEBSOCKET_VERSION], "13");
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(key.as_bytes())
                .unwrap()
                .len(),
            16
        );
        assert_ne!(new_key(), key, "fresh each time");
        request_to_h2(&mut h);
        assert!(!h.contains_key("upgrade") && !h.contains_key(SEC_WEBSOCKET_KEY));
        assert_eq!(h["sec-websocket-protocol"], "chat");

        let mut r = HeaderMap::new();
        r.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        response_to_h1(
            &mut r,
            Some(&HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==")),
        );
        assert_eq!(r[SEC_WEBSOCKET_ACCEPT], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert!(
            !r.contains_key(header::CONTENT_LENGTH),
            "a 1xx has no content"
        );
        r.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        response_to_h2(&mut r);
        assert!(r.is_empty());
    }
}
