//! The memory registry against the conformance suite and the cluster tests,
//! plus the fault-injection tests only the memory registry can do.

mod cluster;
mod conformance;

use std::sync::Arc;
use std::time::Duration;

use dcron::registry::{Claim, RawKind, Registry};
use dcron::{Admin, Dcron, Error, MemoryRegistry, TaskContext, TaskMeta};

use cluster::{now_ms, Ledger};
use conformance::{eventually, fresh_ns};

struct Memory(MemoryRegistry);

impl conformance::Harness for Memory {
    async fn registry(&self) -> Arc<dyn Registry> {
        Arc::new(self.0.clone())
    }

    async fn write_raw(&self, ns: &str, kind: RawKind, name: &str, raw: &[u8]) {
        self.0.write_raw(ns, kind, name, raw);
    }

    fn short_ttl(&self) -> Duration {
        Duration::from_millis(1200)
    }

    fn expiry_bound(&self, ttl: Duration) -> Duration {
        ttl + Duration::from_secs(1)
    }
}

conformance::suite!(Memory(MemoryRegistry::new()));
cluster::suite!(Memory(MemoryRegistry::new()));

fn recording_node(registry: &MemoryRegistry, ns: &str, id: &str, ledger: &Ledger) -> Dcron {
    cluster::recording(Arc::new(registry.clone()), ns, id, ledger)
        .node_ttl(Duration::from_millis(1200))
        .reload_interval(Duration::from_millis(500))
        .build()
        .expect("node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_reload_recovers_a_dropped_event() {
    conformance::init_tracing();
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("dropped");
    let ledger = Ledger::default();
    let node = recording_node(&registry, &ns, "n1", &ledger);
    node.start().await.expect("start");
    registry.drop_next_events(1);
    let writer = Dcron::builder(registry.clone())
        .namespace(&ns)
        .build()
        .expect("writer");
    writer
        .add_task_meta(TaskMeta::new("late-news", "* * * * * *"))
        .await
        .expect("add");
    eventually(
        Duration::from_secs(5),
        "the reload to pick up the task",
        || async { node.owned_tasks() == vec!["late-news".to_string()] },
    )
    .await;
    let l = ledger.clone();
    eventually(Duration::from_secs(5), "the task to run", || {
        let l = l.clone();
        async move { !l.fires("late-news").is_empty() }
    })
    .await;
    node.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_claims_are_retried_not_lost() {
    conformance::init_tracing();
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("claim-retry");
    let ledger = Ledger::default();
    let node = recording_node(&registry, &ns, "n1", &ledger);
    node.add_task_meta(TaskMeta::new("steady", "* * * * * *"))
        .await
        .expect("add");
    node.start().await.expect("start");
    let l = ledger.clone();
    eventually(Duration::from_secs(5), "a first run", || {
        let l = l.clone();
        async move { !l.fires("steady").is_empty() }
    })
    .await;
    // The next three registry calls (the next claims among them) fail.
    let from = now_ms() + 1000;
    registry.fail_next_calls(3);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let to = now_ms() - 1000;
    node.stop().await.expect("stop");
    ledger.assert_no_duplicates();
    ledger.assert_contiguous("steady", from, to);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_node_reregisters_and_resumes() {
    conformance::init_tracing();
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("reregister");
    let ledger = Ledger::default();
    let node = recording_node(&registry, &ns, "n1", &ledger);
    node.add_task_meta(TaskMeta::new("t", "* * * * * *"))
        .await
        .expect("add");
    node.start().await.expect("start");
    registry.expire_node(&ns, "n1");
    let r: Arc<dyn Registry> = Arc::new(registry.clone());
    eventually(Duration::from_secs(5), "re-registration", || async {
        conformance::node_ids(&r, &ns).await.contains("n1")
    })
    .await;
    let back = now_ms();
    let l = ledger.clone();
    eventually(Duration::from_secs(5), "runs after re-registering", || {
        let l = l.clone();
        async move { l.fires("t").iter().any(|t| *t > back) }
    })
    .await;
    node.stop().await.expect("stop");
}

#[tokio::test]
async fn bad_input_is_rejected_and_writes_nothing() {
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("bad-input");
    let node = Dcron::builder(registry.clone())
        .namespace(&ns)
        .max_payload(16)
        .build()
        .expect("node");
    let noop = |_: TaskContext| async { Ok(()) };
    for name in ["", "a/b", "white space", &"x".repeat(201)] {
        assert!(matches!(
            node.add_func(name, "* * * * *", noop).await,
            Err(Error::InvalidTaskName { .. })
        ));
        assert!(matches!(
            node.add_task_meta(TaskMeta::new(name, "* * * * *")).await,
            Err(Error::InvalidTaskName { .. })
        ));
        assert!(matches!(
            node.mark_task_deleted(name).await,
            Err(Error::InvalidTaskName { .. })
        ));
    }
    for cron in [
        "",
        "* * *",
        "99 * * * *",
        "0 0 31 2 *",
        "CRON_TZ=Nowhere/City * * * * *",
    ] {
        assert!(
            matches!(
                node.add_func("ok", cron, noop).await,
                Err(Error::InvalidCron { .. })
            ),
            "{cron}"
        );
        assert!(matches!(
            node.add_task_meta(TaskMeta::new("ok", cron)).await,
            Err(Error::InvalidCron { .. })
        ));
    }
    match node
        .add_task_meta(TaskMeta::new("big", "* * * * *").with_payload("x".repeat(17)))
        .await
    {
        Err(Error::PayloadTooLarge {
            size: 17,
            limit: 16,
        }) => {}
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    assert!(node.all_tasks().is_empty());
    assert!(registry.tasks(&ns).await.expect("tasks").is_empty());
    assert!(registry
        .tombstones(&ns)
        .await
        .expect("tombstones")
        .is_empty());
    assert!(matches!(
        Dcron::builder(registry.clone()).namespace("bad/ns").build(),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(node.stop().await, Err(Error::NotRunning)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_and_events() {
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("lifecycle");
    let a = Dcron::builder(registry.clone())
        .namespace(&ns)
        .node_id("a")
        .build()
        .expect("a");
    let mut events = a.subscribe();
    a.start().await.expect("start");
    assert!(matches!(a.start().await, Err(Error::AlreadyRunning)));
    let b = Dcron::builder(registry.clone())
        .namespace(&ns)
        .node_id("b")
        .build()
        .expect("b");
    b.start().await.expect("start b");
    let nodes = a.nodes().await.expect("nodes");
    assert_eq!(
        nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(nodes.iter().all(|n| n.status == dcron::NodeStatus::Working));
    b.add_task_meta(TaskMeta::new("d", "0 0 * * * *"))
        .await
        .expect("add");
    b.stop().await.expect("stop b");
    let mut saw = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !saw.contains(&"node-delete-b") {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("events in time")
            .expect("event");
        saw.push(match ev {
            dcron::Event::Node(dcron::NodeEvent::Put(n)) if n.id == "b" => "node-put-b",
            dcron::Event::Node(dcron::NodeEvent::Changed(n)) if n.id == "b" => "node-changed-b",
            dcron::Event::Node(dcron::NodeEvent::Delete(id)) if id == "b" => "node-delete-b",
            dcron::Event::Task(dcron::TaskEvent::Put(m)) if m.name == "d" => "task-put-d",
            _ => "other",
        });
    }
    for want in [
        "node-put-b",
        "node-changed-b",
        "task-put-d",
        "node-delete-b",
    ] {
        assert!(saw.contains(&want), "missing {want} in {saw:?}");
    }
    a.stop().await.expect("stop a");
    assert!(
        registry.nodes(&ns).await.expect("nodes").is_empty(),
        "stop unregisters"
    );
}

/// What the registry holds for `ns`, to compare before and after.
async fn contents(admin: &Admin) -> (Vec<TaskMeta>, Vec<String>, Vec<(String, i64)>) {
    let snap = admin.snapshot().await.expect("snapshot");
    let claims = snap
        .claims
        .into_iter()
        .map(|(name, claim)| (name, claim.fire_time))
        .collect();
    (snap.tasks, snap.tombstones, claims)
}

async fn claim(registry: &MemoryRegistry, ns: &str, task: &str, fire_time: i64) {
    let claim = Claim::new(fire_time, "n1", "n1/test", fire_time);
    assert!(registry.claim(ns, task, &claim).await.expect("claim"));
}

#[tokio::test]
async fn admin_every_operation() {
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("admin-ops");
    let admin = Admin::new(Arc::new(registry.clone()), &ns).expect("admin");
    assert_eq!(admin.namespace(), ns);
    let sync = TaskMeta::new("sync", "*/5 * * * * *").with_payload("p");
    admin.add_task(&sync).await.expect("add");
    assert_eq!(admin.tasks().await.expect("tasks"), vec![sync.clone()]);
    assert!(matches!(
        admin.add_task(&TaskMeta::new("sync", "* * * * * *")).await,
        Err(Error::TaskExists(name)) if name == "sync"
    ));
    claim(&registry, &ns, "sync", 1_000).await;

    admin.mark_deleted("sync").await.expect("mark deleted");
    assert!(admin.is_deleted("sync").await.expect("is deleted"));
    assert!(matches!(
        admin.add_task(&sync).await,
        Err(Error::TaskDeleted(name)) if name == "sync"
    ));
    admin.reuse_deleted("sync").await.expect("reuse");
    assert!(!admin.is_deleted("sync").await.expect("is deleted"));

    // A forced add overwrites and clears tombstone and claim.
    admin.mark_deleted("sync").await.expect("mark deleted");
    let changed = TaskMeta::new("sync", "0 * * * * *");
    admin.force_add_task(&changed).await.expect("force add");
    assert_eq!(contents(&admin).await, (vec![changed], vec![], vec![]));

    // Cleanup removes every trace.
    claim(&registry, &ns, "sync", 2_000).await;
    admin.mark_deleted("sync").await.expect("mark deleted");
    admin.cleanup("sync").await.expect("cleanup");
    assert_eq!(contents(&admin).await, (vec![], vec![], vec![]));
    admin.cleanup("sync").await.expect("cleanup of nothing");

    admin.add_task(&sync).await.expect("add again");
    admin.mark_deleted("other").await.expect("mark deleted");
    admin.clear().await.expect("clear");
    assert_eq!(contents(&admin).await, (vec![], vec![], vec![]));
}

#[tokio::test]
async fn admin_bad_input_is_rejected_and_writes_nothing() {
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("admin-bad");
    let shared: Arc<dyn Registry> = Arc::new(registry.clone());
    let admin = Admin::new(shared.clone(), &ns)
        .expect("admin")
        .with_max_payload(16);
    admin
        .add_task(&TaskMeta::new("kept", "* * * * * *"))
        .await
        .expect("add");
    admin.mark_deleted("gone").await.expect("mark deleted");
    claim(&registry, &ns, "kept", 1_000).await;
    let before = contents(&admin).await;

    for name in ["", "a/b", "white space", &"x".repeat(201)] {
        let meta = TaskMeta::new(name, "* * * * *");
        for result in [
            admin.add_task(&meta).await,
            admin.force_add_task(&meta).await,
            admin.mark_deleted(name).await,
            admin.reuse_deleted(name).await,
            admin.cleanup(name).await,
            admin.is_deleted(name).await.map(drop),
        ] {
            assert!(
                matches!(result, Err(Error::InvalidTaskName { .. })),
                "{name:?}: {result:?}"
            );
        }
    }
    for cron in ["", "* * *", "99 * * * *", "CRON_TZ=Nowhere/City * * * * *"] {
        // `gone` is tombstoned: a forced add with a bad cron must not revive it.
        let meta = TaskMeta::new("gone", cron);
        for result in [
            admin.add_task(&meta).await,
            admin.force_add_task(&meta).await,
        ] {
            assert!(
                matches!(result, Err(Error::InvalidCron { .. })),
                "{cron}: {result:?}"
            );
        }
    }
    let big = TaskMeta::new("kept", "* * * * *").with_payload("x".repeat(17));
    for result in [admin.add_task(&big).await, admin.force_add_task(&big).await] {
        assert!(
            matches!(
                result,
                Err(Error::PayloadTooLarge {
                    size: 17,
                    limit: 16
                })
            ),
            "{result:?}"
        );
    }
    assert_eq!(contents(&admin).await, before);
    assert!(matches!(
        Admin::new(shared, "bad/ns"),
        Err(Error::InvalidConfig(_))
    ));
}

/// A node's task API and an `Admin` on the same namespace are one path:
/// the same checks, the same errors, each seeing the other's writes.
#[tokio::test]
async fn node_and_admin_share_one_task_path() {
    let registry = MemoryRegistry::new();
    let ns = fresh_ns("admin-node");
    let admin = Admin::new(Arc::new(registry.clone()), &ns)
        .expect("admin")
        .with_max_payload(16);
    let node = Dcron::builder(registry.clone())
        .namespace(&ns)
        .max_payload(16)
        .build()
        .expect("node");
    let big = TaskMeta::new("t", "* * * * *").with_payload("x".repeat(17));
    assert_eq!(
        format!("{:?}", node.add_task_meta(big.clone()).await),
        format!("{:?}", admin.add_task(&big).await)
    );
    admin
        .add_task(&TaskMeta::new("t", "* * * * * *"))
        .await
        .expect("add");
    assert!(matches!(
        node.add_task_meta(TaskMeta::new("t", "* * * * * *")).await,
        Err(Error::TaskExists(_))
    ));
    node.mark_task_deleted("t").await.expect("mark deleted");
    assert!(admin.is_deleted("t").await.expect("is deleted"));
    assert!(matches!(
        admin.add_task(&TaskMeta::new("u", "* * * * * *")).await,
        Ok(())
    ));
    node.cleanup_task("t").await.expect("cleanup");
    assert_eq!(
        admin.tasks().await.expect("tasks"),
        vec![TaskMeta::new("u", "* * * * * *")]
    );
    assert!(!admin.is_deleted("t").await.expect("is deleted"));
}
