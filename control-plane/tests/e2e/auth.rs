//! Operators of the API: bearer tokens with roles, the audit log, and the refusal to listen in
//! the clear beyond loopback.

use std::os::unix::fs::PermissionsExt as _;

use trellis_testkit::process::ControlProcess;

use crate::{CLI, CONTROL, stderr, stdout};

/// The CLI against `server` as the operator of `token` (none: anonymous), with no login file.
pub(crate) fn as_operator(
    server: &str,
    token: Option<&str>,
    args: &[&str],
) -> std::process::Output {
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
    // Previews store nothing: a viewer may run them, and they are not audited.
    let out = as_operator(
        &control.url,
        Some(&viewer),
        &["diff", "-f", file.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stdout(&out).contains("mesh/m created"), "{}", stdout(&out));
    let out = as_operator(
        &control.url,
        Some(&viewer),
        &["apply", "--dry-run", "-f", file.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let out = as_operator(&control.url, Some(&admin), &apply);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = as_operator(&control.url, Some(&viewer), &["audit", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let writes: Vec<(&str, &str, &str, u64)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["who"].as_str().unwrap(),
                e["action"].as_str().unwrap(),
                e["what"].as_str().unwrap(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        writes,
        [
            (
                "anonymous",
                "POST /v1/apply",
                "refused: an operator token is required (trellis login, or TRELLIS_TOKEN)",
                401
            ),
            ("admin", "POST /v1/operators", "operator vera (viewer)", 200),
            (
                "vera",
                "POST /v1/apply",
                "refused: operator vera is a viewer: writes need an admin",
                403
            ),
            ("admin", "POST /v1/apply", "created Mesh//m", 200),
        ],
        "refused writes are recorded too; {log:#}"
    );
    // Each entry of a known operator names its id, as `trellis operator list` shows it.
    let out = as_operator(&control.url, Some(&admin), &["operator", "list"]);
    let list = stdout(&out);
    let id_of = |name: &str| {
        list.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .to_string()
    };
    let ids: Vec<Option<&str>> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["operatorId"].as_str())
        .collect();
    let (admin_id, vera_id) = (id_of("admin"), id_of("vera"));
    assert_eq!(
        ids,
        [
            None,
            Some(admin_id.as_str()),
            Some(vera_id.as_str()),
            Some(admin_id.as_str())
        ],
        "{log:#}"
    );
}

/// Admins revoking each other at the same moment never leave the mesh without one: each
/// revocation guards the admins that remain in its transaction, so concurrent ones conflict
/// (409) instead of all landing.
#[tokio::test]
async fn concurrent_revocations_leave_an_admin() {
    use tokio::io::AsyncWriteExt as _;
    let data = tempfile::tempdir().unwrap();
    let control =
        ControlProcess::start_with(CONTROL, data.path(), "127.0.0.1:0", &["--auth"]).await;
    let first = std::fs::read_to_string(data.path().join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let mut tokens = vec![first.clone()];
    for i in 0..7 {
        let out = as_operator(
            &control.url,
            Some(&first),
            &[
                "operator",
                "create",
                "--name",
                &format!("admin{i}"),
                "--role",
                "admin",
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        tokens.push(stdout(&out).trim().to_string());
    }
    let out = as_operator(&control.url, Some(&first), &["operator", "list"]);
    let ids: Vec<String> = stdout(&out)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    assert_eq!(ids.len(), tokens.len(), "{}", stdout(&out));
    // Every admin revokes another at once: connections open first, then all the requests.
    let mut streams = Vec::new();
    for _ in &tokens {
        streams.push(tokio::net::TcpStream::connect(control.addr).await.unwrap());
    }
    let requests: Vec<String> = tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            format!(
                "DELETE /v1/operators/{} HTTP/1.1\r\nhost: trellis\r\nauthorization: Bearer {token}\r\ncontent-length: 0\r\n\r\n",
                ids[(i + 1) % ids.len()]
            )
        })
        .collect();
    let sends = streams
        .iter_mut()
        .zip(&requests)
        .map(|(s, r)| s.write_all(r.as_bytes()));
    for sent in futures_util::future::join_all(sends).await {
        sent.unwrap();
    }
    let mut statuses = Vec::new();
    for s in &mut streams {
        let r = trellis_testkit::raw::read_response(s).await.unwrap();
        if r.status == 409 {
            assert!(
                r.text().contains("another revocation") || r.text().contains("last admin"),
                "{}",
                r.text()
            );
        }
        statuses.push(r.status);
    }
    assert!(statuses.contains(&200), "{statuses:?}");
    // Whoever is left: at least one admin.
    let left = tokens
        .iter()
        .find(|t| {
            as_operator(&control.url, Some(t), &["operator", "list"])
                .status
                .success()
        })
        .unwrap_or_else(|| panic!("no admin is left: {statuses:?}"));
    let out = as_operator(&control.url, Some(left), &["operator", "list"]);
    let admins = stdout(&out)
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("admin"))
        .count();
    assert!(admins >= 1, "{}", stdout(&out));
}

/// The token saved by `trellis login` goes to the server it was saved for only; no token is
/// sent over plain http beyond loopback. (Multi-threaded: the listener answers while the test
/// waits for the CLI.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saved_token_goes_to_its_server_only() {
    use trellis_testkit::{RawHttpServer, RawReply};
    let server = RawHttpServer::start(vec![RawReply::keep(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n[]",
    )])
    .await;
    let url = format!("http://{}", server.addr);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let run = |args: &[&str]| {
        std::process::Command::new(CLI)
            .args(args)
            .env("TRELLIS_CONFIG", &config)
            .env_remove("TRELLIS_TOKEN")
            .env_remove("TRELLIS_SERVER")
            .output()
            .unwrap()
    };
    let login = |saved_for: &str| {
        std::fs::write(
            &config,
            serde_json::json!({ "server": saved_for, "token": "trellis-op-saved" }).to_string(),
        )
        .unwrap();
    };
    let authorized = |i: usize| {
        let requests = server.requests();
        requests[i].to_ascii_lowercase().contains("authorization:")
    };

    // Saved for another server: this one gets no token.
    login("http://127.0.0.1:1");
    let out = run(&["--server", &url, "audit", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!authorized(0), "{:?}", server.requests());
    // Saved for this one: it does.
    login(&url);
    let out = run(&["--server", &url, "audit", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(authorized(1), "{:?}", server.requests());
    let out = run(&["audit", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(authorized(2), "{:?}", server.requests());

    // Never in the clear beyond loopback, saved or given.
    login("http://192.0.2.1:7070");
    for args in [
        vec!["audit"],
        vec!["--server", "http://192.0.2.1:7070", "--token", "t", "audit"],
        vec![
            "--server",
            "http://192.0.2.1:7070",
            "login",
            "--with-token",
            "t",
        ],
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr(&out).contains(
                "refusing to send an operator token to http://192.0.2.1:7070 in the clear"
            ),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert_eq!(server.requests().len(), 3);
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
