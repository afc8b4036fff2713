//! `dcron agent` under signals, against a real Redis: SIGTERM, SIGINT and
//! SIGHUP stop it gracefully (it publishes `leaving`, drains, kills what is
//! left with its process group, unregisters and exits 0), and a SIGKILLed
//! agent takes its command down with it (Linux: `PR_SET_PDEATHSIG`).
//!
//! Every wait polls with a deadline; the only fixed duration is the
//! agent's drain timeout, which the graceful tests check it honours.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

/// The agents' `drain_timeout`. The command never ends by itself, so a
/// graceful stop takes this long, then kills it.
const DRAIN: Duration = Duration::from_secs(4);
/// Bound on the rest of a graceful stop: publishing `leaving`,
/// unregistering and reaping (milliseconds against a local Redis; generous
/// for a loaded machine).
const STOP_SLACK: Duration = Duration::from_secs(10);

/// An agent whose only task is a one-shot that runs a shell with a
/// background grandchild and waits for it. The shell writes
/// `SHELL_PID GRANDCHILD_PID` to `pids` (atomically, by rename) once both
/// run.
fn config(pids: &Path) -> String {
    format!(
        r#"node_ttl = "2s"
heartbeat = "300ms"
reload_interval = "1s"
drain_timeout = "{drain}s"
catch_up = "off"
env = {{ PIDS = "{pids}" }}

[[task]]
name = "long"
cron = "* * * * * *"
one_shot = true
command = "sleep 300 & echo \"$$ $!\" > \"$PIDS.tmp\" && mv \"$PIDS.tmp\" \"$PIDS\"; wait"
"#,
        drain = DRAIN.as_secs(),
        pids = pids.display()
    )
}

/// Whether `pid` is still a running process: `kill(pid, 0)` fails with
/// ESRCH once it is gone. A zombie (dead, reparented to init and not
/// reaped yet; this machine's init may never reap) counts as gone too.
fn running(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    if !exists {
        return false;
    }
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
        })
        // Vanished between the two checks.
        .unwrap_or(true);
    !zombie
}

/// The command's shell and its background `sleep`, killed (the whole
/// group) on drop so a failed test leaves nothing running.
struct Run {
    shell: i32,
    grandchild: i32,
}

impl Drop for Run {
    fn drop(&mut self) {
        // SAFETY: plain kill(2); the shell leads the command's process group.
        unsafe {
            if running(self.shell) || running(self.grandchild) {
                libc::kill(-self.shell, libc::SIGKILL);
                libc::kill(self.grandchild, libc::SIGKILL);
            }
        }
    }
}

/// Starts an agent and waits until its command runs.
fn start(cluster: &Cluster, dir: &Scratch, id: &str) -> (Agent, Run) {
    let pids = dir.path("pids");
    let agent = cluster.agent(dir, id, &config(&pids));
    let read = || -> Option<(i32, i32)> {
        let text = std::fs::read_to_string(&pids).ok()?;
        let (a, b) = text.trim().split_once(' ')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    assert!(
        wait_until(Duration::from_secs(30), || read().is_some()),
        "the command did not start: {}",
        agent.log_text()
    );
    let (shell, grandchild) = read().expect("pids");
    let command = Run { shell, grandchild };
    assert!(running(shell), "the command's shell is not running");
    assert!(
        running(grandchild),
        "the command's grandchild is not running"
    );
    assert_eq!(
        cluster.working(),
        [id.to_string()].into_iter().collect(),
        "the agent is not registered as working"
    );
    (agent, command)
}

/// `signal` stops an agent gracefully while its command runs.
fn graceful(signal: i32, name: &str) {
    let Some(url) = redis_url() else { return };
    let cluster = Cluster::new(&url, name);
    let dir = Scratch::new(name);
    let id = format!("{name}-node");
    let (mut agent, command) = start(&cluster, &dir, &id);

    let signalled = Instant::now();
    agent.signal(signal);

    // Leaving is published at once, while the agent still drains (it cannot
    // exit before the drain timeout: the command never ends by itself).
    let mut leaving = false;
    while agent.running() {
        let nodes = cluster.nodes();
        if nodes.get(&id).is_some_and(|n| n["status"] == "leaving") {
            leaving = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        leaving,
        "the node was never seen `leaving` before the agent exited: {}",
        agent.log_text()
    );
    // Closing a terminal can deliver a second hangup: it must not skip the
    // drain (only SIGINT / SIGTERM force the exit).
    let second_hangup = signal == libc::SIGHUP && signalled.elapsed() < DRAIN;
    if second_hangup {
        agent.signal(libc::SIGHUP);
    }
    assert!(
        running(command.shell) && running(command.grandchild),
        "the command was killed before the drain timeout"
    );

    let status = agent
        .wait_exit(DRAIN + STOP_SLACK)
        .unwrap_or_else(|| panic!("the agent did not exit: {}", agent.log_text()));
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "exit status: {}", agent.log_text());
    assert!(
        took >= DRAIN,
        "the agent exited after {took:?}, before its drain timeout of {DRAIN:?}"
    );

    // Both the command and its grandchild are dead; the agent waited for
    // the group it killed, so this holds at once (the deadline only
    // absorbs scheduling).
    assert!(
        wait_until(Duration::from_secs(5), || !running(command.shell)),
        "the command (pid {}) outlived the agent",
        command.shell
    );
    assert!(
        wait_until(Duration::from_secs(5), || !running(command.grandchild)),
        "the command's grandchild (pid {}) outlived the agent",
        command.grandchild
    );
    assert!(
        !cluster.nodes().contains_key(&id),
        "the node is still registered after a graceful stop"
    );
    let log = agent.log_text();
    assert!(log.contains("stopping gracefully"), "{log}");
    assert!(log.contains("drain timeout: killing the runs"), "{log}");
    if second_hangup {
        assert!(log.contains("a hangup does not force the exit"), "{log}");
    }
}

#[test]
fn redis_sigterm_drains_then_kills_the_command_group() {
    graceful(libc::SIGTERM, "sig-term");
}

#[test]
fn redis_sigint_drains_then_kills_the_command_group() {
    graceful(libc::SIGINT, "sig-int");
}

#[test]
fn redis_sighup_is_a_graceful_stop_even_when_repeated() {
    graceful(libc::SIGHUP, "sig-hup");
}

/// A SIGKILLed agent takes its command with it (the kernel's parent-death
/// signal). The command's own background child does not get that signal
/// (documented: only a supervisor that kills the cgroup reaches it); the
/// test's drop kills it.
#[cfg(target_os = "linux")]
#[test]
fn redis_sigkill_of_the_agent_kills_the_command() {
    let Some(url) = redis_url() else { return };
    let name = "sig-kill";
    let cluster = Cluster::new(&url, name);
    let dir = Scratch::new(name);
    let (mut agent, command) = start(&cluster, &dir, &format!("{name}-node"));
    agent.crash();
    assert!(
        wait_until(Duration::from_secs(5), || !running(command.shell)),
        "the command (pid {}) outlived a SIGKILLed agent",
        command.shell
    );
}
