//! Node behaviour on the memory registry: task flags and their precedence,
//! errors and panics, overlap, static ownership, force and cleanup calls,
//! namespaces.

mod cluster;
mod conformance;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dcron::registry::Registry;
use dcron::{Dcron, Error, MemoryRegistry, Overlap, TaskContext, TaskMeta};

use cluster::{now_ms, Ledger};
use conformance::{eventually, fresh_ns};

fn recording_node(registry: &MemoryRegistry, ns: &str, id: &str, ledger: &Ledger) -> Dcron {
    cluster::recording(Arc::new(registry.clone()), ns, id, ledger)
        .build()
        .expect("node")
}

async fn ran(ledger: &Ledger, task: &str) {
    let (l, t) = (ledger.clone(), task.to_string());
    eventually(Duration::from_secs(5), &format!("{task} to run"), || {
        let (l, t) = (l.clone(), t.clone());
        async move { !l.fires(&t).is_empty() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_run_flags_and_their_precedence() {
    conformance::init_tracing();
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("flags");
    let ledger = Ledger::default();
    let node = recording_node(&registry, &ns, "n1", &ledger);
    let mut cleanup = TaskMeta::new("cleanup", "* * * * * *");
    cleanup.executed_and_cleanup = true;
    let mut mark = TaskMeta::new("mark", "* * * * * *");
    mark.executed_and_mark_deleted = true;
    let once = TaskMeta::new("once", "* * * * * *").one_shot();
    let mut once_cleanup = TaskMeta::new("once-cleanup", "* * * * * *").one_shot();
    once_cleanup.executed_and_cleanup = true;
    once_cleanup.executed_and_mark_deleted = true;
    let mut all = TaskMeta::new("cleanup-wins", "* * * * * *");
    all.executed_and_cleanup = true;
    all.executed_and_mark_deleted = true;
    for meta in [cleanup, mark, once, once_cleanup, all] {
        node.add_task_meta(meta).await.expect("add");
    }
    node.start().await.expect("start");
    let names = ["cleanup", "mark", "once", "once-cleanup", "cleanup-wins"];
    for name in names {
        ran(&ledger, name).await;
    }
    let r: Arc<dyn Registry> = Arc::new(registry.clone());
    eventually(Duration::from_secs(5), "flags applied", || async {
        let tombstones = r.tombstones(&ns).await.expect("tombstones");
        let tasks: Vec<String> = r
            .tasks(&ns)
            .await
            .expect("tasks")
            .into_iter()
            .map(|t| t.name)
            .collect();
        let mut t = tombstones.clone();
        t.sort();
        t == ["mark", "once", "once-cleanup"] && {
            let mut k = tasks.clone();
            k.sort();
            k == ["mark", "once"]
        }
    })
    .await;
    let claims: Vec<String> = r
        .claims(&ns)
        .await
        .expect("claims")
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert!(
        !claims.contains(&"cleanup".to_string()) && !claims.contains(&"cleanup-wins".to_string())
    );
    let stop_at = now_ms() + 2000;
    while now_ms() < stop_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.stop().await.expect("stop");
    for name in names {
        assert_eq!(
            ledger.fires(name).len(),
            1,
            "{name} ran {:?}",
            ledger.fires(name)
        );
    }
    ledger.assert_no_duplicates();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_panics_reach_the_error_handler() {
    let registry = MemoryRegistry::new();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = seen.clone();
    let node = Dcron::builder(registry)
        .namespace(fresh_ns("errors"))
        .error_handler(move |meta, err| {
            let kind = match err {
                Error::TaskFailed { .. } => "failed",
                Error::TaskPanicked { .. } => "panicked",
                _ => "other",
            };
            sink.lock().unwrap().push(format!("{}:{kind}", meta.name));
        })
        .build()
        .expect("node");
    node.add_func("fails", "* * * * * *", |_| async { Err("boom".into()) })
        .await
        .expect("add");
    node.add_func("panics", "* * * * * *", |_| async { panic!("kaboom") })
        .await
        .expect("add");
    node.add_func("panics-later", "* * * * * *", |_| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        panic!("late kaboom")
    })
    .await
    .expect("add");
    node.start().await.expect("start");
    // Generous: with RUST_BACKTRACE set, the panic hook resolves a backtrace
    // on the worker thread, which takes seconds on a loaded machine.
    eventually(Duration::from_secs(30), "all three reported", || async {
        let s = seen.lock().unwrap().clone();
        ["fails:failed", "panics:panicked", "panics-later:panicked"]
            .iter()
            .all(|w| s.iter().any(|x| x == w))
    })
    .await;
    node.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_skip_and_allow() {
    for (policy, expect_overlap) in [(Overlap::Skip, false), (Overlap::Allow, true)] {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_seen = Arc::new(AtomicUsize::new(0));
        let starts = Arc::new(AtomicUsize::new(0));
        let node = Dcron::builder(MemoryRegistry::new())
            .namespace(fresh_ns("overlap"))
            .overlap(policy)
            .build()
            .expect("node");
        let (f, m, s) = (in_flight.clone(), max_seen.clone(), starts.clone());
        node.add_func("slow", "* * * * * *", move |_| {
            let (f, m, s) = (f.clone(), m.clone(), s.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                let now = f.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2300)).await;
                f.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .await
        .expect("add");
        node.start().await.expect("start");
        eventually(
            Duration::from_secs(10),
            "three fire times to pass",
            || async { starts.load(Ordering::SeqCst) >= 2 },
        )
        .await;
        node.stop().await.expect("stop");
        assert_eq!(
            max_seen.load(Ordering::SeqCst) > 1,
            expect_overlap,
            "{policy:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_tasks_run_only_where_defined() {
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("defined");
    let ledger = Ledger::default();
    let a = recording_node(&registry, &ns, "a", &ledger);
    let b = recording_node(&registry, &ns, "b", &ledger);
    let c = recording_node(&registry, &ns, "c", &ledger);
    let names: Vec<String> = (0..12).map(|i| format!("only-a-{i}")).collect();
    cluster::add_static(&a, &names, "* * * * * *", &ledger).await;
    for n in [&a, &b, &c] {
        n.start().await.expect("start");
    }
    let from = now_ms() + 1500;
    eventually(Duration::from_secs(10), "runs after all joined", || async {
        names
            .iter()
            .all(|t| ledger.fires(t).iter().any(|f| *f > from))
    })
    .await;
    assert!(
        ledger.runs().iter().all(|r| r.node == "a"),
        "a static task ran on a node lacking it"
    );
    assert_eq!(a.owned_tasks().len(), names.len());
    for n in [&a, &b, &c] {
        n.stop().await.expect("stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_add_cleanup_and_wipe() {
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("force");
    let node = Dcron::builder(registry.clone())
        .namespace(&ns)
        .build()
        .expect("node");
    let noop = |_: TaskContext| async { Ok(()) };
    node.add_func("s", "* * * * * *", noop).await.expect("add");
    assert!(matches!(
        node.add_func("s", "* * * * * *", noop).await,
        Err(Error::TaskExists(_))
    ));
    node.mark_task_deleted("s").await.expect("delete");
    assert!(matches!(
        node.add_func("s", "* * * * * *", noop).await,
        Err(Error::TaskDeleted(_))
    ));
    node.force_add_func("s", "*/2 * * * * *", noop)
        .await
        .expect("force add");
    assert!(registry
        .tombstones(&ns)
        .await
        .expect("tombstones")
        .is_empty());

    node.add_task_meta(TaskMeta::new("d", "* * * * * *"))
        .await
        .expect("add");
    assert!(registry
        .claim(
            &ns,
            "d",
            &dcron::registry::Claim::new(i64::MAX - 1, "x", "x/1", 0)
        )
        .await
        .expect("claim"));
    node.mark_task_deleted("d").await.expect("delete");
    assert!(matches!(
        node.add_task_meta(TaskMeta::new("d", "* * * * * *")).await,
        Err(Error::TaskDeleted(_))
    ));
    node.force_add_task_meta(TaskMeta::new("d", "*/3 * * * * *").with_payload("v2"))
        .await
        .expect("force");
    let tasks = registry.tasks(&ns).await.expect("tasks");
    assert_eq!(
        tasks,
        vec![TaskMeta::new("d", "*/3 * * * * *").with_payload("v2")]
    );
    assert!(
        registry.claims(&ns).await.expect("claims").is_empty(),
        "force clears the claim"
    );
    assert!(registry
        .tombstones(&ns)
        .await
        .expect("tombstones")
        .is_empty());

    node.mark_task_deleted("d").await.expect("delete");
    node.cleanup_task("d").await.expect("cleanup");
    assert!(registry.tasks(&ns).await.expect("tasks").is_empty());
    assert!(registry
        .tombstones(&ns)
        .await
        .expect("tombstones")
        .is_empty());
    node.add_task_meta(TaskMeta::new("d", "* * * * * *"))
        .await
        .expect("add after cleanup");

    node.force_add_one_shot_func("o", "* * * * * *", noop)
        .await
        .expect("one-shot");
    node.mark_task_deleted("o").await.expect("delete");
    node.force_cleanup_all_tasks().await.expect("wipe");
    assert!(registry.tasks(&ns).await.expect("tasks").is_empty());
    assert!(registry
        .tombstones(&ns)
        .await
        .expect("tombstones")
        .is_empty());
    assert!(registry.claims(&ns).await.expect("claims").is_empty());
    let mut all = node.all_tasks();
    all.sort();
    assert_eq!(all, ["o", "s"], "static definitions stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_run_independently() {
    let registry = MemoryRegistry::new();
    let ledger = Ledger::default();
    let (ns1, ns2) = (fresh_ns("ns-one"), fresh_ns("ns-two"));
    let one = recording_node(&registry, &ns1, "same-id", &ledger);
    let two = recording_node(&registry, &ns2, "same-id", &ledger);
    for (n, ns) in [(&one, &ns1), (&two, &ns2)] {
        n.add_task_meta(TaskMeta::new("job", "* * * * * *").with_payload(ns.as_str()))
            .await
            .expect("add");
        n.start().await.expect("start");
    }
    assert_eq!(one.nodes().await.expect("nodes").len(), 1);
    eventually(
        Duration::from_secs(5),
        "both namespaces to run job",
        || async { ledger.runs().iter().filter(|r| r.task == "job").count() >= 2 },
    )
    .await;
    one.mark_task_deleted("job").await.expect("delete in one");
    assert!(registry
        .tombstones(&ns2)
        .await
        .expect("tombstones")
        .is_empty());
    for n in [&one, &two] {
        n.stop().await.expect("stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_publishes_leaving_then_drains_running_tasks() {
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("drain");
    let observer = Dcron::builder(registry.clone())
        .namespace(&ns)
        .node_id("observer")
        .build()
        .expect("observer");
    observer.start().await.expect("start observer");
    let mut events = observer.subscribe();
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let node = Dcron::builder(registry.clone())
        .namespace(&ns)
        .node_id("worker")
        .drain_timeout(Duration::from_secs(10))
        .build()
        .expect("node");
    let (s, f) = (started.clone(), finished.clone());
    node.add_func("slow", "* * * * * *", move |_| {
        let (s, f) = (s.clone(), f.clone());
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(700)).await;
            f.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    })
    .await
    .expect("add");
    node.start().await.expect("start");
    eventually(Duration::from_secs(5), "a run to start", || async {
        started.load(Ordering::SeqCst) > finished.load(Ordering::SeqCst)
    })
    .await;
    node.stop().await.expect("stop");
    assert_eq!(
        started.load(Ordering::SeqCst),
        finished.load(Ordering::SeqCst),
        "stop returned while a run was still going"
    );
    // The observer saw `leaving` before the node went away.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !seen.contains(&"delete") {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("events in time")
            .expect("event");
        match ev {
            dcron::Event::Node(dcron::NodeEvent::Changed(n))
                if n.id == "worker" && n.status == dcron::NodeStatus::Leaving =>
            {
                seen.push("leaving")
            }
            dcron::Event::Node(dcron::NodeEvent::Delete(id)) if id == "worker" => {
                seen.push("delete")
            }
            _ => {}
        }
    }
    assert_eq!(seen, ["leaving", "delete"]);
    observer.stop().await.expect("stop observer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reads_never_revive_a_tombstoned_task() {
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("no-revive");
    let ledger = Ledger::default();
    let node = cluster::recording(Arc::new(registry.clone()), &ns, "n1", &ledger)
        .reload_interval(Duration::from_millis(200))
        .build()
        .expect("node");
    node.add_task_meta(TaskMeta::new("victim", "* * * * * *"))
        .await
        .expect("add");
    node.start().await.expect("start");
    ran(&ledger, "victim").await;
    node.mark_task_deleted("victim").await.expect("delete");
    let deleted_at = now_ms();
    // Every registry call fails for a while: reloads, heartbeats, claims.
    registry.fail_next_calls(1_000);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    registry.fail_next_calls(0);
    assert!(
        node.owned_tasks().is_empty(),
        "a failed reload revived the task"
    );
    node.stop().await.expect("stop");
    assert!(
        ledger.fires("victim").iter().all(|t| *t <= deleted_at),
        "tombstoned task ran: {:?}",
        ledger.fires("victim")
    );
}

// ----- node id uniqueness ---------------------------------------------------

/// A node on a short TTL (1.2 s, heartbeat 300 ms) defining the task `tick`.
async fn id_node(registry: &MemoryRegistry, ns: &str, id: &str, ledger: &Ledger) -> Dcron {
    let node = cluster::recording(Arc::new(registry.clone()), ns, id, ledger)
        .node_ttl(Duration::from_millis(1200))
        .heartbeat(Duration::from_millis(300))
        .build()
        .expect("node");
    cluster::add_static(&node, &["tick".to_string()], "* * * * * *", ledger).await;
    node
}

async fn listed(registry: &MemoryRegistry, ns: &str, id: &str) -> Option<dcron::Node> {
    registry
        .nodes(ns)
        .await
        .expect("nodes")
        .into_iter()
        .find(|n| n.id == id)
}

async fn ran_after(ledger: &Ledger, task: &str, since: i64) {
    let (l, t) = (ledger.clone(), task.to_string());
    eventually(
        Duration::from_secs(5),
        &format!("{task} to run again"),
        || {
            let (l, t) = (l.clone(), t.clone());
            async move { l.fires(&t).iter().any(|f| *f > since) }
        },
    )
    .await;
}

/// Keeps `node`'s registration alive, as the process owning it would.
fn keep_alive(
    registry: &MemoryRegistry,
    ns: &str,
    node: &dcron::Node,
) -> tokio::task::JoinHandle<()> {
    let (registry, ns, id) = (registry.clone(), ns.to_string(), node.id.clone());
    tokio::spawn(async move {
        loop {
            let _ = registry
                .heartbeat(&ns, &id, Duration::from_millis(1200))
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_a_crash_waits_for_the_stale_record() {
    conformance::init_tracing();
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("crash-restart");
    let ledger = Ledger::default();
    let crashed = id_node(&registry, &ns, "n1", &ledger).await;
    crashed.start().await.expect("start");
    ran(&ledger, "tick").await;
    // Its record stays until the TTL runs out (0.9-1.2 s from now).
    crashed.kill().await;
    let killed = tokio::time::Instant::now();
    // The supervisor starts a new process with the same id right away.
    let restarted = id_node(&registry, &ns, "n1", &ledger).await;
    restarted.start().await.expect("start after the crash");
    let waited = killed.elapsed();
    assert!(
        waited >= Duration::from_millis(700) && waited <= Duration::from_millis(2900),
        "waited {waited:?} for the stale record"
    );
    let since = now_ms();
    ran_after(&ledger, "tick", since).await;
    restarted.stop().await.expect("stop");
    ledger.assert_no_duplicates();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_handle_restarts_at_once_after_a_crash() {
    conformance::init_tracing();
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("handle-restart");
    let ledger = Ledger::default();
    let node = id_node(&registry, &ns, "n1", &ledger).await;
    node.start().await.expect("start");
    let first = listed(&registry, &ns, "n1").await.expect("listed");
    node.kill().await;
    let asked = tokio::time::Instant::now();
    node.start().await.expect("restart");
    let took = asked.elapsed();
    assert!(took < Duration::from_millis(500), "restart waited {took:?}");
    let again = listed(&registry, &ns, "n1").await.expect("listed");
    assert!(again.create_time > first.create_time, "{again:?}");
    ran_after(&ledger, "tick", now_ms()).await;
    node.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_process_on_the_same_id_is_overruled() {
    conformance::init_tracing();
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("newer-id");
    let ledger = Ledger::default();
    let node = id_node(&registry, &ns, "n1", &ledger).await;
    node.start().await.expect("start");
    ran(&ledger, "tick").await;
    let mine = listed(&registry, &ns, "n1").await.expect("listed");
    // Another process registers the same id in a race, after this one.
    let mut newer = mine.clone();
    newer.create_time += 1_000;
    newer.hostname = "other-host".into();
    registry
        .register(&ns, &newer, Duration::from_millis(1200))
        .await
        .expect("register the newer one");
    let other = keep_alive(&registry, &ns, &newer);
    eventually(
        Duration::from_secs(2),
        "the node to take its id back",
        || async {
            listed(&registry, &ns, "n1")
                .await
                .is_some_and(|n| n.create_time == mine.create_time && n.hostname == mine.hostname)
        },
    )
    .await;
    other.abort();
    assert!(node.is_running().await);
    assert_eq!(node.owned_tasks(), ["tick"]);
    ran_after(&ledger, "tick", now_ms()).await;
    node.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_process_on_the_same_id_makes_the_node_stand_down() {
    conformance::init_tracing();
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("older-id");
    let ledger = Ledger::default();
    let node = id_node(&registry, &ns, "n1", &ledger).await;
    node.start().await.expect("start");
    ran(&ledger, "tick").await;
    let mine = listed(&registry, &ns, "n1").await.expect("listed");
    // Another process, started before this one, registers the id again
    // (say its registration had been lost meanwhile).
    let mut older = mine.clone();
    older.create_time -= 1_000;
    older.hostname = "other-host".into();
    registry
        .register(&ns, &older, Duration::from_millis(1200))
        .await
        .expect("register the older one");
    let other = keep_alive(&registry, &ns, &older);
    eventually(Duration::from_secs(2), "the node to stand down", || async {
        !node.is_running().await
    })
    .await;
    let stood_down = now_ms();
    assert!(node.owned_tasks().is_empty());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        ledger.fires("tick").iter().all(|f| *f <= stood_down),
        "fires after standing down: {:?}",
        ledger.fires("tick")
    );
    // It leaves the other process's registration alone, stop included.
    assert!(matches!(node.stop().await, Err(Error::NotRunning)));
    let held = listed(&registry, &ns, "n1").await.expect("still listed");
    assert_eq!(
        (held.create_time, held.hostname.as_str()),
        (older.create_time, "other-host")
    );
    // Once the id is free, the node starts again.
    other.abort();
    registry.unregister(&ns, "n1").await.expect("unregister");
    node.start().await.expect("start again");
    ran_after(&ledger, "tick", now_ms()).await;
    node.stop().await.expect("stop");
    ledger.assert_no_duplicates();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_on_the_same_id_is_waited_for() {
    conformance::init_tracing();
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("leaving-id");
    let ledger = Ledger::default();
    let old = id_node(&registry, &ns, "n1", &ledger).await;
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    old.add_func("slow", "* * * * * *", move |_ctx: TaskContext| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Ok(())
        }
    })
    .await
    .expect("add slow");
    old.start().await.expect("start the old one");
    eventually(Duration::from_secs(5), "a slow run", || async {
        started.load(Ordering::SeqCst) > 0
    })
    .await;
    // The old process stops: `leaving`, then drains its slow run.
    let stopping = {
        let old = old.clone();
        tokio::spawn(async move { old.stop().await })
    };
    eventually(Duration::from_secs(2), "the old one to leave", || async {
        listed(&registry, &ns, "n1")
            .await
            .is_some_and(|n| n.status == dcron::NodeStatus::Leaving)
    })
    .await;
    let new = id_node(&registry, &ns, "n1", &ledger).await;
    new.start().await.expect("start while the old one drains");
    stopping.await.expect("join").expect("stop the old one");
    ran_after(&ledger, "tick", now_ms()).await;
    new.stop().await.expect("stop the new one");
    ledger.assert_no_duplicates();
}
