//! The `dcron` side of the chaos test: agents (killed on drop), one-shot
//! commands with deadlines, and a `dcron watch` whose events carry the time
//! this process received them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::procs;
use crate::support::{now_ms, BIN};

/// Variables of the caller's environment that would change what `dcron`
/// does; removed from every child.
const SCRUB: &[&str] = &[
    "DCRON_REGISTRY",
    "DCRON_NAMESPACE",
    "DCRON_CONFIG",
    "DCRON_NODE_ID",
    "DCRON_LOG",
    "DCRON_LOG_FORMAT",
    "RUST_LOG",
    "DCRON_REDIS_USERNAME",
    "DCRON_REDIS_PASSWORD",
    "DCRON_ETCD_USER",
    "DCRON_ETCD_PASSWORD",
    "DCRON_ZK_USER",
    "DCRON_ZK_PASSWORD",
    "DCRON_CONSUL_TOKEN",
    "CONSUL_HTTP_TOKEN",
];

/// One registry and namespace.
pub struct Ns {
    pub registry: String,
    pub ns: String,
}

impl Ns {
    /// `dcron --registry .. --namespace .. --timeout T`.
    pub fn command(&self, timeout: &str) -> Command {
        let mut cmd = Command::new(BIN);
        for var in SCRUB {
            cmd.env_remove(var);
        }
        cmd.arg("--registry")
            .arg(&self.registry)
            .arg("--namespace")
            .arg(&self.ns)
            .arg("--timeout")
            .arg(timeout);
        cmd
    }

    /// Runs `dcron ARGS...` (registry calls bounded to 5 s, the process to 20 s).
    pub fn dcron(&self, args: &[&str]) -> Result<procs::Ran, String> {
        procs::run(self.command("5s").args(args), Duration::from_secs(20))
    }

    /// Live nodes: id → status.
    pub fn nodes(&self) -> Result<BTreeMap<String, String>, String> {
        let ran = self.dcron(&["nodes", "--output", "json"])?;
        if !ran.ok {
            return Err(format!("dcron nodes: {}", ran.stderr.trim()));
        }
        let v: Value = serde_json::from_str(&ran.stdout).map_err(|e| format!("nodes JSON: {e}"))?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .map(|n| {
                        (
                            n["id"].as_str().unwrap_or_default().to_string(),
                            n["status"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Waits until exactly `ids` are listed, all `working`.
    pub fn wait_working(&self, ids: &BTreeSet<String>, limit: Duration) -> Result<(), String> {
        let end = Instant::now() + limit;
        loop {
            let last = match self.nodes() {
                Ok(nodes) => {
                    let working: BTreeSet<String> = nodes
                        .iter()
                        .filter(|(_, s)| *s == "working")
                        .map(|(id, _)| id.clone())
                        .collect();
                    if working == *ids && nodes.len() == ids.len() {
                        return Ok(());
                    }
                    format!("{nodes:?}")
                }
                Err(e) => e,
            };
            if Instant::now() >= end {
                return Err(format!(
                    "nodes {ids:?} not all working after {limit:?}; last seen: {last}"
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// A `dcron agent` process, restartable under the same node id; SIGKILLed
/// on drop.
pub struct Agent {
    pub id: String,
    conf: PathBuf,
    pub log: PathBuf,
    registry: String,
    ns: String,
    child: Option<Child>,
}

impl Agent {
    pub fn new(ns: &Ns, id: &str, conf: &Path, log: &Path) -> Agent {
        Agent {
            id: id.to_string(),
            conf: conf.to_path_buf(),
            log: log.to_path_buf(),
            registry: ns.registry.clone(),
            ns: ns.ns.clone(),
            child: None,
        }
    }

    /// Starts the process (its log is appended to, across restarts).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent {} already runs", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open agent log");
        let err = log.try_clone().expect("clone log handle");
        let ns = Ns {
            registry: self.registry.clone(),
            ns: self.ns.clone(),
        };
        let child = ns
            .command("30s")
            .arg("agent")
            .arg("--config")
            .arg(&self.conf)
            .arg("--node-id")
            .arg(&self.id)
            .env("DCRON_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("spawn dcron agent");
        self.child = Some(child);
    }

    /// SIGTERM, then waits for the graceful exit.
    pub fn stop(&mut self, limit: Duration) -> Result<ExitStatus, String> {
        let Some(child) = self.child.as_mut() else {
            return Err(format!("agent {} does not run", self.id));
        };
        procs::signal(child.id() as i32, libc::SIGTERM);
        let end = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= end {
                self.kill9();
                return Err(format!(
                    "agent {} did not exit within {limit:?} of SIGTERM",
                    self.id
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash would; returns when the process is gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Log lines matching `needle`, counted.
    pub fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `dcron watch --output json --snapshot`, read on a thread; each event
/// with the time (epoch ms) it arrived here. Killed on drop.
pub struct Watch {
    child: Child,
    events: Arc<Mutex<Vec<(i64, Value)>>>,
}

impl Watch {
    pub fn start(ns: &Ns, log: &Path) -> Watch {
        let err = std::fs::File::create(log).expect("create watch log");
        let mut child = ns
            .command("10s")
            .args(["watch", "--output", "json", "--snapshot"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("spawn dcron watch");
        let stdout = child.stdout.take().expect("watch stdout");
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().expect("watch events").push((now_ms(), v));
                }
            }
        });
        Watch { child, events }
    }

    /// Waits up to `limit` for the first event matching `pred` that
    /// arrived at or after `since` (epoch ms); its arrival time.
    pub fn wait_for(
        &self,
        since: i64,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<i64> {
        let end = Instant::now() + limit;
        loop {
            if let Some((t, _)) = self
                .events
                .lock()
                .expect("watch events")
                .iter()
                .find(|(t, v)| *t >= since && pred(v))
            {
                return Some(*t);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every event so far, as `time event node-or-task` text.
    pub fn transcript(&self) -> String {
        self.events
            .lock()
            .expect("watch events")
            .iter()
            .map(|(t, v)| {
                format!(
                    "{t} {} {}",
                    v["event"].as_str().unwrap_or("?"),
                    v["node"]["id"]
                        .as_str()
                        .or(v["task"]["name"].as_str())
                        .unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `event` about node `id`.
pub fn node_event(v: &Value, event: &str, id: &str) -> bool {
    v["event"] == event && v["node"]["id"] == id
}
