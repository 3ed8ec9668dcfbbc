//! `trellis import`'s readers (CloudFormation, Terraform, App Mesh API JSON) and its converter:
//! the first byte picks the format, the rest is the file. No input may panic, and whatever a
//! reader accepts converts into manifests that pass validation as a set — the import's promise
//! that its output applies.

use std::collections::HashMap;

use trellis_control::{
    import::{self, EcsOptions},
    validate::{self, State},
};

/// Tokens the mutations insert: the three formats' keys and syntax.
pub const DICTIONARY: &[&[u8]] = &[
    b"Type: AWS::AppMesh::VirtualNode\n",
    b"Type: AWS::AppMesh::Route\n",
    b"Type: AWS::AppMesh::VirtualService\n",
    b"Properties:\n",
    b"MeshName: !Ref Mesh\n",
    b"VirtualNodeName: ",
    b"!Sub '${AWS::Region}-${Name}'",
    b"!GetAtt Mesh.MeshName",
    b"Fn::Join",
    b"Fn::If",
    b"resource \"aws_appmesh_virtual_node\" \"a\" {",
    b"resource \"aws_appmesh_route\" \"r\" {",
    b"mesh_name = aws_appmesh_mesh.m.id\n",
    b"name = var.x\n",
    b"spec {",
    b"listener {",
    b"weighted_target {",
    b"${local.y}",
    b"}\n",
    b"{\"virtualNode\": {\"meshName\": \"m\", \"virtualNodeName\": \"a\", \"spec\": ",
    b"{\"route\": {\"meshName\": \"m\", \"virtualRouterName\": \"r\", \"routeName\": \"x\", \"spec\": ",
    b"\"virtualNodeName\": \"",
    b"\"virtualServiceName\": \"",
    b"\"weightedTargets\": [{\"virtualNode\": \"a\", \"weight\": 1}]",
    b"\"portMapping\": {\"port\": 8080, \"protocol\": \"http\"}",
    b"\"tls\": {\"mode\": \"STRICT\"}",
    b"null",
    b"[]",
    b"{}",
    b"\"\"",
    b"-1",
    b"99999999999",
    b"\n",
    b": ",
    b",",
];

pub fn target(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest).into_owned();
    let read = match which % 3 {
        0 => import::cloudformation::read(&text, "fuzz.yaml"),
        1 => import::terraform::read(&[("fuzz.tf".into(), text)]),
        _ => import::api_json::read(&text, "fuzz.json"),
    };
    let Ok(read) = read else { return };
    let options = EcsOptions {
        image: "trellis-proxy".into(),
        control_plane: "http://control:7070".into(),
    };
    let converted = import::convert(read, "default", &options);
    // What the CLI prints, read back as `trellis validate` reads it.
    let mut yaml = String::new();
    for m in &converted.manifests {
        yaml.push_str("---\n");
        yaml.push_str(&serde_yaml_ng::to_string(m).unwrap_or_default());
    }
    let manifests = match validate::parse_documents(&yaml) {
        Ok(m) => m,
        Err(p) => panic!("imported manifests do not parse: {p:?}\n{yaml}"),
    };
    let mut state = State::new();
    let mut origin = HashMap::new();
    let mut problems = Vec::new();
    for (i, m) in manifests.into_iter().enumerate() {
        match validate::admit(m, Some(i)) {
            Ok(r) => {
                origin.insert(r.key.clone(), i);
                state.insert(r.key.clone(), std::sync::Arc::new(r));
            }
            Err(p) => problems.extend(p),
        }
    }
    problems.extend(validate::check(&state, &origin));
    assert!(
        problems.is_empty(),
        "imported manifests do not validate: {}\n{yaml}",
        problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    );
}
