//! Rules on a request's header and query-parameter values: compiled once per snapshot (regexes
//! anchored), matched per request — by routes and by a route's faults.

use http::HeaderMap;
use regex::Regex;

#[derive(Debug)]
pub(crate) struct HeaderMatch {
    pub(crate) name: http::HeaderName,
    pub(crate) invert: bool,
    pub(crate) rule: ValueRule,
}

impl HeaderMatch {
    pub(crate) fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter().peekable();
        let hit = if matches!(self.rule, ValueRule::Present) {
            values.peek().is_some()
        } else {
            values.any(|v| v.to_str().is_ok_and(|v| self.rule.matches(v)))
        };
        hit != self.invert
    }
}

/// A rule on one header or query-parameter value. Regexes are anchored at compile time.
#[derive(Debug)]
pub(crate) enum ValueRule {
    Present,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Regex(Regex),
    /// Integer in [start, end).
    Range(i64, i64),
}

impl ValueRule {
    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            Self::Present => true,
            Self::Exact(e) => value == &**e,
            Self::Prefix(p) => value.starts_with(&**p),
            Self::Suffix(s) => value.ends_with(&**s),
            Self::Regex(re) => re.is_match(value),
            Self::Range(start, end) => value
                .trim()
                .parse::<i64>()
                .is_ok_and(|n| *start <= n && n < *end),
        }
    }
}
