//! The registry conformance suite, written once and run unchanged against
//! every backend. A backend's test file provides a [`Harness`] and expands
//! [`suite!`] with it:
//!
//! ```ignore
//! mod conformance;
//! conformance::suite!(my_harness());
//! ```
//!
//! Each test works in its own fresh namespace, so tests run concurrently
//! against one shared server without seeing each other.
#![allow(dead_code, async_fn_in_trait, unused_macros, unused_imports)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use dcron::registry::{
    Claim, ClaimOutcome, FaultRegistry, RawKind, Registry, WatchEvent, WatchReceiver,
};
use dcron::{Error, Node, NodeStatus, TaskMeta};
use tokio::time::Instant;

/// How a backend's tests reach it.
pub trait Harness: Send + Sync {
    /// A new client of the backend (its own connection or session), all
    /// clients sharing one server.
    async fn registry(&self) -> Arc<dyn Registry>;

    /// Stores raw bytes under the key of `kind`/`name` in `ns`, the way a
    /// foreign program would, bypassing dcron's encoding.
    async fn write_raw(&self, ns: &str, kind: RawKind, name: &str, raw: &[u8]);

    /// A node TTL the backend accepts that keeps the expiry tests short.
    fn short_ttl(&self) -> Duration;

    /// How long the backend may take, at most, to expire a registration
    /// with `ttl` after its last heartbeat.
    fn expiry_bound(&self, ttl: Duration) -> Duration {
        ttl * 3 + Duration::from_secs(2)
    }

    /// Simulates a crash of the node `node_id` registered through
    /// `registry`: from now on nothing keeps it alive. The default is
    /// enough where heartbeats are the only keep-alive (the caller stops
    /// sending them); session-based backends end the session abruptly.
    async fn crash(&self, registry: &Arc<dyn Registry>, ns: &str, node_id: &str) {
        let _ = (registry, ns, node_id);
    }

    /// The registry URL of this backend at `host_port` (e.g.
    /// `redis://host:port`), or `None` for a backend without a server.
    fn url_at(&self, host_port: &str) -> Option<String> {
        let _ = host_port;
        None
    }
}

/// Expands the whole suite as `#[tokio::test]`s for the harness expression.
macro_rules! suite {
    ($harness:expr) => {
        mod registry_conformance {
            use super::*;
            conformance::suite!(@tests $harness;
                register_update_unregister,
                heartbeat_keeps_alive_and_is_silent,
                crashed_node_expires,
                reregister_after_loss,
                watch_delivers_puts_and_deletes,
                full_read_recovers_missed_events,
                claim_watermark,
                concurrent_claims_one_winner,
                claim_many_matches_claim,
                claims_are_idempotent,
                claims_survive_faults,
                create_only_and_overwrite,
                tombstones,
                cleanup,
                namespaces_isolated,
                corrupt_values_skipped,
                many_tasks,
                tokenless_and_odd_watermarks,
                large_batch_outcomes_in_order,
                dropped_watches_end,
                unreachable_server_fails_in_bounded_time,
            );
        }
    };
    (@tests $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                conformance::init_tracing();
                let harness = $harness;
                conformance::$name(&harness).await;
            }
        )*
    };
}
pub(crate) use suite;

/// Logs to the test output (`RUST_LOG` to tune).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,dcron=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A namespace no other test uses.
pub fn fresh_ns(test: &str) -> String {
    format!(
        "conf-{test}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

pub fn node(id: &str, status: NodeStatus) -> Node {
    Node {
        id: id.to_string(),
        ip: "127.0.0.1".into(),
        hostname: "test-host".into(),
        last_alive: 0,
        create_time: 1_700_000_000_000,
        status,
        weight: 1,
        strategy: Some("consistent".into()),
        dynamic_tasks: true,
        static_tasks: vec!["static-a".into(), "static-b".into()],
    }
}

fn claim(fire_time: i64, node: &str) -> Claim {
    Claim::new(fire_time, node, &format!("{node}/1"), fire_time + 5)
}

/// Outcomes as `Some(won)`, `None` for failed.
fn answers(outcomes: Vec<ClaimOutcome>) -> Vec<Option<bool>> {
    outcomes
        .into_iter()
        .map(|o| match o {
            ClaimOutcome::Won => Some(true),
            ClaimOutcome::Lost => Some(false),
            ClaimOutcome::Failed(_) => None,
        })
        .collect()
}

/// Node ids currently listed.
pub async fn node_ids(r: &Arc<dyn Registry>, ns: &str) -> BTreeSet<String> {
    r.nodes(ns)
        .await
        .expect("nodes")
        .into_iter()
        .map(|n| n.id)
        .collect()
}

async fn task_names(r: &Arc<dyn Registry>, ns: &str) -> BTreeSet<String> {
    r.tasks(ns)
        .await
        .expect("tasks")
        .into_iter()
        .map(|t| t.name)
        .collect()
}

/// Reads events until one satisfies `want`, failing after `within`.
pub async fn expect_event(
    rx: &mut WatchReceiver,
    within: Duration,
    what: &str,
    want: impl Fn(&WatchEvent) -> bool,
) -> WatchEvent {
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) if want(&ev) => return ev,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("watch closed while waiting for {what}"),
            Err(_) => panic!("no {what} within {within:?}"),
        }
    }
}

/// Polls `cond` until it holds, failing after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(10);
    loop {
        if cond().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{what} did not happen within {within:?}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

const EVENT_WAIT: Duration = Duration::from_secs(15);

pub async fn register_update_unregister(h: &impl Harness) {
    let r = h.registry().await;
    let ns = fresh_ns("register");
    let ttl = Duration::from_secs(30);
    let a = node("node-a", NodeStatus::Starting);
    let b = node("node-b", NodeStatus::Starting);
    r.register(&ns, &a, ttl).await.expect("register a");
    r.register(&ns, &b, ttl).await.expect("register b");
    let listed: BTreeMap<String, Node> = r
        .nodes(&ns)
        .await
        .expect("nodes")
        .into_iter()
        .map(|n| (n.id.clone(), n))
        .collect();
    assert_eq!(listed.len(), 2);
    let got = &listed["node-a"];
    assert_eq!(got.status, NodeStatus::Starting);
    assert_eq!(got.ip, a.ip);
    assert_eq!(got.hostname, a.hostname);
    assert_eq!(got.weight, a.weight);
    assert_eq!(got.create_time, a.create_time);
    assert_eq!(got.static_tasks, a.static_tasks);

    let mut working = a.clone();
    working.status = NodeStatus::Working;
    assert!(r.update_node(&ns, &working).await.expect("update"));
    let listed = r.nodes(&ns).await.expect("nodes");
    let got = listed.iter().find(|n| n.id == "node-a").expect("a listed");
    assert_eq!(got.status, NodeStatus::Working);

    r.unregister(&ns, "node-a").await.expect("unregister");
    assert_eq!(
        node_ids(&r, &ns).await,
        BTreeSet::from(["node-b".to_string()])
    );
    r.unregister(&ns, "node-a")
        .await
        .expect("unregister twice is ok");
    assert!(!r.update_node(&ns, &working).await.expect("update gone"));
    r.unregister(&ns, "node-b").await.expect("unregister b");
}

pub async fn heartbeat_keeps_alive_and_is_silent(h: &impl Harness) {
    let r = h.registry().await;
    let ns = fresh_ns("heartbeat");
    let ttl = h.short_ttl();
    let a = node("node-a", NodeStatus::Working);
    let mut rx = r.watch(&ns).await.expect("watch");
    r.register(&ns, &a, ttl).await.expect("register");
    expect_event(
        &mut rx,
        EVENT_WAIT,
        "NodePut for a",
        |e| matches!(e, WatchEvent::NodePut(n) if n.id == "node-a"),
    )
    .await;
    // Heartbeat at a third of the TTL for twice the TTL: still registered.
    let until = Instant::now() + ttl * 2;
    while Instant::now() < until {
        assert!(r.heartbeat(&ns, "node-a", ttl).await.expect("heartbeat"));
        tokio::time::sleep(ttl / 3).await;
    }
    assert!(
        node_ids(&r, &ns).await.contains("node-a"),
        "heartbeats must keep the node alive"
    );
    // Heartbeats must not wake watchers: the next node event is the marker.
    let marker = node("marker", NodeStatus::Working);
    r.register(&ns, &marker, ttl * 10)
        .await
        .expect("register marker");
    let ev = expect_event(&mut rx, EVENT_WAIT, "a node event", |e| {
        matches!(e, WatchEvent::NodePut(_) | WatchEvent::NodeDelete(_))
    })
    .await;
    assert_eq!(
        ev,
        WatchEvent::NodePut(marker.clone()),
        "heartbeats produced watch events"
    );
    r.unregister(&ns, "node-a").await.expect("unregister");
    r.unregister(&ns, "marker").await.expect("unregister");
}

pub async fn crashed_node_expires(h: &impl Harness) {
    let r = h.registry().await;
    let observer = h.registry().await;
    let ns = fresh_ns("expiry");
    let ttl = h.short_ttl();
    let mut rx = observer.watch(&ns).await.expect("watch");
    r.register(&ns, &node("node-a", NodeStatus::Working), ttl)
        .await
        .expect("register");
    assert!(node_ids(&observer, &ns).await.contains("node-a"));
    let crashed_at = Instant::now();
    h.crash(&r, &ns, "node-a").await;
    let bound = h.expiry_bound(ttl);
    expect_event(
        &mut rx,
        bound,
        "NodeDelete after the crash",
        |e| matches!(e, WatchEvent::NodeDelete(id) if id == "node-a"),
    )
    .await;
    assert!(!node_ids(&observer, &ns).await.contains("node-a"));
    tracing::info!(took = ?crashed_at.elapsed(), ?ttl, "node expired");
}

pub async fn reregister_after_loss(h: &impl Harness) {
    let r = h.registry().await;
    let ns = fresh_ns("reregister");
    let ttl = h.short_ttl();
    let a = node("node-a", NodeStatus::Working);
    r.register(&ns, &a, ttl).await.expect("register");
    h.crash(&r, &ns, "node-a").await;
    let r = h.registry().await; // the crashed client may be gone
    eventually(h.expiry_bound(ttl), "expiry", || async {
        !node_ids(&r, &ns).await.contains("node-a")
    })
    .await;
    assert!(
        !r.heartbeat(&ns, "node-a", ttl).await.expect("heartbeat"),
        "heartbeat must report the loss"
    );
    assert!(!r.update_node(&ns, &a).await.expect("update"));
    r.register(&ns, &a, ttl).await.expect("register again");
    assert!(r.heartbeat(&ns, "node-a", ttl).await.expect("heartbeat"));
    assert!(node_ids(&r, &ns).await.contains("node-a"));
    r.unregister(&ns, "node-a").await.expect("unregister");
}

pub async fn watch_delivers_puts_and_deletes(h: &impl Harness) {
    let writer = h.registry().await;
    let watcher = h.registry().await;
    let ns = fresh_ns("watch");
    let mut rx = watcher.watch(&ns).await.expect("watch");
    let meta = TaskMeta::new("job-1", "*/5 * * * * *").with_payload("{\"x\":1}");
    writer.put_task(&ns, &meta, false).await.expect("put");
    let ev = expect_event(&mut rx, EVENT_WAIT, "TaskPut", |e| {
        matches!(e, WatchEvent::TaskPut(_))
    })
    .await;
    assert_eq!(ev, WatchEvent::TaskPut(meta.clone()));
    writer.put_tombstone(&ns, "job-1").await.expect("tombstone");
    expect_event(&mut rx, EVENT_WAIT, "TombstonePut", |e| {
        *e == WatchEvent::TombstonePut("job-1".into())
    })
    .await;
    writer
        .delete_tombstone(&ns, "job-1")
        .await
        .expect("untombstone");
    expect_event(&mut rx, EVENT_WAIT, "TombstoneDelete", |e| {
        *e == WatchEvent::TombstoneDelete("job-1".into())
    })
    .await;
    writer.delete_task(&ns, "job-1").await.expect("delete");
    expect_event(&mut rx, EVENT_WAIT, "TaskDelete", |e| {
        *e == WatchEvent::TaskDelete("job-1".into())
    })
    .await;
    let n = node("node-w", NodeStatus::Starting);
    writer
        .register(&ns, &n, Duration::from_secs(30))
        .await
        .expect("register");
    expect_event(&mut rx, EVENT_WAIT, "NodePut", |e| {
        *e == WatchEvent::NodePut(n.clone())
    })
    .await;
    let mut working = n.clone();
    working.status = NodeStatus::Working;
    writer.update_node(&ns, &working).await.expect("update");
    expect_event(&mut rx, EVENT_WAIT, "NodePut with the new status", |e| {
        *e == WatchEvent::NodePut(working.clone())
    })
    .await;
    writer.unregister(&ns, "node-w").await.expect("unregister");
    expect_event(&mut rx, EVENT_WAIT, "NodeDelete", |e| {
        *e == WatchEvent::NodeDelete("node-w".into())
    })
    .await;
    // Claims never reach the feed: after a claim, the next event is a marker.
    assert!(writer
        .claim(&ns, "job-2", &claim(1_000, "node-w"))
        .await
        .expect("claim"));
    writer
        .put_task(&ns, &TaskMeta::new("marker", "* * * * *"), false)
        .await
        .expect("put");
    let ev = expect_event(&mut rx, EVENT_WAIT, "marker", |_| true).await;
    assert!(
        matches!(ev, WatchEvent::TaskPut(ref m) if m.name == "marker"),
        "claims leaked into the feed: {ev:?}"
    );
}

pub async fn full_read_recovers_missed_events(h: &impl Harness) {
    let writer = h.registry().await;
    let ns = fresh_ns("missed");
    // Changes made while nobody watches are all visible to a full read.
    writer
        .put_task(&ns, &TaskMeta::new("t1", "* * * * *"), false)
        .await
        .expect("put");
    writer
        .put_task(&ns, &TaskMeta::new("t2", "* * * * *"), false)
        .await
        .expect("put");
    writer.put_tombstone(&ns, "t2").await.expect("tombstone");
    writer
        .register(
            &ns,
            &node("n1", NodeStatus::Working),
            Duration::from_secs(30),
        )
        .await
        .expect("register");
    let reader = h.registry().await;
    let mut rx = reader.watch(&ns).await.expect("watch");
    writer.delete_task(&ns, "t1").await.expect("delete");
    expect_event(&mut rx, EVENT_WAIT, "TaskDelete t1", |e| {
        *e == WatchEvent::TaskDelete("t1".into())
    })
    .await;
    assert_eq!(
        task_names(&reader, &ns).await,
        BTreeSet::from(["t2".to_string()])
    );
    assert_eq!(
        reader.tombstones(&ns).await.expect("tombstones"),
        vec!["t2".to_string()]
    );
    assert_eq!(
        node_ids(&reader, &ns).await,
        BTreeSet::from(["n1".to_string()])
    );
    writer.unregister(&ns, "n1").await.expect("unregister");
}

pub async fn claim_watermark(h: &impl Harness) {
    let r = h.registry().await;
    let ns = fresh_ns("watermark");
    assert!(r.claim(&ns, "t", &claim(2_000, "a")).await.expect("claim"));
    assert!(!r
        .claim(&ns, "t", &claim(2_000, "b"))
        .await
        .expect("same fire time again"));
    assert!(!r
        .claim(&ns, "t", &claim(1_000, "b"))
        .await
        .expect("older fire time"));
    assert!(r.claim(&ns, "t", &claim(3_000, "b")).await.expect("newer"));
    let claims = r.claims(&ns).await.expect("claims");
    assert_eq!(claims, vec![("t".to_string(), claim(3_000, "b"))]);
    r.delete_claim(&ns, "t").await.expect("delete claim");
    assert!(r.claims(&ns).await.expect("claims").is_empty());
    assert!(r
        .claim(&ns, "t", &claim(1_000, "c"))
        .await
        .expect("after delete"));
    r.delete_claim(&ns, "absent")
        .await
        .expect("deleting an absent claim is ok");
}

pub async fn concurrent_claims_one_winner(h: &impl Harness) {
    const TASKS: usize = 50;
    const CLAIMERS: usize = 8;
    let ns = fresh_ns("race");
    let mut clients = Vec::new();
    for _ in 0..CLAIMERS {
        clients.push(h.registry().await);
    }
    for fire_time in [10_000_i64, 20_000] {
        let barrier = Arc::new(tokio::sync::Barrier::new(CLAIMERS));
        let mut joins = Vec::new();
        for (i, r) in clients.iter().enumerate() {
            let (r, ns, barrier) = (r.clone(), ns.clone(), barrier.clone());
            joins.push(tokio::spawn(async move {
                barrier.wait().await;
                let me = format!("claimer-{i}");
                let mut won = Vec::new();
                for t in 0..TASKS {
                    // Half the claimers go in reverse order to maximise contention.
                    let t = if i % 2 == 0 { t } else { TASKS - 1 - t };
                    if r.claim(&ns, &format!("task-{t}"), &claim(fire_time, &me))
                        .await
                        .expect("claim")
                    {
                        won.push(t);
                    }
                }
                won
            }));
        }
        let mut winners = vec![0usize; TASKS];
        for j in joins {
            for t in j.await.expect("claimer") {
                winners[t] += 1;
            }
        }
        assert!(
            winners.iter().all(|&w| w == 1),
            "fire {fire_time}: winners per task {winners:?}"
        );
    }
    let claims = r_claims(&clients[0], &ns).await;
    assert_eq!(claims.len(), TASKS);
    assert!(claims.values().all(|c| c.fire_time == 20_000));
}

async fn r_claims(r: &Arc<dyn Registry>, ns: &str) -> BTreeMap<String, Claim> {
    r.claims(ns).await.expect("claims").into_iter().collect()
}

pub async fn claim_many_matches_claim(h: &impl Harness) {
    let r = h.registry().await;
    let other = h.registry().await;
    let ns = fresh_ns("claim-many");
    assert!(other
        .claim(&ns, "b", &claim(5_000, "other"))
        .await
        .expect("claim"));
    assert!(other
        .claim(&ns, "c", &claim(9_000, "other"))
        .await
        .expect("claim"));
    let won = answers(
        r.claim_many(&ns, &["a", "b", "c", "d"], &claim(5_000, "me"))
            .await,
    );
    assert_eq!(won, vec![Some(true), Some(false), Some(false), Some(true)]);
    let won = answers(
        r.claim_many(&ns, &["a", "b", "c", "d"], &claim(6_000, "me"))
            .await,
    );
    assert_eq!(won, vec![Some(true), Some(true), Some(false), Some(true)]);
    assert!(r.claim_many(&ns, &[], &claim(7_000, "me")).await.is_empty());
    let claims = r_claims(&r, &ns).await;
    assert_eq!(claims["b"].node, "me");
    assert_eq!(claims["c"].node, "other");
}

/// Re-claiming with the same token answers won and changes nothing; the
/// same node id under another token (a restarted process) is not ours.
pub async fn claims_are_idempotent(h: &impl Harness) {
    let r = h.registry().await;
    let other = h.registry().await;
    let ns = fresh_ns("idempotent");
    let mine = claim(5_000, "me");
    assert!(r.claim(&ns, "t", &mine).await.expect("claim"));
    assert!(other
        .claim(&ns, "t", &mine)
        .await
        .expect("same token again"));
    let restarted = Claim::new(5_000, "me", "me/2", 5_005);
    assert!(!r
        .claim(&ns, "t", &restarted)
        .await
        .expect("another incarnation"));
    let stored = r_claims(&r, &ns).await;
    assert_eq!(stored["t"], mine);
    // In a batch: ours again, someone else's, fresh.
    assert!(other
        .claim(&ns, "u", &claim(5_000, "other"))
        .await
        .expect("claim"));
    let won = answers(r.claim_many(&ns, &["t", "u", "v"], &mine).await);
    assert_eq!(won, vec![Some(true), Some(false), Some(true)]);
    // An older fire time under our token is lost once a newer one is stored.
    assert!(!r.claim(&ns, "t", &claim(4_000, "me")).await.expect("older"));
}

/// Injected faults: a lost answer, a partly failed batch and a batch with
/// no answer at all are each answered won by a retry with the same token,
/// and nobody else can take those fire times meanwhile.
pub async fn claims_survive_faults(h: &impl Harness) {
    let faulty = FaultRegistry::wrap_shared(h.registry().await);
    let r: Arc<dyn Registry> = Arc::new(faulty.clone());
    let other = h.registry().await;
    let ns = fresh_ns("claim-faults");
    let mine = claim(8_000, "me");
    let rival = claim(8_000, "rival");

    faulty.lose_next_answers(1);
    assert!(r.claim(&ns, "lost", &mine).await.is_err(), "answer lost");
    assert!(!other.claim(&ns, "lost", &rival).await.expect("rival"));
    assert!(
        r.claim(&ns, "lost", &mine).await.expect("retry"),
        "retry wins"
    );

    let names: Vec<String> = (0..9).map(|i| format!("split-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    faulty.split_next_batches(1);
    let first = answers(r.claim_many(&ns, &refs, &mine).await);
    assert_eq!(first.iter().filter(|a| a.is_none()).count(), 6);
    assert!(first.iter().all(|a| *a != Some(false)));
    let retry = answers(r.claim_many(&ns, &refs, &mine).await);
    assert_eq!(
        retry,
        vec![Some(true); 9],
        "every claim of the batch is ours"
    );
    let rivals = answers(other.claim_many(&ns, &refs, &rival).await);
    assert_eq!(rivals, vec![Some(false); 9]);

    faulty.lose_next_answers(1);
    let lost = answers(r.claim_many(&ns, &["b1", "b2"], &mine).await);
    assert_eq!(lost, vec![None, None]);
    let retry = answers(r.claim_many(&ns, &["b1", "b2"], &mine).await);
    assert_eq!(retry, vec![Some(true), Some(true)]);
    assert!(faulty.injected() >= 8);
}

pub async fn create_only_and_overwrite(h: &impl Harness) {
    let r = h.registry().await;
    let ns = fresh_ns("create");
    let first = TaskMeta::new("job", "0 * * * * *").with_payload("one");
    r.put_task(&ns, &first, false).await.expect("create");
    let second = TaskMeta::new("job", "30 * * * * *").with_payload("two");
    match r.put_task(&ns, &second, false).await {
        Err(Error::TaskExists(name)) => assert_eq!(name, "job"),
        other => panic!("expected TaskExists, got {other:?}"),
    }
    assert_eq!(r.tasks(&ns).await.expect("tasks"), vec![first.clone()]);
    r.put_task(&ns, &second, true).await.expect("overwrite");
    assert_eq!(r.tasks(&ns).await.expect("tasks"), vec![second.clone()]);
    r.delete_task(&ns, "job").await.expect("delete");
    r.delete_task(&ns, "job").await.expect("delete absent");
    assert!(r.tasks(&ns).await.expect("tasks").is_empty());
}

pub async fn tombstones(h: &impl Harness) {
    let r = h.registry().await;
    let ns = fresh_ns("tombstones");
    r.put_tombstone(&ns, "a").await.expect("tombstone");
    r.put_tombstone(&ns, "a").await.expect("idempotent");
    r.put_tombstone(&ns, "b").await.expect("tombstone");
    let mut names = r.tombstones(&ns).await.expect("tombstones");
    names.sort();
    assert_eq!(names, vec!["a".to_string(), "b".to_string()]);
    assert!(
        r.tasks(&ns).await.expect("tasks").is_empty(),
        "tombstones are not tasks"
    );
    r.delete_tombstone(&ns, "a").await.expect("untombstone");
    r.delete_tombstone(&ns, "a").await.expect("absent is ok");
    assert_eq!(
        r.tombstones(&ns).await.expect("tombstones"),
        vec!["b".to_string()]
    );
}

pub async fn cleanup(h: &impl Harness) {
    let r = h.registry().await;
    let ns = fresh_ns("cleanup");
    for i in 0..5 {
        let name = format!("t{i}");
        r.put_task(&ns, &TaskMeta::new(&name, "* * * * *"), false)
            .await
            .expect("put");
        r.put_tombstone(&ns, &name).await.expect("tombstone");
        assert!(r
            .claim(&ns, &name, &claim(1_000, "n"))
            .await
            .expect("claim"));
    }
    let n = node("n1", NodeStatus::Working);
    r.register(&ns, &n, Duration::from_secs(30))
        .await
        .expect("register");
    r.clear(&ns).await.expect("clear");
    assert!(r.tasks(&ns).await.expect("tasks").is_empty());
    assert!(r.tombstones(&ns).await.expect("tombstones").is_empty());
    assert!(r.claims(&ns).await.expect("claims").is_empty());
    assert!(
        node_ids(&r, &ns).await.contains("n1"),
        "clear keeps node registrations"
    );
    assert!(r
        .claim(&ns, "t0", &claim(1_000, "n"))
        .await
        .expect("claim after clear"));
    r.unregister(&ns, "n1").await.expect("unregister");
}

pub async fn namespaces_isolated(h: &impl Harness) {
    let r = h.registry().await;
    let a = fresh_ns("iso-a");
    let b = fresh_ns("iso-b");
    let mut rx_b = r.watch(&b).await.expect("watch b");
    r.register(
        &a,
        &node("n1", NodeStatus::Working),
        Duration::from_secs(30),
    )
    .await
    .expect("register");
    r.put_task(&a, &TaskMeta::new("t", "* * * * *"), false)
        .await
        .expect("put");
    r.put_tombstone(&a, "t").await.expect("tombstone");
    assert!(r.claim(&a, "t", &claim(5_000, "n1")).await.expect("claim"));
    assert!(r.nodes(&b).await.expect("nodes").is_empty());
    assert!(r.tasks(&b).await.expect("tasks").is_empty());
    assert!(r.tombstones(&b).await.expect("tombstones").is_empty());
    assert!(r.claims(&b).await.expect("claims").is_empty());
    // Same task name, other namespace: independent watermark and definition.
    assert!(r
        .claim(&b, "t", &claim(1_000, "n1"))
        .await
        .expect("claim b"));
    r.put_task(&b, &TaskMeta::new("t", "0 0 * * *"), false)
        .await
        .expect("same name in b");
    let ev = expect_event(&mut rx_b, EVENT_WAIT, "b's own event", |_| true).await;
    assert!(
        matches!(ev, WatchEvent::TaskPut(ref m) if m.cron_format == "0 0 * * *"),
        "b saw a's event: {ev:?}"
    );
    r.clear(&b).await.expect("clear b");
    assert_eq!(
        r.tasks(&a).await.expect("tasks").len(),
        1,
        "clearing b must not touch a"
    );
    r.unregister(&a, "n1").await.expect("unregister");
}

pub async fn corrupt_values_skipped(h: &impl Harness) {
    let r = h.registry().await;
    let ns = fresh_ns("corrupt");
    let good = TaskMeta::new("good", "* * * * *");
    r.put_task(&ns, &good, false).await.expect("put");
    h.write_raw(&ns, RawKind::Task, "garbage", b"\xff\x00not json")
        .await;
    h.write_raw(&ns, RawKind::Task, "wrong-shape", b"{\"name\":42}")
        .await;
    h.write_raw(
        &ns,
        RawKind::Task,
        "misnamed",
        br#"{"name":"other","cron_format":"* * * * *"}"#,
    )
    .await;
    assert_eq!(
        r.tasks(&ns).await.expect("tasks must skip corrupt values"),
        vec![good]
    );

    r.register(
        &ns,
        &node("n1", NodeStatus::Working),
        Duration::from_secs(30),
    )
    .await
    .expect("register");
    h.write_raw(&ns, RawKind::Node, "bad-node", b"[1,2,3").await;
    assert_eq!(node_ids(&r, &ns).await, BTreeSet::from(["n1".to_string()]));

    // A tombstone counts whatever its value: corrupt data never revives a task.
    h.write_raw(&ns, RawKind::Tombstone, "dead", b"\x00garbage")
        .await;
    assert_eq!(
        r.tombstones(&ns).await.expect("tombstones"),
        vec!["dead".to_string()]
    );

    // A corrupt watermark is skipped when listing and overwritten by a claim.
    h.write_raw(&ns, RawKind::Claim, "c", b"not a claim").await;
    assert!(r.claims(&ns).await.expect("claims").is_empty());
    assert!(r
        .claim(&ns, "c", &claim(1_000, "n1"))
        .await
        .expect("claim over corrupt"));
    assert!(!r
        .claim(&ns, "c", &claim(1_000, "n2"))
        .await
        .expect("second claim"));
    r.unregister(&ns, "n1").await.expect("unregister");
}

pub async fn many_tasks(h: &impl Harness) {
    const N: usize = 1_000;
    let r = h.registry().await;
    let ns = fresh_ns("many");
    let mut joins = Vec::new();
    for chunk in 0..10 {
        let (r, ns) = (r.clone(), ns.clone());
        joins.push(tokio::spawn(async move {
            for i in (chunk * N / 10)..((chunk + 1) * N / 10) {
                let meta = TaskMeta::new(format!("task-{i:05}"), "*/10 * * * * *");
                r.put_task(&ns, &meta, false).await.expect("put");
            }
        }));
    }
    for j in joins {
        j.await.expect("writer");
    }
    let names = task_names(&h.registry().await, &ns).await;
    assert_eq!(names.len(), N);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let won = r.claim_many(&ns, &names, &claim(1_000, "n")).await;
    assert_eq!(won.len(), N);
    assert!(won.iter().all(ClaimOutcome::is_won), "{won:?}");
    assert_eq!(r.claims(&ns).await.expect("claims").len(), N);
    r.clear(&ns).await.expect("clear");
}

/// Watermarks written by older versions (no token) are never "ours", a
/// token of the wrong type makes a watermark corrupt (skipped, overwritten),
/// and a claim without a token is not idempotent.
pub async fn tokenless_and_odd_watermarks(h: &impl Harness) {
    let r = h.registry().await;
    let ns = fresh_ns("claim-tokens");
    h.write_raw(
        &ns,
        RawKind::Claim,
        "legacy",
        br#"{"fire_time":5000,"node":"me","claimed_at":1}"#,
    )
    .await;
    let stored = r.claims(&ns).await.expect("claims");
    assert_eq!(stored.len(), 1, "a watermark without a token decodes");
    assert!(stored[0].1.token.is_empty());
    assert!(!r
        .claim(&ns, "legacy", &Claim::new(5_000, "me", "me/1", 5_001))
        .await
        .expect("same fire time over a tokenless watermark"));
    assert!(!r
        .claim(&ns, "legacy", &Claim::new(5_000, "me", "", 5_001))
        .await
        .expect("an empty token is never ours"));
    assert!(r
        .claim(&ns, "legacy", &Claim::new(6_000, "me", "me/1", 6_001))
        .await
        .expect("newer"));
    h.write_raw(
        &ns,
        RawKind::Claim,
        "bad-token",
        br#"{"fire_time":9000,"node":"x","claimed_at":1,"token":7}"#,
    )
    .await;
    let stored = r.claims(&ns).await.expect("claims");
    assert_eq!(
        stored.len(),
        1,
        "a watermark with a non-string token is corrupt"
    );
    assert!(r
        .claim(&ns, "bad-token", &Claim::new(1_000, "me", "me/1", 1_001))
        .await
        .expect("claim over a corrupt watermark"));
    let tokenless = Claim::new(7_000, "me", "", 7_001);
    assert!(r.claim(&ns, "plain", &tokenless).await.expect("claim"));
    assert!(!r
        .claim(&ns, "plain", &tokenless)
        .await
        .expect("no token, no idempotency"));
    let stored = r_claims(&r, &ns).await;
    assert_eq!(
        stored["plain"], tokenless,
        "an empty token is stored as none"
    );
    r.clear(&ns).await.expect("clear");
}

/// A batch larger than any backend's round trip (script call, transaction,
/// pipeline): every outcome is in its task's position (fresh, already ours,
/// someone else's), and the stored watermarks agree.
pub async fn large_batch_outcomes_in_order(h: &impl Harness) {
    const SIZE: usize = 2_500;
    let r = h.registry().await;
    let other = h.registry().await;
    let ns = fresh_ns("claim-batch-order");
    let names: Vec<String> = (0..SIZE).map(|i| format!("task-{i:05}")).collect();
    let pick = |keep: fn(usize) -> bool| -> Vec<&str> {
        names
            .iter()
            .enumerate()
            .filter(|(i, _)| keep(*i))
            .map(|(_, n)| n.as_str())
            .collect()
    };
    let theirs = pick(|i| i.is_multiple_of(7));
    let ours = pick(|i| !i.is_multiple_of(7) && i.is_multiple_of(11));
    let mine = Claim::new(50_000, "me", "me/1", 50_001);
    let rival = Claim::new(50_000, "rival", "rival/1", 50_002);
    let pre = other.claim_many(&ns, &theirs, &rival).await;
    assert!(pre.iter().all(ClaimOutcome::is_won), "{pre:?}");
    let pre = r.claim_many(&ns, &ours, &mine).await;
    assert!(pre.iter().all(ClaimOutcome::is_won), "{pre:?}");
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let got = answers(r.claim_many(&ns, &refs, &mine).await);
    assert_eq!(got.len(), SIZE);
    for (i, answer) in got.iter().enumerate() {
        assert_eq!(*answer, Some(!i.is_multiple_of(7)), "task {i}");
    }
    let stored = r_claims(&r, &ns).await;
    assert_eq!(stored.len(), SIZE);
    for (name, c) in &stored {
        let i: usize = name["task-".len()..].parse().expect("index");
        let owner = if i.is_multiple_of(7) { "rival" } else { "me" };
        assert_eq!(c.node, owner, "{name}");
    }
    r.clear(&ns).await.expect("clear");
}

/// Dropping a watch's receiver ends its feed: writes afterwards neither fail
/// nor block on it, many dropped feeds leak nothing that stops a new one,
/// and a new watch on the same client still delivers.
pub async fn dropped_watches_end(h: &impl Harness) {
    let r = h.registry().await;
    let ns = fresh_ns("drop-watch");
    for _ in 0..20 {
        drop(r.watch(&ns).await.expect("watch"));
    }
    for i in 0..10 {
        r.put_task(&ns, &TaskMeta::new(format!("t{i}"), "* * * * *"), false)
            .await
            .expect("put after dropped watches");
    }
    let mut rx = r.watch(&ns).await.expect("watch again");
    r.put_tombstone(&ns, "t3").await.expect("tombstone");
    expect_event(
        &mut rx,
        EVENT_WAIT,
        "the tombstone",
        |ev| matches!(ev, WatchEvent::TombstonePut(n) if n == "t3"),
    )
    .await;
    r.clear(&ns).await.expect("clear");
}

/// A server that is not there: connecting (or, for a backend that connects
/// lazily, the first call) fails within a bound, with a registry error
/// naming the backend that says retrying may help.
pub async fn unreachable_server_fails_in_bounded_time(h: &impl Harness) {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let Some(url) = h.url_at(&format!("127.0.0.1:{port}")) else {
        return;
    };
    const BOUND: Duration = Duration::from_secs(20);
    let started = Instant::now();
    let attempt = async {
        let registry = dcron::registry::connect(&url).await?;
        registry.nodes("conf-unreachable").await.map(drop)
    };
    let err = match tokio::time::timeout(BOUND, attempt).await {
        Ok(Err(err)) => err,
        Ok(Ok(())) => panic!("{url}: a call succeeded without a server"),
        Err(_) => panic!("{url}: no answer within {BOUND:?}"),
    };
    let took = started.elapsed();
    assert!(
        matches!(&err, Error::Registry { .. } | Error::Timeout { .. }),
        "{url}: {err:?}"
    );
    assert!(
        err.is_retryable(),
        "{url}: an unreachable server is retryable: {err:?}"
    );
    eprintln!("{url}: failed after {took:?}: {err}");
}
