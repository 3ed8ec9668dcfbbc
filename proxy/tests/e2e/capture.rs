//! Traffic capture for real (issue 13): two Linux network namespaces joined by a veth pair, the
//! real iptables rules of `trellis-proxy init` in the app's, the proxy running as its own UID.
//! Needs root, `ip` and iptables (`./scripts/test` installs iptables; CI runs as root).

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use trellis_testkit::eventually;

use crate::BIN;

/// Two namespaces, `app` (10.77.x.2) and `peer` (10.77.x.1), and the processes started in
/// them; all removed when dropped.
struct Netns {
    app: String,
    peer: String,
    children: Vec<Child>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.app, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn run(args: &[&str]) -> std::process::Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Netns {
    fn new() -> Self {
        assert!(
            rustix_is_root(),
            "the capture test needs root (network namespaces, iptables)"
        );
        let id = std::process::id() % 200 + 20;
        let ns = Self {
            app: format!("trellis-app-{}", std::process::id()),
            peer: format!("trellis-peer-{}", std::process::id()),
            children: Vec::new(),
        };
        run(&["ip", "netns", "add", &ns.app]);
        run(&["ip", "netns", "add", &ns.peer]);
        let (a, p) = (format!("tva{id}"), format!("tvp{id}"));
        run(&[
            "ip", "link", "add", &a, "netns", &ns.app, "type", "veth", "peer", "name", &p, "netns",
            &ns.peer,
        ]);
        for (n, dev, ip) in [
            (&ns.app, &a, "10.77.0.2/24"),
            (&ns.peer, &p, "10.77.0.1/24"),
        ] {
            run(&["ip", "-n", n, "addr", "add", ip, "dev", dev]);
            run(&["ip", "-n", n, "link", "set", dev, "up"]);
            run(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        ns
    }

    /// Starts `args` in namespace `ns`.
    fn spawn(&mut self, ns: &str, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// A GET of `url` from namespace `ns` (as root: the app's traffic): the status and body, or
    /// the error.
    fn get(&self, ns: &str, url: &str) -> Result<(u16, String), String> {
        let script = format!(
            "import urllib.request as u\nr = u.urlopen(u.Request({url:?}), timeout=5)\nprint(r.status)\nprint(r.read().decode()[:200])"
        );
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", &script])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (status, body) = text.split_once('\n').unwrap_or((&text, ""));
        Ok((status.trim().parse().unwrap_or(0), body.to_string()))
    }

    fn nat_rules(&self) -> String {
        let out = run(&[
            "ip", "netns", "exec", &self.app, "iptables", "-t", "nat", "-S",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn rustix_is_root() -> bool {
    // /proc/self/status: "Uid:\treal\teffective..."
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

const SNAPSHOT: &str = r#"version: capture
listeners:
  - name: ingress
    role: INGRESS
    virtualHosts:
      - name: inbound
        domains: ["*"]
        routes:
          - name: app
            action: { weightedTargets: [{ cluster: app, weight: 1 }] }
  - name: egress
    role: EGRESS
    unmatched: PASSTHROUGH
clusters:
  - name: app
    endpoints: [{ address: "127.0.0.1:8080" }]
"#;

/// With `trellis-proxy init`'s rules, a client outside reaching the app's port is served through
/// the proxy's ingress (the app listens on loopback only), the app calling a plain `IP:port`
/// reaches it through the proxy's egress, and the proxy's own connections are not captured
/// again (no loop). Running init again leaves the same rules.
#[tokio::test]
async fn init_captures_inbound_and_outbound_traffic_through_the_proxy() {
    let mut ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("snapshot.yaml");
    std::fs::write(&snapshot, SNAPSHOT).unwrap();
    let log = dir.path().join("access.log");
    std::fs::write(&log, "").unwrap();
    for p in [dir.path(), &log, &snapshot] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = if p.is_dir() { 0o777 } else { 0o666 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    // Without capture, the app (on loopback) is out of reach.
    let (app, peer) = (ns.app.clone(), ns.peer.clone());
    ns.spawn(
        &app,
        &[
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "127.0.0.1",
            "--directory",
            "/",
        ],
    );
    ns.spawn(
        &peer,
        &[
            "python3",
            "-m",
            "http.server",
            "9090",
            "--bind",
            "10.77.0.1",
            "--directory",
            "/",
        ],
    );
    eventually(Duration::from_secs(10), "the peer's server", || async {
        ns.get(&peer, "http://10.77.0.1:9090/").map(drop)
    })
    .await;
    assert!(
        ns.get(&peer, "http://10.77.0.2:8080/").is_err(),
        "reached without capture"
    );

    let dry = run(&[BIN, "init", "--app-ports", "8080", "--dry-run"]);
    assert!(String::from_utf8_lossy(&dry.stdout).contains("--to-ports 15000"));
    assert!(
        !ns.nat_rules().contains("TRELLIS"),
        "a dry run installs nothing"
    );
    for _ in 0..2 {
        run(&[
            "ip",
            "netns",
            "exec",
            &app,
            BIN,
            "init",
            "--app-ports",
            "8080",
            "--proxy-uid",
            "1337",
        ]);
    }
    let rules = ns.nat_rules();
    assert_eq!(rules.matches("-j TRELLIS_INBOUND").count(), 1, "{rules}");
    assert_eq!(rules.matches("-j TRELLIS_OUTPUT").count(), 1, "{rules}");
    assert_eq!(rules.matches("--to-ports 15001").count(), 1, "{rules}");

    let snapshot = snapshot.display().to_string();
    let log_arg = log.display().to_string();
    ns.spawn(
        &app,
        &[
            "setpriv",
            "--reuid",
            "1337",
            "--regid",
            "1337",
            "--clear-groups",
            "--",
            BIN,
            "--snapshot",
            &snapshot,
            "--ingress-addr",
            "0.0.0.0:15000",
            "--egress-addr",
            "0.0.0.0:15001",
            "--admin-addr",
            "127.0.0.1:9901",
            "--access-log",
            &log_arg,
        ],
    );
    eventually(Duration::from_secs(10), "the proxy", || async {
        ns.get(&app, "http://127.0.0.1:9901/ready").map(drop)
    })
    .await;

    // Inbound: captured to the ingress, which forwards to the app on loopback.
    let (status, body) = ns.get(&peer, "http://10.77.0.2:8080/").unwrap();
    assert_eq!(status, 200, "{body}");
    // Outbound: the app's call to a plain IP:port goes through the egress (passthrough) and the
    // proxy's own connection to it is not captured again.
    let (status, _) = ns.get(&app, "http://10.77.0.1:9090/").unwrap();
    assert_eq!(status, 200);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("\"egress\"") && logged.contains("10.77.0.1:9090"),
        "the egress saw the call: {logged}"
    );
    assert!(
        logged.contains("\"ingress\""),
        "the ingress saw the inbound call: {logged}"
    );
}
