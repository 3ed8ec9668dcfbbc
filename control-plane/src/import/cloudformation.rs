//! CloudFormation templates (YAML or JSON): `AWS::AppMesh::*` resources, and
//! `AWS::ECS::TaskDefinition`s that ran App Mesh's Envoy.
//!
//! A template is read offline, as deployed with its parameters' defaults: intrinsic functions
//! are resolved where the template alone decides them (`Ref` of a parameter or of an App Mesh
//! resource, `Fn::GetAtt` of a name, `Fn::Sub`, `Fn::Join`, `Fn::Select`, `Fn::Split`,
//! `Fn::FindInMap`, `Fn::If` on a condition of defaults), pseudo parameters known only in an
//! account become [placeholders](REGION_PLACEHOLDER) with a note, and anything else is left out
//! with a note naming the field (`Resources.ColorNode.Properties.Spec.ServiceDiscovery.DNS.
//! Hostname: Fn::ImportValue cannot be resolved offline`).
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

/// Reads the template `text`, named `source_name` in the report.
pub fn read(text: &str, source_name: &str) -> Result<Read, ReadError> {
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
    let doc = Doc {
        source_name,
        parameters: section(&mut template, "Parameters"),
        mappings: section(&mut template, "Mappings"),
        conditions: section(&mut template, "Conditions"),
        resources,
    };
    Ok(Resolver::new(&doc).read())
}

/// YAML (with CloudFormation's short-form tags) or JSON, as JSON with the long forms.
fn parse(text: &str) -> Result<Value, String> {
    if text.trim_start().starts_with('{') {
        // JSON templates may be indented with tabs, which YAML refuses.
        if let Ok(value) = serde_json::from_str(text) {
            return Ok(value);
        }
    }
    // Deep flow nesting takes the YAML parser quadratic time: refused before parsing.
    trellis_proxy::snapshot::check_nesting(text)?;
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    Ok(long_form(yaml))
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
                .map(|spec| api_types(camel_keys(spec)))
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
        if !self.naming.insert(id.to_string()) {
            self.note(
                &format!("{path}.{key}"),
                "refers to itself (a cycle of references)".into(),
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
        let mark = self.placeholders.len();
        let resolved = self.resolve_inner(value, path);
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
                        None => return self.unresolved(path, format!("Fn::GetAtt {s}: no attribute")),
                    },
                    Value::Array(items) if items.len() == 2 => {
                        let id = items[0].as_str().unwrap_or_default().to_string();
                        let attribute = self.text(&items[1], path)?;
                        (id, attribute)
                    }
                    _ => {
                        return self.unresolved(
                            path,
                            "Fn::GetAtt: expected [resource, attribute]".into(),
                        );
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
                        format!("Fn::Select: index {index} is not in a list of {}", items.len()),
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
                        format!("Fn::FindInMap: no {}.{}.{} in Mappings", keys[0], keys[1], keys[2]),
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
            _ => self
                .unresolved(path, "expected a string".into())
                .and(None),
        }
    }

    fn list(&mut self, value: &Value, path: &str) -> Option<Vec<Value>> {
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
                return self.unresolved(path, format!("unresolved parameter {name} (no Default)"));
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
        if !self.deciding.insert(name.to_string()) {
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

/// Keys of the App Mesh API's spec whose values are integers.
const INTEGER_KEYS: &[&str] = &[
    "port",
    "ports",
    "weight",
    "priority",
    "maxRetries",
    "healthyThreshold",
    "unhealthyThreshold",
    "intervalMillis",
    "timeoutMillis",
    "maxConnections",
    "maxPendingRequests",
    "maxRequests",
    "maxServerErrors",
    "maxEjectionPercent",
    "start",
    "end",
];

/// Keys of the App Mesh API's spec whose values are booleans.
const BOOLEAN_KEYS: &[&str] = &["enforce", "invert"];

/// CloudFormation takes a string where the API has a number or a boolean (`Port: "8080"`, a
/// `!Ref` of a `Number` parameter): the API's types, where the string is one.
fn api_types(value: Value) -> Value {
    fn integer(value: Value) -> Value {
        match value {
            Value::String(s) => s
                .trim()
                .parse::<i64>()
                .map_or(Value::String(s), Value::from),
            Value::Array(items) => Value::Array(items.into_iter().map(integer).collect()),
            other => other,
        }
    }
    match value {
        Value::Object(map) => {
            // A duration: {unit, value}.
            let duration = map.contains_key("unit");
            Value::Object(
                map.into_iter()
                    .map(|(key, item)| {
                        let item = if INTEGER_KEYS.contains(&key.as_str())
                            || (duration && key == "value")
                        {
                            integer(item)
                        } else if BOOLEAN_KEYS.contains(&key.as_str()) {
                            match item {
                                Value::String(s) if s == "true" || s == "false" => {
                                    Value::Bool(s == "true")
                                }
                                other => other,
                            }
                        } else {
                            api_types(item)
                        };
                        (key, item)
                    })
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(api_types).collect()),
        other => other,
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
    use super::*;

    const COLORAPP: &str = include_str!("../../tests/import/colorapp.cfn.yaml");
    const SHOP: &str = include_str!("../../tests/import/shop.cfn.json");

    #[test]
    fn dump() {
        for (t, n) in [(COLORAPP, "colorapp.cfn.yaml"), (SHOP, "shop.cfn.json")] {
            let read = read(t, n).unwrap();
            for r in &read.resources {
                eprintln!("{:?} {} {} {:?} {}\n  {}", r.kind, r.mesh, r.name, r.parent, r.source, r.spec);
            }
            for t in &read.tasks {
                eprintln!("TASK {} {}", t.source, serde_json::to_string_pretty(&t.task).unwrap());
            }
            for n in &read.notes {
                eprintln!("NOTE {n}");
            }
        }
        panic!();
    }
}
