//! The proxy's snapshot reader and compiler (`trellis_proxy::snapshot::{parse_file, check}`):
//! what a proxy does with a snapshot file, and what the control plane runs before every push.

use trellis_proxy::snapshot::{self, FieldError, SnapshotError};

/// Tokens the mutations insert: the snapshot schema's keys and values, and YAML syntax.
pub const DICTIONARY: &[&[u8]] = &[
    b"version: ",
    b"listeners:\n",
    b"listeners: []\n",
    b"clusters:\n",
    b"  - name: ",
    b"role: INGRESS",
    b"role: EGRESS",
    b"address: ",
    b"protocol: HTTP",
    b"protocol: HTTP2",
    b"protocol: GRPC",
    b"protocol: TCP",
    b"virtualHosts:",
    b"domains: [\"*\"]",
    b"routes:",
    b"match: { prefix: / }",
    b"exact: ",
    b"regex: ",
    b"headers: [{ name: x, exact: y }]",
    b"range: { start: 1, end: 9 }",
    b"queryParameters: [{ name: q, present: true }]",
    b"grpc: { serviceName: s, methodName: m }",
    b"method: GET",
    b"action: { weightedTargets: [{ cluster: c, weight: 1 }] }",
    b"pathRewrite: { prefix: /a, replacement: /b }",
    b"hostRewrite: h",
    b"retryPolicy: { maxRetries: 2, perTryTimeout: 1s }",
    b"httpRetryEvents: [gateway-error]",
    b"budget: { retryRatio: 0.2, minRetriesPerSecond: 10 }",
    b"timeout: { perRequest: 5s, idle: 1s }",
    b"tcp: { weightedTargets: [{ cluster: c, weight: 1 }] }",
    b"lbPolicy: LEAST_REQUEST",
    b"endpoints: [{ address: \"127.0.0.1:1\" }]",
    b"health: UNHEALTHY",
    b"127.0.0.1:0",
    b"[::1]:80",
    b"weight: ",
    b"port: ",
    b"4294967296",
    b"-1",
    b"1e309",
    b".nan",
    b"0.5s",
    b"99999999999s",
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
    b"'",
    b"&a ",
    b"*a",
    b"<<: *a",
    b"!!str ",
    b"~",
    b"null",
    b"---\n",
    b"#",
];

/// Every problem names a field and says what is wrong with it.
fn check_errors(e: &SnapshotError) -> Vec<FieldError> {
    let errors = e.field_errors();
    assert!(!errors.is_empty(), "an error without problems: {e}");
    for error in &errors {
        assert!(!error.path.is_empty(), "a problem without a path: {error}");
        assert!(
            !error.reason.is_empty(),
            "a problem without a reason: {error}"
        );
    }
    errors
}

/// Reads the input as a snapshot file and compiles it: no panic, problems with field paths,
/// compiling twice gives the same answer, and a snapshot that compiles survives a round trip
/// through its JSON form unchanged.
pub fn target(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let parsed = match snapshot::parse_file(&text) {
        Ok(s) => s,
        Err(e) => {
            check_errors(&e);
            return;
        }
    };
    let first = snapshot::check(&parsed).map_err(|e| check_errors(&e));
    let second = snapshot::check(&parsed).map_err(|e| check_errors(&e));
    assert_eq!(first, second, "compiling the same snapshot twice disagreed");
    if first.is_ok() {
        // What `/config_dump` shows and the control plane stores must read back as itself.
        let json = match serde_json::to_string(&parsed) {
            Ok(json) => json,
            Err(e) => panic!("a compiled snapshot does not serialise: {e}"),
        };
        match snapshot::parse(&json) {
            Ok(again) => assert_eq!(again, parsed, "the JSON round trip changed the snapshot"),
            Err(e) => panic!("a compiled snapshot's JSON does not parse: {e}\n{json}"),
        }
    }
}
