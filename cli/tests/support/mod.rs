//! Helpers for end-to-end tests of the `dcron` binary against real
//! registry servers.
//!
//! Server addresses come from the environment (`scripts/test.sh` exports
//! them). Without them a test skips, unless `DCRON_REQUIRE_SERVICES=1`, in
//! which case a missing server is a failure.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The `dcron` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_dcron");

/// Variables of the caller's environment that would change what the
/// command does; removed from every child.
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

/// The value of `var`, or `None` (test skipped) when it is unset and
/// services are not required.
pub fn service_env(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v.trim().to_string()),
        _ => {
            if std::env::var("DCRON_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
                panic!("{var} is not set but DCRON_REQUIRE_SERVICES=1: run the tests with scripts/test.sh");
            }
            eprintln!("skipping: {var} is not set (run the tests with scripts/test.sh)");
            None
        }
    }
}

fn strip_http(addr: &str) -> &str {
    addr.trim_start_matches("http://").trim_end_matches('/')
}

/// `dcron --registry` URL of the Redis server of the test run.
pub fn redis_url() -> Option<String> {
    service_env("DCRON_REDIS_URL")
}

/// `etcd://...` for the etcd server of the test run.
pub fn etcd_url() -> Option<String> {
    let endpoints = service_env("DCRON_ETCD_ENDPOINTS")?;
    let hosts: Vec<&str> = endpoints.split(',').map(|e| strip_http(e.trim())).collect();
    Some(format!("etcd://{}", hosts.join(",")))
}

/// `zk://...` for the ZooKeeper server of the test run.
pub fn zk_url() -> Option<String> {
    Some(format!("zk://{}", service_env("DCRON_ZK_CONNECT")?))
}

/// `consul://...` for the Consul agent of the test run.
pub fn consul_url() -> Option<String> {
    Some(format!(
        "consul://{}",
        strip_http(&service_env("DCRON_CONSUL_ADDR")?)
    ))
}

/// Now, epoch milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Polls `check` every 100 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "dcron-cli-{name}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            eprintln!("keeping {} for inspection", self.0.display());
        }
    }
}

/// A test's cluster: one registry, a fresh namespace.
pub struct Cluster {
    pub registry: String,
    pub ns: String,
}

impl Cluster {
    pub fn new(registry: &str, test: &str) -> Cluster {
        let ns = format!(
            "cli-{test}-{}-{}-{}",
            std::process::id(),
            now_ms() % 1_000_000_000,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        Cluster {
            registry: registry.to_string(),
            ns,
        }
    }

    /// A `dcron` command with this cluster's registry and namespace.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        for var in SCRUB {
            cmd.env_remove(var);
        }
        cmd.arg("--registry")
            .arg(&self.registry)
            .arg("--namespace")
            .arg(&self.ns)
            .arg("--timeout")
            .arg("20s");
        cmd
    }

    /// Runs `dcron ARGS...` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run dcron")
    }

    /// Runs `dcron ARGS...`, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "dcron {args:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `dcron ARGS...`, asserting the exit code; returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "dcron {args:?}: expected exit {code}; stdout: {} stderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    /// `dcron tasks --output json`: name → task object.
    pub fn tasks(&self) -> BTreeMap<String, Value> {
        let text = self.ok(&["tasks", "--output", "json"]);
        let v: Value = serde_json::from_str(&text).expect("tasks JSON");
        v["tasks"]
            .as_array()
            .expect("tasks array")
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().unwrap_or_default().to_string(),
                    t.clone(),
                )
            })
            .collect()
    }

    /// `dcron nodes --output json`: id → node object.
    pub fn nodes(&self) -> BTreeMap<String, Value> {
        let text = self.ok(&["nodes", "--output", "json"]);
        let v: Value = serde_json::from_str(&text).expect("nodes JSON");
        v.as_array()
            .expect("nodes array")
            .iter()
            .map(|n| (n["id"].as_str().unwrap_or_default().to_string(), n.clone()))
            .collect()
    }

    /// Ids of the live nodes whose status is `working`.
    pub fn working(&self) -> BTreeSet<String> {
        self.nodes()
            .into_iter()
            .filter(|(_, n)| n["status"] == "working")
            .map(|(id, _)| id)
            .collect()
    }

    /// Starts `dcron agent` with `config` as its file.
    pub fn agent(&self, dir: &Scratch, id: &str, config: &str) -> Agent {
        let conf = dir.path(&format!("{id}.toml"));
        std::fs::write(&conf, config).expect("write agent config");
        let log = dir.path(&format!("{id}.log"));
        let log_file = std::fs::File::create(&log).expect("create agent log");
        let err_file = log_file.try_clone().expect("clone log handle");
        let child = self
            .command()
            .arg("agent")
            .arg("--config")
            .arg(&conf)
            .arg("--node-id")
            .arg(id)
            .env("DCRON_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            .spawn()
            .expect("spawn dcron agent");
        Agent {
            id: id.to_string(),
            child: Some(child),
            log,
        }
    }
}

/// A running `dcron agent`, killed on drop.
pub struct Agent {
    pub id: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Sends `signal` (a libc constant).
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: plain kill(2) on our own child.
            unsafe {
                libc::kill(child.id() as i32, signal);
            }
        }
    }

    /// SIGKILL, as a crash would.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `limit` for the agent to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- log of agent {} ----\n{}", self.id, self.log_text());
        }
        self.crash();
    }
}

/// One line of a fires file: task, fire time, node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fire {
    pub task: String,
    pub fire_time: i64,
    pub node: String,
}

/// Reads `NAME FIRE_TIME NODE` lines (a torn last line is ignored).
pub fn read_fires(path: &Path) -> Vec<Fire> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let task = parts.next()?.to_string();
            let fire_time = parts.next()?.parse().ok()?;
            let node = parts.next()?.to_string();
            Some(Fire {
                task,
                fire_time,
                node,
            })
        })
        .collect()
}

/// Panics if a (task, fire time) pair ran twice.
pub fn assert_no_duplicates(fires: &[Fire]) {
    let mut seen: BTreeMap<(&str, i64), &str> = BTreeMap::new();
    for f in fires {
        if let Some(other) = seen.insert((&f.task, f.fire_time), &f.node) {
            panic!(
                "task {} fire time {} ran twice: on {other} and on {}",
                f.task, f.fire_time, f.node
            );
        }
    }
}

/// Agent config: short TTLs, a handler and optional extra TOML that
/// appends `NAME FIRE_TIME NODE` to `fires`.
pub fn agent_config(fires: &Path, extra: &str) -> String {
    format!(
        r#"node_ttl = "2s"
heartbeat = "300ms"
reload_interval = "1s"
drain_timeout = "5s"
env = {{ FIRES = "{fires}" }}

[handler]
command = ["/bin/sh", "-c", "printf '%s %s %s\n' \"$DCRON_TASK_NAME\" \"$DCRON_FIRE_TIME\" \"$DCRON_NODE_ID\" >> \"$FIRES\""]
timeout = "10s"
{extra}
"#,
        fires = fires.display()
    )
}

/// Path of `scripts/services.sh`.
pub fn services_script() -> PathBuf {
    std::env::var_os("DCRON_SERVICES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/services.sh"))
}

/// A throw-away server started by `services.sh`, killed on drop.
pub struct Server {
    pids: Vec<String>,
}

impl Server {
    /// Starts a server with `services.sh ARGS...`, which prints its PIDs.
    pub fn start(args: &[&str]) -> Server {
        let out = Command::new("bash")
            .arg(services_script())
            .args(args)
            .output()
            .expect("run scripts/services.sh");
        assert!(
            out.status.success(),
            "services.sh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Server {
            pids: String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(services_script())
            .arg("kill")
            .args(&self.pids)
            .status();
    }
}
