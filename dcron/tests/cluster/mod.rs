//! Cluster tests: three nodes in one process on one backend, every task
//! fired exactly once per fire time, nodes stopped and crashed, tombstones,
//! one-shots, dynamic tasks. Generic over the conformance [`Harness`], so
//! every backend runs the same tests:
//!
//! ```ignore
//! mod cluster;
//! cluster::suite!(my_harness());
//! ```
#![allow(dead_code, unused_macros, unused_imports)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dcron::registry::Registry;
use dcron::{Builder, Dcron, Error, Strategy, TaskContext, TaskMeta};

use crate::conformance::{eventually, fresh_ns, Harness};

mod faults;
pub use faults::*;

macro_rules! suite {
    ($harness:expr) => {
        mod cluster_tests {
            use super::*;
            cluster::suite!(@tests $harness;
                every_fire_runs_once_on_three_nodes,
                stopped_node_hands_over,
                crashed_node_tasks_move_after_ttl,
                tombstone_stops_everywhere_and_survives_restart,
                one_shot_runs_once_in_the_cluster,
                dynamic_task_runs_on_its_owner,
                claim_stall_runs_fires_late_not_lost,
                lost_answers_and_split_batches_lose_nothing,
                claim_outage_retries_in_order,
                long_outage_reports_every_missed_fire,
                node_id_in_use_is_refused_until_freed,
                unreadable_own_record_is_rewritten,
            );
        }
    };
    (@tests $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                conformance::init_tracing();
                let harness = $harness;
                cluster::$name(&harness).await;
            }
        )*
    };
}
pub(crate) use suite;

/// One run as a task body saw it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Run {
    pub task: String,
    pub fire_time: i64,
    pub node: String,
    pub started_ms: i64,
}

/// Every run of every task, shared by all nodes of a test.
#[derive(Clone, Default)]
pub struct Ledger(Arc<Mutex<Vec<Run>>>);

impl Ledger {
    pub fn record(&self, ctx: &TaskContext, node: &str) {
        self.0.lock().unwrap().push(Run {
            task: ctx.name().to_string(),
            fire_time: ctx.fire_time,
            node: node.to_string(),
            started_ms: chrono::Utc::now().timestamp_millis(),
        });
    }

    pub fn runs(&self) -> Vec<Run> {
        let mut runs = self.0.lock().unwrap().clone();
        runs.sort();
        runs
    }

    /// Fails if any (task, fire time) ran more than once.
    pub fn assert_no_duplicates(&self) {
        let mut seen: BTreeMap<(String, i64), String> = BTreeMap::new();
        for run in self.runs() {
            if let Some(first) = seen.insert((run.task.clone(), run.fire_time), run.node.clone()) {
                panic!(
                    "{} fire {} ran twice: on {} and on {}",
                    run.task, run.fire_time, first, run.node
                );
            }
        }
    }

    /// Fire times of `task` in order.
    pub fn fires(&self, task: &str) -> Vec<i64> {
        self.runs()
            .into_iter()
            .filter(|r| r.task == task)
            .map(|r| r.fire_time)
            .collect()
    }

    /// Fails unless every task of `tasks` ran exactly once per second
    /// between `from` and `to`, and nothing ran twice (every-second tasks).
    pub fn assert_exactly_once(&self, tasks: &[String], from: i64, to: i64) {
        self.assert_no_duplicates();
        for t in tasks {
            self.assert_contiguous(t, from, to);
        }
    }

    /// The longest delay from fire time to start among fires at or after `since`.
    pub fn max_lateness_since(&self, since: i64) -> i64 {
        self.runs()
            .into_iter()
            .filter(|r| r.fire_time >= since)
            .map(|r| r.started_ms - r.fire_time)
            .max()
            .unwrap_or(0)
    }

    /// Fails if `task` skipped a whole second between `from` and `to`
    /// (for every-second schedules).
    pub fn assert_contiguous(&self, task: &str, from: i64, to: i64) {
        let fires: BTreeSet<i64> = self
            .fires(task)
            .into_iter()
            .filter(|t| *t >= from && *t <= to)
            .collect();
        let first = from.div_euclid(1000) * 1000 + if from % 1000 == 0 { 0 } else { 1000 };
        let mut t = first;
        while t <= to {
            assert!(
                fires.contains(&t),
                "{task}: fire {t} missing (have {fires:?})"
            );
            t += 1000;
        }
    }
}

const EVERY_SECOND: &str = "* * * * * *";

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A node builder whose task handler records every run into `ledger`.
pub fn recording(registry: Arc<dyn Registry>, ns: &str, id: &str, ledger: &Ledger) -> Builder {
    let (recorder, me) = (ledger.clone(), id.to_string());
    Dcron::builder_shared(registry)
        .namespace(ns)
        .node_id(id)
        .task_handler(move |ctx: TaskContext| {
            let (recorder, me) = (recorder.clone(), me.clone());
            async move {
                recorder.record(&ctx, &me);
                Ok(())
            }
        })
}

/// A node wired for tests: short TTL, frequent heartbeats and reloads.
pub async fn node(h: &impl Harness, ns: &str, id: &str, ledger: &Ledger) -> Dcron {
    let ttl = h.short_ttl();
    recording(h.registry().await, ns, id, ledger)
        .strategy(Strategy::Consistent)
        .node_ttl(ttl)
        .heartbeat(ttl / 4)
        .reload_interval(Duration::from_secs(2))
        .error_handler(|meta, err| tracing::error!(task = %meta.name, %err, "run failed"))
        .build()
        .expect("valid options")
}

/// Adds `names` as static tasks on `cron` recording into the ledger.
pub async fn add_static(node: &Dcron, names: &[String], cron: &str, ledger: &Ledger) {
    for name in names {
        let (recorder, me) = (ledger.clone(), node.node_id());
        node.add_func(name, cron, move |ctx: TaskContext| {
            let (recorder, me) = (recorder.clone(), me.clone());
            async move {
                recorder.record(&ctx, &me);
                Ok(())
            }
        })
        .await
        .expect("add task");
    }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:02}")).collect()
}

/// Starts three nodes defining the same static tasks.
async fn three_nodes(
    h: &impl Harness,
    ns: &str,
    tasks: &[String],
    cron: &str,
    ledger: &Ledger,
) -> Vec<Dcron> {
    let mut nodes = Vec::new();
    for id in ["node-a", "node-b", "node-c"] {
        let n = node(h, ns, id, ledger).await;
        add_static(&n, tasks, cron, ledger).await;
        n.start().await.expect("start");
        nodes.push(n);
    }
    // Wait until every node sees all three working (ownership settled).
    for n in &nodes {
        let n = n.clone();
        eventually(Duration::from_secs(20), "three working nodes", || {
            let n = n.clone();
            async move {
                n.nodes().await.is_ok_and(|v| {
                    v.iter()
                        .filter(|x| x.status == dcron::NodeStatus::Working)
                        .count()
                        == 3
                })
            }
        })
        .await;
    }
    nodes
}

/// Waits until the clock passes `t` (epoch ms).
async fn until(t: i64) {
    let wait = t - now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
}

/// Ownership is settled when the nodes' owned sets partition `tasks`.
pub async fn settled(nodes: &[Dcron], tasks: &[String]) {
    let want: BTreeSet<String> = tasks.iter().cloned().collect();
    eventually(Duration::from_secs(30), "ownership to settle", || async {
        let mut all = BTreeSet::new();
        let mut total = 0;
        for n in nodes {
            let owned = n.owned_tasks();
            total += owned.len();
            all.extend(owned);
        }
        all == want && total == want.len()
    })
    .await;
}

pub async fn every_fire_runs_once_on_three_nodes(h: &impl Harness) {
    let ns = fresh_ns("cluster-once");
    let ledger = Ledger::default();
    let tasks = names("tick", 50);
    let nodes = three_nodes(h, &ns, &tasks, EVERY_SECOND, &ledger).await;
    settled(&nodes, &tasks).await;
    let from = now_ms() + 1000;
    until(from + 4000).await;
    let to = now_ms() - 1000;
    for n in &nodes {
        n.stop().await.expect("stop");
    }
    ledger.assert_exactly_once(&tasks, from, to);
    let by_node: BTreeSet<String> = ledger.runs().into_iter().map(|r| r.node).collect();
    assert_eq!(by_node.len(), 3, "work should spread over the three nodes");
}

pub async fn stopped_node_hands_over(h: &impl Harness) {
    let ns = fresh_ns("cluster-stop");
    let ledger = Ledger::default();
    let tasks = names("job", 20);
    let nodes = three_nodes(h, &ns, &tasks, EVERY_SECOND, &ledger).await;
    settled(&nodes, &tasks).await;
    let leaving = nodes[2].owned_tasks();
    assert!(!leaving.is_empty(), "node-c should own some of 20 tasks");
    let from = now_ms();
    nodes[2].stop().await.expect("stop c");
    settled(&nodes[..2], &tasks).await;
    until(now_ms() + 2500).await;
    let to = now_ms() - 1000;
    for n in &nodes[..2] {
        n.stop().await.expect("stop");
    }
    ledger.assert_no_duplicates();
    for t in &leaving {
        ledger.assert_contiguous(t, from, to);
        let after: BTreeSet<String> = ledger
            .runs()
            .into_iter()
            .filter(|r| &r.task == t && r.fire_time > from + 1000)
            .map(|r| r.node)
            .collect();
        assert!(
            !after.is_empty() && !after.contains("node-c"),
            "{t} not taken over: {after:?}"
        );
    }
}

pub async fn crashed_node_tasks_move_after_ttl(h: &impl Harness) {
    // A period longer than the takeover time, so exactly one fire falls
    // between the crash and the takeover: the one catch-up must run.
    let ttl = h.short_ttl();
    let takeover = h.expiry_bound(ttl) + Duration::from_secs(1);
    let period = [2u64, 3, 4, 5, 6, 10, 12, 15, 20, 30]
        .into_iter()
        .find(|p| Duration::from_secs(*p) > takeover)
        .unwrap_or(30);
    let period_ms = period as i64 * 1000;
    let cron = format!("*/{period} * * * * *");
    let ns = fresh_ns("cluster-crash");
    let ledger = Ledger::default();
    let tasks = names("work", 20);
    let nodes = three_nodes(h, &ns, &tasks, &cron, &ledger).await;
    settled(&nodes, &tasks).await;
    let orphaned = nodes[2].owned_tasks();
    assert!(!orphaned.is_empty());
    // Every task has run once (so it has a watermark) before the crash.
    let l = ledger.clone();
    let all = tasks.clone();
    eventually(
        Duration::from_millis(3 * period_ms as u64),
        "a first run of every task",
        || {
            let (l, all) = (l.clone(), all.clone());
            async move { all.iter().all(|t| !l.fires(t).is_empty()) }
        },
    )
    .await;
    // Crash node-c just before fire `missed`.
    let missed = (now_ms() + 1000).div_euclid(period_ms) * period_ms + period_ms;
    until(missed - 300).await;
    let crashed_at = now_ms();
    nodes[2].kill().await;
    h.crash(&nodes[2].registry(), &ns, "node-c").await;
    settled(&nodes[..2], &tasks).await;
    tracing::info!(
        took_ms = now_ms() - crashed_at,
        "crashed node's tasks taken over"
    );
    until(missed + period_ms + 700).await;
    for n in &nodes[..2] {
        n.stop().await.expect("stop");
    }
    ledger.assert_no_duplicates();
    for t in &orphaned {
        let runs: Vec<Run> = ledger
            .runs()
            .into_iter()
            .filter(|r| &r.task == t && r.fire_time >= missed)
            .collect();
        assert!(
            runs.iter().all(|r| r.node != "node-c"),
            "{t}: the crashed node kept running: {runs:?}"
        );
        let caught_up = runs.iter().find(|r| r.fire_time == missed);
        assert!(
            caught_up.is_some_and(|r| r.started_ms - missed >= 200),
            "{t}: fire {missed}, missed while nobody owned it, was not caught up late: {runs:?}"
        );
        assert!(
            runs.iter().any(|r| r.fire_time == missed + period_ms),
            "{t}: next fire missing: {runs:?}"
        );
    }
}

pub async fn tombstone_stops_everywhere_and_survives_restart(h: &impl Harness) {
    let ns = fresh_ns("cluster-tombstone");
    let ledger = Ledger::default();
    let tasks = names("tomb", 6);
    let nodes = three_nodes(h, &ns, &tasks, EVERY_SECOND, &ledger).await;
    settled(&nodes, &tasks).await;
    let victim = tasks[0].clone();
    let ledger2 = ledger.clone();
    let v = victim.clone();
    eventually(Duration::from_secs(10), "victim to run", || {
        let (l, v) = (ledger2.clone(), v.clone());
        async move { !l.fires(&v).is_empty() }
    })
    .await;
    nodes[0]
        .mark_task_deleted(&victim)
        .await
        .expect("mark deleted");
    let deleted_at = now_ms();
    settled(&nodes, &tasks[1..]).await;
    // A later fire of the others proves time passed; the victim stays quiet.
    until(deleted_at + 2500).await;
    assert!(
        ledger
            .fires(&victim)
            .iter()
            .all(|t| *t <= deleted_at + 1000),
        "tombstoned task still ran: {:?}",
        ledger.fires(&victim)
    );
    // A restarted node cannot add it back without force.
    nodes[1].stop().await.expect("stop b");
    let restarted = node(h, &ns, "node-b", &ledger).await;
    match restarted
        .add_func(&victim, "* * * * * *", |_| async { Ok(()) })
        .await
    {
        Err(Error::TaskDeleted(name)) => assert_eq!(name, victim),
        other => panic!("expected TaskDeleted, got {other:?}"),
    }
    // Reuse revives it.
    nodes[0].reuse_deleted_task(&victim).await.expect("reuse");
    let revived_at = now_ms();
    let l = ledger.clone();
    eventually(Duration::from_secs(10), "revived task to run", || {
        let (l, v) = (l.clone(), victim.clone());
        async move { l.fires(&v).iter().any(|t| *t > revived_at) }
    })
    .await;
    for n in [&nodes[0], &nodes[2]] {
        n.stop().await.expect("stop");
    }
    ledger.assert_no_duplicates();
}

pub async fn one_shot_runs_once_in_the_cluster(h: &impl Harness) {
    let ns = fresh_ns("cluster-oneshot");
    let ledger = Ledger::default();
    let mut nodes = Vec::new();
    for id in ["node-a", "node-b", "node-c"] {
        let n = node(h, &ns, id, &ledger).await;
        let (recorder, me) = (ledger.clone(), id.to_string());
        n.add_one_shot_func("once", "* * * * * *", move |ctx: TaskContext| {
            let (recorder, me) = (recorder.clone(), me.clone());
            async move {
                recorder.record(&ctx, &me);
                Ok(())
            }
        })
        .await
        .expect("add one-shot");
        n.start().await.expect("start");
        nodes.push(n);
    }
    let l = ledger.clone();
    eventually(Duration::from_secs(15), "the one-shot to run", || {
        let l = l.clone();
        async move { !l.fires("once").is_empty() }
    })
    .await;
    let ran_at = now_ms();
    // Every node must see the tombstone and drop the task.
    eventually(
        Duration::from_secs(15),
        "every node to drop the one-shot",
        || async { nodes.iter().all(|n| n.owned_tasks().is_empty()) },
    )
    .await;
    until(ran_at + 2500).await;
    assert_eq!(ledger.fires("once").len(), 1, "runs: {:?}", ledger.runs());
    match nodes[0]
        .add_one_shot_func("once", "* * * * * *", |_| async { Ok(()) })
        .await
    {
        Err(Error::TaskDeleted(_)) | Err(Error::TaskExists(_)) => {}
        other => panic!("a spent one-shot must not be re-added silently: {other:?}"),
    }
    for n in &nodes {
        n.stop().await.expect("stop");
    }
}

pub async fn dynamic_task_runs_on_its_owner(h: &impl Harness) {
    let ns = fresh_ns("cluster-dynamic");
    let ledger = Ledger::default();
    let nodes = three_nodes(h, &ns, &[], EVERY_SECOND, &ledger).await;
    let dynamic = names("dyn", 10);
    for name in &dynamic {
        let meta = TaskMeta::new(name, "* * * * * *").with_payload(format!("payload of {name}"));
        nodes[0].add_task_meta(meta).await.expect("add dynamic");
    }
    match nodes[1]
        .add_task_meta(TaskMeta::new(&dynamic[0], "* * * * * *"))
        .await
    {
        Err(Error::TaskExists(_)) => {}
        other => panic!("expected TaskExists, got {other:?}"),
    }
    settled(&nodes, &dynamic).await;
    let owners: BTreeMap<String, String> = nodes
        .iter()
        .flat_map(|n| n.owned_tasks().into_iter().map(move |t| (t, n.node_id())))
        .collect();
    let from = now_ms() + 1000;
    until(from + 3000).await;
    let to = now_ms() - 1000;
    for n in &nodes {
        n.stop().await.expect("stop");
    }
    ledger.assert_exactly_once(&dynamic, from, to);
    for t in &dynamic {
        for run in ledger
            .runs()
            .iter()
            .filter(|r| &r.task == t && r.fire_time >= from && r.fire_time <= to)
        {
            assert_eq!(run.node, owners[t], "{t} ran off its owner");
        }
    }
}

/// The record listed under `id`, if any (undecodable ones are not listed).
async fn listed(r: &Arc<dyn Registry>, ns: &str, id: &str) -> Option<dcron::Node> {
    r.nodes(ns)
        .await
        .expect("nodes")
        .into_iter()
        .find(|n| n.id == id)
}

/// Waits until every task of `tasks` ran at a fire time after `since`.
async fn fired_after(ledger: &Ledger, tasks: &[String], since: i64, within: Duration) {
    let (l, all) = (ledger.clone(), tasks.to_vec());
    eventually(within, "fires of every task", || {
        let (l, all) = (l.clone(), all.clone());
        async move { all.iter().all(|t| l.fires(t).iter().any(|f| *f > since)) }
    })
    .await;
}

pub async fn node_id_in_use_is_refused_until_freed(h: &impl Harness) {
    let ns = fresh_ns("cluster-node-id");
    let ledger = Ledger::default();
    let tasks = names("id", 3);
    let ttl = h.short_ttl();
    let first = node(h, &ns, "node-a", &ledger).await;
    add_static(&first, &tasks, EVERY_SECOND, &ledger).await;
    first.start().await.expect("start the first");
    settled(std::slice::from_ref(&first), &tasks).await;
    let r = h.registry().await;
    let held = listed(&r, &ns, "node-a")
        .await
        .expect("the first is listed");

    // A second process with the same id, on its own registry client.
    let second = node(h, &ns, "node-a", &ledger).await;
    add_static(&second, &tasks, EVERY_SECOND, &ledger).await;
    let asked = tokio::time::Instant::now();
    match second.start().await {
        Err(Error::NodeIdInUse(id)) => assert_eq!(id, "node-a"),
        other => panic!("expected NodeIdInUse, got {other:?}"),
    }
    let took = asked.elapsed();
    tracing::info!(?took, "second start with the same node id refused");
    // It waits at most two TTLs for a stale record to expire.
    assert!(
        took <= ttl * 2 + Duration::from_secs(5),
        "refused only after {took:?}"
    );
    assert!(!second.is_running().await);
    assert!(second.owned_tasks().is_empty());

    // The first one did not notice: same record, same tasks, still firing.
    let now = listed(&r, &ns, "node-a")
        .await
        .expect("the first is still listed");
    assert_eq!(
        now.create_time, held.create_time,
        "the refused start touched the record"
    );
    assert_eq!(now.hostname, held.hostname);
    assert!(first.is_running().await);
    assert_eq!(first.owned_tasks(), tasks);
    fired_after(&ledger, &tasks, now_ms(), Duration::from_secs(5)).await;

    // Once the first stops, the id is free: the second starts at once.
    first.stop().await.expect("stop the first");
    let asked = tokio::time::Instant::now();
    second.start().await.expect("start once the id is free");
    let took = asked.elapsed();
    assert!(took < ttl, "the second start waited {took:?} for a free id");
    settled(std::slice::from_ref(&second), &tasks).await;
    let mine = listed(&r, &ns, "node-a")
        .await
        .expect("the second is listed");
    assert!(
        mine.create_time > held.create_time,
        "the second's own record: {mine:?}"
    );
    fired_after(&ledger, &tasks, now_ms(), Duration::from_secs(5)).await;
    second.stop().await.expect("stop the second");
    ledger.assert_no_duplicates();
}

pub async fn unreadable_own_record_is_rewritten(h: &impl Harness) {
    let ns = fresh_ns("cluster-own-record");
    let ledger = Ledger::default();
    let tasks = names("own", 3);
    let heartbeat = h.short_ttl() / 4; // as `node` sets it
    let n = node(h, &ns, "node-a", &ledger).await;
    add_static(&n, &tasks, EVERY_SECOND, &ledger).await;
    n.start().await.expect("start");
    settled(std::slice::from_ref(&n), &tasks).await;
    let r = h.registry().await;
    let before = listed(&r, &ns, "node-a").await.expect("listed");
    fired_after(&ledger, &tasks, now_ms(), Duration::from_secs(5)).await;

    // Another program overwrites the record; the registration stays.
    let written_ms = now_ms();
    let written = tokio::time::Instant::now();
    h.write_raw(
        &ns,
        dcron::registry::RawKind::Node,
        "node-a",
        b"\x00{not a node record",
    )
    .await;
    let bound = heartbeat * 2 + Duration::from_secs(2);
    eventually(bound, "the node to rewrite its record", || async {
        listed(&r, &ns, "node-a").await.is_some()
    })
    .await;
    tracing::info!(took = ?written.elapsed(), "own record rewritten");
    let after = listed(&r, &ns, "node-a").await.expect("listed again");
    assert_eq!(
        after.create_time, before.create_time,
        "not the node's own record: {after:?}"
    );
    assert_eq!(after.status, dcron::NodeStatus::Working);
    assert_eq!(after.static_tasks, tasks);

    // Well past a reload of the view (2 s), the node still owns and runs
    // every task, without a gap.
    let steady = written_ms + (heartbeat * 2).as_millis() as i64 + 1000;
    until(steady + 4500).await;
    let to = now_ms() - 1000;
    assert!(n.is_running().await);
    assert_eq!(n.owned_tasks(), tasks);
    n.stop().await.expect("stop");
    ledger.assert_no_duplicates();
    for t in &tasks {
        ledger.assert_contiguous(t, steady, to);
    }
}
