//! Header rules: a route's `request_headers` and `response_headers` — headers set, added and
//! removed, with values from a few variables. Compiled once from the snapshot (names parsed,
//! fixed values made header values); applying them costs a map operation per rule, and a route
//! without rules has none to apply.

use std::fmt::Write as _;

use http::{HeaderMap, HeaderName, HeaderValue};
use trellis_proto::v1 as pb;

use crate::activity::ActiveRequest;

/// A route's compiled rules for one direction.
#[derive(Debug)]
pub struct HeaderRules {
    set: Box<[(HeaderName, Value)]>,
    add: Box<[(HeaderName, Value)]>,
    remove: Box<[HeaderName]>,
    /// The names of `set` and `remove` with `_` for `-`: removed too, as servers that read
    /// `_` and `-` alike (CGI-style `HTTP_X_CALLER`) would take them for the rule's header —
    /// a client must not get past a rule by spelling it so.
    lookalikes: Box<[HeaderName]>,
}

#[derive(Debug)]
enum Value {
    /// No variable that changes per request.
    Fixed(HeaderValue),
    Template(Box<[Piece]>),
}

#[derive(Debug)]
enum Piece {
    Text(Box<str>),
    PeerIdentity,
    RemoteAddress { port: bool },
}

/// Headers no rule may name: hop-by-hop and framing headers (a rule must never change how a
/// message is delimited or what the next hop does with the connection), the authority (the
/// action's host rewrite does that), and the caller's identity header the proxy sets itself.
pub(crate) const NEVER: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "content-length",
    "host",
    "x-forwarded-client-cert",
];

/// The variables a value may use.
pub const VARIABLES: [&str; 4] = [
    "ROUTE_NAME",
    "PEER_IDENTITY",
    "DOWNSTREAM_REMOTE_ADDRESS",
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
];

/// A problem with a rule: the field under the rules (`set[0].name`) and why.
pub type Problem = (String, String);

impl HeaderRules {
    /// Compiles `rules` of the route named `route` (the value of `%ROUTE_NAME%`); None when
    /// there is nothing to do. Every problem is reported, with its field.
    pub fn compile(rules: &pb::HeaderRules, route: &str) -> Result<Option<Self>, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut seen: Vec<HeaderName> = Vec::new();
        let mut name = |field: String, raw: &str, problems: &mut Vec<Problem>| {
            let parsed = match HeaderName::from_bytes(raw.as_bytes()) {
                Ok(n) => n,
                Err(_) => {
                    problems.push((field, format!("{raw:?} is not a header name")));
                    return None;
                }
            };
            if NEVER.contains(&parsed.as_str()) {
                problems.push((
                    field,
                    format!(
                        "{parsed} cannot be changed by a rule (hop-by-hop, framing, the authority or the caller's identity)"
                    ),
                ));
                return None;
            }
            if seen.contains(&parsed) {
                problems.push((
                    field,
                    format!(
                        "{parsed} is named twice (each header once across set, add and remove)"
                    ),
                ));
                return None;
            }
            seen.push(parsed.clone());
            Some(parsed)
        };
        let mut values =
            |list: &str, rules: &[pb::HeaderValueRule], problems: &mut Vec<Problem>| {
                let mut out = Vec::with_capacity(rules.len());
                for (i, r) in rules.iter().enumerate() {
                    let n = name(format!("{list}[{i}].name"), &r.name, problems);
                    let v = match parse_value(&r.value, route) {
                        Ok(v) => Some(v),
                        Err(why) => {
                            problems.push((format!("{list}[{i}].value"), why));
                            None
                        }
                    };
                    if let (Some(n), Some(v)) = (n, v) {
                        out.push((n, v));
                    }
                }
                out
            };
        let set = values("set", &rules.set, &mut problems);
        let add = values("add", &rules.add, &mut problems);
        let remove: Vec<HeaderName> = rules
            .remove
            .iter()
            .enumerate()
            .filter_map(|(i, r)| name(format!("remove[{i}]"), r, &mut problems))
            .collect();
        if !problems.is_empty() {
            return Err(problems);
        }
        if set.is_empty() && add.is_empty() && remove.is_empty() {
            return Ok(None);
        }
        let lookalikes = set
            .iter()
            .map(|(n, _)| n)
            .chain(&remove)
            .filter_map(lookalike)
            .collect::<Vec<_>>();
        Ok(Some(Self {
            set: set.into(),
            add: add.into(),
            remove: remove.into(),
            lookalikes: lookalikes.into(),
        }))
    }

    /// Applies the rules to `headers`; `active` is the request's connection (the caller's
    /// identity and address), when there is one.
    pub fn apply(&self, headers: &mut HeaderMap, active: Option<&ActiveRequest>) {
        for name in self.remove.iter().chain(&self.lookalikes) {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            match value.resolve(active) {
                Some(v) => {
                    headers.insert(name.clone(), v);
                }
                // Nothing to say: the header is absent, never the client's.
                None => {
                    headers.remove(name);
                }
            }
        }
        for (name, value) in &self.add {
            if let Some(v) = value.resolve(active) {
                headers.append(name.clone(), v);
            }
        }
    }
}

impl Value {
    /// The value for this request; None when it comes out empty.
    fn resolve(&self, active: Option<&ActiveRequest>) -> Option<HeaderValue> {
        let pieces = match self {
            // Empty only when it is just %ROUTE_NAME% of a route without a name.
            Self::Fixed(v) => return (!v.is_empty()).then(|| v.clone()),
            Self::Template(pieces) => pieces,
        };
        let mut out = String::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::PeerIdentity => {
                    if let Some(id) = active.and_then(ActiveRequest::identity) {
                        out.push_str(id);
                    }
                }
                Piece::RemoteAddress { port } => {
                    if let Some(peer) = active.and_then(|a| a.addresses().0) {
                        let _ = if *port {
                            write!(out, "{peer}")
                        } else {
                            write!(out, "{}", peer.ip())
                        };
                    }
                }
            }
        }
        if out.is_empty() {
            return None;
        }
        HeaderValue::from_str(&out).ok()
    }
}

/// `name` with `_` for each `-`, when it has one.
pub fn lookalike(name: &HeaderName) -> Option<HeaderName> {
    let n = name.as_str();
    n.contains('-')
        .then(|| HeaderName::from_bytes(n.replace('-', "_").as_bytes()).ok())
        .flatten()
}

/// Parses a value's text: `%NAME%` variables (those of [`VARIABLES`]), `%%` for `%`.
fn parse_value(text: &str, route: &str) -> Result<Value, String> {
    if text.is_empty() {
        return Err("must not be empty (remove the header with remove)".into());
    }
    if text.trim() != text {
        return Err(format!(
            "{text:?}: no space at either end (HTTP/2 refuses such values)"
        ));
    }
    let mut pieces: Vec<Piece> = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('%') {
        literal.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('%') {
            literal.push('%');
            rest = tail;
            continue;
        }
        let Some(end) = after.find('%') else {
            return Err(format!(
                "{text:?}: a % that starts no variable (write %% for a literal %)"
            ));
        };
        let var = &after[..end];
        rest = &after[end + 1..];
        let piece = match var {
            "ROUTE_NAME" => {
                literal.push_str(route);
                continue;
            }
            "PEER_IDENTITY" => Piece::PeerIdentity,
            "DOWNSTREAM_REMOTE_ADDRESS" => Piece::RemoteAddress { port: true },
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Piece::RemoteAddress { port: false },
            other => {
                return Err(format!(
                    "unknown variable %{other}% (known: {})",
                    VARIABLES
                        .iter()
                        .map(|v| format!("%{v}%"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        };
        if !literal.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut literal).into()));
        }
        pieces.push(piece);
    }
    literal.push_str(rest);
    // Fixed text must be a valid header value on its own (no control characters).
    let check = |t: &str| {
        HeaderValue::from_str(t)
            .map_err(|_| format!("{text:?} has characters a header value cannot carry"))
    };
    if pieces.is_empty() {
        return check(&literal).map(Value::Fixed);
    }
    if !literal.is_empty() {
        pieces.push(Piece::Text(literal.into()));
    }
    for p in &pieces {
        if let Piece::Text(t) = p {
            check(t)?;
        }
    }
    Ok(Value::Template(pieces.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, value: &str) -> pb::HeaderValueRule {
        pb::HeaderValueRule {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn set_add_and_remove() {
        let rules = pb::HeaderRules {
            set: vec![
                rule("x-env", "prod"),
                rule("x-route", "via %ROUTE_NAME% 100%%"),
            ],
            add: vec![rule("x-multi", "two")],
            remove: vec!["Server".into()],
        };
        let compiled = HeaderRules::compile(&rules, "split").unwrap().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-env", "dev".parse().unwrap());
        h.insert("x-multi", "one".parse().unwrap());
        h.insert("server", "nginx".parse().unwrap());
        compiled.apply(&mut h, None);
        assert_eq!(h["x-env"], "prod");
        assert_eq!(h["x-route"], "via split 100%");
        let multi: Vec<_> = h.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["one", "two"]);
        assert!(!h.contains_key("server"));
    }

    #[test]
    fn a_set_value_that_comes_out_empty_removes_the_clients_header() {
        let rules = pb::HeaderRules {
            set: vec![rule("x-peer", "%PEER_IDENTITY%")],
            add: vec![rule("x-from", "%DOWNSTREAM_REMOTE_ADDRESS%")],
            ..Default::default()
        };
        let compiled = HeaderRules::compile(&rules, "r").unwrap().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-peer", "spiffe://forged".parse().unwrap());
        compiled.apply(&mut h, None);
        assert!(!h.contains_key("x-peer"), "a client cannot supply it");
        assert!(!h.contains_key("x-from"), "nothing added");
    }

    #[test]
    fn a_lookalike_spelling_does_not_get_past_set_or_remove() {
        let rules = pb::HeaderRules {
            set: vec![rule("x-caller", "%PEER_IDENTITY%")],
            remove: vec!["x-internal-token".into()],
            ..Default::default()
        };
        let compiled = HeaderRules::compile(&rules, "r").unwrap().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x_caller", "spiffe://forged".parse().unwrap());
        h.insert("x_internal_token", "t".parse().unwrap());
        h.insert("x_other", "kept".parse().unwrap());
        compiled.apply(&mut h, None);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x_other"]);
    }

    #[test]
    fn nothing_configured_compiles_to_nothing() {
        assert!(
            HeaderRules::compile(&pb::HeaderRules::default(), "r")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn bad_rules_are_refused_with_their_field() {
        let rules = pb::HeaderRules {
            set: vec![
                rule("transfer-encoding", "chunked"),
                rule("x-a", "%NOPE%"),
                rule("x-b", "50%"),
                rule("bad name", "v"),
                rule("x-c", "line\nbreak"),
                rule("x-d", ""),
                rule("x-e", "prod "),
            ],
            add: vec![rule("X-A", "again"), rule("host", "evil")],
            remove: vec!["content-length".into(), "x-forwarded-client-cert".into()],
        };
        let problems = HeaderRules::compile(&rules, "r").unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "set[0].name",
                "set[1].value",
                "set[2].value",
                "set[3].name",
                "set[4].value",
                "set[5].value",
                "set[6].value",
                "add[0].name",
                "add[1].name",
                "remove[0]",
                "remove[1]",
            ],
            "{problems:?}"
        );
        assert!(
            problems[1].1.contains("unknown variable %NOPE%"),
            "{problems:?}"
        );
        assert!(problems[7].1.contains("named twice"), "{problems:?}");
    }
}
