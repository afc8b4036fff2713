//! The Consul registry against the conformance suite, the cluster tests, and
//! Consul-specific faults (lost sessions, a restarted agent).
//!
//! Needs `DCRON_CONSUL_ADDR` (set by `scripts/services.sh up`); without it
//! every test skips, unless `DCRON_REQUIRE_SERVICES=1`. Tests that restart
//! an agent start their own throw-away agents on ports 31350-31369.
#![cfg(feature = "consul")]

mod cluster;
mod conformance;
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use dcron::registry::{Claim, ClaimOutcome, ConsulRegistry, RawKind, Registry, WatchEvent};
use dcron::{Dcron, NodeStatus, RegistryErrorKind, TaskContext, TaskMeta};
use tokio::time::Instant;

use conformance::{eventually, expect_event, fresh_ns, node, Harness};

/// How the harness simulates a crashed node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Crash {
    /// Destroy the node's session shortly after the crash (Consul deletes
    /// its key at once): a fast, simulated expiry.
    DestroySession,
    /// Do nothing: the caller stops renewing, the session expires (the
    /// true crash; Consul takes up to 2×TTL).
    StopRenewing,
}

struct Consul {
    addr: String,
    crash: Crash,
    http: reqwest::Client,
}

impl Consul {
    fn at(addr: &str, crash: Crash) -> Self {
        Consul {
            addr: addr.trim_end_matches('/').to_string(),
            crash,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
        }
    }

    fn from_env() -> Option<Self> {
        support::service_env("DCRON_CONSUL_ADDR").map(|a| Consul::at(&a, Crash::DestroySession))
    }

    async fn client(&self) -> ConsulRegistry {
        ConsulRegistry::connect(&self.addr)
            .await
            .expect("consul registry")
    }

    /// The session holding a key, read straight from Consul.
    async fn holder(&self, key: &str) -> Option<String> {
        let resp = self
            .http
            .get(format!("{}/v1/kv/{key}", self.addr))
            .send()
            .await
            .expect("read key");
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return None;
        }
        let entries: serde_json::Value = resp.json().await.expect("json");
        entries[0]["Session"].as_str().map(str::to_string)
    }

    async fn destroy_session(&self, session: &str) {
        let resp = self
            .http
            .put(format!("{}/v1/session/destroy/{session}", self.addr))
            .send()
            .await
            .expect("destroy session");
        assert!(resp.status().is_success(), "destroy: {}", resp.status());
    }

    async fn delete_key(&self, key: &str) {
        let resp = self
            .http
            .delete(format!("{}/v1/kv/{key}", self.addr))
            .send()
            .await
            .expect("delete key");
        assert!(resp.status().is_success());
    }
}

impl Harness for Consul {
    async fn registry(&self) -> Arc<dyn Registry> {
        Arc::new(self.client().await)
    }

    async fn write_raw(&self, ns: &str, kind: RawKind, name: &str, raw: &[u8]) {
        let dir = match kind {
            RawKind::Node => "nodes",
            RawKind::Task => "tasks",
            RawKind::Tombstone => "deleted",
            RawKind::Claim => "claims",
        };
        let resp = self
            .http
            .put(format!("{}/v1/kv/{ns}/{dir}/{name}", self.addr))
            .body(raw.to_vec())
            .send()
            .await
            .expect("raw write");
        assert!(resp.status().is_success(), "raw write: {}", resp.status());
    }

    /// Consul's minimum session TTL.
    fn short_ttl(&self) -> Duration {
        Duration::from_secs(10)
    }

    fn url_at(&self, host_port: &str) -> Option<String> {
        Some(format!("consul://{host_port}"))
    }

    /// Consul may take up to twice the TTL to expire a session; the
    /// simulated expiry of [`Crash::DestroySession`] comes after 1.5-2.5 s.
    fn expiry_bound(&self, ttl: Duration) -> Duration {
        match self.crash {
            Crash::StopRenewing => ttl.max(Duration::from_secs(10)) * 2 + Duration::from_secs(5),
            Crash::DestroySession => Duration::from_secs(5),
        }
    }

    async fn crash(&self, _registry: &Arc<dyn Registry>, ns: &str, node_id: &str) {
        if self.crash == Crash::StopRenewing {
            return;
        }
        // Simulated expiry: the session is destroyed 1.5-2.5 s after the
        // crash, half-way through a second, so a crashed owner of an
        // every-second task misses at least one fire and the takeover's
        // catch-up run of it is measurably late (Consul itself would take
        // 10-20 s, longer than the cluster tests wait).
        let Some(session) = self.holder(&format!("{ns}/nodes/{node_id}")).await else {
            return;
        };
        let (http, addr) = (self.http.clone(), self.addr.clone());
        tokio::spawn(async move {
            let now = cluster::now_ms();
            let at = ((now + 1000) / 1000 + 1) * 1000 + 500;
            tokio::time::sleep(Duration::from_millis((at - now) as u64)).await;
            let _ = http
                .put(format!("{addr}/v1/session/destroy/{session}"))
                .send()
                .await;
        });
    }
}

conformance::suite!(match Consul::from_env() {
    Some(h) => h,
    None => return,
});

cluster::suite!(match Consul::from_env() {
    Some(h) => h,
    None => return,
});

async fn ids(r: &ConsulRegistry, ns: &str) -> BTreeSet<String> {
    r.nodes(ns)
        .await
        .expect("nodes")
        .into_iter()
        .map(|n| n.id)
        .collect()
}

fn harness() -> Option<Consul> {
    conformance::init_tracing();
    Consul::from_env()
}

// ----- sessions ---------------------------------------------------------------

/// The true crash: nothing renews the session any more. Consul deletes the
/// key within 2×TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn true_crash_session_expires_within_two_ttl() {
    let Some(h) = harness() else { return };
    let h = Consul::at(&h.addr, Crash::StopRenewing);
    let r = h.client().await;
    let observer = h.client().await;
    let ns = fresh_ns("consul-true-crash");
    let ttl = h.short_ttl();
    let mut rx = observer.watch(&ns).await.expect("watch");
    r.register(&ns, &node("node-a", NodeStatus::Working), ttl)
        .await
        .expect("register");
    let crashed_at = Instant::now();
    expect_event(
        &mut rx,
        h.expiry_bound(ttl),
        "NodeDelete after the session expired",
        |e| *e == WatchEvent::NodeDelete("node-a".into()),
    )
    .await;
    let took = crashed_at.elapsed();
    eprintln!("consul: session with TTL {ttl:?} expired {took:?} after the last renewal");
    assert!(took >= ttl, "expired before its TTL: {took:?}");
    assert!(!r.heartbeat(&ns, "node-a", ttl).await.expect("heartbeat"));
}

/// The conformance expiry checks with the true crash (2×TTL + 5 s bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_expiry_with_a_true_crash() {
    let Some(h) = harness() else { return };
    let h = Consul::at(&h.addr, Crash::StopRenewing);
    tokio::join!(
        conformance::crashed_node_expires(&h),
        conformance::reregister_after_loss(&h)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroyed_session_loses_key_and_node_reregisters() {
    let Some(h) = harness() else { return };
    let r = h.client().await;
    let observer = h.client().await;
    let ns = fresh_ns("consul-destroyed");
    let ttl = h.short_ttl();
    let a = node("node-a", NodeStatus::Working);
    let mut rx = observer.watch(&ns).await.expect("watch");
    r.register(&ns, &a, ttl).await.expect("register");
    expect_event(&mut rx, Duration::from_secs(10), "NodePut", |e| {
        *e == WatchEvent::NodePut(a.clone())
    })
    .await;
    let session = h
        .holder(&format!("{ns}/nodes/node-a"))
        .await
        .expect("key held by a session");
    h.destroy_session(&session).await;
    expect_event(&mut rx, Duration::from_secs(10), "NodeDelete", |e| {
        *e == WatchEvent::NodeDelete("node-a".into())
    })
    .await;
    assert!(
        !r.heartbeat(&ns, "node-a", ttl).await.expect("heartbeat"),
        "renewal must report the lost session"
    );
    assert!(
        !r.update_node(&ns, &a).await.expect("update"),
        "update must not re-create the key"
    );
    assert!(
        ids(&observer, &ns).await.is_empty(),
        "update_node re-created the key"
    );
    r.register(&ns, &a, ttl).await.expect("register again");
    expect_event(&mut rx, Duration::from_secs(10), "NodePut again", |e| {
        *e == WatchEvent::NodePut(a.clone())
    })
    .await;
    let renewed = h
        .holder(&format!("{ns}/nodes/node-a"))
        .await
        .expect("held again");
    assert_ne!(renewed, session, "register creates a new session");
    assert!(r.heartbeat(&ns, "node-a", ttl).await.expect("heartbeat"));
    r.unregister(&ns, "node-a").await.expect("unregister");
    assert_eq!(h.holder(&format!("{ns}/nodes/node-a")).await, None);
}

/// A key deleted behind the node's back (the session still alive) is a lost
/// registration too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_key_under_a_live_session_is_reported() {
    let Some(h) = harness() else { return };
    let r = h.client().await;
    let ns = fresh_ns("consul-deleted-key");
    let ttl = h.short_ttl();
    let a = node("node-a", NodeStatus::Working);
    r.register(&ns, &a, ttl).await.expect("register");
    assert!(r.heartbeat(&ns, "node-a", ttl).await.expect("heartbeat"));
    h.delete_key(&format!("{ns}/nodes/node-a")).await;
    assert!(!r.heartbeat(&ns, "node-a", ttl).await.expect("heartbeat"));
    assert!(!r.update_node(&ns, &a).await.expect("update"));
    r.register(&ns, &a, ttl).await.expect("register again");
    assert!(r.heartbeat(&ns, "node-a", ttl).await.expect("heartbeat"));
    assert_eq!(ids(&r, &ns).await, BTreeSet::from(["node-a".to_string()]));
    r.unregister(&ns, "node-a").await.expect("unregister");
}

/// A restarted process registers the same node id while its previous
/// session still lives: it takes the key over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_takes_over_from_an_older_session() {
    let Some(h) = harness() else { return };
    let old = h.client().await;
    let new = h.client().await;
    let ns = fresh_ns("consul-takeover");
    let ttl = h.short_ttl();
    let mut a = node("node-a", NodeStatus::Working);
    old.register(&ns, &a, ttl).await.expect("register old");
    a.create_time += 1;
    new.register(&ns, &a, ttl).await.expect("register new");
    assert!(
        !old.heartbeat(&ns, "node-a", ttl)
            .await
            .expect("old heartbeat"),
        "the old session must be gone"
    );
    assert!(new
        .heartbeat(&ns, "node-a", ttl)
        .await
        .expect("new heartbeat"));
    let listed = new.nodes(&ns).await.expect("nodes");
    assert_eq!(listed, vec![a.clone()]);
    // A client that did not register the node still reaches its session.
    let third = h.client().await;
    assert!(third
        .heartbeat(&ns, "node-a", ttl)
        .await
        .expect("third heartbeat"));
    a.status = NodeStatus::Leaving;
    assert!(third.update_node(&ns, &a).await.expect("third update"));
    assert_eq!(new.nodes(&ns).await.expect("nodes"), vec![a.clone()]);
    third.unregister(&ns, "node-a").await.expect("unregister");
    assert!(!new
        .heartbeat(&ns, "node-a", ttl)
        .await
        .expect("heartbeat after unregister"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_ttls_are_raised_to_consul_minimum() {
    let Some(h) = harness() else { return };
    let r = h.client().await;
    let ns = fresh_ns("consul-ttl");
    r.register(
        &ns,
        &node("node-a", NodeStatus::Working),
        Duration::from_millis(500),
    )
    .await
    .expect("a sub-10 s TTL is clamped, not refused");
    let session = h.holder(&format!("{ns}/nodes/node-a")).await.expect("held");
    let info: serde_json::Value = h
        .http
        .get(format!("{}/v1/session/info/{session}", h.addr))
        .send()
        .await
        .expect("session info")
        .json()
        .await
        .expect("json");
    assert_eq!(info[0]["TTL"], "10s");
    assert_eq!(info[0]["Behavior"], "delete");
    assert_eq!(info[0]["LockDelay"], 0);
    r.unregister(&ns, "node-a").await.expect("unregister");
}

/// Batched claims racing each other (rolled-back transactions are decided
/// again on a fresh read): exactly one winner per task and fire time, for
/// large batches (several transactions) and small ones (one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claim_many_one_winner() {
    let Some(h) = harness() else { return };
    let ns = fresh_ns("consul-claim-many-race");
    let mut clients: Vec<ConsulRegistry> = Vec::new();
    for _ in 0..6 {
        clients.push(h.client().await);
    }
    for (size, fire_time) in [(150usize, 10_000i64), (150, 20_000), (10, 30_000)] {
        let names: Vec<String> = (0..size).map(|i| format!("task-{i:03}")).collect();
        let barrier = Arc::new(tokio::sync::Barrier::new(clients.len()));
        let mut joins = Vec::new();
        for (c, r) in clients.iter().enumerate() {
            let (r, ns, names, barrier) = (r.clone(), ns.clone(), names.clone(), barrier.clone());
            joins.push(tokio::spawn(async move {
                let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
                if c % 2 == 1 {
                    names.reverse();
                }
                let node = format!("c{c}");
                let claim = Claim::new(fire_time, &node, &format!("{node}/1"), fire_time);
                barrier.wait().await;
                let won = r.claim_many(&ns, &names, &claim).await;
                assert!(
                    won.iter().all(|o| !matches!(o, ClaimOutcome::Failed(_))),
                    "claim_many: {won:?}"
                );
                names
                    .into_iter()
                    .zip(won)
                    .filter(|(_, w)| w.is_won())
                    .map(|(n, _)| n.to_string())
                    .collect::<Vec<_>>()
            }));
        }
        let mut winners: std::collections::BTreeMap<String, usize> = Default::default();
        for j in joins {
            for name in j.await.expect("claimer") {
                *winners.entry(name).or_default() += 1;
            }
        }
        assert_eq!(
            winners.len(),
            size,
            "fire {fire_time}: some task had no winner"
        );
        assert!(
            winners.values().all(|&w| w == 1),
            "fire {fire_time}: {winners:?}"
        );
    }
    let claims = clients[0].claims(&ns).await.expect("claims");
    assert_eq!(claims.len(), 150);
    assert_eq!(
        claims.iter().filter(|(_, c)| c.fire_time == 30_000).count(),
        10
    );
    clients[0].clear(&ns).await.expect("clear");
}

// ----- watch ------------------------------------------------------------------

/// An empty prefix wakes its blocking query on every KV write next to it
/// (claims included): the feed keeps its prefixes non-empty with folder
/// keys, also after `clear` removed them, so fires wake no watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_do_not_wake_the_watch() {
    let Some(h) = harness() else { return };
    let watcher = h.client().await;
    let claimer = h.client().await;
    let ns = fresh_ns("consul-pacing");
    let mut rx = watcher.watch(&ns).await.expect("watch");
    claimer
        .put_task(&ns, &TaskMeta::new("t", "* * * * *"), false)
        .await
        .expect("put");
    claimer.put_tombstone(&ns, "t").await.expect("tombstone");
    // A key created and deleted between two polls yields no event (the
    // periodic reload covers that): let the feed see it first.
    expect_event(&mut rx, Duration::from_secs(10), "TombstonePut", |e| {
        *e == WatchEvent::TombstonePut("t".into())
    })
    .await;
    claimer.clear(&ns).await.expect("clear"); // removes the folder keys too
    expect_event(&mut rx, Duration::from_secs(10), "TombstoneDelete", |e| {
        *e == WatchEvent::TombstoneDelete("t".into())
    })
    .await;
    for dir in ["nodes", "tasks", "deleted"] {
        let key = format!("{ns}/{dir}/");
        eventually(Duration::from_secs(5), "folder key re-created", || async {
            let resp = h
                .http
                .get(format!("{}/v1/kv/{key}", h.addr))
                .send()
                .await
                .expect("get");
            resp.status().is_success()
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    while rx.try_recv().is_ok() {} // the rest of clear's deletes
    let before = watcher.request_stats();
    let started = Instant::now();
    let mut fire = 1_000;
    while started.elapsed() < Duration::from_secs(2) {
        let claim = Claim::new(fire, "n", "n/1", fire);
        assert!(claimer.claim(&ns, "busy", &claim).await.expect("claim"));
        fire += 1_000;
    }
    let polls = watcher.request_stats().requests - before.requests;
    eprintln!(
        "consul: {} claims in 2 s caused {polls} watch polls",
        fire / 1_000 - 1
    );
    assert!(polls <= 3, "claims woke the watch: {polls} polls");
    let ev = rx.try_recv();
    assert!(ev.is_err(), "claims reached the feed: {ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_stops_when_the_receiver_is_dropped() {
    let Some(h) = harness() else { return };
    let watcher = h.client().await;
    let writer = h.client().await;
    let ns = fresh_ns("consul-drop");
    let rx = watcher.watch(&ns).await.expect("watch");
    drop(rx);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_drop = watcher.request_stats().requests;
    for i in 0..5 {
        writer
            .put_task(&ns, &TaskMeta::new(format!("t{i}"), "* * * * *"), false)
            .await
            .expect("put");
        writer
            .put_tombstone(&ns, &format!("t{i}"))
            .await
            .expect("tombstone");
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        watcher.request_stats().requests,
        after_drop,
        "the feed kept polling after the receiver was dropped"
    );
    writer.clear(&ns).await.expect("clear");
}

// ----- construction -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datacenter_and_token_are_sent() {
    let Some(h) = harness() else { return };
    let ns = fresh_ns("consul-dc");
    let dc1 = ConsulRegistry::builder(&h.addr)
        .datacenter("dc1")
        .token("anonymous-is-fine-without-acls")
        .connect()
        .await
        .expect("connect");
    dc1.put_task(&ns, &TaskMeta::new("t", "* * * * *"), false)
        .await
        .expect("put in dc1");
    assert_eq!(dc1.tasks(&ns).await.expect("tasks").len(), 1);
    let err = ConsulRegistry::builder(&h.addr)
        .datacenter("no-such-dc")
        .connect()
        .await
        .expect_err("an unknown datacenter must fail");
    assert!(err.to_string().contains("consul"), "{err}");
    let shown = format!("{dc1:?}");
    assert!(
        !shown.contains("anonymous-is-fine"),
        "token leaked into Debug: {shown}"
    );
    dc1.clear(&ns).await.expect("clear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_agent_errors_in_bounded_time() {
    conformance::init_tracing();
    // Nothing listens there (outside every test's port range).
    let started = Instant::now();
    let err = ConsulRegistry::builder("http://127.0.0.1:31369")
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect_err("connecting to an unreachable agent must fail");
    assert_eq!(
        err.registry_kind(),
        Some(RegistryErrorKind::Unavailable),
        "{err}"
    );
    assert!(err.is_retryable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(6));
    // https without a TLS backend compiled in is an error, not a panic.
    assert!(ConsulRegistry::connect("https://127.0.0.1:31369")
        .await
        .is_err());
}

// ----- a restarted agent ------------------------------------------------------------

/// A throw-away dev agent that can be killed and started again on the same
/// ports (dev agents keep nothing: it comes back empty).
struct Agent {
    http: u16,
    server: u16,
    dir: support::ScratchDir,
    proc: Option<support::Server>,
}

impl Agent {
    fn start(name: &str, http: u16, server: u16) -> Agent {
        let dir = support::ScratchDir::new(name);
        let mut agent = Agent {
            http,
            server,
            dir,
            proc: None,
        };
        agent.up();
        agent
    }

    fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    fn up(&mut self) {
        let (http, server) = (self.http.to_string(), self.server.to_string());
        self.proc = Some(support::Server::start(&[
            "consul",
            &http,
            &server,
            self.dir.path(),
        ]));
    }

    fn crash(&mut self) {
        if let Some(proc) = self.proc.take() {
            for pid in &proc.pids {
                proc.kill_pid(pid);
            }
            drop(proc); // waits until the process is gone
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_mid_run() {
    if support::service_env("DCRON_CONSUL_ADDR").is_none() {
        return; // no consul binary set up
    }
    conformance::init_tracing();
    let mut agent = Agent::start("consul-restart", 31350, 31351);
    let r = ConsulRegistry::builder(&agent.addr())
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(3))
        .connect()
        .await
        .expect("connect");
    let ns = fresh_ns("consul-restart");
    let ttl = Duration::from_secs(10);
    let a = node("node-a", NodeStatus::Working);
    r.register(&ns, &a, ttl).await.expect("register");
    r.put_task(&ns, &TaskMeta::new("before", "* * * * *"), false)
        .await
        .expect("put");
    let mut rx = r.watch(&ns).await.expect("watch");

    agent.crash();
    // Calls fail, in bounded time, while the agent is down.
    let down_at = Instant::now();
    let before = r.request_stats();
    let started = Instant::now();
    assert!(r.heartbeat(&ns, "node-a", ttl).await.is_err());
    assert!(r.nodes(&ns).await.is_err());
    assert!(r
        .claim(&ns, "t", &Claim::new(1, "a", "a/1", 1))
        .await
        .is_err());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "calls took {:?} to fail",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = r.request_stats();
    let down_for = down_at.elapsed().as_secs_f64();
    let watch_requests = (during.requests - before.requests).saturating_sub(4); // heartbeat = 2, nodes, claim
    eprintln!(
        "consul: agent down {down_for:.1} s: {watch_requests} watch requests, {} failures",
        during.failures - before.failures
    );
    // Three loops backing off from 200 ms (doubling, capped at 5 s): a busy
    // loop would make thousands.
    assert!(
        watch_requests <= 30,
        "{watch_requests} watch requests in {down_for:.1} s"
    );

    agent.up();
    // The feed comes back with a Resync (the new agent is empty: the node
    // and task are gone, reported before the Resync).
    let resync = expect_event(
        &mut rx,
        Duration::from_secs(15),
        "Resync after the restart",
        |e| matches!(e, WatchEvent::Resync),
    )
    .await;
    assert_eq!(resync, WatchEvent::Resync);
    // The session died with the agent: the node learns it and re-registers.
    assert!(!r
        .heartbeat(&ns, "node-a", ttl)
        .await
        .expect("heartbeat after restart"));
    let mut again = a.clone();
    again.create_time += 1;
    r.register(&ns, &again, ttl)
        .await
        .expect("register after restart");
    assert!(r.heartbeat(&ns, "node-a", ttl).await.expect("heartbeat"));
    // All three loops are alive (no panic) and deliver new changes again.
    expect_event(
        &mut rx,
        Duration::from_secs(15),
        "NodePut after re-registering",
        |e| *e == WatchEvent::NodePut(again.clone()),
    )
    .await;
    let after = TaskMeta::new("after", "* * * * *");
    r.put_task(&ns, &after, false)
        .await
        .expect("put after restart");
    expect_event(
        &mut rx,
        Duration::from_secs(15),
        "TaskPut after the restart",
        |e| *e == WatchEvent::TaskPut(after.clone()),
    )
    .await;
    r.put_tombstone(&ns, "after")
        .await
        .expect("tombstone after restart");
    expect_event(
        &mut rx,
        Duration::from_secs(15),
        "TombstonePut after the restart",
        |e| *e == WatchEvent::TombstonePut("after".into()),
    )
    .await;
    assert!(r
        .claim(&ns, "t", &Claim::new(1, "a", "a/1", 1))
        .await
        .expect("claim"));
}

// ----- node level -----------------------------------------------------------------

async fn consul_node(
    addr: &str,
    ns: &str,
    id: &str,
    ran: Arc<std::sync::Mutex<Vec<(String, i64)>>>,
) -> Dcron {
    let registry = ConsulRegistry::builder(addr)
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(3))
        .connect()
        .await
        .expect("connect");
    let node = Dcron::builder(registry)
        .namespace(ns)
        .node_id(id)
        .heartbeat(Duration::from_millis(500))
        .reload_interval(Duration::from_secs(2))
        .build()
        .expect("valid options");
    let me = id.to_string();
    node.add_func("tick", "* * * * * *", move |ctx: TaskContext| {
        let (ran, me) = (ran.clone(), me.clone());
        async move {
            ran.lock().unwrap().push((me, ctx.fire_time));
            Ok(())
        }
    })
    .await
    .expect("add");
    node
}

/// A node whose session is destroyed under it re-registers and keeps firing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_reregisters_after_losing_its_session() {
    let Some(h) = harness() else { return };
    let ns = fresh_ns("consul-node-session");
    let ran = Arc::new(std::sync::Mutex::new(Vec::new()));
    let n = consul_node(&h.addr, &ns, "node-a", ran.clone()).await;
    n.start().await.expect("start");
    let key = format!("{ns}/nodes/node-a");
    let first = h.holder(&key).await.expect("registered");
    h.destroy_session(&first).await;
    let lost_at = Instant::now();
    eventually(
        Duration::from_secs(10),
        "re-registration with a new session",
        || async { h.holder(&key).await.is_some_and(|s| s != first) },
    )
    .await;
    eprintln!(
        "consul: node re-registered {:?} after losing its session",
        lost_at.elapsed()
    );
    let since = cluster::now_ms();
    eventually(
        Duration::from_secs(10),
        "fires after re-registering",
        || async { ran.lock().unwrap().iter().any(|(_, t)| *t > since) },
    )
    .await;
    let nodes = n.nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].status, NodeStatus::Working);
    n.stop().await.expect("stop");
    assert_eq!(h.holder(&key).await, None, "stop unregisters");
}

/// A node killed without unregistering (its session simply stops being
/// renewed): the survivor takes its tasks over once Consul expires the
/// session, within 2×TTL (plus the watch's reaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn true_crash_takeover_time() {
    let Some(h) = harness() else { return };
    let ns = fresh_ns("consul-node-crash");
    let ledger = cluster::Ledger::default();
    let tasks: Vec<String> = (0..10).map(|i| format!("job-{i:02}")).collect();
    let mut nodes = Vec::new();
    for id in ["node-a", "node-b"] {
        let n = cluster::node(&h, &ns, id, &ledger).await;
        cluster::add_static(&n, &tasks, "* * * * * *", &ledger).await;
        n.start().await.expect("start");
        nodes.push(n);
    }
    eventually(Duration::from_secs(20), "both nodes own tasks", || async {
        nodes.iter().all(|n| !n.owned_tasks().is_empty())
            && nodes.iter().map(|n| n.owned_tasks().len()).sum::<usize>() == tasks.len()
    })
    .await;
    let crashed_at = Instant::now();
    nodes[1].kill().await; // no `leaving`, no unregister, no more renewals
    let bound = h.short_ttl() * 2 + Duration::from_secs(8);
    eventually(bound, "the survivor to own every task", || async {
        nodes[0].owned_tasks().len() == tasks.len()
    })
    .await;
    eprintln!(
        "consul: a killed node's tasks were taken over {:?} after the crash (TTL {:?})",
        crashed_at.elapsed(),
        h.short_ttl()
    );
    nodes[0].stop().await.expect("stop");
    ledger.assert_no_duplicates();
}

/// The agent restarts under a running node: the node keeps going without
/// panics, re-registers on the new (empty) agent and fires again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_survives_an_agent_restart() {
    if support::service_env("DCRON_CONSUL_ADDR").is_none() {
        return;
    }
    conformance::init_tracing();
    let mut agent = Agent::start("consul-node-restart", 31360, 31361);
    let ns = fresh_ns("consul-node-restart");
    let ran = Arc::new(std::sync::Mutex::new(Vec::new()));
    let n = consul_node(&agent.addr(), &ns, "node-a", ran.clone()).await;
    n.start().await.expect("start");
    let h = Consul::at(&agent.addr(), Crash::DestroySession);
    eventually(Duration::from_secs(5), "a first fire", || async {
        !ran.lock().unwrap().is_empty()
    })
    .await;

    agent.crash();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during_outage = ran.lock().unwrap().len();
    agent.up();
    let back_at = Instant::now();
    let key = format!("{ns}/nodes/node-a");
    eventually(
        Duration::from_secs(20),
        "re-registration on the new agent",
        || async { h.holder(&key).await.is_some() },
    )
    .await;
    eprintln!(
        "consul: node re-registered {:?} after the agent came back",
        back_at.elapsed()
    );
    let since = cluster::now_ms();
    eventually(
        Duration::from_secs(10),
        "fires after the restart",
        || async { ran.lock().unwrap().iter().any(|(_, t)| *t > since) },
    )
    .await;
    assert!(ran.lock().unwrap().len() > during_outage);
    n.stop().await.expect("stop");
}

// ----- throughput -------------------------------------------------------------------
