//! The request on its way upstream: the client's head, with its authority located once (where
//! routing found it), changed by the route's steps, and written for the cluster's protocol by
//! the upstream's `send` (HTTP/1.1 by our own client, HTTP/2 through hyper).

use bytes::Bytes;
use http::{
    HeaderValue, Request, Uri, Version, header,
    request::Parts,
    uri::{Authority, PathAndQuery, Scheme},
};

use crate::BoxError;

/// A request body on its way to an upstream, for our HTTP/1.1 client and hyper's h2 alike.
pub type RequestBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Where a request carries its authority, found once when it is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorityIn {
    /// The request-target: absolute form, or HTTP/2's `:authority`.
    Target,
    /// The `Host` header (origin form).
    Host,
    /// Nowhere (HTTP/1.0 without `Host`): the endpoint's address stands in.
    Missing,
}

/// A request head ready to be sent, and sent again on a retry without being prepared anew.
#[derive(Debug)]
pub struct Outbound {
    parts: Parts,
    authority: AuthorityIn,
}

impl Outbound {
    /// The client's head. A request-target's authority replaces `Host` (RFC 9112 §3.2.2; an
    /// HTTP/2 request's `host` was checked to equal its `:authority`).
    pub fn new(mut parts: Parts, authority: AuthorityIn) -> Self {
        if authority == AuthorityIn::Target {
            parts.headers.remove(header::HOST);
        }
        Self { parts, authority }
    }

    pub fn parts(&self) -> &Parts {
        &self.parts
    }

    pub fn headers_mut(&mut self) -> &mut http::HeaderMap {
        &mut self.parts.headers
    }

    /// The authority the request carries, where it carries it.
    fn authority(&self) -> Option<Authority> {
        match self.authority {
            AuthorityIn::Target => self.parts.uri.authority().cloned(),
            AuthorityIn::Host => self
                .parts
                .headers
                .get(header::HOST)
                .and_then(|h| Authority::try_from(h.as_bytes()).ok()),
            AuthorityIn::Missing => None,
        }
    }

    /// Replaces the authority (a route's host rewrite), where the request carries it.
    pub fn set_authority(&mut self, authority: &Authority) {
        match self.authority {
            AuthorityIn::Target => {
                let mut uri = std::mem::take(&mut self.parts.uri).into_parts();
                uri.authority = Some(authority.clone());
                self.parts.uri = Uri::from_parts(uri).unwrap_or_default();
            }
            AuthorityIn::Host | AuthorityIn::Missing => {
                if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                    self.parts.headers.insert(header::HOST, v);
                    self.authority = AuthorityIn::Host;
                }
            }
        }
    }

    /// Replaces the port of the authority, where the request carries one (a cluster's
    /// `authority_port`: the target sidecar's ingress chooses its listener by it). Nothing to do
    /// when it already names that port, as on a retry.
    pub fn set_authority_port(&mut self, port: u16) {
        let current = self.authority();
        let Some(current) = current else { return };
        if current.port_u16() == Some(port) {
            return;
        }
        if let Ok(to) = Authority::try_from(format!("{}:{port}", current.host())) {
            self.set_authority(&to);
        }
    }

    /// A copy of the head (a hedged request's next attempt).
    pub fn duplicate(&self) -> Self {
        Self {
            parts: copy(&self.parts),
            authority: self.authority,
        }
    }

    /// A copy of the head for a route's mirror: `-shadow` appended to its host, before the
    /// port (`api:8080` → `api-shadow:8080`, as Envoy's shadows), so the copy's receiver can
    /// tell it from a real request. A request without an authority is copied as it is.
    pub fn shadow(&self) -> Self {
        let mut shadow = Self {
            parts: copy(&self.parts),
            authority: self.authority,
        };
        let current = self.authority();
        if let Some(current) = current {
            let host = current.host();
            let renamed = match current.port_u16() {
                Some(port) => format!("{host}-shadow:{port}"),
                None => format!("{host}-shadow"),
            };
            if let Ok(to) = Authority::try_from(renamed) {
                shadow.set_authority(&to);
            }
        }
        shadow
    }

    /// Replaces the method (a WebSocket handshake translated between HTTP versions).
    pub fn set_method(&mut self, method: http::Method) {
        self.parts.method = method;
    }

    /// The head's extensions (HTTP/2's `:protocol` is one).
    pub fn extensions_mut(&mut self) -> &mut http::Extensions {
        &mut self.parts.extensions
    }

    /// Replaces the path and query (a route's path rewrite).
    pub fn set_path_and_query(&mut self, pq: PathAndQuery) {
        let mut uri = std::mem::take(&mut self.parts.uri).into_parts();
        uri.path_and_query = Some(pq);
        self.parts.uri = Uri::from_parts(uri).unwrap_or_default();
    }

    /// The `host` line an HTTP/1.1 head needs besides its headers: `None` when the request
    /// carries `Host` among them, else its authority, else `fallback` (the endpoint's address).
    pub fn host_line<'a>(&'a self, fallback: &'a str) -> Option<&'a str> {
        match self.authority {
            AuthorityIn::Host => None,
            AuthorityIn::Target => {
                Some(self.parts.uri.authority().map_or(fallback, |a| a.as_str()))
            }
            AuthorityIn::Missing => Some(fallback),
        }
    }

    /// The head as hyper's HTTP/2 client takes it: scheme and authority in the URI, no `Host`.
    /// `last` hands over this head (no other attempt follows); otherwise a copy goes out.
    pub fn http2_parts(&mut self, fallback: &str, last: bool) -> Parts {
        let mut parts = if last {
            std::mem::replace(&mut self.parts, Request::new(()).into_parts().0)
        } else {
            copy(&self.parts)
        };
        parts.version = Version::HTTP_2;
        let authority = match self.authority {
            AuthorityIn::Target => {
                if parts.uri.scheme() == Some(&Scheme::HTTP) && parts.uri.authority().is_some() {
                    return parts;
                }
                parts.uri.authority().cloned()
            }
            AuthorityIn::Host => parts
                .headers
                .remove(header::HOST)
                .and_then(|h| Authority::try_from(h.as_bytes()).ok()),
            AuthorityIn::Missing => None,
        };
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = authority.or_else(|| fallback.parse().ok());
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        parts.uri = Uri::from_parts(uri).unwrap_or_default();
        parts
    }

    /// The head as hyper's HTTP/1.1 client takes it (an upgrade): origin form and `Host`.
    pub fn into_http1_parts(self, fallback: &str) -> Parts {
        let Self {
            mut parts,
            authority,
        } = self;
        parts.version = Version::HTTP_11;
        if authority != AuthorityIn::Host {
            let host = parts.uri.authority().map_or(fallback, |a| a.as_str());
            if let Ok(v) = HeaderValue::from_str(host) {
                parts.headers.insert(header::HOST, v);
            }
        }
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            parts.uri = parts
                .uri
                .path_and_query()
                .cloned()
                .map_or_else(|| Uri::from_static("/"), Uri::from);
        }
        parts
    }
}

fn copy(parts: &Parts) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(uri: &str, version: Version, host: Option<&str>) -> Parts {
        let mut b = Request::builder().uri(uri).version(version);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn http2_heads_carry_the_authority_in_the_uri() {
        // Origin form with Host.
        let mut out = Outbound::new(
            head("/a?b", Version::HTTP_11, Some("svc:80")),
            AuthorityIn::Host,
        );
        let p = out.http2_parts("10.0.0.1:80", false);
        assert_eq!(p.uri, "http://svc:80/a?b");
        assert!(!p.headers.contains_key("host"));
        assert_eq!(p.version, Version::HTTP_2);
        // The head stays for another attempt.
        assert_eq!(out.parts().headers["host"], "svc:80");
        // Absolute form: its Host is dropped for the target's authority.
        let out = Outbound::new(
            head("http://a.example/x", Version::HTTP_11, Some("b.example")),
            AuthorityIn::Target,
        );
        assert_eq!(out.host_line("e"), Some("a.example"));
        assert!(!out.parts().headers.contains_key("host"));
        // No authority at all: the endpoint's address.
        let mut out = Outbound::new(head("/", Version::HTTP_10, None), AuthorityIn::Missing);
        assert_eq!(out.host_line("10.0.0.1:80"), Some("10.0.0.1:80"));
        assert_eq!(
            out.http2_parts("10.0.0.1:80", true).uri,
            "http://10.0.0.1:80/"
        );
    }

    #[test]
    fn rewrites_land_where_the_authority_is() {
        let to: Authority = "new.example".parse().unwrap();
        let mut out = Outbound::new(head("/x", Version::HTTP_11, Some("old")), AuthorityIn::Host);
        out.set_authority(&to);
        out.set_path_and_query("/y?q".parse().unwrap());
        assert_eq!(out.host_line("e"), None);
        assert_eq!(out.parts().headers["host"], "new.example");
        let p = out.into_http1_parts("e");
        assert_eq!(p.uri, "/y?q");
        assert_eq!(p.headers["host"], "new.example");

        let mut out = Outbound::new(
            head("http://old/x", Version::HTTP_2, None),
            AuthorityIn::Target,
        );
        out.set_authority(&to);
        assert_eq!(out.host_line("e"), Some("new.example"));
        let p = out.into_http1_parts("e");
        assert_eq!(p.uri, "/x");
        assert_eq!(p.headers["host"], "new.example");

        // HTTP/1.0 without Host gets one from the rewrite.
        let mut out = Outbound::new(head("/", Version::HTTP_10, None), AuthorityIn::Missing);
        out.set_authority(&to);
        assert_eq!(out.host_line("e"), None);
    }

    /// A mirror's copy names its host with `-shadow`, before the port, where the request
    /// carries it; the original stays as it was.
    #[test]
    fn shadow_copies_rename_the_host() {
        let out = Outbound::new(
            head("/x?q", Version::HTTP_11, Some("svc.ns:9080")),
            AuthorityIn::Host,
        );
        let shadow = out.shadow();
        assert_eq!(shadow.parts().headers["host"], "svc.ns-shadow:9080");
        assert_eq!(shadow.parts().uri, "/x?q");
        assert_eq!(out.parts().headers["host"], "svc.ns:9080");

        let out = Outbound::new(
            head("http://svc.ns/x", Version::HTTP_2, None),
            AuthorityIn::Target,
        );
        assert_eq!(out.shadow().host_line("e"), Some("svc.ns-shadow"));

        let out = Outbound::new(head("/", Version::HTTP_10, None), AuthorityIn::Missing);
        assert_eq!(out.shadow().host_line("10.0.0.1:80"), Some("10.0.0.1:80"));
    }

    /// A cluster's authority port replaces the port where the authority is (or adds one), and
    /// leaves a request without an authority alone.
    #[test]
    fn authority_ports_land_where_the_authority_is() {
        let mut out = Outbound::new(
            head("/x", Version::HTTP_11, Some("svc.ns:9080")),
            AuthorityIn::Host,
        );
        out.set_authority_port(9090);
        assert_eq!(out.parts().headers["host"], "svc.ns:9090");
        out.set_authority_port(9090);
        assert_eq!(out.parts().headers["host"], "svc.ns:9090", "once is enough");

        let mut out = Outbound::new(
            head("http://svc.ns/x", Version::HTTP_2, None),
            AuthorityIn::Target,
        );
        out.set_authority_port(9090);
        assert_eq!(out.host_line("e"), Some("svc.ns:9090"));

        let mut out = Outbound::new(head("/", Version::HTTP_10, None), AuthorityIn::Missing);
        out.set_authority_port(9090);
        assert_eq!(out.host_line("e"), Some("e"));
    }
}
