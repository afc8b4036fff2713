//! The fire pipeline under injected registry faults, on every backend:
//! nodes claim through a [`FaultRegistry`] around the backend, and every
//! fire still runs exactly once, or is reported as missed and counted.

use std::sync::atomic::{AtomicU64, Ordering};

use dcron::registry::FaultRegistry;
use dcron::{CatchUp, MissReason};

use super::*;

/// A node on its own client of the backend, wrapped for fault injection
/// (claims only, so liveness and the feed stay healthy).
async fn faulty_node(
    h: &impl Harness,
    ns: &str,
    id: &str,
    ledger: &Ledger,
    catch_up: CatchUp,
    missed: &Arc<AtomicU64>,
) -> (Dcron, FaultRegistry) {
    let faults = FaultRegistry::wrap_shared(h.registry().await);
    faults.claims_only(true);
    let ttl = h.short_ttl();
    let counter = missed.clone();
    let node = recording(Arc::new(faults.clone()), ns, id, ledger)
        .strategy(Strategy::Consistent)
        .node_ttl(ttl)
        .heartbeat(ttl / 4)
        .reload_interval(Duration::from_secs(2))
        .catch_up(catch_up)
        .error_handler(move |_meta, err| {
            if matches!(err, Error::FireMissed { .. }) {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .expect("valid options");
    (node, faults)
}

/// Two nodes running `tasks` every second through fault wrappers.
async fn two_faulty_nodes(
    h: &impl Harness,
    ns: &str,
    tasks: &[String],
    ledger: &Ledger,
    catch_up: CatchUp,
    missed: &Arc<AtomicU64>,
) -> Vec<(Dcron, FaultRegistry)> {
    let mut nodes = Vec::new();
    for id in ["node-a", "node-b"] {
        let (n, f) = faulty_node(h, ns, id, ledger, catch_up, missed).await;
        add_static(&n, tasks, EVERY_SECOND, ledger).await;
        n.start().await.expect("start");
        nodes.push((n, f));
    }
    let handles: Vec<Dcron> = nodes.iter().map(|(n, _)| n.clone()).collect();
    settled(&handles, tasks).await;
    nodes
}

async fn stop_all(nodes: &[(Dcron, FaultRegistry)]) -> u64 {
    let mut missed = 0;
    for (n, _) in nodes {
        n.stop().await.expect("stop");
        missed += n.missed_fires();
    }
    missed
}

/// Every task's runs started in fire-time order (retries of older fires
/// were claimed before newer ones).
fn assert_in_fire_order(ledger: &Ledger, tasks: &[String]) {
    for task in tasks {
        let mut runs: Vec<Run> = ledger
            .runs()
            .into_iter()
            .filter(|r| &r.task == task)
            .collect();
        runs.sort_by_key(|r| r.fire_time);
        for pair in runs.windows(2) {
            assert!(
                pair[0].started_ms <= pair[1].started_ms,
                "{task}: fire {} started after fire {}",
                pair[0].fire_time,
                pair[1].fire_time
            );
        }
    }
}

/// Claims hang for 5 s on every node: the fires of those seconds run late,
/// in order, each once; nothing is missed.
pub async fn claim_stall_runs_fires_late_not_lost(h: &impl Harness) {
    let ns = fresh_ns("fault-stall");
    let ledger = Ledger::default();
    let missed = Arc::new(AtomicU64::new(0));
    let tasks = names("stall", 10);
    let nodes = two_faulty_nodes(h, &ns, &tasks, &ledger, CatchUp::default(), &missed).await;
    let from = now_ms() + 1000;
    until(from + 1000).await;
    let stall_at = now_ms();
    for (_, f) in &nodes {
        f.stall_for(Duration::from_secs(5));
    }
    let to = stall_at + 6000;
    caught_up(&ledger, &tasks, to).await;
    let missed_count = stop_all(&nodes).await;
    ledger.assert_exactly_once(&tasks, from, to);
    assert_in_fire_order(&ledger, &tasks);
    assert_eq!(missed_count, 0, "no fire may be missed");
    assert_eq!(missed.load(Ordering::SeqCst), 0);
    let late = ledger.max_lateness_since(from);
    assert!(late >= 3000, "the stall made fires late ({late} ms)");
    assert!(
        late <= 6500,
        "no fire later than the stall plus 1.5 s ({late} ms)"
    );
    assert!(nodes.iter().all(|(_, f)| f.injected() > 0));
}

/// Lost answers and partly failed batches: retries find their own claims,
/// so every fire runs once.
pub async fn lost_answers_and_split_batches_lose_nothing(h: &impl Harness) {
    let ns = fresh_ns("fault-lost");
    let ledger = Ledger::default();
    let missed = Arc::new(AtomicU64::new(0));
    let tasks = names("lost", 12);
    let nodes = two_faulty_nodes(h, &ns, &tasks, &ledger, CatchUp::default(), &missed).await;
    let from = now_ms() + 1000;
    until(from).await;
    for (_, f) in &nodes {
        f.lose_next_answers(2);
        f.split_next_batches(3);
    }
    for (_, f) in &nodes {
        let f = f.clone();
        eventually(Duration::from_secs(20), "faults to be used up", || {
            let f = f.clone();
            async move { f.injected() >= 2 + 3 }
        })
        .await;
    }
    let to = now_ms() + 1000;
    caught_up(&ledger, &tasks, to).await;
    let missed_count = stop_all(&nodes).await;
    ledger.assert_exactly_once(&tasks, from, to);
    assert_in_fire_order(&ledger, &tasks);
    assert_eq!(missed_count, 0);
}

/// Waits until every task ran its fire at `t` (so the backlog drained).
async fn caught_up(ledger: &Ledger, tasks: &[String], t: i64) {
    let t = t.div_euclid(1000) * 1000;
    eventually(Duration::from_secs(20), "the backlog to drain", || async {
        tasks.iter().all(|task| ledger.fires(task).contains(&t))
    })
    .await;
}

/// A 3 s outage (calls fail at once): fires are retried with backoff in
/// fire-time order and all run once the registry answers again.
pub async fn claim_outage_retries_in_order(h: &impl Harness) {
    let ns = fresh_ns("fault-outage");
    let ledger = Ledger::default();
    let missed = Arc::new(AtomicU64::new(0));
    let tasks = names("outage", 10);
    let nodes = two_faulty_nodes(h, &ns, &tasks, &ledger, CatchUp::default(), &missed).await;
    let from = now_ms() + 1000;
    until(from + 1000).await;
    for (_, f) in &nodes {
        f.outage_for(Duration::from_secs(3));
    }
    let to = now_ms() + 4000;
    caught_up(&ledger, &tasks, to).await;
    let missed_count = stop_all(&nodes).await;
    ledger.assert_exactly_once(&tasks, from, to);
    assert_in_fire_order(&ledger, &tasks);
    assert_eq!(missed_count, 0);
}

/// An outage longer than the late window: the fires that left the window
/// are reported as missed (log, handler, counter), one report per fire that
/// did not run; the others run once.
pub async fn long_outage_reports_every_missed_fire(h: &impl Harness) {
    let ns = fresh_ns("fault-missed");
    let ledger = Ledger::default();
    let missed = Arc::new(AtomicU64::new(0));
    let tasks = names("missed", 4);
    // `Skip` has the shortest late window (5 s).
    let nodes = two_faulty_nodes(h, &ns, &tasks, &ledger, CatchUp::Skip, &missed).await;
    let from = now_ms() + 1000;
    until(from + 1000).await;
    for (_, f) in &nodes {
        f.outage_for(Duration::from_secs(8));
    }
    until(now_ms() + 11_000).await;
    let to = now_ms() - 1500;
    let reported = stop_all(&nodes).await;
    ledger.assert_no_duplicates();
    let mut not_run = 0u64;
    for task in &tasks {
        let fires: BTreeSet<i64> = ledger.fires(task).into_iter().collect();
        let mut t = from.div_euclid(1000) * 1000 + 1000;
        while t <= to {
            if !fires.contains(&t) {
                not_run += 1;
            }
            t += 1000;
        }
    }
    assert!(
        not_run >= tasks.len() as u64,
        "the outage outlasted the window"
    );
    assert_eq!(reported, not_run, "every fire that did not run is reported");
    assert_eq!(missed.load(Ordering::SeqCst), not_run);
    let _ = MissReason::ClaimFailed;
}
