//! App Mesh compatibility: every field of App Mesh's v1beta2 CRDs (their schema, from
//! `control-plane/appmesh/v1beta2-fields.md`) has one status in [`status::STATUS`] — honoured,
//! an AWS identity with a documented meaning, or refused — and every manifest is checked against
//! both before it is parsed: the schema's constraints (types, enums, ranges, lengths, required
//! fields) for every field present, nested ones included; `not supported by Trellis: <reason>`
//! for a refused field; `unknown field` for one App Mesh does not have and Trellis does not add.
//! App Mesh ARN references are turned into the references they name. The README's compatibility
//! table is generated from the same table ([`compatibility_table`]).

pub mod crd;
mod status;

use std::{collections::HashMap, sync::LazyLock};

use serde_json::{Map, Value};

use crate::model::Kind;

/// What Trellis does with a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Honoured as App Mesh documents it; the text says how.
    Honoured(&'static str),
    /// An AWS identity: accepted, with this meaning.
    Identity(&'static str),
    /// Refused, for this reason.
    Refused(&'static str),
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Self::Honoured(_) => "honoured",
            Self::Identity(_) => "identity",
            Self::Refused(_) => "refused",
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Self::Honoured(t) | Self::Identity(t) | Self::Refused(t) => t,
        }
    }
}

/// A field's type and constraints in the App Mesh CRDs.
#[derive(Debug, Default)]
struct Schema {
    ty: &'static str,
    enum_values: Vec<&'static str>,
    item_enum: Vec<&'static str>,
    requires: Vec<&'static str>,
    min: Option<i64>,
    max: Option<i64>,
    min_len: Option<usize>,
    max_len: Option<usize>,
    min_items: Option<usize>,
    max_items: Option<usize>,
}

/// App Mesh's v1beta2 fields, extracted from its CRDs (see the file's header).
pub const FIELDS: &str = include_str!("../../appmesh/v1beta2-fields.md");

/// Every App Mesh field by kind and path (`spec.listeners[].portMapping.port`), in file order.
static SCHEMA: LazyLock<Vec<(Kind, &'static str, Schema)>> = LazyLock::new(|| parse_fields(FIELDS));
static SCHEMA_INDEX: LazyLock<HashMap<(Kind, &'static str), usize>> = LazyLock::new(|| {
    SCHEMA
        .iter()
        .enumerate()
        .map(|(i, (kind, path, _))| ((*kind, *path), i))
        .collect()
});
/// The object fields that have fields of their own (the rest, like `matchLabels`, are maps whose
/// keys are data).
static PARENTS: LazyLock<std::collections::HashSet<(Kind, &'static str)>> = LazyLock::new(|| {
    SCHEMA
        .iter()
        .filter_map(|(kind, path, _)| {
            let parent = &path[..path.rfind('.')?];
            Some((*kind, parent.strip_suffix("[]").unwrap_or(parent)))
        })
        .collect()
});
static STATUS_INDEX: LazyLock<HashMap<(Kind, &'static str), Status>> = LazyLock::new(|| {
    status::STATUS
        .iter()
        .map(|(kind, path, status)| ((*kind, *path), *status))
        .collect()
});

fn parse_fields(text: &'static str) -> Vec<(Kind, &'static str, Schema)> {
    let mut out = Vec::new();
    let mut kind = None;
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            kind = heading.split_whitespace().next().and_then(Kind::parse);
            continue;
        }
        let (Some(kind), Some(row)) = (kind, line.strip_prefix("| `")) else {
            continue;
        };
        let mut cells = row.split('|').map(str::trim);
        let (Some(path), Some(ty), Some(constraints)) = (cells.next(), cells.next(), cells.next())
        else {
            continue;
        };
        let Some(path) = path.strip_suffix('`') else {
            continue;
        };
        let mut schema = Schema {
            ty,
            ..Schema::default()
        };
        for c in constraints
            .split(';')
            .map(str::trim)
            .filter(|c| !c.is_empty())
        {
            let (name, value) = c.split_once(' ').unwrap_or((c, ""));
            let number = || value.trim().parse().ok();
            match name {
                "enum" => schema.enum_values = value.split('/').collect(),
                "items" => {
                    schema.item_enum = value.trim_start_matches("enum ").split('/').collect()
                }
                "requires" => schema.requires = value.split(", ").collect(),
                "minimum" => schema.min = number(),
                "maximum" => schema.max = number(),
                "minLength" => schema.min_len = number().map(|n: i64| n as usize),
                "maxLength" => schema.max_len = number().map(|n: i64| n as usize),
                "minItems" => schema.min_items = number().map(|n: i64| n as usize),
                "maxItems" => schema.max_items = number().map(|n: i64| n as usize),
                _ => {}
            }
        }
        out.push((kind, path, schema));
    }
    out
}

fn schema(kind: Kind, path: &str) -> Option<&'static Schema> {
    SCHEMA_INDEX.get(&(kind, path)).map(|&i| &SCHEMA[i].2)
}

/// A field's status: the table's entry for the longest prefix of its path (by whole segments).
pub fn status(kind: Kind, path: &str) -> Option<Status> {
    let mut p = path;
    loop {
        if let Some(s) = STATUS_INDEX.get(&(kind, p)) {
            return Some(*s);
        }
        p = &p[..p.rfind('.')?];
    }
}

/// What checking a manifest found: problems as (field path, reason), and the mesh each ARN named
/// where the resource names no mesh of its own (checked once its mesh is known).
#[derive(Debug, Default)]
pub struct Checked {
    pub problems: Vec<(String, String)>,
    pub arn_meshes: Vec<(String, String)>,
}

/// Checks a manifest's `spec` against App Mesh's schema and Trellis's statuses, and rewrites
/// ARN references into the references they name.
pub fn check(kind: Kind, spec: &mut Value) -> Checked {
    let mesh = spec
        .pointer("/meshRef/name")
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut walk = Walk {
        kind,
        arn_meshes: Vec::new(),
        mesh,
        problems: Vec::new(),
    };
    match spec {
        Value::Object(map) => walk.object("spec", "spec", map),
        Value::Null => {}
        _ => walk.problem("spec", "must be an object"),
    }
    Checked {
        problems: walk.problems,
        arn_meshes: walk.arn_meshes,
    }
}

struct Walk {
    kind: Kind,
    /// (field path, mesh) of each ARN resolved without a `spec.meshRef` to check it against.
    arn_meshes: Vec<(String, String)>,
    /// The mesh the resource names (`spec.meshRef.name`), which ARNs must agree with.
    mesh: Option<String>,
    problems: Vec<(String, String)>,
}

impl Walk {
    fn problem(&mut self, path: &str, reason: impl Into<String>) {
        self.problems.push((path.to_string(), reason.into()));
    }

    fn object(&mut self, norm: &str, actual: &str, map: &mut Map<String, Value>) {
        self.resolve_arns(norm, actual, map);
        if let Some(schema) = schema(self.kind, norm) {
            // `tls: { mode: DISABLED }` asks for plaintext: no certificate is needed for it.
            let disabled = norm.ends_with(".tls")
                && map.get("mode").and_then(Value::as_str) == Some("DISABLED");
            for required in &schema.requires {
                if disabled && *required == "certificate" {
                    continue;
                }
                if !map.contains_key(*required) && !self.identity_only(norm, required) {
                    self.problem(&format!("{actual}.{required}"), "required");
                }
            }
        }
        for (key, value) in map.iter_mut() {
            let norm = format!("{norm}.{key}");
            let actual = format!("{actual}.{key}");
            self.field(&norm, &actual, value);
        }
    }

    /// A required field App Mesh needs for AWS identity only, which Trellis does not: `uid`s.
    fn identity_only(&self, norm: &str, required: &str) -> bool {
        matches!(
            status(self.kind, &format!("{norm}.{required}")),
            Some(Status::Identity(_))
        )
    }

    fn field(&mut self, norm: &str, actual: &str, value: &mut Value) {
        // `field:` with nothing (YAML null) is the field left out, as the typed model reads it.
        if value.is_null() {
            return;
        }
        let schema = schema(self.kind, norm);
        let exact = STATUS_INDEX.get(&(self.kind, norm)).is_some();
        if schema.is_none() && !exact {
            self.problem(actual, "unknown field");
            return;
        }
        let Some(status) = status(self.kind, norm) else {
            self.problem(actual, "unknown field");
            return;
        };
        if let Status::Refused(reason) = status {
            self.problem(actual, format!("not supported by Trellis: {reason}"));
            return;
        }
        let Some(schema) = schema else {
            // A Trellis addition: its typed model checks it.
            return;
        };
        if !self.value(schema, actual, value) {
            return;
        }
        match value {
            Value::Object(map) if schema.ty == "object" => {
                if PARENTS.contains(&(self.kind, norm)) {
                    self.object(norm, actual, map);
                } else if let Some((key, _)) = map.iter().find(|(_, v)| !v.is_string()) {
                    // A map (`matchLabels`): string values under any key.
                    self.problem(&format!("{actual}.{key}"), "must be a string");
                }
            }
            Value::Array(items) => {
                let norm = format!("{norm}[]");
                for (i, item) in items.iter_mut().enumerate() {
                    let actual = format!("{actual}[{i}]");
                    match item {
                        Value::Object(map) => self.object(&norm, &actual, map),
                        _ => {
                            if let Some(s) = self::schema(self.kind, &norm) {
                                self.value(s, &actual, item);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Checks a value against its field's type and constraints; false when it is not of the
    /// type (its children are not looked at then).
    fn value(&mut self, schema: &Schema, actual: &str, value: &Value) -> bool {
        let ok = match (schema.ty, value) {
            // Trellis addition: Cloud Map attributes also as a `{key: value}` map.
            ("array", Value::Object(m)) if actual.ends_with("awsCloudMap.attributes") => {
                m.values().all(Value::is_string)
            }
            ("object", Value::Object(_)) | ("string", Value::String(_)) => true,
            ("boolean", Value::Bool(_)) | ("array", Value::Array(_)) => true,
            ("integer", Value::Number(n)) => n.is_i64() || n.is_u64(),
            ("array of string", Value::Array(items)) => items.iter().all(Value::is_string),
            _ => false,
        };
        if !ok {
            let ty = match schema.ty {
                "object" => "an object",
                "string" => "a string",
                "boolean" => "true or false",
                "integer" => "a whole number",
                "array" => "a list",
                _ => "a list of strings",
            };
            self.problem(actual, format!("must be {ty}"));
            return false;
        }
        if let Value::String(s) = value {
            if !schema.enum_values.is_empty() && !schema.enum_values.contains(&s.as_str()) {
                self.problem(
                    actual,
                    format!(
                        "must be one of {}, not {s:?}",
                        schema.enum_values.join(", ")
                    ),
                );
            }
            let len = s.chars().count();
            match (schema.min_len, schema.max_len) {
                (Some(min), _) if len < min => {
                    self.problem(actual, format!("must be at least {min} characters long"))
                }
                (_, Some(max)) if len > max => {
                    self.problem(actual, format!("must be at most {max} characters long"))
                }
                _ => {}
            }
        }
        if let Some(n) = value.as_i64().or_else(|| value.as_u64().map(|_| i64::MAX)) {
            let out_of_range =
                schema.min.is_some_and(|min| n < min) || schema.max.is_some_and(|max| n > max);
            if out_of_range {
                let reason = match (schema.min, schema.max) {
                    (Some(min), Some(max)) => format!("must be {min}..={max}"),
                    (Some(min), None) => format!("must be at least {min}"),
                    (None, Some(max)) => format!("must be at most {max}"),
                    (None, None) => String::new(),
                };
                self.problem(actual, reason);
            }
        }
        if let Value::Array(items) = value {
            match (schema.min_items, schema.max_items) {
                (Some(min), _) if items.len() < min => {
                    self.problem(actual, format!("must list at least {min}"))
                }
                (_, Some(max)) if items.len() > max => {
                    self.problem(actual, format!("must list at most {max}"))
                }
                _ => {}
            }
            if !schema.item_enum.is_empty() {
                for (i, item) in items.iter().enumerate() {
                    let s = item.as_str().unwrap_or_default();
                    if !schema.item_enum.contains(&s) {
                        self.problem(
                            &format!("{actual}[{i}]"),
                            format!("must be one of {}", schema.item_enum.join(", ")),
                        );
                    }
                }
            }
        }
        true
    }

    /// `xARN: arn:aws:appmesh:REGION:ACCOUNT:mesh/MESH/x/NAME` becomes `xRef: { name: NAME }`:
    /// the resource named in the ARN's last segment, in the referrer's namespace, within the mesh
    /// named in it (which must be the resource's mesh when it names one).
    fn resolve_arns(&mut self, norm: &str, actual: &str, map: &mut Map<String, Value>) {
        const KINDS: [(&str, &str, &str); 4] = [
            ("virtualNodeARN", "virtualNodeRef", "virtualNode"),
            ("virtualServiceARN", "virtualServiceRef", "virtualService"),
            ("virtualRouterARN", "virtualRouterRef", "virtualRouter"),
            ("virtualGatewayARN", "virtualGatewayRef", "virtualGateway"),
        ];
        for (arn_field, ref_field, kind) in KINDS {
            // Only where App Mesh has the field; elsewhere it is an unknown field.
            let Some(arn) = map
                .get(arn_field)
                .filter(|_| schema(self.kind, &format!("{norm}.{arn_field}")).is_some())
            else {
                continue;
            };
            let path = format!("{actual}.{arn_field}");
            let Some(arn) = arn.as_str() else {
                self.problem(&path, "must be a string");
                continue;
            };
            let Some((mesh, name)) = parse_arn(arn, kind) else {
                self.problem(
                    &path,
                    format!("{arn:?} is not an App Mesh {kind} ARN (arn:aws:appmesh:REGION:ACCOUNT:mesh/MESH/{kind}/NAME)"),
                );
                continue;
            };
            if let Some(own) = &self.mesh {
                if own != mesh {
                    self.problem(
                        &path,
                        format!("names mesh {mesh:?}, but the resource belongs to mesh {own:?}"),
                    );
                    continue;
                }
            } else {
                // Checked against the mesh the resource turns out to belong to, across resources.
                self.arn_meshes.push((path.clone(), mesh.to_string()));
            }
            let by_ref = map
                .get(ref_field)
                .and_then(|r| r.get("name"))
                .and_then(Value::as_str);
            if by_ref.is_some_and(|n| n != name) {
                self.problem(
                    &path,
                    format!("names {name:?}, but {ref_field} names another"),
                );
                continue;
            }
            let name = name.to_string();
            map.remove(arn_field);
            map.entry(ref_field)
                .or_insert_with(|| serde_json::json!({ "name": name }));
        }
    }
}

/// `(mesh, name)` of an App Mesh ARN of a resource of `kind` (its camelCase segment).
fn parse_arn<'a>(arn: &'a str, kind: &str) -> Option<(&'a str, &'a str)> {
    let rest = arn.strip_prefix("arn:")?;
    let mut parts = rest.splitn(5, ':');
    let (_partition, service, _region, _account, resource) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if service != "appmesh" {
        return None;
    }
    let mut segments = resource.split('/');
    match (
        segments.next()?,
        segments.next()?,
        segments.next()?,
        segments.next()?,
        segments.next(),
    ) {
        ("mesh", mesh, k, name, None) if k == kind && !mesh.is_empty() && !name.is_empty() => {
            Some((mesh, name))
        }
        _ => None,
    }
}

/// The compatibility table: per kind, each App Mesh field with its status and what it means.
/// Generated into `docs/appmesh-compatibility.md` (a test keeps the file up to date).
pub fn compatibility_table() -> String {
    use std::fmt::Write as _;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    let mut body = String::new();
    let mut kind = None;
    for (k, path, _) in SCHEMA.iter() {
        if kind != Some(*k) {
            kind = Some(*k);
            let _ = write!(
                body,
                "\n## {}\n\n| field | status | what Trellis does |\n|---|---|---|\n",
                k.as_str()
            );
        }
        let (label, text) = match status(*k, path) {
            Some(s) => (s.label(), s.text()),
            None => ("none", "(no status: a test fails)"),
        };
        *counts.entry(label).or_default() += 1;
        let _ = writeln!(
            body,
            "| `{path}` | {label} | {} |",
            text.replace('|', "\\|")
        );
    }
    let additions: Vec<_> = status::STATUS
        .iter()
        .filter(|(k, path, _)| schema(*k, path).is_none())
        .collect();
    if !additions.is_empty() {
        body.push_str(
            "\n## Trellis additions\n\n| kind | field | what Trellis does |\n|---|---|---|\n",
        );
        for (k, path, s) in additions {
            let _ = writeln!(body, "| {} | `{path}` | {} |", k.as_str(), s.text());
        }
    }
    let count = |l| counts.get(l).copied().unwrap_or_default();
    format!(
        "# App Mesh v1beta2 compatibility\n\n\
         Generated from `control-plane/src/compat/status.rs` by `cargo test -p trellis-control \
         compat` (set `TRELLIS_BLESS=1` to rewrite it). Every field of App Mesh's v1beta2 CRDs \
         (`control-plane/appmesh/v1beta2-fields.md`) has one status: **honoured** (Trellis does \
         what App Mesh documented), **identity** (an AWS identity field, accepted with the meaning \
         given), or **refused** (applying a manifest that sets it fails with `not supported by \
         Trellis: <reason>`, naming the field). A field's status covers the fields below it. \
         Every field present in a manifest is also checked against the CRD schema's constraints.\n\n\
         | status | fields |\n|---|---|\n| honoured | {} |\n| identity | {} |\n| refused | {} |\n{}",
        count("honoured"),
        count("identity"),
        count("refused"),
        body
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn every_app_mesh_field_has_one_status() {
        assert_eq!(SCHEMA.len(), 563, "the CRDs' spec fields");
        // Each field resolves to an entry of its own or of a field above it, never only to the
        // `spec` root's (which would pass any new field unexamined).
        let missing: Vec<String> = SCHEMA
            .iter()
            .filter(|(k, path, _)| {
                *path != "spec" && status(*k, path) == STATUS_INDEX.get(&(*k, "spec")).copied()
                    || status(*k, path).is_none()
            })
            .map(|(k, path, _)| format!("{} {path}", k.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "fields without a status:\n{}",
            missing.join("\n")
        );
        let mut seen = std::collections::HashSet::new();
        for (k, path, _) in status::STATUS {
            assert!(
                seen.insert((k, path)),
                "{} {path} has two statuses",
                k.as_str()
            );
        }
    }

    /// `docs/appmesh-compatibility.md` is what the table says (`TRELLIS_BLESS=1` rewrites it).
    #[test]
    fn the_compatibility_document_is_generated_from_the_table() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/appmesh-compatibility.md"
        );
        let want = compatibility_table();
        if std::env::var_os("TRELLIS_BLESS").is_some() {
            std::fs::write(path, &want).unwrap();
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "docs/appmesh-compatibility.md is out of date: TRELLIS_BLESS=1 cargo test -p trellis-control compat"
        );
    }

    /// The README states the counts of the table.
    #[test]
    fn the_readme_states_the_counts() {
        let readme = include_str!("../../../README.md").replace('\n', " ");
        let count = |label: &str| {
            SCHEMA
                .iter()
                .filter(|(k, path, _)| status(*k, path).is_some_and(|s| s.label() == label))
                .count()
        };
        let want = format!(
            "**{} honoured**, **{} identity** and **{} refused** of {}",
            count("honoured"),
            count("identity"),
            count("refused"),
            SCHEMA.len()
        );
        assert!(readme.contains(&want), "README.md should say: {want}");
    }

    #[test]
    fn schema_constraints_are_enforced_on_nested_fields() {
        let mut spec = serde_json::json!({
            "listeners": [{
                "portMapping": { "port": 70000, "protocol": "htp" },
            }],
        });
        let problems = check(Kind::VirtualRouter, &mut spec).problems;
        let text: Vec<String> = problems.iter().map(|(p, r)| format!("{p}: {r}")).collect();
        assert!(
            text.contains(&"spec.listeners[0].portMapping.port: must be 1..=65535".to_string()),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.starts_with(
                "spec.listeners[0].portMapping.protocol: must be one of grpc, http, http2, tcp"
            )),
            "{text:?}"
        );
    }

    #[test]
    fn arns_resolve_to_references_within_their_mesh() {
        let arn = "arn:aws:appmesh:us-west-2:123456789012:mesh/colors/virtualNode/blue";
        let mut spec = serde_json::json!({
            "meshRef": { "name": "colors", "uid": "x" },
            "provider": { "virtualNode": { "virtualNodeARN": arn } },
        });
        assert!(check(Kind::VirtualService, &mut spec).problems.is_empty());
        assert_eq!(
            spec["provider"]["virtualNode"],
            serde_json::json!({ "virtualNodeRef": { "name": "blue" } })
        );

        let mut other_mesh = serde_json::json!({
            "meshRef": { "name": "shapes", "uid": "x" },
            "provider": { "virtualNode": { "virtualNodeARN": arn } },
        });
        let problems = check(Kind::VirtualService, &mut other_mesh).problems;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].0, "spec.provider.virtualNode.virtualNodeARN");
        assert!(
            problems[0].1.contains("names mesh \"colors\""),
            "{problems:?}"
        );

        let mut wrong_kind = serde_json::json!({
            "provider": { "virtualNode": { "virtualNodeARN": arn.replace("virtualNode/", "virtualRouter/") } },
        });
        assert_eq!(
            check(Kind::VirtualService, &mut wrong_kind).problems.len(),
            1
        );
    }

    #[test]
    fn refused_fields_name_themselves_and_tls_off_is_accepted() {
        let mut spec = serde_json::json!({
            "listeners": [{
                "portMapping": { "port": 8080, "protocol": "http" },
                "healthCheck": { "protocol": "http", "path": "/ping", "healthyThreshold": 2, "unhealthyThreshold": 2, "timeoutMillis": 2000, "intervalMillis": 5000 },
                "tls": { "mode": "DISABLED" },
            }],
            "serviceDiscovery": { "awsCloudMap": { "namespaceName": "demo", "serviceName": "web", "attributes": { "version": "v1" } } },
        });
        let problems = check(Kind::VirtualNode, &mut spec).problems;
        assert_eq!(problems, [], "a node's health check is honoured");

        let mut gateway = serde_json::json!({
            "listeners": [{
                "portMapping": { "port": 8080, "protocol": "http" },
                "healthCheck": { "protocol": "http", "path": "/ping", "unhealthyThreshold": 2, "timeoutMillis": 2000, "intervalMillis": 5000 },
            }],
        });
        let problems = check(Kind::VirtualGateway, &mut gateway).problems;
        assert_eq!(problems, [], "a gateway's health check is honoured");

        // The prober's settings keep the CRD's ranges.
        let mut gateway = serde_json::json!({
            "listeners": [{
                "portMapping": { "port": 8080, "protocol": "http" },
                "healthCheck": { "protocol": "http", "unhealthyThreshold": 2, "timeoutMillis": 2000, "intervalMillis": 1000 },
            }],
        });
        let problems = check(Kind::VirtualGateway, &mut gateway).problems;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].0,
            "spec.listeners[0].healthCheck.intervalMillis"
        );

        let mut gateway = serde_json::json!({
            "listeners": [{ "portMapping": { "port": 8080, "protocol": "http" } }],
            "backendDefaults": { "clientPolicy": { "tls": { "validation": { "trust": { "file": { "certificateChain": "/ca.pem" } } } } } },
        });
        let problems = check(Kind::VirtualGateway, &mut gateway).problems;
        assert_eq!(problems, [], "a client policy's TLS is honoured");
        let mut acm = serde_json::json!({
            "listeners": [{ "portMapping": { "port": 8080, "protocol": "http" } }],
            "backendDefaults": { "clientPolicy": { "tls": { "validation": { "trust": { "acm": { "certificateAuthorityARNs": ["arn:aws:acm-pca:us-west-2:1:certificate-authority/x"] } } } } } },
        });
        let problems = check(Kind::VirtualGateway, &mut acm).problems;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].0,
            "spec.backendDefaults.clientPolicy.tls.validation.trust.acm"
        );
        assert!(
            problems[0]
                .1
                .starts_with("not supported by Trellis: AWS Certificate Manager"),
            "{problems:?}"
        );
        // TLS asked for without a certificate to serve.
        let mut strict = serde_json::json!({
            "listeners": [{ "portMapping": { "port": 8080, "protocol": "http" }, "tls": { "mode": "STRICT" } }],
        });
        let problems = check(Kind::VirtualNode, &mut strict).problems;
        assert_eq!(
            problems,
            [(
                "spec.listeners[0].tls.certificate".to_string(),
                "required".to_string()
            )]
        );
    }

    #[test]
    fn unknown_fields_inside_opaque_objects_are_refused() {
        let mut spec = serde_json::json!({ "provider": { "virtualNode": { "virtualNodeReff": { "name": "x" } } } });
        let problems = check(Kind::VirtualService, &mut spec).problems;
        assert_eq!(
            problems,
            vec![(
                "spec.provider.virtualNode.virtualNodeReff".to_string(),
                "unknown field".to_string()
            )]
        );
    }
}
