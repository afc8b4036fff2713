//! How to test code that uses dcron, without a server and without waiting:
//! copy these tests into your own crate (dev-dependency: tokio with the
//! `test-util` feature).
//!
//! - `MemoryRegistry` is a whole registry in the process: several nodes on
//!   clones of one registry form a cluster.
//! - `TokioClock` makes the nodes' wall clock follow tokio's, so a test
//!   with a paused tokio clock runs hours of schedule in milliseconds.
//! - `FaultRegistry` wraps any registry and injects faults: outages,
//!   stalls, lost answers, failed calls.
//! - `Dcron::kill` simulates a crash: the node stops without a goodbye and
//!   its registration is left to expire, as after `kill -9`.
//!
//! `cargo test -p dcron --example testing` runs them.

fn main() {
    println!("run the tests: cargo test -p dcron --example testing");
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use dcron::clock::TokioClock;
    use dcron::registry::FaultRegistry;
    use dcron::{Dcron, MemoryRegistry, TaskContext};

    /// 2026-01-01T00:00:00Z: tests start on a known instant.
    const START_MS: i64 = 1_767_225_600_000;

    /// A node on `registry` whose static task `job` (every minute) counts runs.
    async fn counting_node(
        registry: impl dcron::Registry,
        id: &str,
        runs: &Arc<AtomicUsize>,
    ) -> dcron::Result<Dcron> {
        let node = Dcron::builder(registry)
            .node_id(id)
            .clock(TokioClock::starting_at(START_MS))
            .node_ttl(Duration::from_secs(3))
            .heartbeat(Duration::from_millis(500))
            .build()?;
        let counter = runs.clone();
        node.add_func("job", "0 * * * * *", move |_ctx: TaskContext| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .await?;
        Ok(node)
    }

    /// An hour of a once-a-minute task, in a paused clock: 60 runs, in
    /// milliseconds of real time.
    #[tokio::test(start_paused = true)]
    async fn an_hour_of_schedule_without_waiting() {
        let runs = Arc::new(AtomicUsize::new(0));
        let node = counting_node(MemoryRegistry::new(), "n1", &runs)
            .await
            .expect("node");
        node.start().await.expect("start");
        tokio::time::sleep(Duration::from_secs(3600) + Duration::from_millis(500)).await;
        node.stop().await.expect("stop");
        assert_eq!(runs.load(Ordering::SeqCst), 60);
    }

    /// Two nodes share a task: it runs once per fire time in the cluster,
    /// and keeps running when the node running it crashes.
    #[tokio::test(start_paused = true)]
    async fn once_per_fire_through_a_crash() {
        let registry = MemoryRegistry::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let a = counting_node(registry.clone(), "a", &runs)
            .await
            .expect("a");
        let b = counting_node(registry.clone(), "b", &runs)
            .await
            .expect("b");
        a.start().await.expect("start a");
        b.start().await.expect("start b");
        tokio::time::sleep(Duration::from_secs(5 * 60) + Duration::from_millis(500)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 5, "once per minute, not twice");
        // Crash whichever owns the task; the other takes over.
        let (owner, other) = if a.owned_tasks().contains(&"job".to_string()) {
            (a, b)
        } else {
            (b, a)
        };
        owner.kill().await;
        tokio::time::sleep(Duration::from_secs(5 * 60)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 10);
        other.stop().await.expect("stop");
    }

    /// A registry outage longer than the catch-up window: the fires in it
    /// are reported missed (never silently dropped), and firing resumes.
    #[tokio::test(start_paused = true)]
    async fn an_outage_is_reported_not_hidden() {
        let faulty = FaultRegistry::wrap(MemoryRegistry::new());
        // Only claims fail: the node stays registered, so no one else could
        // have run these fires either.
        faulty.claims_only(true);
        let runs = Arc::new(AtomicUsize::new(0));
        let node = counting_node(faulty.clone(), "n1", &runs)
            .await
            .expect("node");
        node.start().await.expect("start");
        tokio::time::sleep(Duration::from_secs(60) + Duration::from_millis(500)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        faulty.outage_for(Duration::from_secs(5 * 60));
        tokio::time::sleep(Duration::from_secs(6 * 60)).await;
        let ran = runs.load(Ordering::SeqCst);
        let missed = node.missed_fires();
        assert!(missed >= 3, "fires in the outage are reported: {missed}");
        assert_eq!(
            ran as u64 + missed,
            7,
            "each fire either ran or was reported"
        );
        node.stop().await.expect("stop");
    }
}
