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
        for (n, dev, ip, ip6) in [
            (&ns.app, &a, "10.77.0.2/24", "fd77::2/64"),
            (&ns.peer, &p, "10.77.0.1/24", "fd77::1/64"),
        ] {
            run(&["ip", "-n", n, "addr", "add", ip, "dev", dev]);
            run(&["ip", "-n", n, "-6", "addr", "add", ip6, "dev", dev, "nodad"]);
            run(&["ip", "-n", n, "link", "set", dev, "up"]);
            run(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        ns
    }

    /// A static HTTP server (Python's) in namespace `ns` on `bind`:`port`.
    fn http_server(&mut self, ns: &str, bind: &str, port: &str) {
        let args = [
            "python3",
            "-m",
            "http.server",
            port,
            "--bind",
            bind,
            "--directory",
            "/",
        ];
        self.spawn(ns, &args);
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

    /// Runs a Python script in namespace `ns` (as root: the app's traffic); its output or error.
    fn python(&self, ns: &str, script: &str) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", script])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `trellis-proxy init` in the app's namespace and the proxy there as UID 1337.
    fn start_proxy(&mut self, dir: &std::path::Path, snapshot: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join("snapshot.yaml");
        std::fs::write(&path, snapshot).unwrap();
        let log = dir.join("access.log");
        std::fs::write(&log, "").unwrap();
        for (p, mode) in [(dir, 0o777), (&*log, 0o666), (&*path, 0o666)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let app = self.app.clone();
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
        let (path, log_arg) = (path.display().to_string(), log.display().to_string());
        self.spawn(
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
                &path,
                "--ingress-addr",
                "0.0.0.0:15000",
                "--egress-addr",
                "0.0.0.0:15001",
                "--ipv6-ingress-addr",
                "[::]:15000",
                "--ipv6-egress-addr",
                "[::1]:15001",
                "--admin-addr",
                "127.0.0.1:9901",
                "--access-log",
                &log_arg,
            ],
        );
        log
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

    // Without capture, the app (on loopback) is out of reach.
    let (app, peer) = (ns.app.clone(), ns.peer.clone());
    ns.http_server(&app, "127.0.0.1", "8080");
    ns.http_server(&peer, "10.77.0.1", "9090");
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

    // (Once more, as the proxy starts: still one set.)
    let log = ns.start_proxy(dir.path(), SNAPSHOT);
    assert_eq!(ns.nat_rules(), rules);
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

const ORIGINAL_DST: &str = r#"version: original-dst
listeners:
  - name: egress
    role: EGRESS
    unmatched: DENY
    virtualHosts:
      - name: reviews
        domains: ["reviews.shop.svc.cluster.local", "10.96.0.10:80"]
        routes:
          - name: reviews
            match: { prefix: /, port: 80 }
            action: { weightedTargets: [{ cluster: reviews, weight: 1 }] }
      - name: db
        domains: ["10.96.0.11:7000"]
        routes:
          - name: db
            action: { weightedTargets: [{ cluster: db, weight: 1 }] }
clusters:
  - name: reviews
    endpoints: [{ address: "10.77.0.1:9090" }]
  - name: db
    protocol: TCP_ONLY
    endpoints: [{ address: "10.77.0.1:7070" }]
"#;

/// A TCP server that speaks first (`220 db ready`), then echoes lines.
const DB_SERVER: &str = r#"
import socketserver
class H(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"220 db ready\n")
        for line in self.rfile:
            self.wfile.write(b"echo " + line)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("10.77.0.1", 7070), H).serve_forever()
"#;

/// The app's connections keep where they were going (`SO_ORIGINAL_DST`): HTTP naming a host the
/// egress does not know is routed by the address it was sent to (a virtual service's cluster
/// IP, which exists nowhere; its port is the one routes match when the `Host` names none), bytes that are not HTTP go to the TCP route of the virtual host
/// that address names — also when the server speaks first and the client waits — and with the
/// mesh's DROP_ALL a destination the mesh does not name is refused, HTTP or not.
#[tokio::test]
async fn captured_connections_go_by_their_original_destination() {
    let mut ns = Netns::new();
    let (app, peer) = (ns.app.clone(), ns.peer.clone());
    // Cluster IPs are routed out of the app's namespace (as a node routes them); capture
    // redirects them before they leave.
    run(&[
        "ip",
        "-n",
        &app,
        "route",
        "add",
        "default",
        "via",
        "10.77.0.1",
    ]);
    ns.http_server(&peer, "10.77.0.1", "9090");
    ns.spawn(&peer, &["python3", "-c", DB_SERVER]);
    eventually(Duration::from_secs(10), "the peer's servers", || async {
        ns.python(
            &peer,
            "import socket, urllib.request as u\nu.urlopen('http://10.77.0.1:9090/', timeout=5)\nsocket.create_connection(('10.77.0.1', 7070), timeout=5)",
        )
        .map(drop)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let log = ns.start_proxy(dir.path(), ORIGINAL_DST);
    eventually(Duration::from_secs(10), "the proxy", || async {
        ns.get(&app, "http://127.0.0.1:9901/ready").map(drop)
    })
    .await;

    // HTTP: `Host: reviews` (a short name the egress does not list) sent to the cluster IP.
    let http = |url: &str, host: &str| {
        format!(
            "import urllib.request as u, urllib.error as e\ntry:\n    r = u.urlopen(u.Request({url:?}, headers={{'Host': {host:?}}}), timeout=5)\n    print(r.status)\nexcept e.HTTPError as x:\n    print(x.code, x.headers.get('x-trellis-error'))"
        )
    };
    let out = ns
        .python(&app, &http("http://10.96.0.10/", "reviews"))
        .unwrap();
    assert_eq!(out.trim(), "200", "routed by the original destination");
    let out = ns
        .python(&app, &http("http://10.77.0.1:9090/", "10.77.0.1:9090"))
        .unwrap();
    assert_eq!(
        out.trim(),
        "403 egress_denied",
        "DROP_ALL holds for captured HTTP"
    );

    // Not HTTP: the server speaks first (the client waits), then a client that speaks first.
    let tcp = |addr: &str| {
        format!(
            "import socket\ns = socket.create_connection(({addr}), timeout=5)\nf = s.makefile('rb')\nprint(f.readline().decode().strip() or 'closed')\ns.sendall(b'ping\\n')\nprint(f.readline().decode().strip() or 'closed')\nt = socket.create_connection(({addr}), timeout=5)\nt.sendall(b'hello\\n')\ng = t.makefile('rb')\nprint(g.readline().decode().strip(), '/', g.readline().decode().strip())"
        )
    };
    let out = ns.python(&app, &tcp("'10.96.0.11', 7000")).unwrap();
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["220 db ready", "echo ping", "220 db ready / echo hello"],
        "{out}"
    );
    // The same server at an address the mesh does not name: closed without a byte.
    let out = ns
        .python(
            &app,
            "import socket\ns = socket.create_connection(('10.77.0.1', 7070), timeout=5)\ns.sendall(b'hello\\n')\ntry:\n    print(s.recv(100) or b'closed')\nexcept ConnectionResetError:\n    print(b'closed')",
        )
        .unwrap();
    assert_eq!(out.trim(), "b'closed'");

    let logged = std::fs::read_to_string(&log).unwrap();
    let tcp: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("\"protocol\":\"TCP\""))
        .collect();
    assert_eq!(tcp.len(), 3, "{logged}");
    assert!(
        tcp[..2]
            .iter()
            .all(|l| l.contains("\"endpoint\":\"10.77.0.1:7070\""))
    );
    assert!(tcp[2].contains("\"error\":\"egress_denied\""), "{logged}");
}

/// IPv6 as well: `init`'s ip6tables rules send inbound IPv6 to the proxy's IPv6 ingress and the
/// app's IPv6 calls to its IPv6 egress, which finds their original destination.
#[tokio::test]
async fn ipv6_is_captured_as_well() {
    let mut ns = Netns::new();
    let (app, peer) = (ns.app.clone(), ns.peer.clone());
    ns.http_server(&app, "127.0.0.1", "8080");
    ns.http_server(&peer, "fd77::1", "9090");
    eventually(Duration::from_secs(10), "the peer's server", || async {
        ns.get(&peer, "http://[fd77::1]:9090/").map(drop)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let log = ns.start_proxy(dir.path(), SNAPSHOT);
    let rules = run(&["ip", "netns", "exec", &app, "ip6tables", "-t", "nat", "-S"]);
    let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
    assert!(rules.contains("-d ::1/128 -j RETURN"), "{rules}");
    eventually(Duration::from_secs(10), "the proxy", || async {
        ns.get(&app, "http://127.0.0.1:9901/ready").map(drop)
    })
    .await;

    let (status, body) = ns.get(&peer, "http://[fd77::2]:8080/").unwrap();
    assert_eq!(status, 200, "inbound IPv6 through the ingress: {body}");
    let (status, _) = ns.get(&app, "http://[fd77::1]:9090/").unwrap();
    assert_eq!(status, 200, "outbound IPv6 through the egress");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("\"endpoint\":\"[fd77::1]:9090\""),
        "the egress passed the IPv6 call through to its original destination: {logged}"
    );
    assert!(logged.contains("\"ingress\""), "{logged}");
}
