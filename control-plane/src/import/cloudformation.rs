//! CloudFormation templates (YAML or JSON): `AWS::AppMesh::*` resources, and
//! `AWS::ECS::TaskDefinition`s that ran App Mesh's Envoy.
//!
//! A template is read offline, as deployed with its parameters' defaults: intrinsic functions
//! are resolved where the template alone decides them (`Ref` of a parameter or of an App Mesh
//! resource, `Fn::GetAtt` of a name, `Fn::Sub`, `Fn::Join`, `Fn::Select`, `Fn::Split`,
//! `Fn::FindInMap`, `Fn::If` on a condition of defaults), pseudo parameters known only in an
//! account become [placeholders](REGION_PLACEHOLDER) with a note, and anything else is left out
//! with a note on the resource naming the field:
//!
//! ```text
//! app.yaml: Resources.ColorNode: Properties.Spec.ServiceDiscovery.DNS.Hostname: Fn::ImportValue cannot be resolved offline: left out
//! ```
//!
//! A note's source is the resource's, as in [`ApiResource::source`]; its field is the path
//! below it in the template's spelling. A resource whose name, mesh or parent cannot be resolved
//! is skipped, with a note; other resource types are ignored.
//!
//! CloudFormation's `Spec` is the App Mesh API's `spec` with PascalCase keys; [`camel_keys`]
//! lowers them, and string values in the API's integer fields (a `!Ref` of a `Number`
//! parameter, `Port: "8080"`) become numbers. ECS task definitions differ from the ECS API in one
//! key, `ProxyConfiguration.ProxyConfigurationProperties` (the API's `properties`), and keep the
//! keys of their free-form maps (`DockerLabels`, `Options`, ...) as written.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use super::{ApiKind, ApiResource, EcsTask, Note, Read, ReadError, camel_keys};

/// What `AWS::Region` reads as: the region is known only where the stack was deployed.
pub const REGION_PLACEHOLDER: &str = "aws-region";
/// What `AWS::AccountId` reads as.
pub const ACCOUNT_PLACEHOLDER: &str = "aws-account-id";
/// What `AWS::StackName` reads as.
pub const STACK_NAME_PLACEHOLDER: &str = "aws-stack-name";

/// Reads the template `text`, named `source_name` in the report, with its parameters'
/// defaults.
pub fn read(text: &str, source_name: &str) -> Result<Read, ReadError> {
    read_with(text, source_name, &[])
}

/// [`read`], with `parameters` (name, value) given as a deployment would (`--parameter`): they
/// take the place of the template's defaults.
pub fn read_with(
    text: &str,
    source_name: &str,
    parameters: &[(String, String)],
) -> Result<Read, ReadError> {
    let error = |reason: String| ReadError {
        source_name: source_name.into(),
        reason,
    };
    let template = parse(text).map_err(error)?;
    let Value::Object(mut template) = template else {
        return Err(error(
            "not a CloudFormation template: expected a mapping with a Resources section".into(),
        ));
    };
    let resources = match template.remove("Resources") {
        Some(Value::Object(resources)) => resources,
        Some(_) => return Err(error("Resources: expected a mapping of resources".into())),
        None => {
            return Err(error(
                "not a CloudFormation template: no Resources section".into(),
            ));
        }
    };
    let section = |template: &mut Map<String, Value>, name: &str| match template.remove(name) {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    };
    let mut declared = section(&mut template, "Parameters");
    for (name, value) in parameters {
        let parameter = declared
            .entry(name.clone())
            .or_insert_with(|| serde_json::json!({ "Type": "String" }));
        if let Value::Object(p) = parameter {
            p.insert("Default".into(), Value::String(value.clone()));
        }
    }
    let doc = Doc {
        source_name,
        parameters: declared,
        mappings: section(&mut template, "Mappings"),
        conditions: section(&mut template, "Conditions"),
        resources,
    };
    Ok(Resolver::new(&doc).read())
}

/// YAML (with CloudFormation's short-form tags) or JSON, as JSON with the long forms.
fn parse(text: &str) -> Result<Value, String> {
    // JSON templates may be indented with tabs, which YAML refuses: read as JSON first, and
    // the JSON error is the one to report.
    let json = if text.trim_start().starts_with('{') {
        match serde_json::from_str(text) {
            Ok(value) => return Ok(value),
            Err(e) => Some(format!("not JSON: {e}")),
        }
    } else {
        None
    };
    let yaml = || {
        // Deep flow nesting takes the YAML parser quadratic time: refused before parsing.
        trellis_proxy::snapshot::check_nesting(text)?;
        serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text).map_err(|e| e.to_string())
    };
    match yaml() {
        Ok(yaml) => Ok(long_form(yaml)),
        Err(e) => Err(json.unwrap_or(e)),
    }
}

/// A YAML value as JSON, short-form tags in their long form: `!Ref X` → `{"Ref": "X"}`,
/// `!GetAtt A.B` → `{"Fn::GetAtt": "A.B"}`, `!Condition C` → `{"Condition": "C"}`, `!Sub ...`
/// → `{"Fn::Sub": ...}` (every other tag `!F` is `Fn::F`).
fn long_form(yaml: serde_yaml_ng::Value) -> Value {
    use serde_yaml_ng::Value as Yaml;
    match yaml {
        Yaml::Null => Value::Null,
        Yaml::Bool(b) => Value::Bool(b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map_or_else(|| Value::String(n.to_string()), Value::Number)
            }
        }
        Yaml::String(s) => Value::String(s),
        Yaml::Sequence(items) => Value::Array(items.into_iter().map(long_form).collect()),
        Yaml::Mapping(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let key = match long_form(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, long_form(v))
                })
                .collect(),
        ),
        Yaml::Tagged(tagged) => {
            let tag = tagged.tag.to_string();
            let name = tag.trim_start_matches('!');
            let key = match name {
                "Ref" | "Condition" => name.to_string(),
                _ => format!("Fn::{name}"),
            };
            let mut map = Map::new();
            map.insert(key, long_form(tagged.value));
            Value::Object(map)
        }
    }
}

/// The template's sections.
struct Doc<'a> {
    source_name: &'a str,
    parameters: Map<String, Value>,
    mappings: Map<String, Value>,
    conditions: Map<String, Value>,
    resources: Map<String, Value>,
}

impl Doc<'_> {
    fn resource_type(&self, id: &str) -> Option<&str> {
        self.resources.get(id)?.get("Type")?.as_str()
    }

    fn properties(&self, id: &str) -> Option<&Value> {
        self.resources.get(id)?.get("Properties")
    }
}

fn appmesh_kind(resource_type: &str) -> Option<ApiKind> {
    let name = resource_type.strip_prefix("AWS::AppMesh::")?;
    ApiKind::ALL.into_iter().find(|k| k.as_str() == name)
}

/// The property naming a resource of `kind` (its `Ref`).
fn name_property(kind: ApiKind) -> &'static str {
    match kind {
        ApiKind::Mesh => "MeshName",
        ApiKind::VirtualService => "VirtualServiceName",
        ApiKind::VirtualRouter => "VirtualRouterName",
        ApiKind::Route => "RouteName",
        ApiKind::VirtualNode => "VirtualNodeName",
        ApiKind::VirtualGateway => "VirtualGatewayName",
        ApiKind::GatewayRoute => "GatewayRouteName",
    }
}

/// The property naming a Route's VirtualRouter, a GatewayRoute's VirtualGateway.
fn parent_property(kind: ApiKind) -> Option<&'static str> {
    match kind {
        ApiKind::Route => Some("VirtualRouterName"),
        ApiKind::GatewayRoute => Some("VirtualGatewayName"),
        _ => None,
    }
}

/// The segment of an App Mesh ARN naming a resource of `kind`.
fn arn_segment(kind: ApiKind) -> &'static str {
    match kind {
        ApiKind::Mesh => "mesh",
        ApiKind::VirtualService => "virtualService",
        ApiKind::VirtualRouter => "virtualRouter",
        ApiKind::Route => "route",
        ApiKind::VirtualNode => "virtualNode",
        ApiKind::VirtualGateway => "virtualGateway",
        ApiKind::GatewayRoute => "gatewayRoute",
    }
}

/// How many names (or conditions) naming others the reader follows: CloudFormation allows 500
/// resources, and a chain of them is followed by recursion.
const MAX_REFERENCE_DEPTH: usize = 32;
/// The deepest nesting of resolutions (functions, attributes, mappings, names) followed.
const MAX_RESOLUTION_DEPTH: usize = 128;

/// What a `Ref` of an App Mesh resource stands for where it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refs {
    /// In App Mesh resources, where the API expects names: the resource's name.
    Name,
    /// In ECS task definitions (`APPMESH_RESOURCE_ARN`): its ARN, as CloudFormation returns.
    Arn,
}

struct Resolver<'a> {
    doc: &'a Doc<'a>,
    refs: Refs,
    names: HashMap<String, Option<String>>,
    naming: HashSet<String>,
    conditions: HashMap<String, Option<bool>>,
    deciding: HashSet<String>,
    notes: Vec<Note>,
    /// Notes of placeholders in values, dropped again when the value holding one is left out.
    placeholders: Vec<Note>,
    /// How many resolutions are under way: functions whose arguments resolve through other
    /// functions, attributes and mappings. Bounded, so a cycle anywhere ends with a note.
    depth: usize,
}

impl<'a> Resolver<'a> {
    fn new(doc: &'a Doc<'a>) -> Self {
        Self {
            doc,
            refs: Refs::Name,
            names: HashMap::new(),
            naming: HashSet::new(),
            conditions: HashMap::new(),
            deciding: HashSet::new(),
            notes: Vec::new(),
            placeholders: Vec::new(),
            depth: 0,
        }
    }

    fn read(mut self) -> Read {
        let mut read = Read::default();
        let doc = self.doc;
        for (id, resource) in &doc.resources {
            let Some(resource_type) = resource.get("Type").and_then(Value::as_str) else {
                continue;
            };
            let kind = appmesh_kind(resource_type);
            if kind.is_none() && resource_type != "AWS::ECS::TaskDefinition" {
                continue;
            }
            let marks = (self.notes.len(), self.placeholders.len());
            let path = format!("Resources.{id}");
            if !self.created(resource, &path) {
                continue;
            }
            let source = format!("{}: {path}", doc.source_name);
            let properties = resource.get("Properties").unwrap_or(&Value::Null);
            match kind {
                Some(kind) => match self.appmesh(kind, id, properties, &source) {
                    Some(r) => read.resources.push(r),
                    None => {
                        self.placeholders.truncate(marks.1);
                        self.note(&path, format!("{kind} skipped: its name is not known"));
                    }
                },
                None => {
                    self.refs = Refs::Arn;
                    let task = self.resolve(properties, &format!("{path}.Properties"));
                    self.refs = Refs::Name;
                    match task {
                        Some(task) => read.tasks.push(EcsTask {
                            source,
                            task: ecs_keys(task),
                        }),
                        None => {
                            self.notes.truncate(marks.0);
                            self.placeholders.truncate(marks.1);
                        }
                    }
                }
            }
        }
        read.notes = self.notes;
        read.notes.extend(self.placeholders);
        read.notes.sort();
        read.notes.dedup();
        read
    }

    /// Whether the resource is created with the parameters' defaults (its `Condition`).
    fn created(&mut self, resource: &Value, path: &str) -> bool {
        let Some(condition) = resource.get("Condition").and_then(Value::as_str) else {
            return true;
        };
        let field = format!("{path}.Condition");
        match self.condition(condition, &field) {
            Some(true) => true,
            Some(false) => {
                self.note(
                    &field,
                    format!(
                        "condition {condition} is false with the parameters' defaults: the \
                         resource is not created, skipped"
                    ),
                );
                false
            }
            None => {
                self.note(
                    &field,
                    format!(
                        "created only when condition {condition} holds, which cannot be decided \
                         offline: imported as if it does"
                    ),
                );
                true
            }
        }
    }

    fn appmesh(
        &mut self,
        kind: ApiKind,
        id: &str,
        properties: &Value,
        source: &str,
    ) -> Option<ApiResource> {
        let path = format!("Resources.{id}.Properties");
        let name = self.name_of(id, kind)?;
        let mesh = match kind {
            ApiKind::Mesh => name.clone(),
            _ => self.text_property(properties, "MeshName", &path)?,
        };
        let parent = match parent_property(kind) {
            Some(key) => Some(self.text_property(properties, key, &path)?),
            None => None,
        };
        let spec = match properties.get("Spec") {
            Some(spec) => self
                .resolve(spec, &format!("{path}.Spec"))
                .map(|spec| super::api_types(camel_keys(spec)))
                .unwrap_or(Value::Null),
            None => Value::Null,
        };
        if properties.get("MeshOwner").is_some() {
            self.note(
                &format!("{path}.MeshOwner"),
                "the AWS account owning a shared mesh is AWS identity: not carried over".into(),
            );
        }
        if properties.get("Tags").is_some() {
            self.note(
                &format!("{path}.Tags"),
                "AWS resource tags are AWS metadata: not carried over".into(),
            );
        }
        if let Some(props) = properties.as_object() {
            let parent_key = parent_property(kind);
            for key in props.keys() {
                let known = key == "Spec"
                    || key == "MeshName"
                    || key == "MeshOwner"
                    || key == "Tags"
                    || key == name_property(kind)
                    || Some(key.as_str()) == parent_key;
                if !known {
                    self.note(
                        &format!("{path}.{key}"),
                        format!("not a property of AWS::AppMesh::{kind}: ignored"),
                    );
                }
            }
        }
        Some(ApiResource {
            kind,
            mesh,
            name,
            parent,
            spec,
            source: source.into(),
        })
    }

    /// A property that must resolve to a string (a name); noted when it does not.
    fn text_property(&mut self, properties: &Value, key: &str, path: &str) -> Option<String> {
        let field = format!("{path}.{key}");
        let Some(value) = properties.get(key) else {
            self.note(&field, "required and missing".into());
            return None;
        };
        let saved = std::mem::replace(&mut self.refs, Refs::Name);
        let value = self.resolve(value, &field);
        self.refs = saved;
        match value? {
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            _ => {
                self.note(&field, "expected a name (a string)".into());
                None
            }
        }
    }

    /// The App Mesh name of resource `id` (what its `Ref` stands for): its name property, or,
    /// when the template gives none, the logical id in place of the one CloudFormation generates.
    fn name_of(&mut self, id: &str, kind: ApiKind) -> Option<String> {
        if let Some(name) = self.names.get(id) {
            return name.clone();
        }
        let path = format!("Resources.{id}.Properties");
        let key = name_property(kind);
        if self.naming.len() >= MAX_REFERENCE_DEPTH {
            self.note(
                &format!("{path}.{key}"),
                format!("names refer to names more than {MAX_REFERENCE_DEPTH} deep"),
            );
            return None;
        }
        if !self.naming.insert(id.to_string()) {
            self.note(
                &format!("{path}.{key}"),
                "refers back to itself (a cycle of references)".into(),
            );
            return None;
        }
        let properties = self.doc.properties(id).unwrap_or(&Value::Null);
        let name = if properties.get(key).is_some() || kind == ApiKind::VirtualService {
            self.text_property(properties, key, &path)
        } else {
            self.note(
                &format!("{path}.{key}"),
                format!(
                    "not set: CloudFormation generates a name at deployment; the logical id \
                     {id} is used"
                ),
            );
            Some(id.to_string())
        };
        self.naming.remove(id);
        self.names.insert(id.to_string(), name.clone());
        name
    }

    fn note(&mut self, path: &str, reason: String) {
        let note = self.located(path, reason);
        self.notes.push(note);
    }

    fn placeholder(&mut self, path: &str, pseudo: &str, placeholder: &str) {
        let reason = format!("{pseudo} has no value offline: placeholder \"{placeholder}\" used");
        let note = self.located(path, reason);
        self.placeholders.push(note);
    }

    /// A note on the field at `path` (`Resources.Id.Properties.Spec...`): its source is the
    /// resource (`FILE: Resources.Id`, as [`ApiResource::source`]), its field the rest
    /// (`Properties.Spec...`).
    fn located(&self, path: &str, reason: String) -> Note {
        let mut parts = path.splitn(3, '.');
        let section = [parts.next(), parts.next()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(".");
        Note {
            source: format!("{}: {section}", self.doc.source_name),
            field: parts.next().unwrap_or_default().into(),
            reason,
        }
    }

    /// `value` with its intrinsic functions resolved; None when it is left out (noted, unless
    /// it is `AWS::NoValue`). Placeholders noted inside a value left out are forgotten.
    fn resolve(&mut self, value: &Value, path: &str) -> Option<Value> {
        if self.depth >= MAX_RESOLUTION_DEPTH {
            self.note(
                path,
                format!(
                    "resolving it takes more than {MAX_RESOLUTION_DEPTH} nested steps (a cycle of references?): left out"
                ),
            );
            return None;
        }
        self.depth += 1;
        let mark = self.placeholders.len();
        let resolved = self.resolve_inner(value, path);
        self.depth -= 1;
        if resolved.is_none() {
            self.placeholders.truncate(mark);
        }
        resolved
    }

    fn resolve_inner(&mut self, value: &Value, path: &str) -> Option<Value> {
        match value {
            Value::Object(map) => {
                if map.len() == 1
                    && let Some((key, arg)) = map.iter().next()
                    && (key == "Ref" || key.starts_with("Fn::"))
                {
                    return self.intrinsic(key, arg, path);
                }
                let mut out = Map::new();
                for (key, item) in map {
                    if let Some(item) = self.resolve(item, &format!("{path}.{key}")) {
                        out.insert(key.clone(), item);
                    }
                }
                Some(Value::Object(out))
            }
            Value::Array(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    if let Some(item) = self.resolve(item, &format!("{path}[{i}]")) {
                        out.push(item);
                    }
                }
                Some(Value::Array(out))
            }
            scalar => Some(scalar.clone()),
        }
    }

    fn intrinsic(&mut self, function: &str, arg: &Value, path: &str) -> Option<Value> {
        match function {
            "Ref" => match arg.as_str() {
                Some(name) => self.reference(name, path),
                None => self.unresolved(path, "Ref: expected a name".into()),
            },
            "Fn::GetAtt" => {
                let (id, attribute) = match arg {
                    Value::String(s) => match s.split_once('.') {
                        Some((id, attr)) => (id.to_string(), attr.to_string()),
                        None => {
                            return self.unresolved(path, format!("Fn::GetAtt {s}: no attribute"));
                        }
                    },
                    Value::Array(items) if let [id, attribute] = items.as_slice() => {
                        let id = id.as_str().unwrap_or_default().to_string();
                        let attribute = self.text(attribute, path)?;
                        (id, attribute)
                    }
                    _ => {
                        return self
                            .unresolved(path, "Fn::GetAtt: expected [resource, attribute]".into());
                    }
                };
                self.attribute(&id, &attribute, path)
            }
            "Fn::Sub" => self.sub(arg, path),
            "Fn::Join" => {
                let Some([separator, items]) = arg.as_array().map(Vec::as_slice) else {
                    return self.unresolved(path, "Fn::Join: expected [separator, list]".into());
                };
                let separator = self.text(separator, path)?;
                let items = self.list(items, path)?;
                let mut parts = Vec::new();
                for item in &items {
                    parts.push(self.text(item, path)?);
                }
                Some(Value::String(parts.join(&separator)))
            }
            "Fn::Select" => {
                let Some([index, items]) = arg.as_array().map(Vec::as_slice) else {
                    return self.unresolved(path, "Fn::Select: expected [index, list]".into());
                };
                let index = self.text(index, path)?;
                let items = self.list(items, path)?;
                match index.parse::<usize>().ok().and_then(|i| items.get(i)) {
                    Some(item) => Some(item.clone()),
                    None => self.unresolved(
                        path,
                        format!(
                            "Fn::Select: index {index} is not in a list of {}",
                            items.len()
                        ),
                    ),
                }
            }
            "Fn::Split" => {
                let Some([separator, text]) = arg.as_array().map(Vec::as_slice) else {
                    return self.unresolved(path, "Fn::Split: expected [separator, string]".into());
                };
                let separator = self.text(separator, path)?;
                let text = self.text(text, path)?;
                Some(Value::Array(
                    text.split(separator.as_str())
                        .map(|s| Value::String(s.into()))
                        .collect(),
                ))
            }
            "Fn::FindInMap" => {
                let Some([map, top, second]) = arg.as_array().map(Vec::as_slice) else {
                    return self.unresolved(
                        path,
                        "Fn::FindInMap: expected [map, top-level key, second-level key]".into(),
                    );
                };
                let keys = [
                    self.text(map, path)?,
                    self.text(top, path)?,
                    self.text(second, path)?,
                ];
                let doc = self.doc;
                let found = doc
                    .mappings
                    .get(&keys[0])
                    .and_then(|m| m.get(&keys[1]))
                    .and_then(|m| m.get(&keys[2]));
                match found {
                    Some(value) => self.resolve(value, path),
                    None => self.unresolved(
                        path,
                        format!(
                            "Fn::FindInMap: no {}.{}.{} in Mappings",
                            keys[0], keys[1], keys[2]
                        ),
                    ),
                }
            }
            "Fn::If" => {
                let Some([condition, then, otherwise]) = arg.as_array().map(Vec::as_slice) else {
                    return self.unresolved(
                        path,
                        "Fn::If: expected [condition, value if true, value if false]".into(),
                    );
                };
                let name = condition.as_str().unwrap_or_default();
                match self.condition(name, path) {
                    Some(true) => self.resolve(then, path),
                    Some(false) => self.resolve(otherwise, path),
                    None => self.unresolved(
                        path,
                        format!("Fn::If on condition {name} cannot be decided offline"),
                    ),
                }
            }
            other => self.unresolved(path, format!("{other} cannot be resolved offline")),
        }
    }

    fn unresolved(&mut self, path: &str, reason: String) -> Option<Value> {
        self.note(path, format!("{reason}: left out"));
        None
    }

    /// A value that must resolve to text (a `Fn::Sub` variable, a `Fn::Join` item).
    fn text(&mut self, value: &Value, path: &str) -> Option<String> {
        match self.resolve(value, path)? {
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => self.unresolved(path, "expected a string".into()).and(None),
        }
    }

    /// A list an intrinsic function works on: left out whole when an item is.
    fn list(&mut self, value: &Value, path: &str) -> Option<Vec<Value>> {
        if let Value::Array(items) = value {
            let mut out = Vec::new();
            for item in items {
                if item.get("Ref").and_then(Value::as_str) == Some("AWS::NoValue") {
                    continue;
                }
                out.push(self.resolve(item, path)?);
            }
            return Some(out);
        }
        match self.resolve(value, path)? {
            Value::Array(items) => Some(items),
            _ => self.unresolved(path, "expected a list".into()).and(None),
        }
    }

    /// `Ref` of a parameter, a pseudo parameter or a resource.
    fn reference(&mut self, name: &str, path: &str) -> Option<Value> {
        let text = |s: &str| Some(Value::String(s.into()));
        match name {
            "AWS::NoValue" => return None,
            "AWS::Region" => {
                self.placeholder(path, name, REGION_PLACEHOLDER);
                return text(REGION_PLACEHOLDER);
            }
            "AWS::AccountId" => {
                self.placeholder(path, name, ACCOUNT_PLACEHOLDER);
                return text(ACCOUNT_PLACEHOLDER);
            }
            "AWS::StackName" => {
                self.placeholder(path, name, STACK_NAME_PLACEHOLDER);
                return text(STACK_NAME_PLACEHOLDER);
            }
            // The commercial partition's; China and GovCloud have their own.
            "AWS::Partition" => return text("aws"),
            "AWS::URLSuffix" => return text("amazonaws.com"),
            _ if name.starts_with("AWS::") => {
                return self.unresolved(path, format!("Ref {name} cannot be resolved offline"));
            }
            _ => {}
        }
        let doc = self.doc;
        if let Some(parameter) = doc.parameters.get(name) {
            let Some(default) = parameter.get("Default") else {
                return self.unresolved(path, format!("unresolved parameter {name} (no Default; give it with --parameter {name}=VALUE)"));
            };
            let list = parameter
                .get("Type")
                .and_then(Value::as_str)
                .is_some_and(|t| t == "CommaDelimitedList" || t.starts_with("List<"));
            return match default {
                Value::String(s) if list => Some(Value::Array(
                    s.split(',')
                        .map(|item| Value::String(item.trim().into()))
                        .collect(),
                )),
                other => Some(other.clone()),
            };
        }
        let Some(resource_type) = doc.resource_type(name) else {
            return self.unresolved(
                path,
                format!("Ref {name}: no such parameter or resource in the template"),
            );
        };
        match appmesh_kind(resource_type) {
            Some(kind) if self.refs == Refs::Name => self.name_of(name, kind).map(Value::String),
            Some(kind) => self.arn(name, kind, path).map(Value::String),
            None => self.unresolved(
                path,
                format!(
                    "Ref {name} ({resource_type}) is known only once deployed, it cannot be \
                     resolved offline"
                ),
            ),
        }
    }

    /// `Fn::GetAtt` of `id`'s `attribute`.
    fn attribute(&mut self, id: &str, attribute: &str, path: &str) -> Option<Value> {
        let doc = self.doc;
        let Some(resource_type) = doc.resource_type(id) else {
            return self.unresolved(
                path,
                format!("Fn::GetAtt {id}.{attribute}: no such resource in the template"),
            );
        };
        let properties = doc.properties(id).unwrap_or(&Value::Null);
        let property_path = format!("Resources.{id}.Properties");
        if let Some(kind) = appmesh_kind(resource_type) {
            if attribute == name_property(kind) {
                return self.name_of(id, kind).map(Value::String);
            }
            if attribute == "MeshName" {
                return self
                    .text_property(properties, "MeshName", &property_path)
                    .map(Value::String);
            }
            if Some(attribute) == parent_property(kind) {
                return self
                    .text_property(properties, attribute, &property_path)
                    .map(Value::String);
            }
            if attribute == "Arn" {
                return self.arn(id, kind, path).map(Value::String);
            }
        }
        // Cloud Map namespaces and services are named by their `Name` property.
        if attribute == "Name" && resource_type.starts_with("AWS::ServiceDiscovery::") {
            return self
                .text_property(properties, "Name", &property_path)
                .map(Value::String);
        }
        self.unresolved(
            path,
            format!(
                "Fn::GetAtt {id}.{attribute} ({resource_type}) is known only once deployed, it \
                 cannot be resolved offline"
            ),
        )
    }

    /// The ARN of App Mesh resource `id`, its region and account placeholders.
    fn arn(&mut self, id: &str, kind: ApiKind, path: &str) -> Option<String> {
        let doc = self.doc;
        let properties = doc.properties(id).unwrap_or(&Value::Null);
        let property_path = format!("Resources.{id}.Properties");
        let name = self.name_of(id, kind)?;
        let mut resource = String::new();
        if kind != ApiKind::Mesh {
            let mesh = self.text_property(properties, "MeshName", &property_path)?;
            resource = format!("mesh/{mesh}/");
        }
        if let Some(key) = parent_property(kind) {
            let parent = self.text_property(properties, key, &property_path)?;
            let segment = match kind {
                ApiKind::Route => "virtualRouter",
                _ => "virtualGateway",
            };
            resource.push_str(&format!("{segment}/{parent}/"));
        }
        resource.push_str(&format!("{}/{name}", arn_segment(kind)));
        self.placeholder(path, "AWS::Region", REGION_PLACEHOLDER);
        self.placeholder(path, "AWS::AccountId", ACCOUNT_PLACEHOLDER);
        Some(format!(
            "arn:aws:appmesh:{REGION_PLACEHOLDER}:{ACCOUNT_PLACEHOLDER}:{resource}"
        ))
    }

    /// `Fn::Sub`: `"text ${Param} ${Res.Attr} ${AWS::Region} ${!Literal}"`, or that string and
    /// a map of its own variables.
    fn sub(&mut self, arg: &Value, path: &str) -> Option<Value> {
        let (template, variables) = match arg {
            Value::String(s) => (s.as_str(), None),
            Value::Array(items) => match items.as_slice() {
                [Value::String(s), Value::Object(vars)] => (s.as_str(), Some(vars)),
                _ => {
                    return self.unresolved(
                        path,
                        "Fn::Sub: expected a string, or [string, variables]".into(),
                    );
                }
            },
            _ => {
                return self.unresolved(
                    path,
                    "Fn::Sub: expected a string, or [string, variables]".into(),
                );
            }
        };
        let mut out = String::new();
        let mut rest = template;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[start..]);
                rest = "";
                break;
            };
            let variable = &after[..end];
            rest = &after[end + 1..];
            if let Some(literal) = variable.strip_prefix('!') {
                out.push_str(&format!("${{{literal}}}"));
                continue;
            }
            let value = match variables.and_then(|vars| vars.get(variable)) {
                Some(value) => self.text(value, path)?,
                None => {
                    let value = match variable.split_once('.') {
                        Some((id, attribute)) if !variable.starts_with("AWS::") => {
                            self.attribute(id, attribute, path)?
                        }
                        _ => self.reference(variable, path)?,
                    };
                    match value {
                        Value::String(s) => s,
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        _ => {
                            return self.unresolved(
                                path,
                                format!("Fn::Sub: ${{{variable}}} is not a string"),
                            );
                        }
                    }
                }
            };
            out.push_str(&value);
        }
        out.push_str(rest);
        Some(Value::String(out))
    }

    /// Condition `name` with the parameters' defaults; None when it cannot be decided offline.
    fn condition(&mut self, name: &str, path: &str) -> Option<bool> {
        if let Some(decided) = self.conditions.get(name) {
            return *decided;
        }
        let doc = self.doc;
        let Some(definition) = doc.conditions.get(name) else {
            self.note(path, format!("no condition {name} in Conditions"));
            return None;
        };
        // A cycle, or a chain too long to follow, decides nothing.
        if self.deciding.len() >= MAX_REFERENCE_DEPTH || !self.deciding.insert(name.to_string()) {
            return None;
        }
        let decided = self.decide(definition, &format!("Conditions.{name}"));
        self.deciding.remove(name);
        self.conditions.insert(name.to_string(), decided);
        decided
    }

    fn decide(&mut self, definition: &Value, path: &str) -> Option<bool> {
        let (function, arg) = definition.as_object()?.iter().next()?;
        let args = arg.as_array().map(Vec::as_slice).unwrap_or_default();
        match function.as_str() {
            "Condition" => self.condition(arg.as_str()?, path),
            "Fn::Not" => self.decide(args.first()?, path).map(|b| !b),
            "Fn::And" | "Fn::Or" => {
                let and = function == "Fn::And";
                let mut undecided = false;
                for item in args {
                    match self.decide(item, path) {
                        Some(b) if b != and => return Some(b),
                        Some(_) => {}
                        None => undecided = true,
                    }
                }
                (!undecided).then_some(and)
            }
            "Fn::Equals" => {
                let [a, b] = args else { return None };
                // A placeholder (the region, the account) decides nothing.
                let mark = self.placeholders.len();
                let a = self.resolve(a, path);
                let b = self.resolve(b, path);
                let placeholder = self.placeholders.len() > mark;
                self.placeholders.truncate(mark);
                if placeholder {
                    return None;
                }
                let text = |v: Value| match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                Some(text(a?) == text(b?))
            }
            _ => None,
        }
    }
}

/// Keys of ECS task definitions whose values are free-form maps, their keys kept as written.
const ECS_FREE_MAPS: &[&str] = &["DockerLabels", "Options", "DriverOpts", "Labels"];

/// Lists of `{Name, Value}` pairs whose values the ECS API takes as strings (CloudFormation
/// takes `Value: 8080` or a `!Ref` of a `Number` parameter there too).
const ECS_STRING_LISTS: &[&str] = &["Environment", "ProxyConfigurationProperties"];

/// An `AWS::ECS::TaskDefinition`'s properties in the ECS API's shape: keys lowered, but not
/// those of free-form maps, and `ProxyConfiguration.ProxyConfigurationProperties` is the API's
/// `proxyConfiguration.properties`.
fn ecs_keys(value: Value) -> Value {
    fn walk(value: Value, parent: &str) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(key, item)| {
                        let item = if ECS_FREE_MAPS.contains(&key.as_str()) {
                            item
                        } else if key == "Value" && ECS_STRING_LISTS.contains(&parent) {
                            match item {
                                Value::Number(n) => Value::String(n.to_string()),
                                Value::Bool(b) => Value::String(b.to_string()),
                                other => other,
                            }
                        } else {
                            walk(item, &key)
                        };
                        let key = if parent == "ProxyConfiguration"
                            && key == "ProxyConfigurationProperties"
                        {
                            "properties".to_string()
                        } else {
                            lower(&key)
                        };
                        (key, item)
                    })
                    .collect(),
            ),
            Value::Array(items) => {
                Value::Array(items.into_iter().map(|item| walk(item, parent)).collect())
            }
            other => other,
        }
    }
    walk(value, "")
}

/// One key as [`camel_keys`] lowers it.
fn lower(key: &str) -> String {
    let mut one = Map::new();
    one.insert(key.into(), Value::Null);
    match camel_keys(Value::Object(one)) {
        Value::Object(map) => map.into_iter().next().map_or_else(String::new, |(k, _)| k),
        _ => key.into(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const COLORAPP: &str = include_str!("../../tests/import/colorapp.cfn.yaml");
    const SHOP: &str = include_str!("../../tests/import/shop.cfn.json");

    fn resource<'r>(read: &'r Read, kind: ApiKind, name: &str) -> &'r ApiResource {
        read.resources
            .iter()
            .find(|r| r.kind == kind && r.name == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in {:#?}", read.resources))
    }

    /// The value at `pointer` (`/listeners/0/portMapping`) of `spec`.
    fn at<'v>(spec: &'v Value, pointer: &str) -> &'v Value {
        spec.pointer(pointer)
            .unwrap_or_else(|| panic!("no {pointer} in {spec:#}"))
    }

    fn note(source: &str, field: &str, reason: &str) -> Note {
        Note {
            source: source.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A one-resource template around `resources` (indented YAML), with `parameters`.
    fn template(parameters: &str, resources: &str) -> Read {
        let text = format!("Parameters:\n{parameters}\nResources:\n{resources}");
        read(&text, "t.yaml").unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn colorapp_reads_every_kind_with_its_mesh_and_parent() {
        let read = read(COLORAPP, "colorapp.cfn.yaml").unwrap();
        let mut found: Vec<_> = read
            .resources
            .iter()
            .map(|r| {
                (
                    r.kind,
                    r.mesh.as_str(),
                    r.name.as_str(),
                    r.parent.as_deref(),
                    r.source.as_str(),
                )
            })
            .collect();
        found.sort();
        let source = |id: &str| format!("colorapp.cfn.yaml: Resources.{id}");
        let expected = [
            (ApiKind::Mesh, "colorapp", None, "Mesh"),
            (
                ApiKind::VirtualService,
                "colorteller.colorapp.local",
                None,
                "ColorTellerService",
            ),
            (
                ApiKind::VirtualService,
                "front.colorapp.local",
                None,
                "FrontService",
            ),
            (
                ApiKind::VirtualRouter,
                "colorteller-router",
                None,
                "ColorTellerRouter",
            ),
            (
                ApiKind::Route,
                "color-grpc",
                Some("colorteller-router"),
                "ColorGrpcRoute",
            ),
            (
                ApiKind::Route,
                "color-http",
                Some("colorteller-router"),
                "ColorHttpRoute",
            ),
            (ApiKind::VirtualNode, "colorteller-blue", None, "BlueNode"),
            (ApiKind::VirtualNode, "colorteller-red", None, "RedNode"),
            (ApiKind::VirtualNode, "front", None, "FrontNode"),
            (ApiKind::VirtualGateway, "ingress", None, "Gateway"),
            (
                ApiKind::GatewayRoute,
                "front-route",
                Some("ingress"),
                "FrontGatewayRoute",
            ),
        ];
        let sources: Vec<String> = expected.iter().map(|e| source(e.3)).collect();
        let expected: Vec<_> = expected
            .iter()
            .zip(&sources)
            .map(|((kind, name, parent, _), source)| {
                (*kind, "colorapp", *name, *parent, source.as_str())
            })
            .collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn colorapp_specs_are_in_the_api_shape() {
        let read = read(COLORAPP, "colorapp.cfn.yaml").unwrap();
        let mesh = &resource(&read, ApiKind::Mesh, "colorapp").spec;
        assert_eq!(
            mesh,
            &json!({
                "egressFilter": { "type": "DROP_ALL" },
                "serviceDiscovery": { "ipPreference": "IPv4_PREFERRED" },
            })
        );

        let front = &resource(&read, ApiKind::VirtualNode, "front").spec;
        // `Port: !Ref FrontPort`, a Number parameter.
        assert_eq!(
            at(front, "/listeners/0/portMapping"),
            &json!({ "port": 8080, "protocol": "http" })
        );
        assert_eq!(at(front, "/listeners/0/healthCheck/path"), "/ping");
        assert_eq!(at(front, "/listeners/0/healthCheck/unhealthyThreshold"), 3);
        assert_eq!(
            at(front, "/listeners/0/timeout/http/perRequest"),
            &json!({ "unit": "s", "value": 15 })
        );
        assert_eq!(at(front, "/listeners/0/timeout/http/idle/value"), 300);
        assert_eq!(
            at(front, "/listeners/0/connectionPool/http"),
            &json!({ "maxConnections": 100, "maxPendingRequests": 50 })
        );
        assert_eq!(
            at(front, "/listeners/0/outlierDetection"),
            &json!({
                "maxServerErrors": 5,
                "interval": { "unit": "s", "value": 10 },
                "baseEjectionDuration": { "unit": "s", "value": 30 },
                "maxEjectionPercent": 50,
            })
        );
        assert_eq!(
            at(front, "/serviceDiscovery/dns"),
            &json!({ "hostname": "front.colorapp.local", "responseType": "LOADBALANCER" })
        );
        assert_eq!(
            at(front, "/backends/0/virtualService/virtualServiceName"),
            "colorteller.colorapp.local"
        );
        // `Ports: [!Ref ColorTellerPort]`, whose Default is the string "9080".
        assert_eq!(
            at(front, "/backendDefaults/clientPolicy/tls"),
            &json!({
                "enforce": true,
                "ports": [9080],
                "validation": { "trust": { "acm": { "certificateAuthorityArns": ["arn:aws:acm-pca:us-west-2:111122223333:certificate-authority/colorapp"] } } },
            })
        );
        assert_eq!(
            at(front, "/logging/accessLog/file/format/json/1"),
            &json!({ "key": "status", "value": "%RESPONSE_CODE%" })
        );

        let blue = &resource(&read, ApiKind::VirtualNode, "colorteller-blue").spec;
        assert_eq!(
            at(blue, "/serviceDiscovery/awsCloudMap"),
            &json!({
                "namespaceName": "colorapp.local",
                "serviceName": "colorteller",
                "attributes": [{ "key": "color", "value": "blue" }],
            })
        );
        assert_eq!(
            at(blue, "/serviceDiscovery/awsCloudMap/attributes/0/key"),
            "color"
        );
        assert_eq!(at(blue, "/listeners/0/portMapping/port"), 9080);
        assert_eq!(
            at(blue, "/listeners/0/tls"),
            &json!({
                "mode": "STRICT",
                "certificate": {
                    "acm": { "certificateArn": "arn:aws:acm:us-west-2:111122223333:certificate/blue" },
                },
            })
        );
        let red = &resource(&read, ApiKind::VirtualNode, "colorteller-red").spec;
        assert_eq!(at(red, "/listeners/1/connectionPool/grpc/maxRequests"), 200);
        assert_eq!(at(red, "/listeners/1/healthCheck/protocol"), "grpc");

        let router = &resource(&read, ApiKind::VirtualRouter, "colorteller-router").spec;
        assert_eq!(
            router,
            &json!({ "listeners": [
                { "portMapping": { "port": 9080, "protocol": "http" } },
                { "portMapping": { "port": 9090, "protocol": "grpc" } },
            ]})
        );
        let http = &resource(&read, ApiKind::Route, "color-http").spec;
        assert_eq!(at(http, "/priority"), 10);
        assert_eq!(
            at(http, "/httpRoute/action/weightedTargets"),
            &json!([
                { "virtualNode": "colorteller-blue", "weight": 3, "port": 9080 },
                { "virtualNode": "colorteller-red", "weight": 1, "port": 9080 },
            ])
        );
        assert_eq!(
            at(http, "/httpRoute/action/weightedTargets/0/virtualNode"),
            "colorteller-blue"
        );
        assert_eq!(
            at(http, "/httpRoute/match"),
            &json!({
                "prefix": "/",
                "port": 9080,
                "headers": [{ "name": "x-color-debug", "invert": false, "match": { "exact": "on" } }],
            })
        );
        assert_eq!(
            at(http, "/httpRoute/retryPolicy"),
            &json!({
                "maxRetries": 3,
                "perRetryTimeout": { "unit": "ms", "value": 2000 },
                "httpRetryEvents": ["server-error", "gateway-error"],
                "tcpRetryEvents": ["connection-error"],
            })
        );
        assert_eq!(
            at(http, "/httpRoute/retryPolicy/perRetryTimeout/unit"),
            "ms"
        );
        assert_eq!(
            at(http, "/httpRoute/timeout/perRequest"),
            &json!({ "unit": "s", "value": 10 })
        );
        let grpc = &resource(&read, ApiKind::Route, "color-grpc").spec;
        assert_eq!(
            at(grpc, "/grpcRoute/match"),
            &json!({
                "serviceName": "color.ColorTeller",
                "methodName": "GetColor",
                "port": 9090,
                "metadata": [{ "name": "x-canary", "match": { "prefix": "1" } }],
            })
        );
        // `VirtualNode: !Ref RedNode`: the node's name where the API expects one.
        assert_eq!(
            at(grpc, "/grpcRoute/action/weightedTargets/0"),
            &json!({ "virtualNode": "colorteller-red", "weight": 1, "port": 9090 })
        );
        assert_eq!(
            at(grpc, "/grpcRoute/retryPolicy/grpcRetryEvents"),
            &json!(["unavailable", "resource-exhausted"])
        );

        let colorteller = &resource(&read, ApiKind::VirtualService, "colorteller.colorapp.local");
        assert_eq!(
            colorteller.spec,
            json!({ "provider": { "virtualRouter": { "virtualRouterName": "colorteller-router" } } })
        );
        let front_service = &resource(&read, ApiKind::VirtualService, "front.colorapp.local");
        assert_eq!(
            front_service.spec,
            json!({ "provider": { "virtualNode": { "virtualNodeName": "front" } } })
        );
        let gateway = &resource(&read, ApiKind::VirtualGateway, "ingress").spec;
        assert_eq!(
            at(gateway, "/listeners/0"),
            &json!({
                "portMapping": { "port": 8088, "protocol": "http" },
                "healthCheck": {
                    "protocol": "http", "path": "/health", "healthyThreshold": 2,
                    "unhealthyThreshold": 2, "timeoutMillis": 2000, "intervalMillis": 5000,
                },
            })
        );
        let gateway_route = &resource(&read, ApiKind::GatewayRoute, "front-route").spec;
        assert_eq!(
            gateway_route,
            &json!({ "httpRoute": {
                "match": { "prefix": "/color/" },
                "action": {
                    "target": { "virtualService": { "virtualServiceName": "front.colorapp.local" } },
                    "rewrite": { "prefix": { "defaultPrefix": "DISABLED", "value": "/" } },
                },
            }})
        );
    }

    #[test]
    fn colorapp_task_definition_is_in_the_ecs_api_shape() {
        let read = read(COLORAPP, "colorapp.cfn.yaml").unwrap();
        let [task] = read.tasks.as_slice() else {
            panic!("one task expected: {:#?}", read.tasks)
        };
        assert_eq!(
            task.source,
            "colorapp.cfn.yaml: Resources.FrontTaskDefinition"
        );
        let envoy = at(&task.task, "/containerDefinitions/1");
        assert_eq!(at(envoy, "/name"), "envoy");
        assert_eq!(at(envoy, "/user"), "1337");
        assert_eq!(
            at(envoy, "/image"),
            "840364872350.dkr.ecr.us-west-2.amazonaws.com/aws-appmesh-envoy:v1.29.4.0-prod"
        );
        assert_eq!(
            at(envoy, "/environment/0"),
            &json!({
                "name": "APPMESH_RESOURCE_ARN",
                "value": "arn:aws:appmesh:aws-region:aws-account-id:mesh/colorapp/virtualNode/front",
            })
        );
        let ports: Vec<&Value> = at(envoy, "/portMappings")
            .as_array()
            .unwrap()
            .iter()
            .map(|p| at(p, "/containerPort"))
            .collect();
        assert_eq!(ports, [9901, 15000, 15001]);
        // A free-form map keeps its keys as written.
        assert_eq!(
            at(envoy, "/dockerLabels"),
            &json!({ "Com.Example.Team": "colors" })
        );
        let app = at(&task.task, "/containerDefinitions/0");
        // ECS takes environment values as strings, `!Ref FrontPort` a number.
        assert_eq!(
            at(app, "/environment"),
            &json!([
                { "name": "COLOR_TELLER_ENDPOINT", "value": "colorteller.colorapp.local:9080" },
                { "name": "PORT", "value": "8080" },
            ])
        );
        assert_eq!(
            at(app, "/logConfiguration"),
            &json!({
                "logDriver": "awslogs",
                "options": { "awslogs-region": "aws-region", "awslogs-stream-prefix": "front" },
            })
        );
        assert_eq!(at(app, "/dependsOn/0/condition"), "HEALTHY");
        // CloudFormation's `ProxyConfigurationProperties` is the API's `properties`.
        assert_eq!(at(&task.task, "/proxyConfiguration/type"), "APPMESH");
        assert_eq!(
            at(&task.task, "/proxyConfiguration/properties/0"),
            &json!({ "name": "IgnoredUID", "value": "1337" })
        );
        assert_eq!(
            at(&task.task, "/proxyConfiguration/properties/3"),
            &json!({ "name": "AppPorts", "value": "8080" })
        );
        assert_eq!(
            at(&task.task, "/requiresCompatibilities"),
            &json!(["FARGATE"])
        );
    }

    #[test]
    fn colorapp_notes_what_it_does_not_carry_over() {
        let read = read(COLORAPP, "colorapp.cfn.yaml").unwrap();
        let task = "colorapp.cfn.yaml: Resources.FrontTaskDefinition";
        assert_eq!(
            read.notes,
            [
                note(
                    task,
                    "Properties.ContainerDefinitions[0].LogConfiguration.Options.awslogs-group",
                    "Ref LogGroup (AWS::Logs::LogGroup) is known only once deployed, it cannot \
                     be resolved offline: left out",
                ),
                note(
                    task,
                    "Properties.ContainerDefinitions[0].LogConfiguration.Options.awslogs-region",
                    "AWS::Region has no value offline: placeholder \"aws-region\" used",
                ),
                note(
                    task,
                    "Properties.ContainerDefinitions[1].Environment[0].Value",
                    "AWS::AccountId has no value offline: placeholder \"aws-account-id\" used",
                ),
                note(
                    task,
                    "Properties.ContainerDefinitions[1].Environment[0].Value",
                    "AWS::Region has no value offline: placeholder \"aws-region\" used",
                ),
                note(
                    "colorapp.cfn.yaml: Resources.Mesh",
                    "Properties.Tags",
                    "AWS resource tags are AWS metadata: not carried over",
                ),
            ]
        );
        assert_eq!(
            read.notes[0].to_string(),
            "colorapp.cfn.yaml: Resources.FrontTaskDefinition: \
             Properties.ContainerDefinitions[0].LogConfiguration.Options.awslogs-group: Ref \
             LogGroup (AWS::Logs::LogGroup) is known only once deployed, it cannot be resolved \
             offline: left out"
        );
    }

    #[test]
    fn json_template_resolves_what_it_can_and_notes_the_rest() {
        let read = read(SHOP, "shop.cfn.json").unwrap();
        let source = |id: &str| format!("shop.cfn.json: Resources.{id}");
        let names: Vec<_> = read
            .resources
            .iter()
            .map(|r| (r.kind, r.name.as_str(), r.parent.as_deref()))
            .collect();
        // The VirtualService named by a parameter without a default is skipped, the one of a
        // condition false with the defaults is not created; AWS::SNS::Topic is not App Mesh's.
        assert_eq!(
            names,
            [
                (ApiKind::VirtualNode, "CartNode", None),
                (ApiKind::Route, "CartRoute", Some("shop-router")),
                (ApiKind::Mesh, "shop", None),
                (ApiKind::VirtualRouter, "shop-router", None),
            ]
        );
        assert!(read.resources.iter().all(|r| r.mesh == "shop"));
        let node = &resource(&read, ApiKind::VirtualNode, "CartNode").spec;
        // Fn::Select of a CommaDelimitedList parameter, "8080" as the API's integer.
        assert_eq!(
            at(node, "/listeners/0/portMapping"),
            &json!({ "port": 8080, "protocol": "http" })
        );
        assert_eq!(at(node, "/serviceDiscovery/dns"), &json!({}));
        assert_eq!(
            at(node, "/backends"),
            &json!([
                { "virtualService": {} },
                { "virtualService": { "virtualServiceName": "catalog.shop.internal" } },
            ])
        );
        assert_eq!(
            at(node, "/backendDefaults/clientPolicy/tls"),
            &json!({ "validation": { "trust": { "file": { "certificateChain": "/certs/ca.pem" } } } })
        );
        let route = &resource(&read, ApiKind::Route, "CartRoute").spec;
        // Fn::If on a condition of defaults (Stage = dev), Fn::FindInMap, a Ref of a VirtualNode.
        assert_eq!(
            route,
            &json!({ "httpRoute": {
                "match": { "prefix": "/cart-dev" },
                "action": { "weightedTargets": [{ "virtualNode": "CartNode", "weight": 1 }] },
                "retryPolicy": {
                    "maxRetries": 1,
                    "perRetryTimeout": { "unit": "s", "value": 2 },
                    "httpRetryEvents": ["server-error"],
                },
            }})
        );
        assert_eq!(resource(&read, ApiKind::Mesh, "shop").spec, Value::Null);
        let generated = |id: &str| {
            format!(
                "not set: CloudFormation generates a name at deployment; the logical id {id} is \
                 used"
            )
        };
        assert_eq!(
            read.notes,
            [
                note(
                    &source("CartNode"),
                    "Properties.MeshOwner",
                    "the AWS account owning a shared mesh is AWS identity: not carried over",
                ),
                note(
                    &source("CartNode"),
                    "Properties.Spec.BackendDefaults.ClientPolicy.TLS.Enforce",
                    "Fn::If on condition InUsEast1 cannot be decided offline: left out",
                ),
                note(
                    &source("CartNode"),
                    "Properties.Spec.Backends[0].VirtualService.VirtualServiceName",
                    "Fn::ImportValue cannot be resolved offline: left out",
                ),
                note(
                    &source("CartNode"),
                    "Properties.Spec.ServiceDiscovery.DNS.Hostname",
                    "unresolved parameter CartHost (no Default; give it with --parameter CartHost=VALUE): left out",
                ),
                note(
                    &source("CartNode"),
                    "Properties.VirtualNodeName",
                    &generated("CartNode"),
                ),
                note(
                    &source("CartRoute"),
                    "Properties.RouteName",
                    &generated("CartRoute"),
                ),
                note(
                    &source("CartService"),
                    "",
                    "VirtualService skipped: its name is not known",
                ),
                note(
                    &source("CartService"),
                    "Properties.VirtualServiceName",
                    "unresolved parameter CartHost (no Default; give it with --parameter CartHost=VALUE): left out",
                ),
                note(
                    &source("ProdOnlyService"),
                    "Condition",
                    "condition IsProd is false with the parameters' defaults: the resource is \
                     not created, skipped",
                ),
            ]
        );
    }

    #[test]
    fn ref_of_an_app_mesh_resource_is_its_name_in_mesh_resources_and_its_arn_in_tasks() {
        let read = template(
            "  Unused: { Type: String }",
            "  M: { Type: AWS::AppMesh::Mesh, Properties: { MeshName: m } }
  R: { Type: AWS::AppMesh::VirtualRouter, Properties: { MeshName: !Ref M, VirtualRouterName: r } }
  Rt:
    Type: AWS::AppMesh::Route
    Properties: { MeshName: !Ref M, VirtualRouterName: !Ref R, RouteName: rt }
  N:
    Type: AWS::AppMesh::VirtualNode
    Properties: { MeshName: !Ref M, VirtualNodeName: n }
  T:
    Type: AWS::ECS::TaskDefinition
    Properties:
      ContainerDefinitions:
        - Environment:
            - { Name: APPMESH_RESOURCE_ARN, Value: !Ref N }
            - { Name: ROUTE, Value: !GetAtt Rt.Arn }
            - { Name: ROUTER, Value: !GetAtt Rt.VirtualRouterName }
            - { Name: SUB, Value: !Sub '${N}' }
            - { Name: UID, Value: !GetAtt N.Uid }",
        );
        let route = resource(&read, ApiKind::Route, "rt");
        assert_eq!(
            (route.mesh.as_str(), route.parent.as_deref()),
            ("m", Some("r"))
        );
        let node_arn = "arn:aws:appmesh:aws-region:aws-account-id:mesh/m/virtualNode/n";
        assert_eq!(
            at(&read.tasks[0].task, "/containerDefinitions/0/environment"),
            &json!([
                { "name": "APPMESH_RESOURCE_ARN", "value": node_arn },
                {
                    "name": "ROUTE",
                    "value": "arn:aws:appmesh:aws-region:aws-account-id:mesh/m/virtualRouter/r/route/rt",
                },
                { "name": "ROUTER", "value": "r" },
                { "name": "SUB", "value": node_arn },
                // The value is left out, with a note.
                { "name": "UID" },
            ])
        );
        let uid = read
            .notes
            .iter()
            .find(|n| n.field == "Properties.ContainerDefinitions[0].Environment[4].Value")
            .unwrap();
        assert_eq!(
            uid.reason,
            "Fn::GetAtt N.Uid (AWS::AppMesh::VirtualNode) is known only once deployed, it \
             cannot be resolved offline: left out"
        );
    }

    #[test]
    fn sub_join_select_and_split() {
        let read = template(
            "  Domain: { Type: String, Default: example.local }
  Zones: { Type: CommaDelimitedList, Default: 'a, b, c' }",
            r#"  M:
    Type: AWS::AppMesh::Mesh
    Properties:
      MeshName: !Sub '${AWS::StackName}-mesh'
      Spec:
        Literal: !Sub '${!Domain} ${Domain}'
        Own: !Sub ['${Host}.${Domain}', { Host: !Select [1, !Ref Zones] }]
        Joined: !Join ['/', [x, !Ref Domain, 7]]
        Split: !Select [2, !Split [',', 'p,q,r']]
        Mapping: { 'Fn::Sub': 'long ${Domain}' }"#,
        );
        let mesh = resource(&read, ApiKind::Mesh, "aws-stack-name-mesh");
        assert_eq!(
            mesh.spec,
            json!({
                "literal": "${Domain} example.local",
                "own": "b.example.local",
                "joined": "x/example.local/7",
                "split": "r",
                "mapping": "long example.local",
            })
        );
        assert_eq!(
            read.notes,
            [note(
                "t.yaml: Resources.M",
                "Properties.MeshName",
                "AWS::StackName has no value offline: placeholder \"aws-stack-name\" used",
            )]
        );
    }

    #[test]
    fn a_placeholder_is_noted_only_in_a_value_kept() {
        let read = template(
            "  Unused: { Type: String }",
            "  M:
    Type: AWS::AppMesh::Mesh
    Properties:
      MeshName: m
      Spec:
        Dropped: !Join ['', [!Ref AWS::Region, !ImportValue shared-name]]
        Kept: !Sub '${AWS::AccountId}'
        Gone: !Ref AWS::NoValue",
        );
        assert_eq!(
            resource(&read, ApiKind::Mesh, "m").spec,
            json!({ "kept": "aws-account-id" })
        );
        assert_eq!(
            read.notes,
            [
                note(
                    "t.yaml: Resources.M",
                    "Properties.Spec.Dropped",
                    "Fn::ImportValue cannot be resolved offline: left out",
                ),
                note(
                    "t.yaml: Resources.M",
                    "Properties.Spec.Kept",
                    "AWS::AccountId has no value offline: placeholder \"aws-account-id\" used",
                ),
            ]
        );
    }

    #[test]
    fn unresolvable_names_skip_the_resource() {
        let read = template(
            "  NoDefault: { Type: String }",
            "  M: { Type: AWS::AppMesh::Mesh, Properties: { MeshName: m } }
  N:
    Type: AWS::AppMesh::VirtualNode
    Properties: { MeshName: !Ref M, VirtualNodeName: !Ref NoDefault }
  Self:
    Type: AWS::AppMesh::VirtualRouter
    Properties: { MeshName: !Ref M, VirtualRouterName: !Ref Self }
  Orphan:
    Type: AWS::AppMesh::GatewayRoute
    Properties: { MeshName: m, GatewayRouteName: g, VirtualGatewayName: !Base64 gw }",
        );
        let names: Vec<_> = read.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["m"]);
        let notes: Vec<String> = read.notes.iter().map(Note::to_string).collect();
        assert_eq!(
            notes,
            [
                "t.yaml: Resources.N: VirtualNode skipped: its name is not known",
                "t.yaml: Resources.N: Properties.VirtualNodeName: unresolved parameter \
                 NoDefault (no Default; give it with --parameter NoDefault=VALUE): left out",
                "t.yaml: Resources.Orphan: GatewayRoute skipped: its name is not known",
                "t.yaml: Resources.Orphan: Properties.VirtualGatewayName: Fn::Base64 cannot be \
                 resolved offline: left out",
                "t.yaml: Resources.Self: VirtualRouter skipped: its name is not known",
                "t.yaml: Resources.Self: Properties.VirtualRouterName: refers back to itself (a \
                 cycle of references)",
            ]
        );
    }

    #[test]
    fn a_long_chain_of_names_is_cut_not_followed_down_the_stack() {
        let mut resources =
            String::from("  M: { Type: AWS::AppMesh::Mesh, Properties: { MeshName: m } }\n");
        for i in 0..100 {
            resources.push_str(&format!(
                "  R{i}: {{ Type: AWS::AppMesh::VirtualRouter, Properties: {{ MeshName: m, \
                 VirtualRouterName: !Sub '${{R{}}}-x' }} }}\n",
                i + 1
            ));
        }
        resources.push_str(
            "  R100: { Type: AWS::AppMesh::VirtualRouter, Properties: { MeshName: m, \
             VirtualRouterName: end } }",
        );
        let read = template("  Unused: { Type: String }", &resources);
        let deep = read
            .notes
            .iter()
            .filter(|n| n.reason == "names refer to names more than 32 deep")
            .count();
        assert!(deep > 0, "{:#?}", read.notes);
        let end = resource(&read, ApiKind::VirtualRouter, "end-x-x-x");
        assert_eq!(end.source, "t.yaml: Resources.R97");
    }

    #[test]
    fn a_resource_condition_is_decided_with_the_defaults_where_it_can_be() {
        let read = template(
            "  Stage: { Type: String, Default: prod }",
            "  M: { Type: AWS::AppMesh::Mesh, Properties: { MeshName: m } }
  Prod:
    Type: AWS::AppMesh::VirtualRouter
    Condition: IsProd
    Properties: { MeshName: m, VirtualRouterName: prod }
  Dev:
    Type: AWS::AppMesh::VirtualRouter
    Condition: NotProd
    Properties: { MeshName: m, VirtualRouterName: dev }
  East:
    Type: AWS::AppMesh::VirtualRouter
    Condition: ProdInEast
    Properties: { MeshName: m, VirtualRouterName: east }
Conditions:
  IsProd: !Equals [!Ref Stage, prod]
  NotProd: !Not [!Condition IsProd]
  ProdInEast: !And [!Condition IsProd, !Equals [!Ref 'AWS::Region', us-east-1]]",
        );
        let mut names: Vec<_> = read.resources.iter().map(|r| r.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["east", "m", "prod"]);
        let notes: Vec<String> = read.notes.iter().map(Note::to_string).collect();
        assert_eq!(
            notes,
            [
                "t.yaml: Resources.Dev: Condition: condition NotProd is false with the \
                 parameters' defaults: the resource is not created, skipped",
                "t.yaml: Resources.East: Condition: created only when condition ProdInEast \
                 holds, which cannot be decided offline: imported as if it does",
            ]
        );
    }

    /// Mutants of the fixtures (bytes deleted, repeated, replaced with template syntax) never
    /// panic the reader, and what it notes names a source and a reason.
    #[test]
    fn mutated_templates_do_not_panic() {
        const TOKENS: &[&str] = &[
            "!Ref ",
            "!Sub ",
            "!GetAtt ",
            "!If ",
            "!Select [",
            "${",
            "}",
            "{",
            "[",
            "\"",
            ":",
            "\n  ",
            "Fn::Sub",
            "Ref",
            "AWS::NoValue",
            "!Condition ",
            "-",
            "'",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |bound: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % bound.max(1) as u64) as usize
        };
        for seed in [COLORAPP, SHOP] {
            for _ in 0..300 {
                let mut text = seed.as_bytes().to_vec();
                for _ in 0..=next(4) {
                    let at = next(text.len());
                    match next(3) {
                        0 => {
                            let end = (at + next(40)).min(text.len());
                            text.drain(at..end);
                        }
                        1 => {
                            let end = (at + next(40)).min(text.len());
                            let copy = text[at..end].to_vec();
                            text.splice(at..at, copy);
                        }
                        _ => {
                            let token = TOKENS[next(TOKENS.len())].as_bytes();
                            text.splice(at..at, token.iter().copied());
                        }
                    }
                }
                let text = String::from_utf8_lossy(&text);
                if let Ok(read) = read(&text, "m.yaml") {
                    for note in &read.notes {
                        assert!(note.source.starts_with("m.yaml: "), "{note}\n{text}");
                        assert!(!note.reason.is_empty(), "{note}\n{text}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_property_app_mesh_does_not_have_is_noted() {
        let read = template(
            "  Unused: { Type: String }",
            "  M: { Type: AWS::AppMesh::Mesh, Properties: { MeshName: m, MeshOwner: '1', Color: blue } }",
        );
        let notes: Vec<String> = read.notes.iter().map(Note::to_string).collect();
        assert_eq!(
            notes,
            [
                "t.yaml: Resources.M: Properties.Color: not a property of AWS::AppMesh::Mesh: \
                 ignored",
                "t.yaml: Resources.M: Properties.MeshOwner: the AWS account owning a shared mesh \
                 is AWS identity: not carried over",
            ]
        );
    }

    #[test]
    fn a_template_without_app_mesh_resources_reads_empty() {
        let text = "AWSTemplateFormatVersion: '2010-09-09'
Resources:
  Bucket: { Type: AWS::S3::Bucket, Properties: { BucketName: !Sub '${AWS::StackName}-logs' } }
  Queue: { Type: AWS::SQS::Queue }";
        assert_eq!(read(text, "t.yaml").unwrap(), Read::default());
        assert_eq!(read("Resources: {}", "t.yaml").unwrap(), Read::default());
    }

    #[test]
    fn what_is_not_a_template_is_an_error() {
        for (text, reason) in [
            ("Resources: [unclosed", "line 2"),
            (
                "{ \"Resources\": ",
                "not JSON: EOF while parsing a value at line 1",
            ),
            ("just words", "not a CloudFormation template"),
            ("apiVersion: v1\nkind: Namespace", "no Resources section"),
            ("Resources: [a, b]", "Resources: expected a mapping"),
        ] {
            let error = read(text, "in.yaml").unwrap_err();
            assert_eq!(error.source_name, "in.yaml");
            assert!(error.reason.contains(reason), "{text}: {}", error.reason);
        }
    }
}
