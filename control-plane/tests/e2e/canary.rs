//! Canaries (issue 16) with a real control plane, a real caller sidecar and real apps: the
//! caller's proxy measures the canary's requests and reports them on its config stream; the
//! control plane advances, promotes or rolls back the router's weights.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use trellis_testkit::{TestServer, client::Client, eventually, process::ControlProcess};

use crate::{CONTROL, apply, cli, mtls::sidecar, register_instance, stderr, wait_synced};

const API: &str = "apiVersion: mesh.trellis.dev/v1beta1";

/// `front` calls virtual service `color`, provided by router `color` (not in it: see
/// [`router`]); `color-v1` and `color-v2` are the two versions, registry service `test/color`
/// with attribute `version`. Instances are the apps themselves (no sidecars of their own: the
/// caller's proxy is the one that measures).
pub(crate) fn color_mesh() -> String {
    let node = |name: &str, version: &str| {
        format!(
            "{API}\nkind: VirtualNode\nmetadata: {{ name: {name} }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: 8080, protocol: http }} }}]\n  \
             serviceDiscovery: {{ registry: {{ namespaceName: test, serviceName: color, attributes: {{ version: {version} }} }} }}\n---\n"
        )
    };
    format!(
        "{API}\nkind: Mesh\nmetadata: {{ name: m }}\nspec: {{}}\n---\n{}{}\
         {API}\nkind: VirtualNode\nmetadata: {{ name: front }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: 1, protocol: http }} }}]\n  \
         backends: [{{ virtualService: {{ virtualServiceRef: {{ name: color }} }} }}]\n---\n\
         {API}\nkind: VirtualService\nmetadata: {{ name: color }}\nspec:\n  \
         provider: {{ virtualRouter: {{ virtualRouterRef: {{ name: color }} }} }}\n---\n",
        node("color-v1", "v1"),
        node("color-v2", "v2"),
    )
}

/// [`color_mesh`] with the router's route `main` sending everything to `color-v1`.
fn mesh() -> String {
    color_mesh() + &router(100, None)
}

/// The router with `v1`'s weight and, if given, `v2`'s.
fn router(v1: i64, v2: Option<i64>) -> String {
    let v2 = v2
        .map(|w| format!(", {{ virtualNodeRef: {{ name: color-v2 }}, weight: {w} }}"))
        .unwrap_or_default();
    format!(
        "{API}\nkind: VirtualRouter\nmetadata: {{ name: color }}\nspec:\n  \
         listeners: [{{ portMapping: {{ port: 8080, protocol: http }} }}]\n  \
         routes:\n  - name: main\n    httpRoute:\n      match: {{ prefix: / }}\n      \
         action: {{ weightedTargets: [{{ virtualNodeRef: {{ name: color-v1 }}, weight: {v1} }}{v2}] }}\n"
    )
}

/// A canary of route `main` from v1 to v2: `steps` as (weight, seconds); gates of 30 requests,
/// 99% success and a p99 of 200 ms; judged every second.
fn canary(steps: &[(i64, u64)]) -> String {
    let steps: Vec<String> = steps
        .iter()
        .map(|(w, s)| format!("{{ weight: {w}, duration: {{ unit: s, value: {s} }} }}"))
        .collect();
    format!(
        "{API}\nkind: Canary\nmetadata: {{ name: color }}\nspec:\n  \
         virtualRouterRef: {{ name: color }}\n  route: main\n  \
         stableRef: {{ name: color-v1 }}\n  canaryRef: {{ name: color-v2 }}\n  \
         steps: [{}]\n  \
         gates: {{ minRequests: 30, minSuccessRate: 99, maxLatencyP99: {{ unit: ms, value: 200 }} }}\n  \
         interval: {{ unit: s, value: 1 }}\n",
        steps.join(", ")
    )
}

/// Requests through the caller's sidecar, from a few concurrent loops, until stopped: answers
/// counted by the app that sent them (`x-server`) and status.
struct Traffic {
    stop: Arc<AtomicBool>,
    counts: Arc<Mutex<HashMap<(String, u16), usize>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(egress: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<Mutex<HashMap<(String, u16), usize>>> = Arc::default();
        let tasks = (0..4)
            .map(|_| {
                let (stop, counts) = (stop.clone(), counts.clone());
                tokio::spawn(async move {
                    let mut client = Client::h1(egress).await.unwrap();
                    // A steady load (not a wait for anything): about 400 requests a second.
                    let mut pace = tokio::time::interval(Duration::from_millis(10));
                    while !stop.load(Ordering::SeqCst) {
                        pace.tick().await;
                        let reply = match client.get("color.default:8080", "/").await {
                            Ok(r) => r,
                            Err(_) => {
                                client = Client::h1(egress).await.unwrap();
                                continue;
                            }
                        };
                        let server = reply.header("x-server").unwrap_or("proxy").to_string();
                        *counts
                            .lock()
                            .unwrap()
                            .entry((server, reply.status.as_u16()))
                            .or_default() += 1;
                    }
                })
            })
            .collect();
        Self {
            stop,
            counts,
            tasks,
        }
    }

    fn counts(&self) -> HashMap<(String, u16), usize> {
        self.counts.lock().unwrap().clone()
    }

    fn total(&self) -> usize {
        self.counts().values().sum()
    }

    /// Answers from `server` with a status other than 200.
    fn failed(&self, server: &str) -> usize {
        self.counts()
            .iter()
            .filter(|((s, status), _)| s == server && *status != 200)
            .map(|(_, n)| n)
            .sum()
    }

    async fn stop(self) -> HashMap<(String, u16), usize> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.counts.lock().unwrap().clone()
    }
}

/// Answers with a status other than 200, whoever sent them.
fn failures(counts: &HashMap<(String, u16), usize>) -> usize {
    counts
        .iter()
        .filter(|((_, status), _)| *status != 200)
        .map(|(_, n)| n)
        .sum()
}

fn canary_status(url: &str) -> Value {
    let out = cli(url, &["canary", "status", "color", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The canary's status once `phase` is reached (at most `within`).
async fn wait_phase(url: &str, phase: &str, within: Duration) -> Value {
    eventually(within, &format!("the canary {phase}"), || async {
        let s = canary_status(url);
        if s["phase"] == phase {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await
}

/// The stored route's (v1, v2) weights.
fn weights(url: &str) -> (i64, i64) {
    let out = cli(url, &["get", "virtualrouter", "color", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let router: Value = serde_json::from_slice(&out.stdout).unwrap();
    let targets = router["spec"]["routes"][0]["httpRoute"]["action"]["weightedTargets"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let weight = |name: &str| {
        targets
            .iter()
            .find(|t| t["virtualNodeRef"]["name"] == name)
            .and_then(|t| t["weight"].as_i64())
            .unwrap_or(0)
    };
    (weight("color-v1"), weight("color-v2"))
}

/// The canary requests every decision after the start was taken on.
fn judged_requests(status: &Value) -> u64 {
    status["history"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|d| d["window"]["requests"].as_u64().unwrap())
        .sum()
}

fn actions(status: &Value) -> Vec<String> {
    status["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["action"].as_str().unwrap().to_string())
        .collect()
}

struct Setup {
    _data: tempfile::TempDir,
    _dir: tempfile::TempDir,
    control: ControlProcess,
    front: trellis_testkit::process::ProxyProcess,
    v1: TestServer,
    v2: TestServer,
}

async fn setup() -> Setup {
    let data = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(CONTROL, data.path()).await;
    setup_on(data, control).await
}

/// The mesh applied through `control`, the apps registered, the caller's sidecar connected.
async fn setup_on(data: tempfile::TempDir, control: ControlProcess) -> Setup {
    let url = control.url.clone();
    let v1 = TestServer::start("color-v1").await;
    let v2 = TestServer::start("color-v2").await;
    apply(&url, &mesh());
    register_instance(&url, ("test", "color"), "v1", v1.addr, &["version=v1"]);
    register_instance(&url, ("test", "color"), "v2", v2.addr, &["version=v2"]);
    let dir = tempfile::tempdir().unwrap();
    let front = sidecar(&url, "front", dir.path(), false).await;
    wait_synced(&url, 1).await;
    Setup {
        _data: data,
        _dir: dir,
        control,
        front,
        v1,
        v2,
    }
}

/// A healthy new version goes from 0 to 100% step by step, each step judged on the caller's
/// own measurements of the canary (enough requests, every gate passing), with no failed
/// request; a control-plane restart in the middle resumes it at the step it was in.
#[tokio::test]
async fn a_healthy_canary_is_promoted_step_by_step_and_resumes_after_a_restart() {
    let mut s = setup().await;
    let url = s.control.url.clone();
    let listen = url.trim_start_matches("http://").to_string();
    let traffic = Traffic::start(s.front.egress);
    // The second step is long enough to be in it when the control plane is killed.
    apply(&url, &canary(&[(20, 2), (50, 6), (80, 1)]));

    // Past the first step: the control plane restarts on its data dir and address.
    let before = eventually(Duration::from_secs(30), "the second step", || async {
        let st = canary_status(&url);
        if st["step"].as_u64() >= Some(1) {
            Ok(st)
        } else {
            Err(st.to_string())
        }
    })
    .await;
    assert_eq!(before["phase"], "Progressing", "{before:#}");
    s.control.kill().await;
    s.control = ControlProcess::start_on(CONTROL, s._data.path(), &listen).await;

    let done = wait_phase(&url, "Succeeded", Duration::from_secs(60)).await;
    assert_eq!(
        actions(&done),
        ["start", "advance", "advance", "promote"],
        "resumed, not started over: {done:#}"
    );
    let mut judged = 0;
    for d in done["history"].as_array().unwrap().iter().skip(1) {
        let w = &d["window"];
        assert!(w["requests"].as_u64().unwrap() >= 30, "{d}");
        judged += w["requests"].as_u64().unwrap();
        assert_eq!(w["successRate"].as_f64(), Some(100.0), "{d}");
        assert!(w["p99Ms"].as_f64().unwrap() <= 200.0, "{d}");
        assert_eq!(d["by"], "controller");
    }
    assert_eq!(done["weight"], 100);
    assert_eq!(weights(&url), (0, 100));
    // Nothing counted twice: the steps' requests are some of those v2 served.
    assert!(
        judged <= s.v2.requests() as u64,
        "{judged} > {}",
        s.v2.requests()
    );

    // The caller runs the final weights: everything to v2.
    wait_synced(&url, 1).await;
    let after = crate::split(s.front.egress, "color.default:8080", 50).await;
    assert_eq!(after.get("color-v2"), Some(&50), "{after:?}");
    let counts = traffic.stop().await;
    let failed = failures(&counts);
    assert_eq!(failed, 0, "{counts:?}");
    assert!(s.v1.requests() > 0 && s.v2.requests() > 0);
}

/// A new version that answers 500 is rolled back during its first step, as soon as the minimum
/// of requests is in: every failed request the caller saw was one v2 served, none after the
/// rollback; the route is back at 100/0.
#[tokio::test]
async fn a_failing_canary_is_rolled_back_in_its_first_step() {
    let s = setup().await;
    let url = s.control.url.clone();
    s.v2.fail_with(500);
    let traffic = Traffic::start(s.front.egress);
    apply(&url, &canary(&[(20, 30), (50, 30)]));
    let done = wait_phase(&url, "RolledBack", Duration::from_secs(30)).await;
    assert_eq!(actions(&done), ["start", "rollback"], "{done:#}");
    let rollback = &done["history"][1];
    let reason = rollback["reason"].as_str().unwrap();
    assert!(reason.contains("success rate"), "{reason}");
    assert!(rollback["window"]["failures"].as_u64().unwrap() > 0);
    assert_eq!(rollback["weight"], 0);
    assert_eq!(weights(&url), (100, 0));

    wait_synced(&url, 1).await;
    let after = crate::split(s.front.egress, "color.default:8080", 50).await;
    assert_eq!(after.get("color-v1"), Some(&50), "{after:?}");
    // Well after the caller took the rollback, 200 more requests: none fails.
    let failed_at_rollback = traffic.failed("color-v2");
    let answered = traffic.total();
    eventually(Duration::from_secs(20), "200 more requests", || async {
        let now = traffic.total();
        if now >= answered + 200 {
            Ok(())
        } else {
            Err(format!("{now}"))
        }
    })
    .await;
    let counts = traffic.stop().await;
    let failed = failures(&counts);
    // Every failure is one v2 served (none from the proxy, none from v1), and none came after
    // the rollback reached the caller.
    assert_eq!(
        failed,
        counts.get(&("color-v2".into(), 500)).copied().unwrap_or(0)
    );
    assert_eq!(failed, failed_at_rollback, "{counts:?}");
    assert!(failed > 0 && failed <= s.v2.requests());
}

/// A new version slower than the p99 gate is rolled back, with the p99 it was measured at.
#[tokio::test]
async fn a_slow_canary_is_rolled_back() {
    let s = setup().await;
    let url = s.control.url.clone();
    s.v2.delay(400);
    let traffic = Traffic::start(s.front.egress);
    apply(&url, &canary(&[(20, 30), (50, 30)]));
    let done = wait_phase(&url, "RolledBack", Duration::from_secs(40)).await;
    assert_eq!(actions(&done), ["start", "rollback"], "{done:#}");
    let rollback = &done["history"][1];
    let reason = rollback["reason"].as_str().unwrap();
    assert!(reason.contains("p99"), "{reason}");
    assert!(
        rollback["window"]["p99Ms"].as_f64().unwrap() > 200.0,
        "{rollback}"
    );
    assert_eq!(weights(&url), (100, 0));
    let counts = traffic.stop().await;
    assert!(
        counts.keys().all(|(_, status)| *status == 200),
        "{counts:?}"
    );
}

/// An operator's say: pause holds the weights; a change to the route under a running canary
/// pauses it (and is left as made) until resume sets the canary's weights again; promote sends
/// everything to the canary; a finished canary takes no more commands.
#[tokio::test]
async fn an_operator_pauses_resumes_and_promotes_a_canary() {
    let s = setup().await;
    let url = s.control.url.clone();
    // Steps too long to end by themselves.
    apply(&url, &canary(&[(10, 3600), (50, 3600)]));
    let started = wait_phase(&url, "Progressing", Duration::from_secs(30)).await;
    assert_eq!(started["weight"], 10);
    eventually(
        Duration::from_secs(30),
        "the start's weights stored",
        || async {
            match weights(&url) {
                (90, 10) => Ok(()),
                w => Err(format!("{w:?}")),
            }
        },
    )
    .await;

    let out = cli(&url, &["canary", "pause", "color"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(canary_status(&url)["phase"], "Paused");
    let out = cli(&url, &["canary", "resume", "color"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(canary_status(&url)["phase"], "Progressing");

    // Someone applies the router with other weights: the canary pauses and says why.
    apply(&url, &router(70, Some(30)));
    let paused = wait_phase(&url, "Paused", Duration::from_secs(30)).await;
    let message = paused["message"].as_str().unwrap();
    assert!(message.contains("changed outside the canary"), "{message}");
    assert_eq!(weights(&url), (70, 30));
    let out = cli(&url, &["canary", "resume", "color"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(weights(&url), (90, 10));

    let out = cli(&url, &["canary", "promote", "color"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let done = canary_status(&url);
    assert_eq!(done["phase"], "Succeeded");
    assert_eq!(weights(&url), (0, 100));
    let last = done["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["action"].as_str(), last["by"].as_str()),
        (Some("promote"), Some("anonymous"))
    );
    wait_synced(&url, 1).await;
    let after = crate::split(s.front.egress, "color.default:8080", 20).await;
    assert_eq!(after.get("color-v2"), Some(&20), "{after:?}");

    let out = cli(&url, &["canary", "abort", "color"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is over"), "{}", stderr(&out));
    assert_eq!(weights(&url), (0, 100));
    let table = cli(&url, &["canary", "status", "color"]);
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(
        table.contains("promote") && table.contains("Succeeded"),
        "{table}"
    );
    drop(s.v1);
}

/// Runs headless Chromium (Debian's `chromium`) on `page`: its DOM once the page's scripts have
/// run, and a screenshot in the test's output directory.
async fn chromium(page: &str, screenshot: &str) -> String {
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(screenshot);
    let profile = tempfile::tempdir().unwrap();
    let run = |extra: Vec<String>| {
        let profile = profile.path().display().to_string();
        let page = page.to_string();
        async move {
            let run = tokio::process::Command::new("chromium")
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--window-size=1400,1100",
                    "--virtual-time-budget=8000",
                    &format!("--user-data-dir={profile}"),
                ])
                .args(extra)
                .arg(page)
                .kill_on_drop(true)
                .output();
            tokio::time::timeout(Duration::from_secs(120), run)
                .await
                .expect("chromium did not finish in 120 s")
                .expect("chromium (Debian package chromium) must be installed; the test command installs it")
        }
    };
    let dom = run(vec!["--dump-dom".into()]).await;
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let out = run(vec![format!("--screenshot={}", shot.display())]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        shot.display()
    );
    String::from_utf8(dom.stdout).unwrap()
}

/// The control plane's dashboard in a real headless browser, from the API the CLI uses: the
/// mesh graph with the live split on the router's edges (weights, rates, success), the caller's
/// proxy SYNCED, and the running canary with its gates and decisions.
#[tokio::test]
async fn the_dashboard_shows_the_live_split_convergence_and_a_canary() {
    let s = setup().await;
    let url = s.control.url.clone();
    let traffic = Traffic::start(s.front.egress);
    apply(&url, &canary(&[(30, 3600)]));
    wait_phase(&url, "Progressing", Duration::from_secs(30)).await;
    // Both versions' edges carry traffic in the graph the page reads.
    let addr: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    eventually(
        Duration::from_secs(30),
        "live rates on both edges",
        || async {
            let mut c = Client::h1(addr).await.map_err(|e| e.to_string())?;
            let g: Value = serde_json::from_str(
                &c.get("x", "/v1/graph")
                    .await
                    .map_err(|e| e.to_string())?
                    .text(),
            )
            .map_err(|e| e.to_string())?;
            let live = |node: &str| {
                g["edges"].as_array().unwrap().iter().any(|e| {
                    e["kind"] == "route"
                        && e["to"] == format!("VirtualNode/default/{node}")
                        && e["requestsPerSecond"].as_f64().unwrap_or(0.0) > 1.0
                })
            };
            if live("color-v1") && live("color-v2") {
                Ok(())
            } else {
                Err(g.to_string())
            }
        },
    )
    .await;

    let dom = chromium(&format!("{url}/ui"), "dashboard.png").await;
    for want in [
        "front",
        "color-v1",
        "color-v2",
        "VirtualRouter",
        "Progressing",
        "step 1 of 1",
    ] {
        assert!(dom.contains(want), "{want:?} not on the page: {dom}");
    }
    // The router's two edges, drawn with their weights and live rates.
    let labels: Vec<&str> = dom
        .split("class=\"label edge-label\"")
        .skip(1)
        .filter_map(|l| {
            l.split_once('>')
                .and_then(|(_, t)| t.split_once('<'))
                .map(|(t, _)| t)
        })
        .collect();
    for weight in ["70.0%", "30.0%"] {
        let label = labels
            .iter()
            .find(|l| l.starts_with(weight))
            .unwrap_or_else(|| panic!("no edge at {weight}: {labels:?}"));
        let rate: f64 = label
            .split(" · ")
            .find_map(|p| p.strip_suffix(" req/s"))
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no rate on {label:?}"));
        assert!(rate > 0.0, "{label}");
    }
    assert!(
        dom.contains("<td>start</td>"),
        "the canary's decisions: {dom}"
    );
    assert!(dom.contains(r#"class="ok proxy-state">SYNCED"#), "{dom}");
    assert!(!dom.contains(r#"class="bad proxy-state""#), "{dom}");
    traffic.stop().await;
}

/// Two control planes on one etcd: the caller's sidecar is connected to the one that does not
/// lead; the leader judges the canary on the totals the other one publishes, and promotes it.
#[tokio::test]
async fn the_leader_judges_on_the_measurements_another_control_plane_publishes() {
    let etcd = trellis_testkit::etcd::EtcdCluster::start(1).await;
    let store = etcd.url();
    let flags = ["--store", &store, "--etcd-prefix", "/canary/"];
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = ControlProcess::start_with(CONTROL, da.path(), "127.0.0.1:0", &flags).await;
    let b = ControlProcess::start_with(CONTROL, db.path(), "127.0.0.1:0", &flags).await;
    let who = |url: &str| {
        let out = cli(url, &["status", "-o", "json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let s: Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            s["replica"].as_str().unwrap().to_string(),
            s["leader"].as_str().map(str::to_string),
        )
    };
    let leader = eventually(Duration::from_secs(30), "a leader", || async {
        match who(&a.url).1 {
            Some(l) => Ok(l),
            None => Err("none yet".to_string()),
        }
    })
    .await;
    // The follower serves the caller.
    let (follower, leading) = if who(&a.url).0 == leader {
        (b, a)
    } else {
        (a, b)
    };
    assert_ne!(who(&follower.url).0, leader);
    let s = setup_on(db, follower).await;
    let url = s.control.url.clone();
    let traffic = Traffic::start(s.front.egress);
    apply(&url, &canary(&[(20, 1), (60, 1)]));
    let done = wait_phase(&url, "Succeeded", Duration::from_secs(60)).await;
    assert_eq!(actions(&done), ["start", "advance", "promote"], "{done:#}");
    let judged = judged_requests(&done);
    assert!(
        judged >= 60 && judged <= s.v2.requests() as u64,
        "{judged} of {}",
        s.v2.requests()
    );
    // The leader's own view follows the store's watch (the follower may see the promotion
    // first).
    let leading_url = leading.url.clone();
    eventually(
        Duration::from_secs(10),
        "the leader sees the promotion",
        || async {
            match weights(&leading_url) {
                (0, 100) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    // The judging was the other control plane's all along.
    assert_eq!(who(&leading.url), (leader.clone(), Some(leader)));
    let counts = traffic.stop().await;
    assert!(
        counts.keys().all(|(_, status)| *status == 200),
        "{counts:?}"
    );
    drop((da, leading));
}

/// With `--auth`: a viewer reads canaries and the dashboard (its token given to the page) but
/// may not steer a canary; an admin may, and the audit log names who did; the page without a
/// token shows the API's refusal and no data.
#[tokio::test]
async fn a_viewer_watches_and_an_admin_steers() {
    use crate::auth::as_operator;
    let data = tempfile::tempdir().unwrap();
    let control =
        ControlProcess::start_with(CONTROL, data.path(), "127.0.0.1:0", &["--auth"]).await;
    let url = control.url.clone();
    let admin = std::fs::read_to_string(data.path().join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, mesh() + "---\n" + &canary(&[(10, 3600), (50, 3600)])).unwrap();
    let out = as_operator(&url, Some(&admin), &["apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = as_operator(
        &url,
        Some(&admin),
        &["operator", "create", "--name", "vera", "--role", "viewer"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let viewer = crate::stdout(&out).trim().to_string();
    let status = |token: &str| {
        let out = as_operator(
            &url,
            Some(token),
            &["canary", "status", "color", "-o", "json"],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    eventually(Duration::from_secs(30), "the canary started", || async {
        let s = status(&viewer);
        if s["phase"] == "Progressing" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .await;

    let out = as_operator(&url, Some(&viewer), &["canary", "promote", "color"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));
    assert_eq!(status(&viewer)["phase"], "Progressing");

    let dom = chromium(&format!("{url}/ui#token={viewer}"), "dashboard-viewer.png").await;
    for want in ["color-v1", "Progressing", "step 1 of 2", "90%"] {
        assert!(dom.contains(want), "{want:?} not on the page: {dom}");
    }
    let dom = chromium(&format!("{url}/ui"), "dashboard-no-token.png").await;
    assert!(dom.contains("401"), "{dom}");
    assert!(!dom.contains("color-v1"), "{dom}");

    let out = as_operator(&url, Some(&admin), &["canary", "abort", "color"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let done = status(&viewer);
    assert_eq!(done["phase"], "Aborted");
    let last = done["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["by"], "admin", "{last}");
    let out = as_operator(&url, Some(&admin), &["audit", "-o", "json"]);
    let audit = crate::stdout(&out);
    assert!(
        audit.contains("POST /v1/canaries/default/color/abort")
            && audit.contains("\"status\": 200"),
        "{audit}"
    );
    assert!(
        audit.contains("canary default/color: Aborted at 0% to default/color-v2"),
        "{audit}"
    );
    assert!(
        audit.contains("POST /v1/canaries/default/color/promote"),
        "{audit}"
    );
}

/// Traffic that enters through a gateway is judged too: the gateway reports its routes to
/// `color`'s router under its own route names (`GATEWAYROUTE/ROUTER/ROUTE`), counted as the
/// router's; with no other caller, the canary is promoted on the gateway's measurements alone.
#[tokio::test]
async fn a_canary_is_judged_on_traffic_through_a_gateway() {
    let s = setup().await;
    let url = s.control.url.clone();
    let port = trellis_testkit::free_port();
    apply(
        &url,
        &format!(
            "{API}\nkind: VirtualGateway\nmetadata: {{ name: gw }}\nspec:\n  \
             listeners: [{{ portMapping: {{ port: {port}, protocol: http }} }}]\n---\n\
             {API}\nkind: GatewayRoute\nmetadata: {{ name: web }}\nspec:\n  \
             virtualGatewayRef: {{ name: gw }}\n  httpRoute:\n    match: {{ prefix: / }}\n    \
             action: {{ target: {{ virtualService: {{ virtualServiceRef: {{ name: color }} }} }} }}\n"
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let gw = trellis_testkit::process::ProxyProcess::gateway(
        crate::proxy_bin(),
        &url,
        "default/gw",
        dir.path(),
    )
    .await;
    wait_synced(&url, 2).await;
    let traffic = Traffic::start(gw.listener_addr(&format!("gateway:{port}")).await);
    apply(&url, &canary(&[(20, 1), (60, 1)]));
    let done = wait_phase(&url, "Succeeded", Duration::from_secs(60)).await;
    assert_eq!(actions(&done), ["start", "advance", "promote"], "{done:#}");
    let judged = judged_requests(&done);
    assert!(
        judged >= 60 && judged <= s.v2.requests() as u64,
        "{judged} of {}",
        s.v2.requests()
    );
    let counts = traffic.stop().await;
    assert!(
        counts.keys().all(|(_, status)| *status == 200),
        "{counts:?}"
    );
    assert!(
        counts
            .get(&("color-v2".to_string(), 200))
            .is_some_and(|n| *n > 0),
        "{counts:?}"
    );
}
