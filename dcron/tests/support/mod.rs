//! Shared helpers for tests that need real registry servers.
//!
//! Servers are started by `scripts/services.sh` (see `scripts/test.sh`),
//! which exports their addresses. Without them the tests skip, unless
//! `DCRON_REQUIRE_SERVICES=1` (set by `scripts/test.sh` and CI), in which
//! case a missing server is a failure.
#![allow(dead_code)]

pub mod stall;

use std::path::PathBuf;
use std::process::Command;

/// The value of `var`, or `None` (test skipped) when it is unset and
/// services are not required.
pub fn service_env(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            if std::env::var("DCRON_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
                panic!("{var} is not set but DCRON_REQUIRE_SERVICES=1: run the tests with scripts/test.sh");
            }
            eprintln!("skipping: {var} is not set (run the tests with scripts/test.sh)");
            None
        }
    }
}

/// Path of `scripts/services.sh`.
pub fn services_script() -> PathBuf {
    std::env::var_os("DCRON_SERVICES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/services.sh"))
}

/// Runs `scripts/services.sh ARGS...` and returns its trimmed stdout;
/// panics with its stderr if it fails.
pub fn services(args: &[&str]) -> String {
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
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A scratch directory for a throw-away server, removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(name: &str) -> Self {
        let base = std::env::var_os("DCRON_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("scratch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        ScratchDir(dir)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server process started by `services.sh`, killed on drop.
pub struct Server {
    pub pids: Vec<String>,
}

impl Server {
    /// Starts a server with `services.sh ARGS...`, which prints its PIDs.
    pub fn start(args: &[&str]) -> Self {
        let pids = services(args)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        Server { pids }
    }

    /// Kills one process of the server (SIGKILL), as a crash would.
    pub fn kill_pid(&self, pid: &str) {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let mut args = vec!["kill"];
        args.extend(self.pids.iter().map(String::as_str));
        let _ = Command::new("bash")
            .arg(services_script())
            .args(&args)
            .status();
    }
}
