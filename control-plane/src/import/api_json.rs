//! What the App Mesh API returned: `aws appmesh describe-*` answers (`{"virtualNode": {...}}`),
//! their inner objects, several in an array or one after another in a file, and ECS task
//! definitions (`aws ecs describe-task-definition`, or a task definition as registered).
//! `list-*` answers name resources without their specs: each entry is reported.

use serde_json::Value;

use super::{ApiKind, ApiResource, EcsTask, Note, Read, ReadError};

/// The wrapper key of a `describe-*` answer, and the name field of its object.
const DESCRIBED: [(&str, ApiKind, &str); 7] = [
    ("mesh", ApiKind::Mesh, "meshName"),
    (
        "virtualService",
        ApiKind::VirtualService,
        "virtualServiceName",
    ),
    ("virtualRouter", ApiKind::VirtualRouter, "virtualRouterName"),
    ("route", ApiKind::Route, "routeName"),
    ("virtualNode", ApiKind::VirtualNode, "virtualNodeName"),
    (
        "virtualGateway",
        ApiKind::VirtualGateway,
        "virtualGatewayName",
    ),
    ("gatewayRoute", ApiKind::GatewayRoute, "gatewayRouteName"),
];

/// The `list-*` answers' keys.
const LISTED: [&str; 7] = [
    "meshes",
    "virtualServices",
    "virtualRouters",
    "routes",
    "virtualNodes",
    "virtualGateways",
    "gatewayRoutes",
];

/// Reads the JSON `text`, named `source_name` in the report.
pub fn read(text: &str, source_name: &str) -> Result<Read, ReadError> {
    let mut values = Vec::new();
    for value in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
        values.push(value.map_err(|e| ReadError {
            source_name: source_name.into(),
            reason: format!("not JSON: {e}"),
        })?);
    }
    let mut read = Read::default();
    let mut n = 0;
    for value in values {
        match value {
            Value::Array(items) => {
                for item in items {
                    one(item, source_name, &mut n, &mut read);
                }
            }
            item => one(item, source_name, &mut n, &mut read),
        }
    }
    Ok(read)
}

/// One answer (or inner object): the `n`th of the file.
fn one(value: Value, source_name: &str, n: &mut usize, read: &mut Read) {
    let source = format!("{source_name}: [{n}]");
    *n += 1;
    let Value::Object(mut map) = value else {
        read.notes.push(Note {
            source,
            field: String::new(),
            reason: "not an App Mesh API answer (an object): skipped".into(),
        });
        return;
    };
    // `describe-*`: {"virtualNode": {...}}.
    for (key, kind, name_field) in DESCRIBED {
        if let Some(Value::Object(inner)) = map.remove(key) {
            described(kind, name_field, inner, source, read);
            return;
        }
    }
    // The inner object alone (`jq .virtualNode`): known by its name field. A Mesh's is
    // `meshName` alone, which every other kind has too.
    for (_, kind, name_field) in DESCRIBED.iter().rev() {
        if map.contains_key(*name_field) && map.contains_key("spec") {
            described(*kind, name_field, map, source, read);
            return;
        }
    }
    for key in LISTED {
        if let Some(Value::Array(items)) = map.get(key) {
            for item in items {
                let name = DESCRIBED
                    .iter()
                    .find_map(|(_, _, f)| (*f != "meshName").then(|| item.get(*f)).flatten())
                    .or_else(|| item.get("meshName"))
                    .and_then(Value::as_str)
                    .unwrap_or("?");
                read.notes.push(Note {
                    source: source.clone(),
                    field: key.into(),
                    reason: format!(
                        "{name}: a list-* answer names resources without their spec; export each with the matching describe-* command"
                    ),
                });
            }
            return;
        }
    }
    // ECS: {"taskDefinition": {...}} or a task definition as registered.
    let task = match map.remove("taskDefinition") {
        Some(Value::Object(task)) => Some(task),
        _ => map.contains_key("containerDefinitions").then_some(map),
    };
    if let Some(task) = task {
        read.tasks.push(EcsTask {
            source,
            task: Value::Object(task),
        });
        return;
    }
    read.notes.push(Note {
        source,
        field: String::new(),
        reason: "neither an App Mesh describe-* answer nor an ECS task definition: skipped".into(),
    });
}

fn described(
    kind: ApiKind,
    name_field: &str,
    mut inner: serde_json::Map<String, Value>,
    source: String,
    read: &mut Read,
) {
    let text = |inner: &serde_json::Map<String, Value>, f: &str| {
        inner.get(f).and_then(Value::as_str).map(str::to_string)
    };
    let (Some(mesh), Some(name)) = (text(&inner, "meshName"), text(&inner, name_field)) else {
        read.notes.push(Note {
            source,
            field: name_field.into(),
            reason: format!("a {kind} without meshName or {name_field}: skipped"),
        });
        return;
    };
    let parent = match kind {
        ApiKind::Route => text(&inner, "virtualRouterName"),
        ApiKind::GatewayRoute => text(&inner, "virtualGatewayName"),
        _ => None,
    };
    if parent.is_none() && matches!(kind, ApiKind::Route | ApiKind::GatewayRoute) {
        read.notes.push(Note {
            source,
            field: String::new(),
            reason: format!(
                "a {kind} without its virtualRouterName or virtualGatewayName: skipped"
            ),
        });
        return;
    }
    let spec = inner.remove("spec").unwrap_or(Value::Null);
    // metadata (ARN, uid, version, timestamps, owners) and status are AWS bookkeeping, not
    // configuration: a resource's ARN and owner are reported, so none is lost unseen.
    if let Some(owner) = inner
        .get("metadata")
        .and_then(|m| m.get("meshOwner"))
        .and_then(Value::as_str)
    {
        let resource_owner = inner
            .get("metadata")
            .and_then(|m| m.get("resourceOwner"))
            .and_then(Value::as_str);
        if resource_owner.is_some_and(|r| r != owner) {
            read.notes.push(Note {
                source: source.clone(),
                field: "metadata.resourceOwner".into(),
                reason: "a resource shared from another AWS account: ownership has no Trellis equivalent (all resources of a control plane are its operator's)".into(),
            });
        }
    }
    read.resources.push(ApiResource {
        kind,
        mesh,
        name,
        parent,
        spec,
        source,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_answers_inner_objects_arrays_and_streams() {
        let text = r#"
{"virtualNode": {"meshName": "shop", "virtualNodeName": "blue", "spec": {"listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}]},
  "metadata": {"arn": "arn:aws:appmesh:us-west-2:1:mesh/shop/virtualNode/blue", "meshOwner": "1", "resourceOwner": "1"}, "status": {"status": "ACTIVE"}}}
[{"route": {"meshName": "shop", "virtualRouterName": "color", "routeName": "r1", "spec": {"priority": 1}}},
 {"meshName": "shop", "spec": {"egressFilter": {"type": "DROP_ALL"}}}]
{"virtualNodes": [{"meshName": "shop", "virtualNodeName": "green"}]}
{"taskDefinition": {"family": "front", "containerDefinitions": [{"name": "envoy"}]}}
"#;
        let read = read(text, "export.json").unwrap();
        let got: Vec<(ApiKind, &str, Option<&str>, &str)> = read
            .resources
            .iter()
            .map(|r| {
                (
                    r.kind,
                    r.name.as_str(),
                    r.parent.as_deref(),
                    r.source.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (ApiKind::VirtualNode, "blue", None, "export.json: [0]"),
                (ApiKind::Route, "r1", Some("color"), "export.json: [1]"),
                (ApiKind::Mesh, "shop", None, "export.json: [2]"),
            ]
        );
        assert_eq!(
            read.resources[0].spec["listeners"][0]["portMapping"]["port"],
            8080
        );
        assert_eq!(read.tasks.len(), 1);
        assert_eq!(read.tasks[0].task["family"], "front");
        assert_eq!(read.notes.len(), 1, "{:#?}", read.notes);
        assert!(
            read.notes[0].reason.starts_with("green: a list-* answer"),
            "{}",
            read.notes[0]
        );
    }

    #[test]
    fn what_is_not_an_answer_is_reported_or_refused() {
        assert!(read("{not json", "x.json").is_err());
        let r = read(r#"{"something": 1} 3"#, "x.json").unwrap();
        assert!(r.resources.is_empty());
        assert_eq!(r.notes.len(), 2, "{:#?}", r.notes);
        let r = read(
            r#"{"route": {"meshName": "m", "routeName": "r", "spec": {}}}"#,
            "x.json",
        )
        .unwrap();
        assert!(r.resources.is_empty());
        assert!(
            r.notes[0].reason.contains("without its virtualRouterName"),
            "{:#?}",
            r.notes
        );
    }
}
