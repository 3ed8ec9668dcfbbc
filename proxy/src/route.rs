//! Route tables: virtual host by authority, then the first matching route by priority.
//!
//! Everything here is built once per snapshot by `compile` and read-only afterwards.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use http::{HeaderMap, Method, uri::Scheme};
use regex::Regex;

pub(crate) use crate::matching::{HeaderMatch, ValueRule};
use crate::{balance::WeightedTargets, retry::RetryPolicy, steps::Steps};

/// The parts of a request that routes match on.
#[derive(Debug, Clone, Copy)]
pub struct MatchInput<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// Port of the request's authority, if it has one.
    pub port: Option<u16>,
    /// The request's scheme where it names one: HTTP/2's `:scheme`, an absolute-form
    /// request-target's. None is `http` (the listeners are plaintext).
    pub scheme: Option<&'a Scheme>,
}

/// The virtual hosts of one HTTP listener, indexed by domain.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub(crate) hosts: Vec<VirtualHost>,
    /// Exact domains, lowercase, with or without port. Hashed with FNV, not SipHash (~100
    /// instructions per request less): the keys come from the snapshot and a request's authority
    /// only looks up, so no request can lengthen a probe sequence, keyed hash or not.
    pub(crate) exact: HashMap<Box<str>, usize, fnv::FnvBuildHasher>,
    /// `*.suffix` domains as (".suffix", host), longest suffix first.
    pub(crate) suffixes: Vec<(Box<str>, usize)>,
    /// The `*` host.
    pub(crate) any: Option<usize>,
}

impl RouteTable {
    /// The virtual host serving `authority` (`host[:port]`, any case): an exact domain with the
    /// port, then without it, then the longest `*.suffix`, then `*`.
    pub fn host(&self, authority: &str) -> Option<&VirtualHost> {
        let index = self.lookup(authority).or(self.any)?;
        self.hosts.get(index)
    }

    /// For a captured connection (`original` is where the client meant to connect): the virtual
    /// host serving `authority`, else the one whose domains name the original destination
    /// (`ip:port`, then `ip`: a virtual service's cluster IP), else the `*` host.
    pub fn host_captured(&self, authority: &str, original: SocketAddr) -> Option<&VirtualHost> {
        let index = self
            .lookup(authority)
            .or_else(|| self.lookup_address(original))
            .or(self.any)?;
        self.hosts.get(index)
    }

    /// The virtual host whose domains name `addr` exactly (`ip:port`, then `ip`), without the `*`
    /// host: what a captured connection that carries no authority (not HTTP) reaches.
    pub fn host_at(&self, addr: SocketAddr) -> Option<&VirtualHost> {
        self.hosts.get(self.lookup_address(addr)?)
    }

    fn lookup_address(&self, addr: SocketAddr) -> Option<usize> {
        if self.exact.is_empty() {
            return None;
        }
        let with_port = addr.to_string();
        self.exact.get(with_port.as_str()).copied().or_else(|| {
            let ip = strip_port(&with_port);
            self.exact.get(ip).copied()
        })
    }

    fn lookup(&self, authority: &str) -> Option<usize> {
        if self.exact.is_empty() && self.suffixes.is_empty() {
            return None;
        }
        let lowered;
        let authority = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = authority.to_ascii_lowercase();
            lowered.as_str()
        } else {
            authority
        };
        if let Some(&i) = self.exact.get(authority) {
            return Some(i);
        }
        let host = strip_port(authority);
        if host.len() != authority.len()
            && let Some(&i) = self.exact.get(host)
        {
            return Some(i);
        }
        self.suffixes
            .iter()
            .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(&**suffix))
            .map(|&(_, i)| i)
    }
}

/// "host:port" → "host"; IPv6 literals keep their brackets.
pub(crate) fn strip_port(authority: &str) -> &str {
    match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => &authority[..i],
        _ => authority,
    }
}

/// The port of an authority, if it names one.
pub(crate) fn authority_port(authority: &str) -> Option<u16> {
    let host = strip_port(authority);
    authority.get(host.len() + 1..)?.parse().ok()
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: Arc<str>,
    /// Sorted by priority (stable).
    pub(crate) routes: Vec<Route>,
}

impl VirtualHost {
    pub fn route(&self, input: &MatchInput<'_>) -> Option<&Route> {
        self.routes.iter().find(|r| r.matcher.matches(input))
    }
}

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub(crate) priority: i32,
    pub(crate) matcher: RouteMatch,
    pub targets: WeightedTargets,
    pub retry: Option<Arc<RetryPolicy>>,
    pub timeouts: Timeouts,
    /// What the route changes in its requests and responses.
    pub steps: Steps,
    /// Set when the proxy answers the route's requests itself (then it has no targets).
    pub direct: Option<Box<DirectResponse>>,
    /// Delays and errors injected into its requests.
    pub fault: Option<Box<crate::fault::Fault>>,
    /// The bucket its requests are admitted from, when it has a rate limit.
    pub rate_limit: Option<Arc<crate::rate_limit::RateLimiter>>,
    /// Where a share of its requests is copied.
    pub mirror: Option<Box<crate::mirror::Mirror>>,
}

/// A response the proxy makes itself for a route: compiled from its `directResponse`.
#[derive(Debug)]
pub struct DirectResponse {
    pub kind: DirectKind,
    /// Requests and latency for the route (its cluster label is empty).
    pub metrics: Arc<crate::metrics::RequestMetrics>,
}

#[derive(Debug)]
pub enum DirectKind {
    /// This status and text body.
    Static {
        status: http::StatusCode,
        body: bytes::Bytes,
    },
    /// 200 with this body while the proxy is ready, else 503 not_ready.
    Readiness { body: bytes::Bytes },
    /// grpc.health.v1.Health/Check: SERVING while the proxy is ready, else NOT_SERVING.
    GrpcHealth,
}

/// A route's timeouts; `None` means no limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeouts {
    /// To the response headers, retries included.
    pub per_request: Option<std::time::Duration>,
    /// Longest gap between response body frames.
    pub idle: Option<std::time::Duration>,
}

#[derive(Debug, Default)]
pub(crate) struct RouteMatch {
    pub(crate) path: PathMatch,
    pub(crate) method: Option<Method>,
    pub(crate) headers: Vec<HeaderMatch>,
    pub(crate) query: Vec<QueryMatch>,
    pub(crate) port: Option<u16>,
    /// `http` or `https`.
    pub(crate) scheme: Option<Scheme>,
}

impl RouteMatch {
    pub(crate) fn matches(&self, input: &MatchInput<'_>) -> bool {
        self.path.matches(input.path)
            && self.method.as_ref().is_none_or(|m| m == input.method)
            && self.port.is_none_or(|p| input.port == Some(p))
            && self
                .scheme
                .as_ref()
                .is_none_or(|s| input.scheme.unwrap_or(&Scheme::HTTP) == s)
            && self.headers.iter().all(|h| h.matches(input.headers))
            && (self.query.is_empty() || query_matches(&self.query, input.query))
    }
}

#[derive(Debug, Default)]
pub(crate) enum PathMatch {
    #[default]
    Any,
    Prefix(Box<str>),
    Exact(Box<str>),
    Regex(Regex),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Prefix(p) => path.starts_with(&**p),
            Self::Exact(p) => path == &**p,
            Self::Regex(re) => re.is_match(path),
        }
    }
}

#[derive(Debug)]
pub(crate) struct QueryMatch {
    pub(crate) name: Box<str>,
    pub(crate) rule: ValueRule,
}

fn query_matches(rules: &[QueryMatch], query: Option<&str>) -> bool {
    let query = query.unwrap_or_default();
    rules.iter().all(|rule| {
        form_urlencoded::parse(query.as_bytes())
            .any(|(name, value)| *name == *rule.name && rule.rule.matches(&value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn input<'a>(path: &'a str, headers: &'a HeaderMap) -> MatchInput<'a> {
        MatchInput {
            method: &Method::GET,
            path,
            query: None,
            headers,
            port: None,
            scheme: None,
        }
    }

    fn re(s: &str) -> Regex {
        Regex::new(&format!("^(?:{s})$")).unwrap()
    }

    #[test]
    fn paths() {
        let h = HeaderMap::new();
        let cases = [
            (PathMatch::Any, "/x", true),
            (PathMatch::Prefix("/api".into()), "/api/v1", true),
            (PathMatch::Prefix("/api".into()), "/ap", false),
            (PathMatch::Exact("/a".into()), "/a", true),
            (PathMatch::Exact("/a".into()), "/a/", false),
            (PathMatch::Regex(re("/u/[0-9]+")), "/u/42", true),
            (PathMatch::Regex(re("/u/[0-9]+")), "/u/42/x", false),
        ];
        for (m, path, want) in cases {
            let rm = RouteMatch {
                path: m,
                ..Default::default()
            };
            assert_eq!(rm.matches(&input(path, &h)), want, "{rm:?} on {path}");
        }
    }

    #[test]
    fn headers() {
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("alice-admin"));
        h.insert("x-n", HeaderValue::from_static("15"));
        let rule = |name: &str, rule, invert| HeaderMatch {
            name: http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            invert,
            rule,
        };
        let cases = [
            (
                rule("x-user", ValueRule::Exact("alice-admin".into()), false),
                true,
            ),
            (
                rule("x-user", ValueRule::Exact("alice".into()), false),
                false,
            ),
            (
                rule("x-user", ValueRule::Prefix("alice".into()), false),
                true,
            ),
            (
                rule("x-user", ValueRule::Suffix("-admin".into()), false),
                true,
            ),
            (
                rule("x-user", ValueRule::Suffix("-admin".into()), true),
                false,
            ),
            (rule("x-user", ValueRule::Regex(re("a.*n")), false), true),
            (rule("x-user", ValueRule::Regex(re("lice")), false), false),
            (rule("x-n", ValueRule::Range(10, 20), false), true),
            (rule("x-n", ValueRule::Range(15, 20), false), true),
            (rule("x-n", ValueRule::Range(10, 15), false), false),
            (rule("x-user", ValueRule::Range(0, 100), false), false),
            (rule("x-user", ValueRule::Present, false), true),
            (rule("x-missing", ValueRule::Present, false), false),
            (rule("x-missing", ValueRule::Present, true), true),
            (rule("x-missing", ValueRule::Exact("a".into()), true), true),
        ];
        for (m, want) in cases {
            assert_eq!(m.matches(&h), want, "{m:?}");
        }
    }

    /// `https` matches a request naming that scheme (HTTP/2 `:scheme`, absolute form); `http`
    /// one naming `http` or none (a plaintext listener); unset, any.
    #[test]
    fn scheme() {
        let h = HeaderMap::new();
        let https = RouteMatch {
            scheme: Some(Scheme::HTTPS),
            ..Default::default()
        };
        let http = RouteMatch {
            scheme: Some(Scheme::HTTP),
            ..Default::default()
        };
        let mut i = input("/", &h);
        assert!(!https.matches(&i) && http.matches(&i), "none is http");
        i.scheme = Some(&Scheme::HTTP);
        assert!(!https.matches(&i) && http.matches(&i));
        i.scheme = Some(&Scheme::HTTPS);
        assert!(https.matches(&i) && !http.matches(&i));
        assert!(RouteMatch::default().matches(&i), "unset: any");
    }

    #[test]
    fn method_port_and_query() {
        let h = HeaderMap::new();
        let rm = RouteMatch {
            method: Some(Method::POST),
            port: Some(9080),
            query: vec![
                QueryMatch {
                    name: "v".into(),
                    rule: ValueRule::Exact("a b".into()),
                },
                QueryMatch {
                    name: "debug".into(),
                    rule: ValueRule::Present,
                },
            ],
            ..Default::default()
        };
        let mut i = input("/", &h);
        i.method = &Method::POST;
        i.port = Some(9080);
        i.query = Some("x=1&v=a%20b&debug");
        assert!(rm.matches(&i));
        i.query = Some("v=a%20b");
        assert!(!rm.matches(&i), "missing debug parameter");
        i.query = Some("v=ab&debug");
        assert!(!rm.matches(&i), "wrong value");
        i.query = Some("v=a+b&debug");
        assert!(rm.matches(&i), "form-encoded space");
        i.port = Some(80);
        assert!(!rm.matches(&i), "wrong port");
        i.port = Some(9080);
        i.method = &Method::GET;
        assert!(!rm.matches(&i), "wrong method");
    }

    #[test]
    fn authority_helpers() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(authority_port("a:9080"), Some(9080));
        assert_eq!(authority_port("a"), None);
        assert_eq!(authority_port("[::1]"), None);
    }

    #[test]
    fn host_lookup() {
        let vh = |n: &str| VirtualHost {
            name: n.into(),
            routes: vec![],
        };
        let table = RouteTable {
            hosts: vec![vh("exact-port"), vh("exact"), vh("suffix"), vh("any")],
            exact: [("svc.default:9080".into(), 0), ("svc.default".into(), 1)]
                .into_iter()
                .collect(),
            suffixes: vec![(".example.com".into(), 2)],
            any: Some(3),
        };
        let name = |a: &str| table.host(a).map(|h| h.name.to_string());
        assert_eq!(name("svc.default:9080").as_deref(), Some("exact-port"));
        assert_eq!(name("SVC.Default:9080").as_deref(), Some("exact-port"));
        assert_eq!(name("svc.default:80").as_deref(), Some("exact"));
        assert_eq!(name("svc.default").as_deref(), Some("exact"));
        assert_eq!(name("a.example.com:443").as_deref(), Some("suffix"));
        assert_eq!(name("example.com").as_deref(), Some("any"));
        let no_any = RouteTable { any: None, ..table };
        assert!(no_any.host("other").is_none());
    }
}
