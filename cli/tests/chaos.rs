//! The chaos test: on every backend, three `dcron agent` processes run 20
//! static tasks every second and 10 dynamic tasks every 2 s, each run
//! appending `task fire_time node wall_ms` to one ledger, while the test
//! stops an agent gracefully, kills one with SIGKILL, and injures the
//! registry itself (etcd / ZooKeeper: SIGKILL of the leader of a 3-member
//! cluster; Redis: SIGSTOP for 5 s, then a 5 s outage with its data kept;
//! Consul: a restart of the agent). Then the ledger is checked against
//! every expected fire time of the run:
//!
//! - no (task, fire_time) ran twice;
//! - none is missing, except the fires of a killed agent's tasks inside its
//!   crash window (kill → the registry's expiry + 1 s), and for each of
//!   those tasks the latest fire before the takeover ran (caught up);
//! - every fire ran at most the length of its phase's fault + 1 s late.
//!
//! A Consul dev agent keeps nothing, so its restart wipes the registry:
//! until every node has registered again nobody owns a task, and with the
//! claim watermarks gone there is nothing to catch up. Those fires, and the
//! dynamic tasks' until the test has re-added them, are counted apart
//! ("wiped registry") instead of as missing.
//!
//! Every backend starts its own servers with `scripts/services.sh` on ports
//! 32000-32999 and kills them on drop. One test per backend, so they run in
//! parallel (two at a time with the default test threads on two cores;
//! `RUST_TEST_THREADS=4` runs all four at once). Each prints its table row
//! to stderr (uncaptured) and appends it to
//! `$CARGO_TARGET_TMPDIR/chaos-report.txt`; a failure prints the table, the
//! offending (task, fire_time) samples and the agents' last log lines, and
//! keeps the run's directory (ledger, agent logs, server logs). One backend
//! alone:
//!
//! ```sh
//! source .dcron-test/env   # written by `scripts/services.sh up`
//! DCRON_REQUIRE_SERVICES=1 cargo test -p dcron-cli --test chaos -- redis
//! ```
//!
//! Needs `DCRON_SERVICES` (from that env file) and, for Consul,
//! `DCRON_CONSUL_BIN`; without them every test skips, unless
//! `DCRON_REQUIRE_SERVICES=1`, which makes that a failure.

mod support;

#[path = "chaos/cluster.rs"]
mod cluster;
#[path = "chaos/ledger.rs"]
mod ledger;
#[path = "chaos/procs.rs"]
mod procs;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cluster::{node_event, Agent, Ns, Watch};
use ledger::{Crash, Excluded, Phase, Spec};
use procs::{Servers, Services};
use support::{now_ms, service_env, Scratch};

const STATIC_TASKS: usize = 20;
const DYNAMIC_TASKS: usize = 10;
/// Steady state between two faults.
const STEADY_MS: i64 = 4_000;
const AGENTS: [&str; 3] = ["a1", "a2", "a3"];

/// Appends the ledger line: bash's clock needs no extra process.
const RECORD: &str = r#"t=${EPOCHREALTIME//[!0-9]/}; echo "$DCRON_TASK_NAME $DCRON_FIRE_TIME $DCRON_NODE_ID ${t::-3}" >> "$LEDGER""#;

/// Rows of the backends finished so far, for every failure message.
static ROWS: Mutex<Vec<String>> = Mutex::new(Vec::new());

// Backends whose cargo feature is off are never constructed.
#[allow(dead_code)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Redis,
    Etcd,
    Zookeeper,
    Consul,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Redis => "redis",
            Backend::Etcd => "etcd",
            Backend::Zookeeper => "zookeeper",
            Backend::Consul => "consul",
        }
    }

    /// node_ttl, heartbeat of the agents. Consul raises TTLs under 10 s.
    fn timing(self) -> (&'static str, &'static str) {
        match self {
            Backend::Consul => ("10s", "1s"),
            _ => ("3s", "500ms"),
        }
    }

    /// How long after a crash the registry drops the node at the latest:
    /// the TTL (ZooKeeper: the session timeout), for Consul twice the TTL
    /// (it expires sessions 2×TTL after the last renewal).
    fn expiry_ms(self) -> i64 {
        match self {
            Backend::Consul => 20_000,
            _ => 3_000,
        }
    }
}

/// The registry's servers (their PIDs are tracked in `Servers`).
#[allow(dead_code)]
enum Reg {
    Redis {
        port: u16,
        dir: PathBuf,
        pid: i32,
    },
    Etcd {
        base: u16,
        dir: PathBuf,
        pids: Vec<i32>,
    },
    Zookeeper {
        base: u16,
        dir: PathBuf,
        pids: Vec<i32>,
    },
    Consul {
        http: u16,
        server: u16,
        dir: PathBuf,
        pid: i32,
    },
}

/// First slot of `count` whose ports are all free: `base + i*step + offsets`.
fn pick_base(base: u16, step: u16, count: u16, offsets: &[u16]) -> u16 {
    (0..count)
        .map(|i| base + i * step)
        .find(|b| procs::free(&offsets.iter().map(|o| b + o).collect::<Vec<_>>()))
        .unwrap_or_else(|| panic!("no free ports for the chaos test from {base} on"))
}

fn endpoints(base: u16) -> Vec<String> {
    (0..3).map(|i| format!("127.0.0.1:{}", base + i)).collect()
}

fn etcd_initial(base: u16) -> String {
    (1..=3)
        .map(|i| format!("e{i}=http://127.0.0.1:{}", base + 9 + i))
        .collect::<Vec<_>>()
        .join(",")
}

fn zk_servers(base: u16) -> String {
    (1..=3)
        .map(|i| format!("{i}=127.0.0.1:{}:{}", base + 9 + i, base + 19 + i))
        .collect::<Vec<_>>()
        .join(",")
}

fn http_list(eps: &[String]) -> String {
    eps.iter()
        .map(|e| format!("http://{e}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn sleep_until(ms: i64) {
    let left = ms - now_ms();
    if left > 0 {
        std::thread::sleep(Duration::from_millis(left as u64));
    }
}

/// Starts the backend's servers; the registry URL for `dcron`.
fn start_registry(
    backend: Backend,
    services: &Services,
    servers: &mut Servers,
    dir: &Path,
) -> (Reg, String) {
    match backend {
        Backend::Redis => {
            let port = pick_base(32000, 10, 10, &[0]);
            let dir = dir.join("redis");
            let pid = services
                .call(&["redis", &port.to_string(), path_str(&dir)])
                .unwrap_or_else(|e| panic!("{e}"));
            let pid = servers.track("redis", &pid);
            (
                Reg::Redis { port, dir, pid },
                format!("redis://127.0.0.1:{port}"),
            )
        }
        Backend::Etcd => {
            let base = pick_base(32100, 25, 12, &[0, 1, 2, 10, 11, 12]);
            let dir = dir.join("etcd");
            let pids = services
                .call(&["etcd-cluster", &base.to_string(), path_str(&dir)])
                .unwrap_or_else(|e| panic!("{e}"));
            let pids = pids
                .split_whitespace()
                .map(|p| servers.track("etcd", p))
                .collect();
            (
                Reg::Etcd { base, dir, pids },
                format!("etcd://{}", endpoints(base).join(",")),
            )
        }
        Backend::Zookeeper => {
            let base = pick_base(32400, 25, 12, &[0, 1, 2, 10, 11, 12, 20, 21, 22]);
            let dir = dir.join("zk");
            let pids = services
                .call(&["zk-ensemble", &base.to_string(), path_str(&dir)])
                .unwrap_or_else(|e| panic!("{e}"));
            let pids = pids
                .split_whitespace()
                .map(|p| servers.track("zookeeper", p))
                .collect();
            (
                Reg::Zookeeper { base, dir, pids },
                format!("zk://{}", endpoints(base).join(",")),
            )
        }
        Backend::Consul => {
            let http = pick_base(32700, 10, 25, &[0, 1, 2, 3]);
            let server = http + 1;
            let dir = dir.join("consul");
            let pid = services
                .call(&[
                    "consul",
                    &http.to_string(),
                    &server.to_string(),
                    path_str(&dir),
                ])
                .unwrap_or_else(|e| panic!("{e}"));
            let pid = servers.track("consul", &pid);
            (
                Reg::Consul {
                    http,
                    server,
                    dir,
                    pid,
                },
                format!("consul://127.0.0.1:{http}"),
            )
        }
    }
}

fn agent_config(backend: Backend, ledger: &Path) -> String {
    let (ttl, heartbeat) = backend.timing();
    let mut c = format!(
        "node_ttl = \"{ttl}\"\nheartbeat = \"{heartbeat}\"\nreload_interval = \"2s\"\n\
         drain_timeout = \"5s\"\ncatch_up = \"1m\"\ntimeout = \"10s\"\n\
         env = {{ LEDGER = \"{}\" }}\n\n[handler]\ncommand = [\"/bin/bash\", \"-c\", '{RECORD}']\n",
        ledger.display()
    );
    for i in 0..STATIC_TASKS {
        c.push_str(&format!(
            "\n[[task]]\nname = \"s{i:02}\"\ncron = \"* * * * * *\"\ncommand = [\"/bin/bash\", \"-c\", '{RECORD}']\n"
        ));
    }
    c
}

/// One backend's run. Fields drop in order: agents, the watch, then the
/// servers.
struct Chaos {
    agents: Vec<Agent>,
    watch: Option<Watch>,
    servers: Servers,
    services: Services,
    reg: Reg,
    backend: Backend,
    ns: Ns,
    dir: PathBuf,
    ledger: PathBuf,
    specs: Vec<Spec>,
    phases: Vec<Phase>,
    crashes: Vec<Crash>,
    excluded: Vec<Excluded>,
    started: Instant,
}

impl Chaos {
    /// Fails the test with the agents' last log lines.
    fn bail(&self, msg: &str) -> ! {
        let mut text = format!(
            "chaos {}: {msg}\n(after {:.0?}; files kept in {})\n",
            self.backend.name(),
            self.started.elapsed(),
            self.dir.display()
        );
        for a in &self.agents {
            text.push_str(&format!(
                "---- last lines of agent {} ----\n{}\n",
                a.id,
                a.log_tail(15)
            ));
        }
        if let Some(w) = &self.watch {
            text.push_str(&format!("---- watch ----\n{}\n", w.transcript()));
        }
        panic!("{text}");
    }

    fn ids(&self) -> BTreeSet<String> {
        self.agents.iter().map(|a| a.id.clone()).collect()
    }

    fn wait_working(&self) {
        if let Err(e) = self.ns.wait_working(&self.ids(), Duration::from_secs(45)) {
            self.bail(&e);
        }
    }

    fn agent(&mut self, id: &str) -> &mut Agent {
        self.agents
            .iter_mut()
            .find(|a| a.id == id)
            .expect("known agent")
    }

    fn dynamic(&self) -> BTreeSet<String> {
        self.specs
            .iter()
            .filter(|s| s.name.starts_with('d'))
            .map(|s| s.name.clone())
            .collect()
    }

    fn add_dynamic(&self) {
        for name in self.dynamic() {
            let end = Instant::now() + Duration::from_secs(20);
            loop {
                match self
                    .ns
                    .dcron(&["add", &name, "*/2 * * * * *", "--payload", "chaos"])
                {
                    // 3: it exists already (a retried add that had landed).
                    Ok(r) if r.ok || r.code == Some(3) => break,
                    other => {
                        if Instant::now() >= end {
                            let why = match other {
                                Ok(r) => r.stderr,
                                Err(e) => e,
                            };
                            self.bail(&format!("dcron add {name} kept failing: {why}"));
                        }
                        std::thread::sleep(Duration::from_millis(300));
                    }
                }
            }
        }
    }

    /// Waits until every task ran a fire time of at least `since`.
    fn wait_all_fired(&self, since: i64, limit: Duration) {
        let end = Instant::now() + limit;
        loop {
            let lines = ledger::read(&self.ledger);
            let fired: BTreeSet<&str> = lines
                .iter()
                .filter(|l| l.fire >= since)
                .map(|l| l.task.as_str())
                .collect();
            let idle: Vec<&str> = self
                .specs
                .iter()
                .map(|s| s.name.as_str())
                .filter(|n| !fired.contains(n))
                .collect();
            if idle.is_empty() {
                return;
            }
            if Instant::now() >= end {
                self.bail(&format!("tasks {idle:?} did not fire within {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Each task's node for its latest fire at or before `t`.
    fn owners_at(&self, t: i64) -> BTreeMap<String, String> {
        let mut latest: BTreeMap<String, (i64, String)> = BTreeMap::new();
        for l in ledger::read(&self.ledger) {
            if l.fire <= t && l.fire > t - 5_000 {
                let e = latest
                    .entry(l.task.clone())
                    .or_insert((i64::MIN, String::new()));
                if l.fire > e.0 {
                    *e = (l.fire, l.node.clone());
                }
            }
        }
        latest.into_iter().map(|(t, (_, n))| (t, n)).collect()
    }

    /// Waits (bounded) until the last three seconds of every static task
    /// ran at most 300 ms late: the servers and the other scenarios' start
    /// (three JVMs, three etcds) load the two cores for a while.
    fn wait_calm(&self, limit: Duration) {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            let now = now_ms();
            let last = (now - 600).div_euclid(1000) * 1000;
            let lines = ledger::read(&self.ledger);
            let on_time: BTreeSet<(&str, i64)> = lines
                .iter()
                .filter(|l| l.wall - l.fire <= 300)
                .map(|l| (l.task.as_str(), l.fire))
                .collect();
            let calm = (0..3).all(|i| {
                self.specs
                    .iter()
                    .filter(|s| s.period == 1000)
                    .all(|s| on_time.contains(&(s.name.as_str(), last - i * 1000)))
            });
            if calm {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        eprintln!(
            "chaos {}: not calm after {limit:?}; starting anyway",
            self.backend.name()
        );
    }

    fn steady(&self) {
        std::thread::sleep(Duration::from_millis(STEADY_MS as u64));
    }

    // ----- the scenario -------------------------------------------------

    fn start(&mut self) {
        for a in &mut self.agents {
            a.spawn();
        }
        self.wait_working();
        let watch = Watch::start(&self.ns, &self.dir.join("watch.log"));
        for id in AGENTS {
            if watch
                .wait_for(0, Duration::from_secs(20), |v| {
                    node_event(v, "node_join", id)
                })
                .is_none()
            {
                self.watch = Some(watch);
                self.bail(&format!("the watch did not list {id}"));
            }
        }
        self.watch = Some(watch);
        let added = now_ms();
        self.add_dynamic();
        self.wait_all_fired(added, Duration::from_secs(30));
    }

    fn graceful_restart(&mut self, id: &str) {
        let start = now_ms();
        match self.agent(id).stop(Duration::from_secs(20)) {
            Ok(status) if status.success() => {}
            Ok(status) => self.bail(&format!("agent {id} exited with {status} on SIGTERM")),
            Err(e) => self.bail(&e),
        }
        // The handoff travels through the registry's change feed: its
        // fault is how long the feed took to show the agent leaving (an
        // outside watcher's view, so a loaded machine widens the bound by
        // what the feed itself took, not by what the agents took).
        let seen = self.watch.as_ref().and_then(|w| {
            w.wait_for(start, Duration::from_secs(5), |v| {
                node_event(v, "node_leave", id)
                    || (node_event(v, "node_update", id) && v["node"]["status"] == "leaving")
            })
        });
        self.phases.push(Phase {
            name: "sigterm".into(),
            start,
            fault: seen.map_or(0, |t| (t - start).max(0)),
        });
        std::thread::sleep(Duration::from_secs(3));
        self.agent(id).spawn();
        self.wait_working();
        self.steady();
    }

    fn crash_restart(&mut self) {
        // The victim: the agent that owns the most tasks right now.
        let owners = self.owners_at(now_ms());
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for n in owners.values() {
            *count.entry(n.as_str()).or_default() += 1;
        }
        let victim = count
            .iter()
            .max_by_key(|(_, c)| **c)
            .map(|(n, _)| n.to_string())
            .unwrap_or_else(|| self.bail("no task ran recently"));
        // Mid-second, away from the fire boundaries.
        let now = now_ms();
        let at = if now % 1000 < 400 {
            now - now % 1000 + 500
        } else {
            now - now % 1000 + 1500
        };
        sleep_until(at);
        let kill = now_ms();
        self.agent(&victim).kill9();
        let tasks: BTreeSet<String> = self
            .owners_at(kill)
            .into_iter()
            .filter(|(_, n)| *n == victim)
            .map(|(t, _)| t)
            .collect();
        self.phases.push(Phase {
            name: "kill9".into(),
            start: kill,
            fault: 0,
        });
        let window_end = kill + self.backend.expiry_ms() + 1000;
        let takeover = self.watch.as_ref().and_then(|w| {
            w.wait_for(
                kill,
                Duration::from_millis(self.backend.expiry_ms() as u64 + 15_000),
                |v| node_event(v, "node_leave", &victim),
            )
        });
        self.crashes.push(Crash {
            node: victim.clone(),
            kill,
            window_end,
            takeover,
            tasks,
        });
        sleep_until(window_end.max(takeover.unwrap_or(0)) + 500);
        self.agent(&victim).spawn();
        self.wait_working();
        self.steady();
    }

    fn registry_faults(&mut self) {
        match &self.reg {
            Reg::Redis { port, dir, pid } => {
                let (port, dir, pid) = (*port, dir.clone(), *pid);
                // 1. Frozen for 5 s: connections stay open, nothing answers.
                let t = now_ms();
                self.servers.signal(pid, libc::SIGSTOP);
                std::thread::sleep(Duration::from_secs(5));
                self.servers.signal(pid, libc::SIGCONT);
                self.phases.push(Phase {
                    name: "redis-pause".into(),
                    start: t,
                    fault: now_ms() - t,
                });
                self.wait_working();
                self.steady();
                // 2. Down for 5 s, back with its data (SHUTDOWN SAVE writes
                // dump.rdb into its dir, which the restart loads).
                let t = now_ms();
                let _ = procs::run(
                    std::process::Command::new("redis-cli").args([
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &port.to_string(),
                        "SHUTDOWN",
                        "SAVE",
                    ]),
                    Duration::from_secs(15),
                );
                if !procs::wait_gone(pid, Duration::from_secs(15)) {
                    self.bail("redis did not shut down");
                }
                self.servers.forget(pid);
                sleep_until(t + 5_000);
                let new = self
                    .services
                    .call(&["redis", &port.to_string(), path_str(&dir)])
                    .unwrap_or_else(|e| self.bail(&e));
                let new = self.servers.track("redis", &new);
                let fault = now_ms() - t;
                self.reg = Reg::Redis {
                    port,
                    dir,
                    pid: new,
                };
                let keys = procs::run(
                    std::process::Command::new("redis-cli").args([
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &port.to_string(),
                        "DBSIZE",
                    ]),
                    Duration::from_secs(10),
                )
                .map(|r| r.stdout.trim().to_string())
                .unwrap_or_default();
                if keys.parse::<u64>().unwrap_or(0) == 0 {
                    self.bail(&format!(
                        "redis came back without its data (DBSIZE {keys:?})"
                    ));
                }
                self.phases.push(Phase {
                    name: "redis-stop".into(),
                    start: t,
                    fault,
                });
                self.wait_working();
                self.steady();
            }
            Reg::Etcd { base, dir, pids } => {
                let (base, dir, pids) = (*base, dir.clone(), pids.clone());
                let eps = endpoints(base);
                let leader = self
                    .services
                    .call(&["leader-etcd", &http_list(&eps)])
                    .unwrap_or_else(|e| self.bail(&e));
                let i = eps
                    .iter()
                    .position(|e| leader.ends_with(e.as_str()))
                    .unwrap_or_else(|| {
                        self.bail(&format!("leader {leader} is not one of {eps:?}"))
                    });
                let t = now_ms();
                self.servers.kill9(pids[i]);
                let rest: Vec<String> =
                    (0..3).filter(|j| *j != i).map(|j| eps[j].clone()).collect();
                let new_leader = self
                    .services
                    .call(&["leader-etcd", &http_list(&rest)])
                    .unwrap_or_else(|e| self.bail(&e));
                let fault = now_ms() - t;
                self.phases.push(Phase {
                    name: "etcd-leader-kill".into(),
                    start: t,
                    fault,
                });
                eprintln!(
                    "chaos etcd: killed leader {leader}, {new_leader} leads after {fault} ms"
                );
                std::thread::sleep(Duration::from_secs(3));
                let n = i as u16;
                let pid = self
                    .services
                    .call(&[
                        "etcd",
                        &format!("e{}", i + 1),
                        &(base + n).to_string(),
                        &(base + 10 + n).to_string(),
                        path_str(&dir.join(format!("e{}", i + 1))),
                        &etcd_initial(base),
                        "existing",
                    ])
                    .unwrap_or_else(|e| self.bail(&e));
                let pid = self.servers.track("etcd", &pid);
                self.services
                    .call(&["etcd-wait", &http_list(&eps)])
                    .unwrap_or_else(|e| self.bail(&e));
                if let Reg::Etcd { pids, .. } = &mut self.reg {
                    pids[i] = pid;
                }
                self.wait_working();
                self.steady();
            }
            Reg::Zookeeper { base, dir, pids } => {
                let (base, dir, pids) = (*base, dir.clone(), pids.clone());
                let leader = self
                    .services
                    .call(&["leader-zk", &base.to_string()])
                    .unwrap_or_else(|e| self.bail(&e));
                let i = leader
                    .parse::<u16>()
                    .ok()
                    .and_then(|p| p.checked_sub(base))
                    .map(usize::from)
                    .filter(|i| *i < 3)
                    .unwrap_or_else(|| self.bail(&format!("leader port {leader}?")));
                let t = now_ms();
                self.servers.kill9(pids[i]);
                let new_leader = self
                    .services
                    .call(&["leader-zk", &base.to_string()])
                    .unwrap_or_else(|e| self.bail(&e));
                let fault = now_ms() - t;
                self.phases.push(Phase {
                    name: "zk-leader-kill".into(),
                    start: t,
                    fault,
                });
                eprintln!(
                    "chaos zookeeper: killed leader :{leader}, :{new_leader} leads after {fault} ms"
                );
                std::thread::sleep(Duration::from_secs(3));
                let n = i as u16;
                let pid = self
                    .services
                    .call(&[
                        "zk",
                        &(i + 1).to_string(),
                        &(base + n).to_string(),
                        path_str(&dir.join(format!("zk{}", i + 1))),
                        &zk_servers(base),
                    ])
                    .unwrap_or_else(|e| self.bail(&e));
                let pid = self.servers.track("zookeeper", &pid);
                let ports: Vec<String> = (0..3).map(|j| (base + j).to_string()).collect();
                let mut args = vec!["zk-wait"];
                args.extend(ports.iter().map(String::as_str));
                self.services.call(&args).unwrap_or_else(|e| self.bail(&e));
                if let Reg::Zookeeper { pids, .. } = &mut self.reg {
                    pids[i] = pid;
                }
                self.wait_working();
                self.steady();
            }
            Reg::Consul {
                http,
                server,
                dir,
                pid,
            } => {
                let (http, server, dir, pid) = (*http, *server, dir.clone(), *pid);
                let t = now_ms();
                self.servers.kill9(pid);
                let new = self
                    .services
                    .call(&[
                        "consul",
                        &http.to_string(),
                        &server.to_string(),
                        path_str(&dir),
                    ])
                    .unwrap_or_else(|e| self.bail(&e));
                let new = self.servers.track("consul", &new);
                let fault = now_ms() - t;
                self.reg = Reg::Consul {
                    http,
                    server,
                    dir,
                    pid: new,
                };
                self.phases.push(Phase {
                    name: "consul-restart".into(),
                    start: t,
                    fault,
                });
                // A dev agent keeps nothing: node registrations, the
                // dynamic definitions and every claim are gone. Until each
                // node has noticed and registered again nobody owns a task,
                // and without a claim watermark there is nothing to catch
                // up ("tasks that never ran are not caught up"): those fires
                // are the wiped registry's, not the engine's. Likewise the
                // dynamic tasks until they are restored (as an operator
                // would) and seen again by the agents.
                self.wait_working();
                let rejoined = now_ms();
                self.excluded.push(Excluded {
                    why: "consul dev agent restarted empty: until every node re-registered".into(),
                    tasks: self.specs.iter().map(|s| s.name.clone()).collect(),
                    from: t,
                    to: rejoined + 1_000,
                });
                self.add_dynamic();
                let readded = now_ms();
                self.excluded.push(Excluded {
                    why: "consul dev agent restarted empty: dynamic tasks until re-added and seen"
                        .into(),
                    tasks: self.dynamic(),
                    from: t,
                    to: readded + 4_000,
                });
                self.steady();
                self.steady();
            }
        }
    }

    /// Stops the agents and checks the ledger.
    fn finish(&mut self) {
        let t0 = self.phases[0].start;
        let t_end = (now_ms() - 1_000).div_euclid(1000) * 1000;
        // Late fires of the last phase may still be running: wait for them
        // (bounded), then stop.
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let lines = ledger::read(&self.ledger);
            let r = self.analyse(&lines, t0, t_end);
            if r.missing.is_empty() || Instant::now() >= end {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let ids: Vec<String> = self.agents.iter().map(|a| a.id.clone()).collect();
        for id in ids {
            match self.agent(&id).stop(Duration::from_secs(20)) {
                Ok(s) if s.success() => {}
                Ok(s) => self.bail(&format!("agent {id} exited with {s} at the end")),
                Err(e) => self.bail(&e),
            }
        }
        let lines = ledger::read(&self.ledger);
        let report = self.analyse(&lines, t0, t_end);
        let runs_failed: usize = self.agents.iter().map(|a| a.log_count("run failed")).sum();
        let row = format!(
            "{} | wall {:.0?}, {} ledger lines, {runs_failed} failed runs logged",
            report.row(),
            self.started.elapsed(),
            lines.len()
        );
        // Straight to stderr (not captured) and to a file, so the row shows
        // up whether or not the test passes.
        let _ = writeln!(std::io::stderr(), "{}\n{row}", ledger::HEADER);
        let report_file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-report.txt");
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&report_file)
        {
            let _ = writeln!(f, "{row}");
        }
        let table = {
            let mut rows = ROWS.lock().unwrap_or_else(|e| e.into_inner());
            rows.push(row);
            format!("{}\n{}", ledger::HEADER, rows.join("\n"))
        };
        let failures = report.failures();
        if !failures.is_empty() {
            let excl: Vec<String> = self
                .excluded
                .iter()
                .map(|e| format!("{} [{}, {}]", e.why, e.from, e.to))
                .collect();
            let crashes: Vec<String> = self
                .crashes
                .iter()
                .map(|c| {
                    format!(
                        "{} killed at {}, window to {}, watch saw it leave at {:?}, its tasks {:?}",
                        c.node, c.kill, c.window_end, c.takeover, c.tasks
                    )
                })
                .collect();
            let phases: Vec<String> = self
                .phases
                .iter()
                .map(|p| format!("{} from {} (fault {} ms)", p.name, p.start, p.fault))
                .collect();
            self.bail(&format!(
                "the ledger fails its checks\n{table}\n\n{failures}\nrun from {t0} to {t_end}; phases: {phases:?}\ncrashes: {crashes:?}\nexcluded: {excl:?}"
            ));
        }
    }

    fn analyse(&self, lines: &[ledger::Line], t0: i64, t_end: i64) -> ledger::Report {
        ledger::analyse(&ledger::Run {
            backend: self.backend.name(),
            lines,
            specs: &self.specs,
            t0,
            t_end,
            phases: &self.phases,
            crashes: &self.crashes,
            excluded: &self.excluded,
        })
    }
}

fn scenario(backend: Backend) {
    let Some(script) = service_env("DCRON_SERVICES") else {
        return;
    };
    // One cluster at a time: four of them (12 agents, 3-member registries)
    // on a 2-core machine starve each other for seconds, and the lateness
    // bounds are meant to measure dcron, not the machine.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if backend == Backend::Consul && service_env("DCRON_CONSUL_BIN").is_none() {
        return;
    }
    let started = Instant::now();
    let scratch = Scratch::new(&format!("chaos-{}", backend.name()));
    let services = Services {
        script: PathBuf::from(script),
    };
    let mut servers = Servers::default();
    let (reg, url) = start_registry(backend, &services, &mut servers, &scratch.0);
    let ns = Ns {
        registry: url,
        ns: format!(
            "chaos-{}-{}-{}",
            backend.name(),
            std::process::id(),
            now_ms() % 1_000_000_000
        ),
    };
    let ledger_path = scratch.path("ledger");
    let conf = scratch.path("agent.toml");
    std::fs::write(&conf, agent_config(backend, &ledger_path)).expect("write agent config");
    let agents = AGENTS
        .iter()
        .map(|id| Agent::new(&ns, id, &conf, &scratch.path(&format!("{id}.log"))))
        .collect();
    let mut specs: Vec<Spec> = (0..STATIC_TASKS)
        .map(|i| Spec {
            name: format!("s{i:02}"),
            period: 1000,
        })
        .collect();
    specs.extend((0..DYNAMIC_TASKS).map(|i| Spec {
        name: format!("d{i:02}"),
        period: 2000,
    }));
    let mut chaos = Chaos {
        agents,
        watch: None,
        servers,
        services,
        reg,
        backend,
        ns,
        dir: scratch.0.clone(),
        ledger: ledger_path,
        specs,
        phases: Vec::new(),
        crashes: Vec::new(),
        excluded: Vec::new(),
        started,
    };
    chaos.start();
    chaos.wait_calm(Duration::from_secs(30));
    let t0 = (now_ms() + 1_500).div_euclid(1000) * 1000;
    chaos.phases.push(Phase {
        name: "steady".into(),
        start: t0,
        fault: 0,
    });
    sleep_until(t0 + STEADY_MS);
    chaos.graceful_restart("a1");
    chaos.crash_restart();
    chaos.registry_faults();
    chaos.finish();
}

#[cfg(feature = "redis")]
#[test]
fn chaos_redis() {
    scenario(Backend::Redis);
}

#[cfg(feature = "etcd")]
#[test]
fn chaos_etcd() {
    scenario(Backend::Etcd);
}

#[cfg(feature = "zookeeper")]
#[test]
fn chaos_zookeeper() {
    scenario(Backend::Zookeeper);
}

#[cfg(feature = "consul")]
#[test]
fn chaos_consul() {
    scenario(Backend::Consul);
}
