//! The control plane's manifest validator (`trellis_control::validate`): a YAML stream split
//! into manifests, each admitted on its own, then the set checked as a whole — what `apply` does —
//! and, when it passes, translated into every proxy's snapshot and compiled.

use std::collections::HashMap;

use trellis_control::{
    model::Kind,
    translate,
    validate::{self, Problem, Resource, State},
    view,
};

/// Tokens the mutations insert: the manifest schema's keys and values, and YAML syntax.
pub const DICTIONARY: &[&[u8]] = &[
    b"apiVersion: mesh.trellis.dev/v1beta1\n",
    b"kind: Mesh\n",
    b"kind: VirtualNode\n",
    b"kind: VirtualRouter\n",
    b"kind: VirtualService\n",
    b"kind: VirtualGateway\n",
    b"kind: GatewayRoute\n",
    b"metadata: { name: a }\n",
    b"namespace: ",
    b"spec:\n",
    b"meshRef: { name: m }",
    b"listeners: [{ portMapping: { port: 8080, protocol: http } }]",
    b"protocol: http2",
    b"protocol: grpc",
    b"protocol: tcp",
    b"tls: { mode: DISABLED }",
    b"serviceDiscovery: { dns: { hostname: a.local } }",
    b"registry: { namespaceName: demo, serviceName: s, attributes: { version: blue } }",
    b"backends: [{ virtualService: { virtualServiceRef: { name: s } } }]",
    b"routes:",
    b"- name: r",
    b"httpRoute:",
    b"http2Route:",
    b"grpcRoute:",
    b"tcpRoute:",
    b"match: { prefix: / }",
    b"headers: [{ name: x, match: { exact: y } }]",
    b"action: { weightedTargets: [{ virtualNodeRef: { name: a }, weight: 100 }] }",
    b"retryPolicy: { maxRetries: 2, perRetryTimeout: { unit: ms, value: 10 } }",
    b"timeout: { idle: { unit: s, value: 31536001 } }",
    b"provider: { virtualRouter: { virtualRouterRef: { name: r } } }",
    b"provider: { virtualNode: { virtualNodeRef: { name: a } } }",
    b"virtualGatewayRef: { name: g }",
    b"target: { virtualService: { virtualServiceRef: { name: s } } }",
    b"weight: ",
    b"port: ",
    b"4294967296",
    b"-1",
    b"101",
    b"\n",
    b"\n  ",
    b"- ",
    b": ",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b"\"",
    b"&a ",
    b"*a",
    b"<<: *a",
    b"~",
    b"---\n",
    b"...\n",
];

/// A problem names a field and says what is wrong with it.
fn check_problem(p: &Problem) {
    assert!(!p.path.is_empty(), "a problem without a field path: {p}");
    assert!(!p.reason.is_empty(), "a problem without a reason: {p}");
}

/// Validates the input as an applied manifest stream: no panic, every problem carries a field
/// path (and its document and resource where it has them), and checking is deterministic.
pub fn target(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let manifests = match validate::parse_documents(&text) {
        Ok(m) => m,
        Err(problems) => {
            assert!(!problems.is_empty());
            for p in &problems {
                check_problem(p);
                assert!(
                    p.document.is_some(),
                    "a stream problem without its document: {p}"
                );
            }
            return;
        }
    };
    let mut state = State::new();
    let mut origin = HashMap::new();
    for (i, manifest) in manifests.into_iter().enumerate() {
        match validate::admit(manifest, Some(i)) {
            Ok(resource) => {
                reads_back(&resource, i);
                origin.insert(resource.key.clone(), i);
                state.insert(resource.key.clone(), std::sync::Arc::new(resource));
            }
            Err(problems) => {
                assert!(
                    !problems.is_empty(),
                    "document {i} refused without a problem"
                );
                for p in &problems {
                    check_problem(p);
                    assert_eq!(
                        p.document,
                        Some(i),
                        "a problem naming the wrong document: {p}"
                    );
                }
            }
        }
    }
    let problems = validate::check(&state, &origin);
    for p in &problems {
        check_problem(p);
    }
    assert_eq!(
        problems,
        validate::check(&state, &origin),
        "check is not deterministic"
    );
    if problems.is_empty() {
        translate_all(&state);
    }
}

/// An admitted resource, stored as `apply` stores it, reads back the same: the store's watch, a
/// reload and a restart read it back, and a resource that did not would leave the mesh (a
/// gateway health check without `healthyThreshold` once did: stored as 0, refused on reading).
fn reads_back(resource: &Resource, document: usize) {
    let stored = match serde_json::to_vec(resource) {
        Ok(stored) => stored,
        Err(e) => panic!("document {document} does not serialize: {e}"),
    };
    match view::read_resource(&stored) {
        Ok(back) => assert!(
            back.key == resource.key && back.same(resource),
            "document {document} reads back from the store as something else:\n{back:?}\nnot\n{resource:?}"
        ),
        Err(e) => {
            panic!("document {document} is admitted but does not read back from the store: {e}")
        }
    }
}

/// What the set was validated for: every proxy's snapshot, translated from a state that passed
/// validation, compiles with the proxy's own compiler. Validation is what refuses bad config; a
/// snapshot the compiler rejects here is a validator gap (the control plane would cut pieces
/// out of it or withhold it at push time instead of refusing the apply).
fn translate_all(state: &State) {
    for key in state.keys() {
        let translated = match key.kind {
            Kind::VirtualNode => translate::sidecar(state, &[], key, Default::default()),
            Kind::VirtualGateway => translate::gateway(state, &[], key, Default::default()),
            _ => continue,
        };
        let Some(t) = translated else {
            panic!("{key} was validated but does not translate");
        };
        if let Err(e) = trellis_proxy::snapshot::check(&t.snapshot) {
            panic!(
                "validated manifests translate to a snapshot for {key} that the proxy rejects: {e}"
            );
        }
    }
}
