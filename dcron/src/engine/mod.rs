//! The engine: fires the tasks this node owns. The pipeline, one module a
//! stage: the timer queue ([`queue`]) takes due fires a little ahead of
//! their time and hands them to the claimer ([`claimer`]), which claims
//! them in the registry in batches per fire time (off the timer, so a slow
//! registry never stops the queue); only the won fires run ([`dispatch`]),
//! and tasks with one-shot or after-run flags get their registry writes
//! around the run ([`after_run`]).
//!
//! No fire is dropped silently: a fire whose claim fails is retried, in
//! fire-time order per task, until the claim is answered or the fire
//! leaves the late window; then it is reported as missed ([`missed`],
//! [`Error::FireMissed`]).

mod after_run;
mod claimer;
mod dispatch;
mod missed;
mod policy;
mod queue;
mod state;
#[cfg(test)]
mod test_support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio::sync::Notify;

use crate::admin::Admin;
use crate::clock::Clock;
use crate::error::Error;
use crate::registry::Registry;
use crate::schedule::Schedule;
use crate::task::{Task, TaskMeta};

pub use policy::{CatchUp, Overlap};
use state::{Fire, State};

/// Called with every failed or panicked run.
pub type ErrorHandler = Arc<dyn Fn(&TaskMeta, &Error) + Send + Sync>;

/// A task this node owns, as the node hands it to the engine.
#[derive(Clone)]
pub(crate) struct Job {
    pub meta: Arc<TaskMeta>,
    pub schedule: Arc<Schedule>,
    pub body: Arc<dyn Task>,
}

pub(crate) struct EngineConfig {
    pub registry: Arc<dyn Registry>,
    pub ns: String,
    pub node_id: String,
    pub clock: Arc<dyn Clock>,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    pub error_handler: Option<ErrorHandler>,
}

/// The fire queue and the runs in flight.
pub(crate) struct Engine {
    cfg: EngineConfig,
    /// The registry writes around runs of flagged tasks.
    admin: Admin,
    state: Mutex<State>,
    /// Wakes the timer: jobs changed, a catch-up was queued, or it stopped.
    wake: Notify,
    /// Runs in flight, and claimed fires waiting for their time or for a
    /// previous run (what `drain` waits for).
    running: AtomicUsize,
    idle: Notify,
    /// Recent cost of one claim in a batch, nanoseconds (moving average).
    claim_ns: AtomicU64,
    /// Wakes the claimer: claims queued, or the engine stopped.
    claim_wake: Notify,
    /// This incarnation's claim token (set at each start).
    token: Mutex<Arc<str>>,
    /// Fires reported missed since the engine was built.
    missed: AtomicU64,
}

/// The late window is at least this long, even with `CatchUp::Skip`.
const MIN_LATE_WINDOW_MS: i64 = 5_000;
/// Fires handled per step of a batch (claims per registry call at most).
const CHUNK: usize = 2048;

impl Engine {
    pub fn new(cfg: EngineConfig) -> Arc<Engine> {
        let admin = Admin::unchecked(cfg.registry.clone(), cfg.ns.clone());
        Arc::new(Engine {
            cfg,
            admin,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            running: AtomicUsize::new(0),
            idle: Notify::new(),
            claim_ns: AtomicU64::new(1_000),
            claim_wake: Notify::new(),
            token: Mutex::new(Arc::from("")),
            missed: AtomicU64::new(0),
        })
    }

    /// Fires reported missed so far (for metrics).
    pub fn missed(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }

    /// How late a fire may still be claimed and run: the catch-up window,
    /// at least [`MIN_LATE_WINDOW_MS`].
    fn late_window_ms(&self) -> i64 {
        self.cfg.catch_up.window_ms().max(MIN_LATE_WINDOW_MS)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent between
        // statements that can panic, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Names of the tasks currently scheduled here.
    pub fn owned(&self) -> Vec<String> {
        let st = self.lock();
        let mut names: Vec<String> = st.index.keys().map(|n| n.0.name.clone()).collect();
        names.sort();
        names
    }

    /// Makes the engine schedule exactly `jobs` (by name): new ones are
    /// queued from now, changed ones are replaced, missing ones dropped.
    /// Returns the names and schedules of the jobs not scheduled before.
    pub fn set_jobs(&self, jobs: Vec<Job>) -> Vec<(String, Arc<Schedule>)> {
        let now = self.cfg.clock.now_ms();
        let mut st = self.lock();
        let wanted: FxHashMap<&str, &Job> =
            jobs.iter().map(|j| (j.meta.name.as_str(), j)).collect();
        let stale: Vec<String> = st
            .index
            .iter()
            .filter(|(name, &slot)| {
                match (wanted.get(name.0.name.as_str()), &st.slots[slot as usize]) {
                    (Some(job), Some(entry)) => !entry.same_as(job),
                    _ => true,
                }
            })
            .map(|(name, _)| name.0.name.clone())
            .collect();
        drop(wanted);
        for name in &stale {
            st.remove(name);
        }
        let horizon = now - 2 * self.late_window_ms();
        st.recent_won.retain(|_, won| *won >= horizon);
        let mut added = Vec::new();
        let mut next_cache: FxHashMap<usize, Option<i64>> = FxHashMap::default();
        for job in jobs {
            if st.index.contains_key(job.meta.name.as_str()) {
                continue;
            }
            let next = *next_cache
                .entry(Arc::as_ptr(&job.schedule) as *const () as usize)
                .or_insert_with(|| job.schedule.next_after(now));
            added.push((job.meta.name.clone(), job.schedule.clone()));
            st.insert(job, next);
        }
        drop(st);
        self.wake.notify_one();
        added
    }

    /// Queues an extra, immediate fire of `name` at the past `fire_time`.
    pub fn catch_up(&self, name: &str, fire_time: i64) {
        let now = self.cfg.clock.now_ms();
        let mut st = self.lock();
        let Some(&slot) = st.index.get(name) else {
            return;
        };
        let Some(entry) = &st.slots[slot as usize] else {
            return;
        };
        let fire = Fire {
            slot,
            generation: entry.generation,
            fire_time,
            regular: false,
            attempt: 0,
        };
        st.queue.entry(now).or_default().push(fire);
        drop(st);
        self.wake.notify_one();
    }

    /// Stops firing; runs in flight continue. Fires still waiting for
    /// their claim are left to the next owner (its catch-up applies).
    pub fn stop(&self) {
        let unclaimed: usize = {
            let mut st = self.lock();
            st.stopped = true;
            let n = st.claims.values().map(Vec::len).sum();
            st.claims.clear();
            n
        };
        if unclaimed > 0 {
            tracing::warn!(
                unclaimed,
                "stopping with fires still waiting for their claim; the next owner's catch-up applies"
            );
        }
        self.wake.notify_one();
        self.claim_wake.notify_one();
    }

    /// Clears the queue (after `stop`), so a later start begins afresh.
    pub fn reset(&self) {
        let mut st = self.lock();
        let deferred: usize = st.deferred.values().map(|(_, q)| q.len()).sum();
        *st = State::default();
        drop(st);
        if deferred > 0 {
            tracing::warn!(
                deferred,
                "reset with claimed fires still waiting for a previous run; they are dropped"
            );
            self.running.fetch_sub(deferred, Ordering::SeqCst);
        }
    }

    /// Allows firing again after `stop`, claiming under `token` (node id
    /// plus this start's incarnation).
    pub fn resume(&self, token: &str) {
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Arc::from(token);
        self.lock().stopped = false;
    }

    fn token(&self) -> Arc<str> {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs in flight on this node.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Waits until no run is in flight, at most `limit`. Returns whether it
    /// drained.
    pub async fn drain(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let idle = self.idle.notified();
            if self.running() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.running() == 0;
            }
        }
    }

    /// The timer loop (and the claimer it starts). Ends after `stop`.
    ///
    /// A batch is taken out of the queue a little before its fire time (the
    /// claim lead, sized from how long recent claims took) and handed to
    /// the claimer; won fires run at their fire time, so claims don't delay
    /// the runs. The timer never waits for the registry.
    pub async fn run(self: Arc<Self>) {
        let claimer = tokio::spawn(self.clone().claim_loop());
        self.timer_loop().await;
        self.claim_wake.notify_one();
        let _ = claimer.await;
    }
}
