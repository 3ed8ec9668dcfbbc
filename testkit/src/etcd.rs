//! Real etcd servers for tests (Debian's `etcd-server`; `./scripts/test` installs it): one member
//! or a cluster of several, on loopback ports the OS picks, each with its own data directory,
//! stopped when dropped. Members can be killed, paused and resumed for fault tests.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{eventually, free_port};

/// One member: its process, its client URL, and what it was started with (to start it again).
#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub client_url: String,
    args: Vec<String>,
    child: Option<Child>,
}

/// An etcd cluster of real processes.
#[derive(Debug)]
pub struct EtcdCluster {
    pub members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members forming one cluster, and waits until it answers.
    pub async fn start(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let name = format!("m{i}");
                let data: PathBuf = dir.path().join(&name);
                let client_url = format!("http://127.0.0.1:{client}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let args = vec![
                    format!("--name={name}"),
                    format!("--data-dir={}", data.display()),
                    format!("--listen-client-urls={client_url}"),
                    format!("--advertise-client-urls={client_url}"),
                    format!("--listen-peer-urls={peer_url}"),
                    format!("--initial-advertise-peer-urls={peer_url}"),
                    format!("--initial-cluster={}", initial.join(",")),
                    "--initial-cluster-state=new".into(),
                    "--initial-cluster-token=trellis-test".into(),
                    // Fast elections, so fault tests do not wait long for a new leader.
                    "--heartbeat-interval=50".into(),
                    "--election-timeout=500".into(),
                    "--logger=zap".into(),
                    "--log-level=error".into(),
                ];
                let mut m = Member {
                    name,
                    client_url,
                    args,
                    child: None,
                };
                m.start();
                m
            })
            .collect();
        let cluster = Self { members, _dir: dir };
        let endpoints = cluster.endpoints();
        eventually(Duration::from_secs(20), "etcd answering", || async {
            healthy(&endpoints)
                .then_some(())
                .ok_or_else(|| "not yet".to_string())
        })
        .await;
        cluster
    }

    /// `host:port` of every member, comma-separated (for `etcd://...`).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.trim_start_matches("http://").to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `etcd://` URL of the whole cluster.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoints())
    }
}

/// Whether every endpoint's `/health` says `true` (etcd serves it on the client port).
fn healthy(endpoints: &str) -> bool {
    use std::io::{Read as _, Write as _};
    endpoints.split(',').all(|e| {
        let Ok(mut s) = std::net::TcpStream::connect(e) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut reply = String::new();
        s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_ok()
            && s.read_to_string(&mut reply).is_ok()
            && reply.contains("\"health\":\"true\"")
    })
}

impl Member {
    fn start(&mut self) {
        let child = Command::new("etcd")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd on PATH (Debian: apt-get install etcd-server)");
        self.child = Some(child);
    }

    /// SIGKILL, no clean shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again after [`kill`](Self::kill), on its data directory.
    pub fn restart(&mut self) {
        self.kill();
        // The data directory exists now: the member rejoins.
        self.args
            .retain(|a| !a.starts_with("--initial-cluster-state"));
        self.args.push("--initial-cluster-state=existing".into());
        self.start();
    }

    /// SIGSTOP / SIGCONT.
    pub fn pause(&self, paused: bool) {
        if let Some(c) = &self.child {
            let signal = if paused { "-STOP" } else { "-CONT" };
            let _ = Command::new("kill")
                .args([signal, &c.id().to_string()])
                .status();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.pause(false);
        self.kill();
    }
}
