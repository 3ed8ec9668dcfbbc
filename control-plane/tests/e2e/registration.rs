//! Registrations at addresses no mesh endpoint is at (issue 12): refused with the field named,
//! unless trellis-control allows the range.

use serde_json::Value;
use trellis_testkit::process::ControlProcess;

use crate::{CONTROL, cli, stderr, stdout};

/// `trellis instances register` of instance `id` at `address`.
fn register(server: &str, id: &str, address: &str) -> std::process::Output {
    cli(
        server,
        &[
            "instances",
            "register",
            "--namespace",
            "demo",
            "--service",
            "svc",
            "--id",
            id,
            "--address",
            address,
            "--port",
            "80",
        ],
    )
}

/// `address` is refused with a 400 naming the field and `why`.
fn refused(server: &str, address: &str, why: &str) {
    let out = register(server, "refused", address);
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "{address} registered: {}",
        stdout(&out)
    );
    assert!(err.contains("400"), "{address}: {err}");
    assert!(
        err.contains("invalid instance: address:"),
        "{address}: {err}"
    );
    assert!(err.contains(why), "{address}: {err}");
}

/// The addresses registered in `demo/svc`.
fn addresses(server: &str) -> Vec<String> {
    let out = cli(server, &["instances", "list", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = list["items"].as_array().or(list.as_array()).unwrap();
    items
        .iter()
        .map(|i| i["address"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn metadata_and_link_local_addresses_are_refused_loopback_is_not() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    refused(
        &control.url,
        "169.254.169.254",
        "\"169.254.169.254\" is the cloud metadata service",
    );
    refused(&control.url, "::ffff:169.254.169.254", "an IPv6 form");
    refused(&control.url, "fe80::1", "link-local");
    refused(&control.url, "0.0.0.0", "unspecified");
    refused(&control.url, "metadata.google.internal", "metadata");
    refused(&control.url, "2852039166", "169.254.169.254");
    let out = register(&control.url, "local", "127.0.0.1");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(addresses(&control.url), ["127.0.0.1"]);
}

#[tokio::test]
async fn an_allowed_range_permits_its_addresses_only() {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start_with(
        CONTROL,
        data.path(),
        "127.0.0.1:0",
        &["--allow-registration-cidr", "169.254.0.0/16"],
    )
    .await;
    let out = register(&control.url, "imds", "169.254.169.254");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(addresses(&control.url), ["169.254.169.254"]);
    refused(&control.url, "fe80::1", "link-local");
    refused(&control.url, "224.0.0.1", "multicast");
    refused(&control.url, "metadata.google.internal", "metadata");
}

#[test]
fn a_malformed_range_stops_trellis_control_at_start() {
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(CONTROL)
        .args(["--data-dir", &data.path().display().to_string()])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--allow-registration-cidr", "169.254.1.0/16"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--allow-registration-cidr") && err.contains("169.254.0.0/16"),
        "{err}"
    );
}
