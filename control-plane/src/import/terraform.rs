//! Terraform (HCL): `aws_appmesh_*` resources, with variables, locals and the references between
//! them resolved.
//!
//! The `.tf` files of one module are read together, as Terraform does: a variable declared in
//! `variables.tf` is used in `main.tf`. What Terraform would only know at apply time (data
//! sources, module outputs, other providers' resources, `count.index`) cannot be resolved
//! offline: such a field is left out with a [`Note`] naming its path
//! (`spec.service_discovery.dns.hostname: data.aws_lb.x.dns_name cannot be resolved offline`).
//!
//! Expressions are evaluated by `hcl-rs`'s evaluator in a context holding:
//! - `var.X`: the literal `default` of `variable "X"` (no default: unresolved);
//! - `local.X`: the value of the local, itself evaluated;
//! - `aws_appmesh_<type>.<label>.{name,id,arn,mesh_name}`: that App Mesh resource's name (its
//!   `id` and `arn` too, where Terraform passes them as names), or its mesh's name;
//! - the functions `format` (verbs `%s`, `%d`, `%v`), `lower`, `upper`, `join`, `replace`
//!   (plain strings), `trimspace`.
//!
//! A resource's `spec` block becomes the App Mesh API's `spec` JSON: snake_case becomes
//! camelCase, and the blocks Terraform repeats for what the API holds as a list take the API's
//! key (`LIST_BLOCKS`). `aws_cloud_map { attributes = { k = "v" } }` becomes the API's
//! `attributes: [{key, value}]`.

use std::collections::{BTreeMap, HashMap, HashSet};

use hcl::eval::{Context, Evaluate, FuncArgs, FuncDef, ParamType};
use hcl::expr::{Expression, Operation, TraversalOperator};
use hcl::template::{Element, Template};
use hcl::{Block, Body, Value};
use serde_json::{Map as JsonMap, Value as Json};

use super::{ApiKind, ApiResource, Note, Read, ReadError};

/// The Terraform resource types read, and the App Mesh kind of each.
const RESOURCE_TYPES: [(&str, ApiKind); 7] = [
    ("aws_appmesh_mesh", ApiKind::Mesh),
    ("aws_appmesh_virtual_service", ApiKind::VirtualService),
    ("aws_appmesh_virtual_router", ApiKind::VirtualRouter),
    ("aws_appmesh_route", ApiKind::Route),
    ("aws_appmesh_virtual_node", ApiKind::VirtualNode),
    ("aws_appmesh_virtual_gateway", ApiKind::VirtualGateway),
    ("aws_appmesh_gateway_route", ApiKind::GatewayRoute),
];

/// Blocks that Terraform repeats (one block per element) for what the App Mesh API holds as a
/// list, and the API's key. Every other block appears once and is an object under the camelCase
/// of its name.
const LIST_BLOCKS: [(&str, &str); 7] = [
    // VirtualNode, VirtualRouter, VirtualGateway `spec.listeners[]`.
    ("listener", "listeners"),
    // VirtualNode `spec.backends[]`.
    ("backend", "backends"),
    // Route `*Route.action.weightedTargets[]`.
    ("weighted_target", "weightedTargets"),
    // Route and GatewayRoute `httpRoute.match.headers[]`.
    ("header", "headers"),
    // Route and GatewayRoute `httpRoute.match.queryParameters[]`.
    ("query_parameter", "queryParameters"),
    // Route and GatewayRoute `grpcRoute.match.metadata[]`: same name, a list.
    ("metadata", "metadata"),
    // Access log `format.json[{key, value}]`: same name, a list.
    ("json", "json"),
];

/// The attributes of an App Mesh resource that resolve offline: all to its name but
/// `mesh_name`.
const RESOLVED_ATTRIBUTES: [&str; 4] = ["name", "id", "arn", "mesh_name"];

/// The functions evaluated offline.
const FUNCTIONS: [&str; 6] = ["format", "lower", "upper", "join", "replace", "trimspace"];

/// Reads the `.tf` files of one module together (references cross files): (name, text) pairs.
pub fn read(files: &[(String, String)]) -> Result<Read, ReadError> {
    read_with(files, &[])
}

/// [`read`], with `variables` (name, value) given as `-var` would: they take the place of the
/// variables' defaults.
pub fn read_with(
    files: &[(String, String)],
    variables: &[(String, String)],
) -> Result<Read, ReadError> {
    let mut bodies = Vec::with_capacity(files.len());
    for (name, text) in files {
        let body = hcl::parse(text).map_err(|err| ReadError {
            source_name: name.clone(),
            reason: format!("not valid HCL: {err}"),
        })?;
        bodies.push((name.as_str(), body));
    }
    let mut read = Read::default();
    let mut module = Module::default();
    for (file, body) in &bodies {
        module.collect(file, body, &mut read.notes);
    }
    for (name, value) in variables {
        module.declared.insert(name.clone());
        module
            .variables
            .insert(name.clone(), hcl::Value::String(value.clone()));
    }
    module.resolve();
    let ctx = module.context();
    for resource in &module.resources {
        if let Some(api) = module.api_resource(resource, &ctx, &mut read.notes) {
            read.resources.push(api);
        }
    }
    Ok(read)
}

/// An `aws_appmesh_*` resource block.
struct Resource<'a> {
    file: &'a str,
    rtype: &'static str,
    label: String,
    kind: ApiKind,
    body: &'a Body,
}

impl Resource<'_> {
    fn source(&self) -> String {
        format!("{}: {}.{}", self.file, self.rtype, self.label)
    }

    fn attribute(&self, key: &str) -> Option<&Expression> {
        self.body
            .attributes()
            .find(|attr| attr.key() == key)
            .map(|attr| attr.expr())
    }
}

/// A resource's App Mesh name and its mesh's.
#[derive(Clone)]
struct Names {
    name: String,
    mesh: String,
}

#[derive(Default)]
struct Module<'a> {
    /// Every declared variable.
    declared: HashSet<String>,
    /// The variables with a default, and their value.
    variables: hcl::Map<String, Value>,
    locals: Vec<(String, &'a Expression)>,
    /// The locals evaluated so far.
    local_values: hcl::Map<String, Value>,
    /// Why each local that could not be evaluated could not.
    local_reasons: HashMap<String, String>,
    resources: Vec<Resource<'a>>,
    /// The resources whose names resolved, by (type, label).
    names: HashMap<(&'static str, String), Names>,
    /// Other resources' `name` arguments (a Cloud Map namespace's, say), by (type, label), and
    /// their values once evaluated: App Mesh resources refer to them.
    other_names: Vec<((String, String), &'a Expression)>,
    other_values: HashMap<(String, String), Value>,
}

impl<'a> Module<'a> {
    /// Takes the variables, locals, App Mesh resources and modules of one file.
    fn collect(&mut self, file: &'a str, body: &'a Body, notes: &mut Vec<Note>) {
        for block in body.blocks() {
            let labels: Vec<&str> = block.labels().iter().map(|l| l.as_str()).collect();
            match (block.identifier(), labels.as_slice()) {
                ("variable", [name]) => {
                    self.declared.insert((*name).to_owned());
                    let default = block
                        .body()
                        .attributes()
                        .find(|attr| attr.key() == "default");
                    if let Some(Ok(value)) =
                        default.map(|attr| attr.expr().evaluate(&Context::new()))
                    {
                        self.variables.insert((*name).to_owned(), value);
                    }
                }
                ("locals", []) => {
                    for attr in block.body().attributes() {
                        self.locals.push((attr.key().to_owned(), attr.expr()));
                    }
                }
                ("resource", [rtype, label]) => {
                    if let Some((rtype, kind)) = RESOURCE_TYPES.iter().find(|(t, _)| t == rtype) {
                        self.resources.push(Resource {
                            file,
                            rtype,
                            label: (*label).to_owned(),
                            kind: *kind,
                            body: block.body(),
                        });
                    } else if let Some(name) = block.body().attributes().find(|a| a.key() == "name")
                    {
                        self.other_names
                            .push((((*rtype).to_owned(), (*label).to_owned()), name.expr()));
                    }
                    if *rtype == "aws_ecs_task_definition" {
                        notes.push(Note {
                            source: format!("{file}: {rtype}.{label}"),
                            field: String::new(),
                            reason: "ECS task definitions are not read from Terraform: export the registered one (aws ecs describe-task-definition) and import it with --from appmesh-json for its trellis-proxy container".into(),
                        });
                    }
                }
                ("module", [name]) => notes.push(Note {
                    source: format!("{file}: module.{name}"),
                    field: String::new(),
                    reason: "modules are not followed: import the module's own directory".into(),
                }),
                _ => {}
            }
        }
    }

    /// Evaluates the locals and the resources' names until nothing more resolves (they may
    /// refer to each other in any order, across files).
    fn resolve(&mut self) {
        loop {
            let ctx = self.context();
            let locals: Vec<(String, Value)> = self
                .locals
                .iter()
                .filter(|(name, _)| !self.local_values.contains_key(name))
                .filter_map(|(name, expr)| Some((name.clone(), expr.evaluate(&ctx).ok()?)))
                .collect();
            let names: Vec<((&'static str, String), Names)> = self
                .resources
                .iter()
                .filter(|r| !self.names.contains_key(&(r.rtype, r.label.clone())))
                .filter_map(|r| Some(((r.rtype, r.label.clone()), resource_names(r, &ctx)?)))
                .collect();
            let others: Vec<((String, String), Value)> = self
                .other_names
                .iter()
                .filter(|(key, _)| !self.other_values.contains_key(key))
                .filter_map(|(key, expr)| Some((key.clone(), expr.evaluate(&ctx).ok()?)))
                .collect();
            if locals.is_empty() && names.is_empty() && others.is_empty() {
                break;
            }
            self.local_values.extend(locals);
            self.names.extend(names);
            self.other_values.extend(others);
        }
        let ctx = self.context();
        let reasons: HashMap<String, String> = self
            .locals
            .iter()
            .filter(|(name, _)| !self.local_values.contains_key(name))
            .map(|(name, expr)| (name.clone(), self.why(expr, &ctx)))
            .collect();
        self.local_reasons = reasons;
    }

    /// The evaluation context: variables, locals, App Mesh resources resolved so far, functions.
    fn context(&self) -> Context<'static> {
        let mut ctx = Context::new();
        ctx.declare_var("var", Value::Object(self.variables.clone()));
        ctx.declare_var("local", Value::Object(self.local_values.clone()));
        for (rtype, kind) in RESOURCE_TYPES {
            let mut by_label = hcl::Map::new();
            for ((t, label), names) in &self.names {
                if *t != rtype {
                    continue;
                }
                let mut attrs = hcl::Map::new();
                for attr in ["name", "id", "arn"] {
                    attrs.insert(attr.to_owned(), Value::from(names.name.clone()));
                }
                if kind != ApiKind::Mesh {
                    attrs.insert("mesh_name".to_owned(), Value::from(names.mesh.clone()));
                }
                by_label.insert(label.clone(), Value::Object(attrs));
            }
            ctx.declare_var(rtype, Value::Object(by_label));
        }
        // Other resources' names (`aws_service_discovery_private_dns_namespace.main.name`).
        let mut others: BTreeMap<&str, hcl::Map<String, Value>> = BTreeMap::new();
        for ((rtype, label), value) in &self.other_values {
            let mut attrs = hcl::Map::new();
            attrs.insert("name".to_owned(), value.clone());
            others
                .entry(rtype.as_str())
                .or_default()
                .insert(label.clone(), Value::Object(attrs));
        }
        for (rtype, by_label) in others {
            ctx.declare_var(rtype.to_owned(), Value::Object(by_label));
        }
        declare_functions(&mut ctx);
        ctx
    }

    fn api_resource(
        &self,
        resource: &Resource<'_>,
        ctx: &Context<'_>,
        notes: &mut Vec<Note>,
    ) -> Option<ApiResource> {
        let source = resource.source();
        let note = |notes: &mut Vec<Note>, field: &str, reason: String| {
            notes.push(Note {
                source: source.clone(),
                field: field.to_owned(),
                reason,
            })
        };
        let names = self.names.get(&(resource.rtype, resource.label.clone()));
        for key in ["count", "for_each"] {
            if resource.attribute(key).is_some() {
                let outcome = if names.is_some() {
                    "the resource is read once"
                } else {
                    "the resource is skipped"
                };
                note(
                    notes,
                    key,
                    format!("{key} is not expanded offline: {outcome}"),
                );
            }
        }
        let Some(names) = names else {
            let (field, reason) = self.why_unnamed(resource, ctx);
            note(notes, field, format!("{reason}; the resource is skipped"));
            return None;
        };
        let parent_key = match resource.kind {
            ApiKind::Route => Some("virtual_router_name"),
            ApiKind::GatewayRoute => Some("virtual_gateway_name"),
            _ => None,
        };
        let mut parent = None;
        if let Some(key) = parent_key {
            match resource
                .attribute(key)
                .map(|expr| (expr, expr.evaluate(ctx)))
            {
                Some((_, Ok(Value::String(name)))) => parent = Some(name),
                Some((expr, _)) => {
                    let reason = self.why(expr, ctx);
                    note(notes, key, format!("{reason}; the resource is skipped"));
                    return None;
                }
                None => {
                    note(notes, key, "missing; the resource is skipped".into());
                    return None;
                }
            }
        }
        for attr in resource.body.attributes() {
            let key = attr.key();
            match key {
                "name" | "mesh_name" | "provider" | "depends_on" | "count" | "for_each" => {}
                _ if Some(key) == parent_key => {}
                "mesh_owner" => note(
                    notes,
                    key,
                    "the AWS account owning a shared mesh is not carried over".into(),
                ),
                "tags" | "tags_all" => note(notes, key, "AWS tags are not carried over".into()),
                _ => note(
                    notes,
                    key,
                    format!("not an argument of {}; ignored", resource.rtype),
                ),
            }
        }
        let mut spec = Json::Null;
        let mut specs = 0;
        for block in resource.body.blocks() {
            match block.identifier() {
                "spec" => {
                    specs += 1;
                    if specs == 1 {
                        spec = Json::Object(self.spec(block.body(), "spec", &source, ctx, notes));
                    } else {
                        note(notes, "spec", "a second spec block is ignored".into());
                    }
                }
                "lifecycle" | "timeouts" => {}
                "dynamic" => note(notes, "dynamic", dynamic_reason(block)),
                other => note(
                    notes,
                    other,
                    format!("not a block of {}; ignored", resource.rtype),
                ),
            }
        }
        Some(ApiResource {
            kind: resource.kind,
            mesh: names.mesh.clone(),
            name: names.name.clone(),
            parent,
            // Terraform takes `port = "8080"` as readily as `port = 8080`.
            spec: super::api_types(spec),
            source,
        })
    }

    /// A block of `spec` in the API's JSON shape; `path` is its field path in Terraform's
    /// spelling, for the notes.
    fn spec(
        &self,
        body: &Body,
        path: &str,
        source: &str,
        ctx: &Context<'_>,
        notes: &mut Vec<Note>,
    ) -> JsonMap<String, Json> {
        let mut out = JsonMap::new();
        for attr in body.attributes() {
            let key = attr.key();
            match attr.expr().evaluate(ctx) {
                Ok(Value::Null) => {}
                Ok(value) => {
                    let json = to_json(value);
                    let json = if key == "attributes" && path.ends_with(".aws_cloud_map") {
                        key_value_list(json)
                    } else {
                        json
                    };
                    out.insert(camel(key), json);
                }
                Err(_) => notes.push(Note {
                    source: source.to_owned(),
                    field: format!("{path}.{key}"),
                    reason: self.why(attr.expr(), ctx),
                }),
            }
        }
        // Blocks by name, in the order they first appear.
        let mut groups: Vec<(&str, Vec<&Block>)> = Vec::new();
        for block in body.blocks() {
            match groups
                .iter_mut()
                .find(|(ident, _)| *ident == block.identifier())
            {
                Some((_, blocks)) => blocks.push(block),
                None => groups.push((block.identifier(), vec![block])),
            }
        }
        for (ident, blocks) in groups {
            if ident == "dynamic" {
                for block in blocks {
                    notes.push(Note {
                        source: source.to_owned(),
                        field: format!(
                            "{path}.{}",
                            block.labels().first().map_or("dynamic", |l| l.as_str())
                        ),
                        reason: dynamic_reason(block),
                    });
                }
                continue;
            }
            if let Some((_, api_key)) = LIST_BLOCKS.iter().find(|(tf, _)| *tf == ident) {
                let items = blocks
                    .iter()
                    .enumerate()
                    .map(|(i, block)| {
                        let path = format!("{path}.{ident}[{i}]");
                        Json::Object(self.spec(block.body(), &path, source, ctx, notes))
                    })
                    .collect();
                out.insert((*api_key).to_owned(), Json::Array(items));
                continue;
            }
            let path = format!("{path}.{ident}");
            if blocks.len() > 1 {
                notes.push(Note {
                    source: source.to_owned(),
                    field: path.clone(),
                    reason: format!(
                        "the block appears {} times where the API holds one: the first is read",
                        blocks.len()
                    ),
                });
            }
            if let Some(block) = blocks.first() {
                let object = self.spec(block.body(), &path, source, ctx, notes);
                out.insert(camel(ident), Json::Object(object));
            }
        }
        out
    }

    /// Which of a resource's naming arguments did not resolve, and why.
    fn why_unnamed(&self, resource: &Resource<'_>, ctx: &Context<'_>) -> (&'static str, String) {
        let keys: &[&'static str] = if resource.kind == ApiKind::Mesh {
            &["name"]
        } else {
            &["name", "mesh_name"]
        };
        for key in keys {
            match resource.attribute(key) {
                None => return (key, "missing".into()),
                Some(expr) => match expr.evaluate(ctx) {
                    Ok(Value::String(_)) => {}
                    Ok(other) => return (key, format!("not a string: {other}")),
                    Err(_) => return (key, self.why(expr, ctx)),
                },
            }
        }
        ("name", "cannot be resolved".into())
    }

    /// Why an expression does not evaluate: the first reference or function in it that does not.
    fn why(&self, expr: &Expression, ctx: &Context<'_>) -> String {
        match self.first_unresolved(expr, ctx) {
            Some(reason) => reason,
            None => match expr.evaluate(ctx) {
                Err(err) => format!("{expr} cannot be evaluated offline: {err}"),
                Ok(value) => format!("unexpected value {value}"),
            },
        }
    }

    fn first_unresolved(&self, expr: &Expression, ctx: &Context<'_>) -> Option<String> {
        match expr {
            Expression::Traversal(traversal) => {
                if let Expression::Variable(root) = &traversal.expr {
                    if expr.evaluate(ctx).is_err() {
                        return Some(self.unresolved_reference(root, &traversal.operators, expr));
                    }
                    None
                } else {
                    let indexes = traversal.operators.iter().filter_map(|op| match op {
                        TraversalOperator::Index(e) => Some(e),
                        _ => None,
                    });
                    self.first_of(std::iter::once(&traversal.expr).chain(indexes), ctx)
                }
            }
            Expression::Variable(root) => expr
                .evaluate(ctx)
                .is_err()
                .then(|| self.unresolved_reference(root, &[], expr)),
            Expression::FuncCall(call) => {
                let name = call.name.to_string();
                if FUNCTIONS.contains(&name.as_str()) {
                    self.first_of(&call.args, ctx)
                } else {
                    Some(format!("function {name}() cannot be evaluated offline"))
                }
            }
            Expression::TemplateExpr(template) => {
                let template = Template::from_expr(template).ok()?;
                template
                    .elements()
                    .iter()
                    .find_map(|element| match element {
                        Element::Interpolation(interpolation) => {
                            self.first_unresolved(&interpolation.expr, ctx)
                        }
                        _ => None,
                    })
            }
            Expression::Array(items) => self.first_of(items, ctx),
            Expression::Object(object) => self.first_of(object.values(), ctx),
            Expression::Parenthesis(inner) => self.first_unresolved(inner, ctx),
            Expression::Conditional(cond) => {
                self.first_of([&cond.cond_expr, &cond.true_expr, &cond.false_expr], ctx)
            }
            Expression::Operation(operation) => match operation.as_ref() {
                Operation::Unary(op) => self.first_unresolved(&op.expr, ctx),
                Operation::Binary(op) => self.first_of([&op.lhs_expr, &op.rhs_expr], ctx),
            },
            Expression::ForExpr(for_expr) => self.first_unresolved(&for_expr.collection_expr, ctx),
            _ => None,
        }
    }

    fn first_of<'e>(
        &self,
        exprs: impl IntoIterator<Item = &'e Expression>,
        ctx: &Context<'_>,
    ) -> Option<String> {
        exprs
            .into_iter()
            .find_map(|e| self.first_unresolved(e, ctx))
    }

    /// Why `root.operators…` (the whole of it: `whole`) does not resolve.
    fn unresolved_reference(
        &self,
        root: &str,
        operators: &[TraversalOperator],
        whole: &Expression,
    ) -> String {
        let first = match operators.first() {
            Some(TraversalOperator::GetAttr(attr)) => Some(attr.as_str()),
            _ => None,
        };
        let attr = match operators.get(1) {
            Some(TraversalOperator::GetAttr(attr)) => Some(attr.as_str()),
            _ => None,
        };
        match (root, first) {
            ("var", Some(name)) if self.declared.contains(name) => {
                format!(
                    "unresolved variable {name} (it has no default; give it with --var {name}=VALUE)"
                )
            }
            ("var", Some(name)) => format!("unresolved variable {name} (it is not declared)"),
            ("local", Some(name)) => match self.local_reasons.get(name) {
                Some(reason) => format!("unresolved local {name} ({reason})"),
                None => format!("unresolved local {name} (it is not declared)"),
            },
            (rtype, Some(label)) if RESOURCE_TYPES.iter().any(|(t, _)| *t == rtype) => {
                if !self
                    .resources
                    .iter()
                    .any(|r| r.rtype == rtype && r.label == label)
                {
                    format!("{whole}: there is no {rtype} \"{label}\" in this module")
                } else if !self
                    .names
                    .contains_key(&(rtype_static(rtype), label.to_owned()))
                {
                    format!("{whole}: the name of {rtype}.{label} cannot be resolved")
                } else if attr.is_some_and(|a| !RESOLVED_ATTRIBUTES.contains(&a)) {
                    format!(
                        "{whole} cannot be resolved offline (of an App Mesh resource, only {} are)",
                        RESOLVED_ATTRIBUTES.join(", ")
                    )
                } else {
                    format!("{whole} cannot be resolved offline")
                }
            }
            _ => format!("{whole} cannot be resolved offline"),
        }
    }
}

/// A resource's name and mesh name, if both evaluate to strings.
fn resource_names(resource: &Resource<'_>, ctx: &Context<'_>) -> Option<Names> {
    let string = |key: &str| match resource.attribute(key)?.evaluate(ctx).ok()? {
        Value::String(s) => Some(s),
        _ => None,
    };
    let name = string("name")?;
    let mesh = if resource.kind == ApiKind::Mesh {
        name.clone()
    } else {
        string("mesh_name")?
    };
    Some(Names { name, mesh })
}

fn rtype_static(rtype: &str) -> &'static str {
    RESOURCE_TYPES
        .iter()
        .find(|(t, _)| *t == rtype)
        .map_or("", |(t, _)| t)
}

fn dynamic_reason(block: &Block) -> String {
    let label = block.labels().first().map_or("", |l| l.as_str());
    format!("dynamic \"{label}\" blocks are not expanded offline; write the blocks out")
}

/// `snake_case` → `camelCase`.
fn camel(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for c in key.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Terraform's map `{ k = "v" }` → the API's `[{"key": "k", "value": "v"}]`.
fn key_value_list(json: Json) -> Json {
    match json {
        Json::Object(map) => Json::Array(
            map.into_iter()
                .map(|(key, value)| serde_json::json!({ "key": key, "value": value }))
                .collect(),
        ),
        other => other,
    }
}

fn to_json(value: Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Json::from(i)
            } else if let Some(u) = n.as_u64() {
                Json::from(u)
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map_or(Json::Null, Json::Number)
            }
        }
        Value::String(s) => Json::String(s),
        Value::Array(items) => Json::Array(items.into_iter().map(to_json).collect()),
        Value::Object(map) => Json::Object(map.into_iter().map(|(k, v)| (k, to_json(v))).collect()),
    }
}

fn declare_functions(ctx: &mut Context<'_>) {
    let string = || ParamType::String;
    ctx.declare_func(
        "format",
        FuncDef::builder()
            .param(string())
            .variadic_param(ParamType::Any)
            .build(format_fn),
    );
    ctx.declare_func("lower", FuncDef::new(lower_fn, [string()]));
    ctx.declare_func("upper", FuncDef::new(upper_fn, [string()]));
    ctx.declare_func("trimspace", FuncDef::new(trimspace_fn, [string()]));
    ctx.declare_func(
        "replace",
        FuncDef::new(replace_fn, [string(), string(), string()]),
    );
    ctx.declare_func(
        "join",
        FuncDef::builder()
            .param(string())
            .variadic_param(ParamType::array_of(string()))
            .build(join_fn),
    );
}

fn string_arg(args: &FuncArgs, i: usize) -> Result<&str, String> {
    args.get(i)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("argument {i} is not a string"))
}

/// A scalar as Terraform's `format` prints it with `%s`, `%d` or `%v`.
fn scalar_text(value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(format!("cannot format {other}")),
    }
}

fn format_fn(args: FuncArgs) -> Result<Value, String> {
    let spec = string_arg(&args, 0)?;
    let mut values = args.iter().skip(1);
    let mut out = String::with_capacity(spec.len());
    let mut chars = spec.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('s' | 'd' | 'v') => {
                let value = values.next().ok_or("too few arguments")?;
                out.push_str(&scalar_text(value)?);
            }
            Some(verb) => return Err(format!("the verb %{verb} is not supported offline")),
            None => return Err("a format ends with %".into()),
        }
    }
    Ok(Value::from(out))
}

fn lower_fn(args: FuncArgs) -> Result<Value, String> {
    Ok(Value::from(string_arg(&args, 0)?.to_lowercase()))
}

fn upper_fn(args: FuncArgs) -> Result<Value, String> {
    Ok(Value::from(string_arg(&args, 0)?.to_uppercase()))
}

fn trimspace_fn(args: FuncArgs) -> Result<Value, String> {
    Ok(Value::from(string_arg(&args, 0)?.trim()))
}

fn replace_fn(args: FuncArgs) -> Result<Value, String> {
    let (s, from, to) = (
        string_arg(&args, 0)?,
        string_arg(&args, 1)?,
        string_arg(&args, 2)?,
    );
    if from.len() > 1 && from.starts_with('/') && from.ends_with('/') {
        return Err("replace with a regular expression is not supported offline".into());
    }
    Ok(Value::from(s.replace(from, to)))
}

fn join_fn(args: FuncArgs) -> Result<Value, String> {
    let sep = string_arg(&args, 0)?;
    let mut parts = Vec::new();
    for list in args.iter().skip(1) {
        for item in list.as_array().into_iter().flatten() {
            parts.push(scalar_text(item)?);
        }
    }
    Ok(Value::from(parts.join(sep)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const VARIABLES_TF: &str = include_str!("../../tests/import/terraform/variables.tf");
    const COLORAPP_TF: &str = include_str!("../../tests/import/terraform/colorapp.tf");

    fn fixture() -> Read {
        let files = [
            ("variables.tf".to_owned(), VARIABLES_TF.to_owned()),
            ("colorapp.tf".to_owned(), COLORAPP_TF.to_owned()),
        ];
        read(&files).unwrap()
    }

    fn read_one(text: &str) -> Read {
        read(&[("main.tf".to_owned(), text.to_owned())]).unwrap()
    }

    fn spec_of<'r>(read: &'r Read, kind: ApiKind, name: &str) -> &'r Json {
        &read
            .resources
            .iter()
            .find(|r| r.kind == kind && r.name == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .spec
    }

    fn notes(read: &Read) -> Vec<String> {
        read.notes.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn the_fixture_module_reads_into_every_kind_with_names_resolved_across_files() {
        let read = fixture();
        let got: Vec<(ApiKind, &str, &str, Option<&str>, &str)> = read
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
        let mesh = "colorapp-prod";
        assert_eq!(
            got,
            [
                (
                    ApiKind::Mesh,
                    mesh,
                    mesh,
                    None,
                    "colorapp.tf: aws_appmesh_mesh.colorapp"
                ),
                (
                    ApiKind::VirtualNode,
                    mesh,
                    "colorteller-blue-prod",
                    None,
                    "colorapp.tf: aws_appmesh_virtual_node.blue"
                ),
                (
                    ApiKind::VirtualNode,
                    mesh,
                    "colorteller-red-prod",
                    None,
                    "colorapp.tf: aws_appmesh_virtual_node.red"
                ),
                (
                    ApiKind::VirtualNode,
                    mesh,
                    "front-prod",
                    None,
                    "colorapp.tf: aws_appmesh_virtual_node.front"
                ),
                (
                    ApiKind::VirtualRouter,
                    mesh,
                    "colorteller-router",
                    None,
                    "colorapp.tf: aws_appmesh_virtual_router.colorteller"
                ),
                (
                    ApiKind::Route,
                    mesh,
                    "colors",
                    Some("colorteller-router"),
                    "colorapp.tf: aws_appmesh_route.colors"
                ),
                (
                    ApiKind::Route,
                    mesh,
                    "colors-grpc",
                    Some("colorteller-router"),
                    "colorapp.tf: aws_appmesh_route.colors_grpc"
                ),
                (
                    ApiKind::VirtualService,
                    mesh,
                    "colorteller.colors.local",
                    None,
                    "colorapp.tf: aws_appmesh_virtual_service.colorteller"
                ),
                (
                    ApiKind::VirtualService,
                    mesh,
                    "red.colors.local",
                    None,
                    "colorapp.tf: aws_appmesh_virtual_service.red"
                ),
                (
                    ApiKind::VirtualGateway,
                    mesh,
                    "colorapp-prod-ingress",
                    None,
                    "colorapp.tf: aws_appmesh_virtual_gateway.ingress"
                ),
                (
                    ApiKind::GatewayRoute,
                    mesh,
                    "colors-edge",
                    Some("colorapp-prod-ingress"),
                    "colorapp.tf: aws_appmesh_gateway_route.colors"
                ),
            ]
        );
    }

    #[test]
    fn a_virtual_nodes_spec_takes_the_apis_shape() {
        let read = fixture();
        assert_eq!(
            spec_of(&read, ApiKind::VirtualNode, "colorteller-blue-prod"),
            &json!({
                "listeners": [{
                    "portMapping": {"port": 8080, "protocol": "http"},
                    "healthCheck": {
                        "protocol": "http", "path": "/ping", "healthyThreshold": 2,
                        "unhealthyThreshold": 3, "timeoutMillis": 2000, "intervalMillis": 5000
                    },
                    "timeout": {"http": {
                        "idle": {"unit": "s", "value": 60},
                        "perRequest": {"unit": "ms", "value": 1500}
                    }},
                    "outlierDetection": {
                        "maxServerErrors": 5, "maxEjectionPercent": 50,
                        "interval": {"unit": "s", "value": 10},
                        "baseEjectionDuration": {"unit": "s", "value": 30}
                    },
                    "connectionPool": {"http": {"maxConnections": 100, "maxPendingRequests": 25}},
                    "tls": {
                        "mode": "STRICT",
                        "certificate": {"acm": {
                            "certificateArn": "arn:aws:acm:eu-west-1:111122223333:certificate/blue"
                        }},
                        "validation": {
                            "subjectAlternativeNames": {"match": {"exact": ["gateway.colors.local"]}},
                            "trust": {"file": {"certificateChain": "/etc/ssl/colors-ca.pem"}}
                        }
                    }
                }],
                "serviceDiscovery": {"awsCloudMap": {
                    "namespaceName": "colors.local",
                    "serviceName": "colorteller",
                    "attributes": [
                        {"key": "color", "value": "blue"},
                        {"key": "stage", "value": "prod"}
                    ]
                }},
                "logging": {"accessLog": {"file": {
                    "path": "/dev/stdout",
                    "format": {"json": [
                        {"key": "start", "value": "%START_TIME%"},
                        {"key": "status", "value": "%RESPONSE_CODE%"}
                    ]}
                }}}
            })
        );
        assert_eq!(
            spec_of(&read, ApiKind::VirtualNode, "colorteller-red-prod")["serviceDiscovery"],
            json!({"dns": {
                "hostname": "red.colors.local", "responseType": "ENDPOINTS", "ipPreference": "IPv4_ONLY"
            }})
        );
        assert_eq!(
            spec_of(&read, ApiKind::VirtualNode, "front-prod")["backends"],
            json!([
                {"virtualService": {
                    "virtualServiceName": "colorteller.colors.local",
                    "clientPolicy": {"tls": {
                        "enforce": true,
                        "ports": [8080],
                        "validation": {"trust": {"acm": {"certificateAuthorityArns": [
                            "arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/colors"
                        ]}}}
                    }}
                }},
                {"virtualService": {"virtualServiceName": "red.colors.local"}}
            ])
        );
    }

    #[test]
    fn routes_take_the_apis_list_names() {
        let read = fixture();
        assert_eq!(
            spec_of(&read, ApiKind::Route, "colors"),
            &json!({
                "priority": 10,
                "httpRoute": {
                    "match": {
                        "prefix": "/",
                        "method": "GET",
                        "headers": [
                            {"name": "x-color", "match": {"exact": "blue"}},
                            {"name": "x-canary", "invert": true,
                             "match": {"range": {"start": 1, "end": 5}}}
                        ],
                        "queryParameters": [{"name": "debug", "match": {"exact": "1"}}]
                    },
                    "action": {"weightedTargets": [
                        {"virtualNode": "colorteller-blue-prod", "weight": 3},
                        {"virtualNode": "colorteller-red-prod", "weight": 1}
                    ]},
                    "retryPolicy": {
                        "maxRetries": 2,
                        "httpRetryEvents": ["server-error", "gateway-error"],
                        "tcpRetryEvents": ["connection-error"],
                        "perRetryTimeout": {"unit": "ms", "value": 500}
                    },
                    "timeout": {"perRequest": {"unit": "s", "value": 5}}
                }
            })
        );
        assert_eq!(
            spec_of(&read, ApiKind::Route, "colors-grpc"),
            &json!({"grpcRoute": {
                "match": {
                    "serviceName": "color.ColorService",
                    "methodName": "GetColor",
                    "metadata": [{"name": "x-tenant", "match": {"prefix": "acme"}}]
                },
                "action": {"weightedTargets": [{"virtualNode": "colorteller-red-prod", "weight": 1}]},
                "retryPolicy": {
                    "maxRetries": 3,
                    "grpcRetryEvents": ["unavailable", "deadline-exceeded"],
                    "perRetryTimeout": {"unit": "s", "value": 2}
                }
            }})
        );
    }

    #[test]
    fn mesh_services_router_gateway_and_gateway_route_specs() {
        let read = fixture();
        assert_eq!(
            spec_of(&read, ApiKind::Mesh, "colorapp-prod"),
            &json!({
                "egressFilter": {"type": "DROP_ALL"},
                "serviceDiscovery": {"ipPreference": "IPv4_PREFERRED"}
            })
        );
        assert_eq!(
            spec_of(&read, ApiKind::VirtualService, "colorteller.colors.local"),
            &json!({"provider": {"virtualRouter": {"virtualRouterName": "colorteller-router"}}})
        );
        assert_eq!(
            spec_of(&read, ApiKind::VirtualService, "red.colors.local"),
            &json!({"provider": {"virtualNode": {"virtualNodeName": "colorteller-red-prod"}}})
        );
        assert_eq!(
            spec_of(&read, ApiKind::VirtualRouter, "colorteller-router"),
            &json!({"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}]})
        );
        let gateway = spec_of(&read, ApiKind::VirtualGateway, "colorapp-prod-ingress");
        assert_eq!(
            gateway["listeners"][0]["healthCheck"],
            json!({
                "protocol": "http", "path": "/healthz", "healthyThreshold": 2,
                "unhealthyThreshold": 2, "timeoutMillis": 2000, "intervalMillis": 5000
            })
        );
        assert_eq!(
            gateway["listeners"][0]["portMapping"],
            json!({"port": 8443, "protocol": "http"})
        );
        assert_eq!(
            gateway["logging"]["accessLog"]["file"]["format"]["text"],
            json!("[%START_TIME%] %REQ(:METHOD)% %RESPONSE_CODE%\n")
        );
        assert_eq!(
            spec_of(&read, ApiKind::GatewayRoute, "colors-edge"),
            &json!({"httpRoute": {
                "match": {"prefix": "/color/"},
                "action": {
                    "target": {"virtualService": {"virtualServiceName": "colorteller.colors.local"}},
                    "rewrite": {
                        "prefix": {"value": "/"},
                        "hostname": {"defaultTargetHostname": "DISABLED"}
                    }
                }
            }})
        );
    }

    #[test]
    fn what_cannot_be_read_offline_is_noted_with_its_field_path() {
        let read = fixture();
        assert_eq!(
            notes(&read),
            [
                "colorapp.tf: module.observability: modules are not followed: import the module's own directory",
                "colorapp.tf: aws_appmesh_mesh.colorapp: tags: AWS tags are not carried over",
                "colorapp.tf: aws_appmesh_virtual_node.red: mesh_owner: the AWS account owning a shared mesh is not carried over",
                "colorapp.tf: aws_appmesh_virtual_node.front: spec.service_discovery.dns.hostname: data.aws_lb.front.dns_name cannot be resolved offline",
                "colorapp.tf: aws_appmesh_virtual_gateway.ingress: tags: AWS tags are not carried over",
                "colorapp.tf: aws_appmesh_virtual_gateway.ingress: spec.listener[0].tls.certificate.acm.certificate_arn: unresolved variable gateway_cert_arn (it has no default; give it with --var gateway_cert_arn=VALUE)",
                "colorapp.tf: aws_appmesh_virtual_node.extra: for_each: for_each is not expanded offline: the resource is skipped",
                "colorapp.tf: aws_appmesh_virtual_node.extra: name: each.key cannot be resolved offline; the resource is skipped",
            ]
        );
        // The unresolved field is left out, the rest of its block kept.
        let front = spec_of(&read, ApiKind::VirtualNode, "front-prod");
        assert_eq!(front["serviceDiscovery"], json!({"dns": {}}));
        let gateway = spec_of(&read, ApiKind::VirtualGateway, "colorapp-prod-ingress");
        assert_eq!(
            gateway["listeners"][0]["tls"],
            json!({"mode": "STRICT", "certificate": {"acm": {}}})
        );
    }

    #[test]
    fn locals_and_references_resolve_in_any_order() {
        // The route comes first, its router's name is a local defined last, built from a
        // variable and the mesh's name.
        let read = read_one(
            r#"
            resource "aws_appmesh_route" "r" {
              name                = "r"
              mesh_name           = aws_appmesh_mesh.m.name
              virtual_router_name = aws_appmesh_virtual_router.vr.id
              spec {
                tcp_route {
                  action {
                    weighted_target {
                      virtual_node = aws_appmesh_virtual_node.n.arn
                      weight       = 1
                    }
                  }
                }
              }
            }
            resource "aws_appmesh_virtual_router" "vr" {
              name      = local.router
              mesh_name = aws_appmesh_mesh.m.id
            }
            resource "aws_appmesh_virtual_node" "n" {
              name      = upper(join("-", [var.prefix, "node"]))
              mesh_name = aws_appmesh_virtual_router.vr.mesh_name
            }
            resource "aws_appmesh_mesh" "m" { name = "${var.prefix}-mesh" }
            variable "prefix" { default = "shop" }
            locals { router = format("%s-router-%d", aws_appmesh_mesh.m.name, 2) }
            "#,
        );
        assert!(read.notes.is_empty(), "{:?}", read.notes);
        let route = &read.resources[0];
        assert_eq!(
            (route.mesh.as_str(), route.parent.as_deref()),
            ("shop-mesh", Some("shop-mesh-router-2"))
        );
        assert_eq!(
            route.spec,
            json!({"tcpRoute": {"action": {"weightedTargets": [
                {"virtualNode": "SHOP-NODE", "weight": 1}
            ]}}})
        );
        assert_eq!(read.resources[2].mesh, "shop-mesh");
    }

    #[test]
    fn an_unresolvable_name_or_parent_skips_the_resource_with_a_note() {
        let read = read_one(
            r#"
            variable "mesh" {}
            resource "aws_appmesh_virtual_node" "a" {
              name      = "a"
              mesh_name = var.mesh
            }
            resource "aws_appmesh_mesh" "m" { name = "m" }
            resource "aws_appmesh_virtual_node" "b" {
              name      = md5("b")
              mesh_name = "m"
            }
            resource "aws_appmesh_route" "r" {
              name                = "r"
              mesh_name           = "m"
              virtual_router_name = aws_appmesh_virtual_router.missing.name
            }
            resource "aws_appmesh_virtual_service" "s" {
              name      = "${local.nope}.local"
              mesh_name = aws_appmesh_mesh.m.created_date
            }
            resource "aws_appmesh_gateway_route" "g" {
              name                 = "g"
              mesh_name            = "m"
              virtual_gateway_name = module.edge.gateway
            }
            resource "aws_appmesh_virtual_node" "c" {
              name      = "c"
              mesh_name = aws_appmesh_mesh.m.name
              count     = 2
              spec {
                listener {
                  port_mapping {
                    port     = var.port
                    protocol = "http"
                  }
                }
              }
            }
            "#,
        );
        assert_eq!(
            notes(&read),
            [
                "main.tf: aws_appmesh_virtual_node.a: mesh_name: unresolved variable mesh (it has no default; give it with --var mesh=VALUE); the resource is skipped",
                "main.tf: aws_appmesh_virtual_node.b: name: function md5() cannot be evaluated offline; the resource is skipped",
                "main.tf: aws_appmesh_route.r: virtual_router_name: aws_appmesh_virtual_router.missing.name: there is no aws_appmesh_virtual_router \"missing\" in this module; the resource is skipped",
                "main.tf: aws_appmesh_virtual_service.s: name: unresolved local nope (it is not declared); the resource is skipped",
                "main.tf: aws_appmesh_gateway_route.g: virtual_gateway_name: module.edge.gateway cannot be resolved offline; the resource is skipped",
                "main.tf: aws_appmesh_virtual_node.c: count: count is not expanded offline: the resource is read once",
                "main.tf: aws_appmesh_virtual_node.c: spec.listener[0].port_mapping.port: unresolved variable port (it is not declared)",
            ]
        );
        let names: Vec<&str> = read.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["m", "c"]);
        assert_eq!(
            read.resources[1].spec,
            json!({"listeners": [{"portMapping": {"protocol": "http"}}]})
        );
    }

    #[test]
    fn other_attributes_of_an_app_mesh_resource_cannot_be_resolved() {
        let read = read_one(
            r#"
            resource "aws_appmesh_mesh" "m" { name = "m" }
            resource "aws_appmesh_virtual_node" "n" {
              name      = "n"
              mesh_name = "m"
              spec {
                backend {
                  virtual_service { virtual_service_name = aws_appmesh_mesh.m.resource_owner }
                }
              }
            }
            "#,
        );
        assert_eq!(
            notes(&read),
            [
                "main.tf: aws_appmesh_virtual_node.n: spec.backend[0].virtual_service.virtual_service_name: \
              aws_appmesh_mesh.m.resource_owner cannot be resolved offline (of an App Mesh resource, \
              only name, id, arn, mesh_name are)"
            ]
        );
    }

    #[test]
    fn a_local_that_cannot_be_evaluated_says_why() {
        let read = read_one(
            r#"
            locals { host = "${data.aws_lb.x.dns_name}:80" }
            resource "aws_appmesh_virtual_node" "n" {
              name      = "n"
              mesh_name = "m"
              spec {
                service_discovery {
                  dns { hostname = local.host }
                }
              }
            }
            "#,
        );
        assert_eq!(
            notes(&read),
            [
                "main.tf: aws_appmesh_virtual_node.n: spec.service_discovery.dns.hostname: unresolved \
              local host (data.aws_lb.x.dns_name cannot be resolved offline)"
            ]
        );
    }

    #[test]
    fn repeated_single_blocks_dynamic_blocks_and_unknown_arguments_are_noted() {
        let read = read_one(
            r#"
            resource "aws_appmesh_virtual_node" "n" {
              name      = "n"
              mesh_name = "m"
              colour    = "blue"
              spec {
                logging {
                  access_log {
                    file { path = "/a" }
                  }
                }
                logging {
                  access_log {
                    file { path = "/b" }
                  }
                }
                dynamic "backend" {
                  for_each = var.backends
                  content {
                    virtual_service { virtual_service_name = backend.value }
                  }
                }
              }
            }
            "#,
        );
        assert_eq!(
            notes(&read),
            [
                "main.tf: aws_appmesh_virtual_node.n: colour: not an argument of aws_appmesh_virtual_node; ignored",
                "main.tf: aws_appmesh_virtual_node.n: spec.logging: the block appears 2 times where the API holds one: the first is read",
                "main.tf: aws_appmesh_virtual_node.n: spec.backend: dynamic \"backend\" blocks are not expanded offline; write the blocks out",
            ]
        );
        assert_eq!(
            read.resources[0].spec,
            json!({"logging": {"accessLog": {"file": {"path": "/a"}}}})
        );
    }

    #[test]
    fn files_without_app_mesh_resources_read_empty() {
        let read = read_one(
            r#"
            variable "region" { default = "eu-west-1" }
            provider "aws" { region = var.region }
            resource "aws_ecs_service" "app" { name = "app" }
            data "aws_vpc" "main" { default = true }
            "#,
        );
        assert_eq!(read, Read::default());
        assert_eq!(read_one(""), Read::default());
    }

    #[test]
    fn invalid_hcl_is_an_error_naming_the_file() {
        let files = [
            ("ok.tf".to_owned(), "locals { a = 1 }".to_owned()),
            (
                "broken.tf".to_owned(),
                "resource \"aws_appmesh_mesh\" \"m\" {\n  name = \n".to_owned(),
            ),
        ];
        let err = read(&files).unwrap_err();
        assert_eq!(err.source_name, "broken.tf");
        assert!(err.reason.starts_with("not valid HCL"), "{}", err.reason);
    }

    #[test]
    fn names_become_the_apis_keys() {
        for (tf, api) in [
            ("port_mapping", "portMapping"),
            ("aws_cloud_map", "awsCloudMap"),
            ("http2_route", "http2Route"),
            ("per_retry_timeout", "perRetryTimeout"),
            ("certificate_authority_arns", "certificateAuthorityArns"),
            ("default_target_hostname", "defaultTargetHostname"),
            ("tls", "tls"),
        ] {
            assert_eq!(camel(tf), api, "{tf}");
        }
    }

    #[test]
    fn format_supports_the_plain_verbs() {
        let mut ctx = Context::new();
        declare_functions(&mut ctx);
        let eval = |src: &str| {
            let body = hcl::parse(&format!("x = {src}")).unwrap();
            let attr = body.attributes().next().unwrap().clone();
            attr.expr().evaluate(&ctx)
        };
        assert_eq!(
            eval(r#"format("%s-%d-%v%%", "a", 3, true)"#).unwrap(),
            Value::from("a-3-true%")
        );
        assert!(eval(r#"format("%05d", 3)"#).is_err());
        assert_eq!(
            eval(r#"replace(trimspace(" a.b "), ".", "-")"#).unwrap(),
            Value::from("a-b")
        );
        assert!(eval(r#"replace("a", "/a/", "b")"#).is_err());
        assert_eq!(eval(r#"lower("AB")"#).unwrap(), Value::from("ab"));
    }
}
