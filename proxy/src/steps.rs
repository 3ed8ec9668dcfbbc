//! A route's request and response steps: compiled from the snapshot into plain lists and run at
//! fixed points of the request path — the request head once before its first attempt, the
//! response head as it arrives. A feature that changes requests or responses (header rules,
//! faults, ...) is a new variant here, compiled only when configured, so it costs nothing unset.

use http::{
    HeaderMap, HeaderValue, header,
    uri::{Authority, PathAndQuery},
};

use crate::{activity::ActiveRequest, header_rules::HeaderRules, outbound::Outbound};

/// What a route does to its requests and responses, in order. Hop-by-hop headers never cross
/// the proxy: their removal comes first, for every route, before the configured steps.
#[derive(Debug, Default)]
pub struct Steps {
    request: Box<[RequestStep]>,
    response: Option<Box<HeaderRules>>,
}

/// A change to a request head before it goes upstream.
#[derive(Debug)]
pub enum RequestStep {
    /// Replaces a path prefix (the query stays).
    RewritePath(PathRewrite),
    /// Replaces the whole path (the query stays).
    ReplacePath(Box<str>),
    /// Replaces each match of a regex in the path (the query stays).
    RegexPath(Box<RegexRewrite>),
    /// Replaces the authority.
    RewriteHost(Authority),
    /// Sets, adds and removes headers.
    Headers(Box<HeaderRules>),
}

impl Steps {
    /// `request` runs in order after the hop-by-hop headers' removal; `response` (header
    /// rules) after theirs.
    pub fn new(request: Vec<RequestStep>, response: Option<HeaderRules>) -> Self {
        Self {
            request: request.into(),
            response: response.map(Box::new),
        }
    }

    /// `active` is the request's connection (for the rules' variables), when there is one.
    pub fn on_request(&self, out: &mut Outbound, active: Option<&ActiveRequest>) {
        strip_hop_by_hop(out.headers_mut());
        for step in &self.request {
            match step {
                RequestStep::Headers(rules) => rules.apply(out.headers_mut(), active),
                RequestStep::RewritePath(rw) => {
                    let new = out
                        .parts()
                        .uri
                        .path_and_query()
                        .and_then(|pq| rw.apply(pq.as_str()))
                        .and_then(|pq| PathAndQuery::try_from(pq).ok());
                    if let Some(new) = new {
                        out.set_path_and_query(new);
                    }
                }
                RequestStep::RewriteHost(host) => out.set_authority(host),
                RequestStep::ReplacePath(path) => {
                    let new = out
                        .parts()
                        .uri
                        .path_and_query()
                        .map(|pq| with_query(path, pq.query()))
                        .and_then(|pq| PathAndQuery::try_from(pq).ok());
                    if let Some(new) = new {
                        out.set_path_and_query(new);
                    }
                }
                RequestStep::RegexPath(rw) => {
                    let new = out
                        .parts()
                        .uri
                        .path_and_query()
                        .and_then(|pq| rw.apply(pq.path(), pq.query()))
                        .and_then(|pq| PathAndQuery::try_from(pq).ok());
                    if let Some(new) = new {
                        out.set_path_and_query(new);
                    }
                }
            }
        }
    }

    /// The response head's fixed point: the hop-by-hop headers' removal, then the route's
    /// response header rules.
    pub fn on_response(&self, parts: &mut http::response::Parts, active: Option<&ActiveRequest>) {
        strip_hop_by_hop(&mut parts.headers);
        if let Some(rules) = &self.response {
            rules.apply(&mut parts.headers, active);
        }
    }

    /// The response header rules alone: for a `101 Switching Protocols` answer (its upgrade
    /// headers stay; rules cannot name them) and for the responses the proxy makes itself for
    /// the route's requests (errors, faults, rate limits).
    pub fn response_rules(&self, headers: &mut HeaderMap, active: Option<&ActiveRequest>) {
        if let Some(rules) = &self.response {
            rules.apply(headers, active);
        }
    }
}

/// A path with the request's query, if it had one.
fn with_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    }
}

/// Each match of a regex in the path, and what replaces it.
#[derive(Debug)]
pub struct RegexRewrite {
    pub regex: regex::Regex,
    pub substitution: Box<str>,
}

impl RegexRewrite {
    /// The rewritten path-and-query; None when the regex does not match.
    pub fn apply(&self, path: &str, query: Option<&str>) -> Option<String> {
        let new = match self.regex.replace_all(path, &*self.substitution) {
            std::borrow::Cow::Borrowed(_) => return None,
            std::borrow::Cow::Owned(p) => p,
        };
        let new = if new.starts_with('/') {
            new
        } else {
            format!("/{new}")
        };
        Some(with_query(&new, query))
    }
}

/// A path prefix and what replaces it.
#[derive(Debug)]
pub struct PathRewrite {
    pub prefix: Box<str>,
    pub replacement: Box<str>,
}

impl PathRewrite {
    /// The rewritten path-and-query, if the prefix applies.
    pub fn apply(&self, pq: &str) -> Option<String> {
        let rest = pq.strip_prefix(&*self.prefix)?;
        let mut out = String::with_capacity(self.replacement.len() + rest.len());
        out.push_str(&self.replacement);
        // Never produce "//": "/colors/" + "/x" or "/" + "x" both become "/x".
        if out.ends_with('/') && rest.starts_with('/') {
            out.push_str(&rest[1..]);
        } else if !out.ends_with('/') && !rest.is_empty() && !rest.starts_with(['/', '?']) {
            out.push('/');
            out.push_str(rest);
        } else {
            out.push_str(rest);
        }
        Some(out)
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1). Names, not strings, so removing them does not parse a
/// header name per request.
const HOP_BY_HOP: [header::HeaderName; 6] = [
    header::CONNECTION,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The names a message's `Connection` header lists, but Host (it names the request's target:
/// never hop-by-hop, whatever a client lists) and `keep`.
fn connection_listed(headers: &HeaderMap, keep: &[header::HeaderName]) -> Vec<header::HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| header::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| name != header::HOST && !keep.contains(name))
        .collect()
}

/// The options a request's `Connection` keeps when what it lists is removed on arrival: what
/// it says of the connection (`close`, `keep-alive`), the upgrade a websocket's handling reads,
/// and the framing fields the head's reader owns (the upstream request is framed anew).
const CONNECTION_OPTIONS: [header::HeaderName; 5] = [
    header::HeaderName::from_static("close"),
    header::HeaderName::from_static("keep-alive"),
    header::UPGRADE,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
];

/// Removes, as an HTTP/1 request's head is read, the headers its `Connection` lists (but its
/// [`CONNECTION_OPTIONS`] and Host), and those names from `Connection`: before the proxy adds
/// headers of its own (`x-forwarded-client-cert`, `traceparent`), so that a client cannot list
/// those away, as Envoy's codec drops them on receipt. HTTP/2 requests have no `Connection`.
pub fn strip_connection_listed(headers: &mut HeaderMap) {
    let listed = connection_listed(headers, &CONNECTION_OPTIONS);
    if listed.is_empty() {
        return;
    }
    for name in &listed {
        headers.remove(name);
    }
    let kept: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !listed.iter().any(|n| n.as_str().eq_ignore_ascii_case(t)))
        .map(str::to_string)
        .collect();
    headers.remove(header::CONNECTION);
    if !kept.is_empty()
        && let Ok(value) = HeaderValue::from_str(&kept.join(", "))
    {
        headers.insert(header::CONNECTION, value);
    }
}

/// Removes hop-by-hop headers, those `Connection` lists among them, and `TE` unless it is
/// `trailers`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names is cheaper than a lookup per name.
    let any = headers
        .keys()
        .any(|k| k == header::TE || HOP_BY_HOP.contains(k));
    if !any {
        return;
    }
    // Headers the Connection header lists are hop-by-hop too.
    for name in connection_listed(headers, &[]) {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    let keep_te = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !keep_te {
        headers.remove(header::TE);
    }
}

#[cfg(test)]
mod tests {
    use http::{Request, Version};

    use super::*;
    use crate::outbound::AuthorityIn;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["te", "x-kept"]);
        h.insert("te", "gzip".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key("te"));
    }

    #[test]
    fn path_rewrites() {
        let r = |p: &str, to: &str| PathRewrite {
            prefix: p.into(),
            replacement: to.into(),
        };
        let cases = [
            ("/colors/", "/", "/colors/x?a=1", Some("/x?a=1")),
            ("/colors", "/", "/colors/x", Some("/x")),
            ("/colors", "/", "/colors", Some("/")),
            ("/colors", "/", "/colors?q", Some("/?q")),
            ("/colors/", "/v2/", "/colors/x", Some("/v2/x")),
            ("/a", "/b", "/a/c", Some("/b/c")),
            ("/a", "/b", "/other", None),
        ];
        for (prefix, to, path, want) in cases {
            assert_eq!(
                r(prefix, to).apply(path).as_deref(),
                want,
                "{prefix} -> {to} on {path}"
            );
        }
    }

    #[test]
    fn regex_rewrites_use_groups_and_keep_the_query() {
        let rw = RegexRewrite {
            regex: regex::Regex::new(r"^/users/([0-9]+)/orders$").unwrap(),
            substitution: "/orders/by-user/$1".into(),
        };
        assert_eq!(
            rw.apply("/users/42/orders", Some("page=2")).as_deref(),
            Some("/orders/by-user/42?page=2")
        );
        assert_eq!(rw.apply("/users/x/orders", None), None);
        let every = RegexRewrite {
            regex: regex::Regex::new("v1").unwrap(),
            substitution: "v2".into(),
        };
        assert_eq!(every.apply("/v1/a/v1", None).as_deref(), Some("/v2/a/v2"));
    }

    #[test]
    fn path_rewrites_apply_one_after_another() {
        // A gateway's prefix rewrite, then its router route's regex one.
        let steps = Steps::new(
            vec![
                RequestStep::RewritePath(PathRewrite {
                    prefix: "/colors/".into(),
                    replacement: "/".into(),
                }),
                RequestStep::RegexPath(Box::new(RegexRewrite {
                    regex: regex::Regex::new("^/([a-z]+)$").unwrap(),
                    substitution: "/api/$1".into(),
                })),
            ],
            None,
        );
        let parts = Request::builder()
            .uri("/colors/blue?x=1")
            .header("host", "svc")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let mut out = Outbound::new(parts, AuthorityIn::Host);
        steps.on_request(&mut out, None);
        assert_eq!(out.parts().uri, "/api/blue?x=1");
    }

    #[test]
    fn request_steps_run_in_order() {
        let steps = Steps::new(
            vec![
                RequestStep::RewritePath(PathRewrite {
                    prefix: "/old".into(),
                    replacement: "/new".into(),
                }),
                RequestStep::RewriteHost("upstream.internal".parse().unwrap()),
            ],
            None,
        );
        let parts = Request::builder()
            .uri("/old/x?q=1")
            .version(Version::HTTP_11)
            .header("host", "svc")
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let mut out = Outbound::new(parts, AuthorityIn::Host);
        steps.on_request(&mut out, None);
        assert_eq!(out.parts().uri, "/new/x?q=1");
        assert_eq!(out.parts().headers["host"], "upstream.internal");
        assert!(!out.parts().headers.contains_key("x-hop"));
        assert!(!out.parts().headers.contains_key("connection"));
        // No rewrites configured: no steps beyond the hop-by-hop headers' removal.
        let default = Steps::default();
        assert!(default.request.is_empty());
    }
}
