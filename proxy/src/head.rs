//! HTTP/1.x head syntax both sides read: where a head ends, a `content-length` value.

/// Whether the bytes of `buf` from `from` on (with the two before) complete a blank line, the
/// end of a head: `\n\n` or `\n\r\n` (httparse accepts bare line feeds).
pub(crate) fn ends_head(buf: &[u8], from: usize) -> bool {
    let start = from.saturating_sub(2);
    buf[start..].iter().enumerate().any(|(i, &b)| {
        let at = start + i;
        b == b'\n'
            && at >= 1
            && (buf[at - 1] == b'\n' || (at >= 2 && buf[at - 1] == b'\r' && buf[at - 2] == b'\n'))
    })
}

/// A content-length value: digits only.
pub(crate) fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}
