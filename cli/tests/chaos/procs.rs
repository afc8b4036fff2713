//! Processes for the chaos test: commands with deadlines, the throw-away
//! servers of `scripts/services.sh` (killed on drop), PID bookkeeping.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What a finished command printed.
pub struct Ran {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` in its own process group; after `limit` the whole group is
/// SIGKILLed (so a half-started server of a hung `services.sh` goes too)
/// and the call fails.
pub fn run(cmd: &mut Command, limit: Duration) -> Result<Ran, String> {
    use std::os::unix::process::CommandExt;
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    for (is_out, pipe) in [
        (
            true,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
        (
            false,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            let _ = tx.send((is_out, text));
        });
    }
    drop(tx);
    let end = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                // SAFETY: kill(2) on the process group we created.
                unsafe {
                    libc::kill(-(child.id() as i32), libc::SIGKILL);
                }
                let _ = child.wait();
                return Err(format!("{what} did not finish within {limit:?}"));
            }
        }
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    // Output pipes end with the process (servers detach theirs); a
    // background child that kept one open only costs this bounded wait.
    let read_end = Instant::now() + Duration::from_secs(5);
    for _ in 0..2 {
        let left = read_end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, t)) => stdout = t,
            Ok((false, t)) => stderr = t,
            Err(_) => break,
        }
    }
    Ok(Ran {
        ok: status.success(),
        code: status.code(),
        stdout,
        stderr,
    })
}

/// Whether `pid` runs (a zombie counts as gone: nothing may reap
/// re-parented server processes here).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

/// Field 22 of /proc/PID/stat: with the PID it names one process even if
/// the PID is reused later.
pub fn start_time(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(") ")?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Sends `sig` to `pid`.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: plain kill(2).
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Waits up to `limit` until `pid` is gone.
pub fn wait_gone(pid: i32, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// `scripts/services.sh`.
pub struct Services {
    pub script: PathBuf,
}

impl Services {
    /// Runs `services.sh ARGS...`; its stdout (PIDs, a URL, a port).
    pub fn call(&self, args: &[&str]) -> Result<String, String> {
        let ran = run(
            Command::new("bash")
                .arg(&self.script)
                .args(args)
                // Three JVMs or etcds starting beside the other backends'
                // scenarios on two cores take longer than the default 30 s.
                .env("DCRON_START_TIMEOUT", "90")
                .env("DCRON_STOP_TIMEOUT", "3"),
            Duration::from_secs(120),
        )?;
        if !ran.ok {
            return Err(format!(
                "services.sh {args:?} failed ({:?}): {}",
                ran.code,
                ran.stderr.trim()
            ));
        }
        Ok(ran.stdout.trim().to_string())
    }
}

/// One server process, named by PID and start time.
struct Proc {
    name: String,
    pid: i32,
    start: Option<u64>,
}

/// The servers a scenario started; every one still running is SIGKILLed
/// (and waited for) on drop, whatever happened.
#[derive(Default)]
pub struct Servers {
    procs: Vec<Proc>,
}

impl Servers {
    /// Remembers a server started by `services.sh`; returns its PID.
    pub fn track(&mut self, name: &str, pid: &str) -> i32 {
        let pid: i32 = pid
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("services.sh printed `{pid}`, not a PID"));
        self.procs.push(Proc {
            name: name.to_string(),
            pid,
            start: start_time(pid),
        });
        pid
    }

    fn ours(p: &Proc) -> bool {
        alive(p.pid) && start_time(p.pid) == p.start
    }

    /// SIGKILLs the server with this PID and waits until it is gone.
    pub fn kill9(&mut self, pid: i32) {
        if let Some(p) = self.procs.iter().find(|p| p.pid == pid) {
            if Self::ours(p) {
                signal(pid, libc::SIGCONT);
                signal(pid, libc::SIGKILL);
                assert!(
                    wait_gone(pid, Duration::from_secs(10)),
                    "{} (pid {pid}) survived SIGKILL",
                    p.name
                );
            }
        }
        self.procs.retain(|p| p.pid != pid);
    }

    /// SIGSTOP / SIGCONT (or any other signal) to a tracked server.
    pub fn signal(&self, pid: i32, sig: i32) {
        if let Some(p) = self.procs.iter().find(|p| p.pid == pid) {
            if Self::ours(p) {
                signal(pid, sig);
            }
        }
    }

    /// Forgets a server that exited by itself (Redis `SHUTDOWN`).
    pub fn forget(&mut self, pid: i32) {
        self.procs.retain(|p| p.pid != pid);
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for p in &self.procs {
            if Self::ours(p) {
                signal(p.pid, libc::SIGCONT);
                signal(p.pid, libc::SIGKILL);
            }
        }
        for p in &self.procs {
            if !wait_gone(p.pid, Duration::from_secs(10)) {
                eprintln!("chaos: {} (pid {}) survived SIGKILL", p.name, p.pid);
            }
        }
    }
}

/// Whether every one of `ports` is free on 127.0.0.1 right now.
pub fn free(ports: &[u16]) -> bool {
    ports
        .iter()
        .all(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
}
