//! A real `trellis-proxy` process on 127.0.0.1:0 sockets, found through its "listening" log lines,
//! killed when dropped.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::{client::Client, eventually};

#[derive(Debug)]
pub struct ProxyProcess {
    child: Child,
    pub ingress: SocketAddr,
    pub egress: SocketAddr,
    pub admin: SocketAddr,
    pub snapshot: PathBuf,
    logs: Arc<Mutex<Logs>>,
    _dir: tempfile::TempDir,
}

#[derive(Debug, Default)]
struct Logs {
    lines: Vec<String>,
    listening: HashMap<String, SocketAddr>,
}

/// `... listening listener=NAME addr=IP:PORT`
fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let rest = &line[line.find(" listening ")? + 11..];
    let name = rest
        .split_whitespace()
        .find_map(|f| f.strip_prefix("listener="))?;
    let addr = rest
        .split_whitespace()
        .find_map(|f| f.strip_prefix("addr="))?;
    Some((name.trim_matches('"').to_string(), addr.parse().ok()?))
}

/// How many of a process's last log lines a failing test prints.
const LOG_TAIL: usize = 80;

/// On a failing test (a panic unwinding past the process's owner), prints the last of what
/// `who` logged: a test's assertion names the symptom, the processes' logs hold the cause.
fn print_tail_if_failing(who: &str, logs: &Mutex<Logs>) {
    if !std::thread::panicking() {
        return;
    }
    let Ok(logs) = logs.lock() else { return };
    let from = logs.lines.len().saturating_sub(LOG_TAIL);
    eprintln!("---- last {} lines of {who}:", logs.lines.len() - from);
    for line in &logs.lines[from..] {
        eprintln!("{line}");
    }
}

/// Reads a child's stdout and stderr into shared logs, noting "listening" lines.
fn collect_logs(child: &mut Child) -> Arc<Mutex<Logs>> {
    let logs = Arc::new(Mutex::new(Logs::default()));
    let stderr = child.stderr.take().unwrap();
    let sink = logs.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut logs = sink.lock().unwrap();
            if let Some((name, addr)) = parse_listening(&line) {
                logs.listening.insert(name, addr);
            }
            logs.lines.push(line);
        }
    });
    let stdout = child.stdout.take().unwrap();
    let sink = logs.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().lines.push(line);
        }
    });
    logs
}

/// Waits until the child logged a "listening" line for every name, or exited.
async fn wait_listening(
    child: &mut Child,
    logs: &Arc<Mutex<Logs>>,
    names: &[&str],
) -> Result<Vec<SocketAddr>, FailedStart> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            // Let the log readers catch up with the last lines.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let stderr = logs.lock().unwrap().lines.join("\n");
            return Err(FailedStart { status, stderr });
        }
        let found = {
            let l = logs.lock().unwrap();
            names
                .iter()
                .map(|n| l.listening.get(*n).copied())
                .collect::<Option<Vec<_>>>()
        };
        if let Some(addrs) = found {
            return Ok(addrs);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "process did not listen in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A real `trellis-control` process on 127.0.0.1:0 with its store in `data_dir`.
#[derive(Debug)]
pub struct ControlProcess {
    child: Child,
    pub addr: SocketAddr,
    pub url: String,
    logs: Arc<Mutex<Logs>>,
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        print_tail_if_failing(&format!("trellis-control {}", self.addr), &self.logs);
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        print_tail_if_failing(&format!("trellis-proxy (admin {})", self.admin), &self.logs);
    }
}

impl ControlProcess {
    pub async fn start(bin: &str, data_dir: &Path) -> Self {
        Self::start_on(bin, data_dir, "127.0.0.1:0").await
    }

    /// Starts on a given address (to come back on the same one after a restart).
    pub async fn start_on(bin: &str, data_dir: &Path, listen: &str) -> Self {
        Self::start_with(bin, data_dir, listen, &[]).await
    }

    /// [`start_on`](Self::start_on) with more flags (`--require-identity`, say).
    pub async fn start_with(bin: &str, data_dir: &Path, listen: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(bin)
            .args([
                "--data-dir",
                &data_dir.display().to_string(),
                "--listen",
                listen,
            ])
            .args(extra)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let logs = collect_logs(&mut child);
        match wait_listening(&mut child, &logs, &["api"]).await {
            Ok(addrs) => Self {
                child,
                addr: addrs[0],
                url: format!("http://{}", addrs[0]),
                logs,
            },
            Err(f) => panic!(
                "trellis-control failed to start ({}):\n{}",
                f.status, f.stderr
            ),
        }
    }

    /// Kills the process (SIGKILL, no clean shutdown) and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().lines.join("\n")
    }
}

/// How a start that failed ended.
#[derive(Debug)]
pub struct FailedStart {
    pub status: ExitStatus,
    pub stderr: String,
}

impl ProxyProcess {
    /// Starts `bin` serving `snapshot` (YAML), with `extra` flags; waits until it listens.
    pub async fn start(bin: &str, snapshot: &str, extra: &[&str]) -> Self {
        match Self::try_start(bin, snapshot, extra).await {
            Ok(p) => p,
            Err(f) => panic!(
                "trellis-proxy failed to start ({}):\n{}",
                f.status, f.stderr
            ),
        }
    }

    /// Like [`start`](Self::start), but a process that exits is returned as an error.
    pub async fn try_start(bin: &str, snapshot: &str, extra: &[&str]) -> Result<Self, FailedStart> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.yaml");
        std::fs::write(&path, snapshot).unwrap();
        let mut args: Vec<String> = vec!["--snapshot".into(), path.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(bin, args, path, dir).await
    }

    /// A sidecar for `node` (NAMESPACE/NAME) following the control plane(s) `urls`, keeping its
    /// snapshot in `data_dir`.
    pub async fn sidecar(bin: &str, urls: &str, node: &str, data_dir: &Path) -> Self {
        Self::follow(bin, urls, "--node", node, data_dir, &[]).await
    }

    /// [`sidecar`](Self::sidecar) with more flags (`--token T`, say).
    pub async fn sidecar_with(
        bin: &str,
        urls: &str,
        node: &str,
        data_dir: &Path,
        extra: &[&str],
    ) -> Self {
        Self::follow(bin, urls, "--node", node, data_dir, extra).await
    }

    /// A gateway for VirtualGateway `gateway` (NAMESPACE/NAME); see [`sidecar`](Self::sidecar).
    /// A gateway binds no ingress socket (`ingress` is `0.0.0.0:0`): it serves its listeners'
    /// ports on 127.0.0.1, named `gateway:PORT` (see [`listener_addr`](Self::listener_addr)).
    pub async fn gateway(bin: &str, urls: &str, gateway: &str, data_dir: &Path) -> Self {
        Self::follow(bin, urls, "--gateway", gateway, data_dir, &[]).await
    }

    /// [`gateway`](Self::gateway) with more flags.
    pub async fn gateway_with(
        bin: &str,
        urls: &str,
        gateway: &str,
        data_dir: &Path,
        extra: &[&str],
    ) -> Self {
        Self::follow(bin, urls, "--gateway", gateway, data_dir, extra).await
    }

    async fn follow(
        bin: &str,
        urls: &str,
        flag: &str,
        name: &str,
        data_dir: &Path,
        extra: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--control-plane".to_string(),
            urls.to_string(),
            flag.into(),
            name.into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        match Self::spawn(bin, args, data_dir.join("snapshot.json"), dir).await {
            Ok(p) => p,
            Err(f) => panic!(
                "trellis-proxy failed to start ({}):\n{}",
                f.status, f.stderr
            ),
        }
    }

    async fn spawn(
        bin: &str,
        args: Vec<String>,
        snapshot: PathBuf,
        dir: tempfile::TempDir,
    ) -> Result<Self, FailedStart> {
        let mut child = Command::new(bin)
            .args(&args)
            .args([
                "--ingress-addr",
                "127.0.0.1:0",
                "--egress-addr",
                "127.0.0.1:0",
            ])
            .args(["--admin-addr", "127.0.0.1:0", "--snapshot-poll", "100ms"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let logs = collect_logs(&mut child);
        let gateway = args.iter().any(|a| a == "--gateway");
        let names: &[&str] = if gateway {
            &["egress", "admin"]
        } else {
            &["egress", "admin", "ingress"]
        };
        match wait_listening(&mut child, &logs, names).await {
            Ok(addrs) => Ok(Self {
                child,
                ingress: addrs
                    .get(2)
                    .copied()
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                egress: addrs[0],
                admin: addrs[1],
                snapshot,
                logs,
                _dir: dir,
            }),
            Err(f) => Err(f),
        }
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or_default()
    }

    /// Sends a signal by name (TERM, HUP, ...).
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -s {name} failed");
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("trellis-proxy did not exit in time")
            .unwrap()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().lines.join("\n")
    }

    /// The address a listener with its own socket bound, once it logged it.
    pub async fn listener_addr(&self, name: &str) -> SocketAddr {
        eventually(Duration::from_secs(10), "listener bound", || async {
            self.logs
                .lock()
                .unwrap()
                .listening
                .get(name)
                .copied()
                .ok_or_else(|| format!("no listening line for {name}"))
        })
        .await
    }

    /// Replaces the snapshot file atomically (write + rename, as a config map update does).
    pub fn write_snapshot(&self, yaml: &str) {
        let tmp = self.snapshot.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.snapshot).unwrap();
    }

    /// Rewrites the snapshot file in place (truncate, then write), as a careless writer does:
    /// the proxy may see it empty or half-written.
    pub fn write_snapshot_in_place(&self, bytes: &[u8]) {
        std::fs::write(&self.snapshot, bytes).unwrap();
    }

    /// GET an admin path; returns (status, body).
    pub async fn admin(&self, path: &str) -> (u16, String) {
        let mut c = Client::h1(self.admin).await.unwrap();
        let r = c.get("admin", path).await.unwrap();
        (r.status.as_u16(), r.text())
    }

    /// The version in use, from `/config_dump`.
    pub async fn version(&self) -> String {
        let (_, body) = self.admin("/config_dump").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["version"].as_str().unwrap_or_default().to_string()
    }

    /// Waits until the proxy serves `version`.
    pub async fn wait_version(&self, version: &str) {
        eventually(
            Duration::from_secs(10),
            "snapshot version applied",
            || async {
                let now = self.version().await;
                if now == version {
                    Ok(())
                } else {
                    Err(format!("serving {now:?}"))
                }
            },
        )
        .await
    }

    /// One metric's value (summed over series matching all `labels`), from `/metrics`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, text) = self.admin("/metrics").await;
        metric_value(&text, name, labels)
    }
}

/// Checks a Prometheus text exposition with `promtool check metrics` (Debian package
/// `prometheus`, which the test command installs); panics with promtool's complaints.
pub fn promtool_check(metrics: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, metrics).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect(
            "promtool (Debian package prometheus) must be installed; the test command installs it",
        );
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sums the samples of `name` whose labels include all of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_lines() {
        let line = "2026-11-26T23:00:00Z  INFO trellis_proxy::app: listening listener=egress addr=127.0.0.1:4321";
        assert_eq!(
            parse_listening(line),
            Some(("egress".into(), "127.0.0.1:4321".parse().unwrap()))
        );
        assert_eq!(parse_listening("INFO snapshot applied version=v1"), None);
    }

    #[test]
    fn sums_metric_series() {
        let text = "# HELP x\nx_total{a=\"1\",b=\"2\"} 3\nx_total{a=\"1\",b=\"3\"} 4\ny 1\n";
        assert_eq!(metric_value(text, "x_total", &[("a", "1")]), 7.0);
        assert_eq!(metric_value(text, "x_total", &[("b", "3")]), 4.0);
        assert_eq!(metric_value(text, "y", &[]), 1.0);
    }
}
