//! Operators of the API: bearer tokens with roles, the audit log, and the refusal to listen in
//! the clear beyond loopback.

use std::os::unix::fs::PermissionsExt as _;

use trellis_testkit::process::ControlProcess;

use crate::{CLI, CONTROL, stderr, stdout};

/// The CLI against `server` as the operator of `token` (none: anonymous), with no login file.
fn as_operator(server: &str, token: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(CLI);
    cmd.args(["--server", server])
        .args(args)
        .env("TRELLIS_CONFIG", "/nonexistent/trellis-config.json")
        .env_remove("TRELLIS_TOKEN");
    if let Some(t) = token {
        cmd.env("TRELLIS_TOKEN", t);
    }
    cmd.output().unwrap()
}

const MESH: &str = "apiVersion: mesh.trellis.dev/v1beta1\nkind: Mesh\nmetadata: { name: m }\n";

/// With `--auth`: no token → 401; a viewer reads but may not write (403); an admin writes;
/// the audit log names who changed what.
#[tokio::test]
async fn operators_authenticate_and_every_write_is_audited() {
    let data = tempfile::tempdir().unwrap();
    let control =
        ControlProcess::start_with(CONTROL, data.path(), "127.0.0.1:0", &["--auth"]).await;
    let admin_file = data.path().join("admin-token");
    let mode = std::fs::metadata(&admin_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let admin = std::fs::read_to_string(&admin_file)
        .unwrap()
        .trim()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, MESH).unwrap();
    let apply = ["apply", "-f", file.to_str().unwrap()];

    let out = as_operator(&control.url, None, &apply);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("401"), "{}", stderr(&out));
    let out = as_operator(&control.url, Some("trellis-op-forged"), &["get", "meshes"]);
    assert!(
        stderr(&out).contains("unknown operator token"),
        "{}",
        stderr(&out)
    );

    let out = as_operator(
        &control.url,
        Some(&admin),
        &["operator", "create", "--name", "vera", "--role", "viewer"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let viewer = stdout(&out).trim().to_string();
    let out = as_operator(&control.url, Some(&viewer), &apply);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("403") && stderr(&out).contains("vera is a viewer"),
        "{}",
        stderr(&out)
    );
    let out = as_operator(&control.url, Some(&viewer), &["get", "meshes"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = as_operator(&control.url, Some(&admin), &apply);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = as_operator(&control.url, Some(&viewer), &["audit", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let writes: Vec<(&str, &str, &str)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["who"].as_str().unwrap(),
                e["action"].as_str().unwrap(),
                e["what"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        writes,
        [
            ("admin", "POST /v1/operators", "operator vera (viewer)"),
            ("admin", "POST /v1/apply", "created Mesh//m"),
        ],
        "refused writes never reach the log; {log:#}"
    );
}

/// A non-loopback address is refused without --tls and --auth, unless `--insecure`.
#[test]
fn listening_beyond_loopback_needs_tls_and_auth() {
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(CONTROL)
        .args([
            "--data-dir",
            data.path().to_str().unwrap(),
            "--listen",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("needs --tls and --auth (or --insecure"),
        "{}",
        stderr(&out)
    );
}

/// Operators are listed without their tokens and revoked by id; the last admin cannot be.
#[tokio::test]
async fn operators_are_listed_and_revoked() {
    let data = tempfile::tempdir().unwrap();
    let control =
        ControlProcess::start_with(CONTROL, data.path(), "127.0.0.1:0", &["--auth"]).await;
    let admin = std::fs::read_to_string(data.path().join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let out = as_operator(
        &control.url,
        Some(&admin),
        &["operator", "create", "--name", "vera", "--role", "viewer"],
    );
    let viewer = stdout(&out).trim().to_string();
    let out = as_operator(&control.url, Some(&admin), &["operator", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list = stdout(&out);
    assert!(
        !list.contains(&viewer) && !list.contains(&admin),
        "tokens are never listed: {list}"
    );
    let id_of = |name: &str| {
        list.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .to_string()
    };
    let out = as_operator(
        &control.url,
        Some(&admin),
        &["operator", "revoke", &id_of("vera")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = as_operator(&control.url, Some(&viewer), &["get", "meshes"]);
    assert!(
        stderr(&out).contains("unknown operator token"),
        "{}",
        stderr(&out)
    );
    let out = as_operator(
        &control.url,
        Some(&admin),
        &["operator", "revoke", &id_of("admin")],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("last admin"), "{}", stderr(&out));
}
