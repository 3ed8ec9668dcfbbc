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
    /// Starts `n` members forming one cluster, and waits until it answers. A port the OS gave
    /// may be taken by another test between the pick and etcd's bind: the cluster is then
    /// started again on other ports.
    pub async fn start(n: usize) -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(n).await {
                Ok(cluster) => return cluster,
                Err(why) => last = why,
            }
        }
        panic!("etcd did not start: {last}");
    }

    async fn try_start(n: usize) -> Result<Self, String> {
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
                    // Elections quicker than the defaults (100 ms / 1 s), not so quick that a
                    // busy test machine makes them churn.
                    "--heartbeat-interval=100".into(),
                    "--election-timeout=1000".into(),
                    // What the README asks of a production cluster: room for a large apply.
                    "--max-txn-ops=10000".into(),
                    "--max-request-bytes=33554432".into(),
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
        let mut cluster = Self { members, _dir: dir };
        let endpoints = cluster.endpoints();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if healthy(&endpoints) {
                return Ok(cluster);
            }
            // A member that exited could not bind its ports.
            for m in &mut cluster.members {
                if m.exited() {
                    return Err(format!("member {} exited", m.name));
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err("not healthy within 30s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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

impl EtcdCluster {
    /// The index of the member that leads now (asked through etcd's JSON gateway), once one
    /// does.
    pub async fn leader(&self) -> usize {
        eventually(Duration::from_secs(20), "an etcd leader", || async {
            for (i, m) in self.members.iter().enumerate() {
                let Some(status) = post_json(&m.client_url, "/v3/maintenance/status") else {
                    continue;
                };
                let me = &status["header"]["member_id"];
                if !me.is_null() && *me == status["leader"] {
                    return Ok(i);
                }
            }
            Err("no member says it leads".to_string())
        })
        .await
    }

    /// Whether `index` answers (its `/health`).
    pub fn answers(&self, index: usize) -> bool {
        healthy(self.members[index].client_url.trim_start_matches("http://"))
    }
}

/// POSTs `{}` to `path` of the member at `url`; the JSON answer.
fn post_json(url: &str, path: &str) -> Option<serde_json::Value> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(url.trim_start_matches("http://")).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = format!(
        "POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    s.write_all(request.as_bytes()).ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let body = reply.split_once("\r\n\r\n")?.1;
    serde_json::from_str(body).ok()
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

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
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
