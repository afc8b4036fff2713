//! A registry wrapper that injects faults into any backend, for tests.
//!
//! Wrap a real registry (or the memory registry) and make its calls slow,
//! stalled, failing, failing *after* they took effect (the answer was lost
//! on the way back), or failing for part of a claim batch. Nodes built on
//! the wrapper see exactly what they would see from a sick server.
//!
//! ```
//! use std::time::Duration;
//! use dcron::registry::FaultRegistry;
//! use dcron::MemoryRegistry;
//!
//! let registry = FaultRegistry::wrap(MemoryRegistry::new());
//! registry.claims_only(true);
//! registry.lose_next_answers(1); // the next claim is stored, its answer lost
//! registry.stall_for(Duration::from_secs(5)); // calls wait 5 s, then go through
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Claim, ClaimOutcome, Registry, Timing, WatchReceiver};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::task::TaskMeta;

/// A [`Registry`] that forwards to another one, with injected faults.
///
/// Clones share the faults and the wrapped registry. Times are tokio time,
/// so a test with a paused clock controls them.
#[derive(Clone)]
pub struct FaultRegistry {
    inner: Arc<dyn Registry>,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    faults: Mutex<Faults>,
    injected: AtomicU64,
}

#[derive(Default)]
struct Faults {
    claims_only: bool,
    delay: Duration,
    stall_until: Option<Instant>,
    down_until: Option<Instant>,
    fail_next: usize,
    lose_next: usize,
    split_next: usize,
}

/// What happens to one call.
enum Plan {
    Pass,
    FailBefore,
    FailAfter,
}

impl FaultRegistry {
    /// Wraps `inner`; no fault is active until one is set.
    pub fn wrap(inner: impl Registry) -> FaultRegistry {
        FaultRegistry::wrap_shared(Arc::new(inner))
    }

    /// Wraps a shared registry handle.
    pub fn wrap_shared(inner: Arc<dyn Registry>) -> FaultRegistry {
        FaultRegistry {
            inner,
            shared: Arc::default(),
        }
    }

    /// The wrapped registry.
    pub fn inner(&self) -> &Arc<dyn Registry> {
        &self.inner
    }

    fn faults(&self) -> MutexGuard<'_, Faults> {
        self.shared.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// With `true`, faults hit only `claim` and `claim_many` (liveness and
    /// the feed stay healthy), so a test isolates the fire pipeline.
    pub fn claims_only(&self, on: bool) {
        self.faults().claims_only = on;
    }

    /// Every call waits `delay` before going through (a slow registry).
    pub fn delay_calls(&self, delay: Duration) {
        self.faults().delay = delay;
    }

    /// Calls made during the next `d` hang until `d` has passed, then go
    /// through (a stalled server, a leader election).
    pub fn stall_for(&self, d: Duration) {
        self.faults().stall_until = Some(Instant::now() + d);
    }

    /// Calls made during the next `d` fail at once without effect (an
    /// unreachable server).
    pub fn outage_for(&self, d: Duration) {
        self.faults().down_until = Some(Instant::now() + d);
    }

    /// The next `n` calls fail without effect.
    pub fn fail_next(&self, n: usize) {
        self.faults().fail_next = n;
    }

    /// The next `n` calls take effect, then fail (the answer was lost).
    pub fn lose_next_answers(&self, n: usize) {
        self.faults().lose_next = n;
    }

    /// The next `n` claim batches fail in part: of every three claims the
    /// first is answered, the second fails without effect and the third
    /// takes effect with its answer lost.
    pub fn split_next_batches(&self, n: usize) {
        self.faults().split_next = n;
    }

    /// Ends every fault.
    pub fn heal(&self) {
        let mut f = self.faults();
        let claims_only = f.claims_only;
        *f = Faults {
            claims_only,
            ..Faults::default()
        };
    }

    /// How many calls (or claims of a batch) a fault has hit so far.
    pub fn injected(&self) -> u64 {
        self.shared.injected.load(Ordering::SeqCst)
    }

    fn hit(&self) {
        self.shared.injected.fetch_add(1, Ordering::SeqCst);
    }

    fn injected_error(what: &str) -> Error {
        Error::registry_msg("fault", format!("injected fault: {what}"))
    }

    /// Applies delay, stall and outage, then picks what happens to the call.
    async fn before(&self, claim: bool) -> Result<Plan> {
        let (delay, stall, down) = {
            let f = self.faults();
            if f.claims_only && !claim {
                return Ok(Plan::Pass);
            }
            (f.delay, f.stall_until, f.down_until)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(until) = stall.filter(|u| *u > Instant::now()) {
            self.hit();
            tokio::time::sleep_until(until).await;
        }
        if down.is_some_and(|u| u > Instant::now()) {
            self.hit();
            return Err(Self::injected_error("registry unreachable"));
        }
        let mut f = self.faults();
        if f.fail_next > 0 {
            f.fail_next -= 1;
            drop(f);
            self.hit();
            return Ok(Plan::FailBefore);
        }
        if f.lose_next > 0 {
            f.lose_next -= 1;
            drop(f);
            self.hit();
            return Ok(Plan::FailAfter);
        }
        Ok(Plan::Pass)
    }

    /// Runs one call under the faults.
    async fn call<T>(
        &self,
        claim: bool,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match self.before(claim).await? {
            Plan::Pass => fut.await,
            Plan::FailBefore => Err(Self::injected_error("call failed")),
            Plan::FailAfter => {
                let _ = fut.await;
                Err(Self::injected_error("answer lost"))
            }
        }
    }

    fn take_split(&self) -> bool {
        let mut f = self.faults();
        if f.split_next > 0 {
            f.split_next -= 1;
            true
        } else {
            false
        }
    }
}

#[async_trait]
impl Registry for FaultRegistry {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn timing(&self) -> Timing {
        self.inner.timing()
    }

    async fn register(&self, ns: &str, node: &Node, ttl: Duration) -> Result<()> {
        self.call(false, self.inner.register(ns, node, ttl)).await
    }

    async fn heartbeat(&self, ns: &str, node_id: &str, ttl: Duration) -> Result<bool> {
        self.call(false, self.inner.heartbeat(ns, node_id, ttl))
            .await
    }

    async fn update_node(&self, ns: &str, node: &Node) -> Result<bool> {
        self.call(false, self.inner.update_node(ns, node)).await
    }

    async fn unregister(&self, ns: &str, node_id: &str) -> Result<()> {
        self.call(false, self.inner.unregister(ns, node_id)).await
    }

    async fn nodes(&self, ns: &str) -> Result<Vec<Node>> {
        self.call(false, self.inner.nodes(ns)).await
    }

    async fn put_task(&self, ns: &str, meta: &TaskMeta, overwrite: bool) -> Result<()> {
        self.call(false, self.inner.put_task(ns, meta, overwrite))
            .await
    }

    async fn delete_task(&self, ns: &str, name: &str) -> Result<()> {
        self.call(false, self.inner.delete_task(ns, name)).await
    }

    async fn tasks(&self, ns: &str) -> Result<Vec<TaskMeta>> {
        self.call(false, self.inner.tasks(ns)).await
    }

    async fn put_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        self.call(false, self.inner.put_tombstone(ns, name)).await
    }

    async fn delete_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        self.call(false, self.inner.delete_tombstone(ns, name))
            .await
    }

    async fn tombstones(&self, ns: &str) -> Result<Vec<String>> {
        self.call(false, self.inner.tombstones(ns)).await
    }

    async fn claim(&self, ns: &str, task: &str, claim: &Claim) -> Result<bool> {
        self.call(true, self.inner.claim(ns, task, claim)).await
    }

    async fn claim_many(&self, ns: &str, tasks: &[&str], claim: &Claim) -> Vec<ClaimOutcome> {
        let plan = match self.before(true).await {
            Ok(plan) => plan,
            Err(err) => return ClaimOutcome::fail_all(tasks.len(), err),
        };
        match plan {
            Plan::FailBefore => {
                return ClaimOutcome::fail_all(tasks.len(), Self::injected_error("call failed"))
            }
            Plan::FailAfter => {
                let _ = self.inner.claim_many(ns, tasks, claim).await;
                return ClaimOutcome::fail_all(tasks.len(), Self::injected_error("answer lost"));
            }
            Plan::Pass => {}
        }
        if !self.take_split() {
            return self.inner.claim_many(ns, tasks, claim).await;
        }
        // Send the first and third of every three; drop the second.
        let sent: Vec<&str> = tasks
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 1)
            .map(|(_, t)| *t)
            .collect();
        let mut answers = self.inner.claim_many(ns, &sent, claim).await.into_iter();
        let mut out = Vec::with_capacity(tasks.len());
        for i in 0..tasks.len() {
            match i % 3 {
                0 => out.push(answers.next().unwrap_or_else(|| {
                    ClaimOutcome::Failed(Self::injected_error("missing answer"))
                })),
                1 => {
                    self.hit();
                    out.push(ClaimOutcome::Failed(Self::injected_error("call failed")));
                }
                _ => {
                    let _ = answers.next();
                    self.hit();
                    out.push(ClaimOutcome::Failed(Self::injected_error("answer lost")));
                }
            }
        }
        out
    }

    async fn claims(&self, ns: &str) -> Result<Vec<(String, Claim)>> {
        self.call(false, self.inner.claims(ns)).await
    }

    async fn delete_claim(&self, ns: &str, task: &str) -> Result<()> {
        self.call(false, self.inner.delete_claim(ns, task)).await
    }

    async fn clear(&self, ns: &str) -> Result<()> {
        self.call(false, self.inner.clear(ns)).await
    }

    async fn watch(&self, ns: &str) -> Result<WatchReceiver> {
        self.call(false, self.inner.watch(ns)).await
    }
}
