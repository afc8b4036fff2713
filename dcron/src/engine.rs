//! The timer: one loop over a queue of next fire times for the tasks this
//! node owns. Due fires go to the claimer, which claims them in the
//! registry in batches per fire time (off the timer, so a slow registry
//! never stops the queue), and only the won fires run.
//!
//! No fire is dropped silently: a fire whose claim fails is retried, in
//! fire-time order per task, until the claim is answered or the fire
//! leaves the late window; then it is reported as missed
//! ([`Error::FireMissed`]).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::clock::{rfc3339, Clock};
use crate::error::{Error, MissReason};
use crate::registry::{Claim, ClaimOutcome, Registry};
use crate::schedule::Schedule;
use crate::task::{Task, TaskContext, TaskMeta, TaskResult};

/// What to do with a fire that comes while the previous run of the same
/// task still runs on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Skip the new fire while the previous run, started on time, still
    /// goes (nobody runs it); the skip is reported as a missed fire
    /// ([`MissReason::Overlap`]). A fire that finds a *late* run still going
    /// (its claim was slow) waits for it and runs right after it, in order:
    /// a registry stall never turns into skipped fires.
    #[default]
    Skip,
    /// Run it anyway, concurrently.
    Allow,
}

/// What a node does about fires missed while nobody owned a task (a crash,
/// a rebalance, a restart, a registry outage that expired registrations).
/// Only tasks that ran before (have a claim watermark) are caught up: a fire
/// before a task existed is not "missed".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Forget missed fires.
    Skip,
    /// Run the most recent missed fire if it is at most `window` old and
    /// newer than the task's claim watermark.
    RunLatest {
        /// How old a missed fire may be.
        window: Duration,
    },
    /// Run every fire newer than the task's claim watermark and at most
    /// `window` old, oldest first (at most [`CatchUp::MAX_FIRES`] per task,
    /// the most recent ones). Fires that another node still had in flight
    /// (a rebalance during a registry outage) are claimed by whoever comes
    /// first, so none is lost and none runs twice.
    RunAll {
        /// How old a missed fire may be.
        window: Duration,
    },
}

impl Default for CatchUp {
    fn default() -> Self {
        CatchUp::RunAll {
            window: Duration::from_secs(60),
        }
    }
}

impl CatchUp {
    /// Most fires [`CatchUp::RunAll`] runs for one task at a takeover.
    pub const MAX_FIRES: usize = 100;

    pub(crate) fn window_ms(self) -> i64 {
        match self {
            CatchUp::Skip => 0,
            CatchUp::RunLatest { window } | CatchUp::RunAll { window } => {
                i64::try_from(window.as_millis()).unwrap_or(i64::MAX)
            }
        }
    }

    /// The fire times to catch up for a task whose watermark is
    /// `watermark`, at `now`, oldest first.
    pub(crate) fn missed(self, schedule: &Schedule, watermark: i64, now: i64) -> Vec<i64> {
        let floor = now.saturating_sub(self.window_ms());
        match self {
            CatchUp::Skip => Vec::new(),
            CatchUp::RunLatest { .. } => schedule
                .latest_at_or_before(now)
                .filter(|t| *t > watermark && *t >= floor)
                .into_iter()
                .collect(),
            CatchUp::RunAll { .. } => {
                let mut fires = VecDeque::new();
                let mut at = watermark.max(floor.saturating_sub(1));
                while let Some(t) = schedule.next_after(at).filter(|t| *t <= now) {
                    if fires.len() == Self::MAX_FIRES {
                        fires.pop_front();
                    }
                    fires.push_back(t);
                    at = t;
                }
                fires.into()
            }
        }
    }
}

/// Called with every failed or panicked run.
pub type ErrorHandler = Arc<dyn Fn(&TaskMeta, &Error) + Send + Sync>;

/// A task this node owns, as the node hands it to the engine.
#[derive(Clone)]
pub(crate) struct Job {
    pub meta: Arc<TaskMeta>,
    pub schedule: Arc<Schedule>,
    pub body: Arc<dyn Task>,
}

impl Entry {
    /// Whether the entry already runs `job` as given.
    fn same_as(&self, job: &Job) -> bool {
        Arc::ptr_eq(&self.schedule, &job.schedule)
            && Arc::ptr_eq(&self.runnable.body, &job.body)
            && (Arc::ptr_eq(&self.runnable.meta, &job.meta) || self.runnable.meta == job.meta)
    }
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
    state: Mutex<State>,
    wake: Notify,
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

#[derive(Default)]
struct State {
    slots: Vec<Option<Entry>>,
    free: Vec<u32>,
    index: FxHashMap<Name, u32>,
    /// Due time (epoch ms) → fires due then.
    queue: BTreeMap<i64, Vec<Fire>>,
    /// The buffer of the last batch, reused for the next new bucket.
    spare: Vec<Fire>,
    /// Fires waiting for their claim, by fire time: the claimer always
    /// takes the oldest first, so a task's older fire is claimed before
    /// any newer one (a retry goes back to its own fire time).
    claims: BTreeMap<i64, Vec<Pending>>,
    /// After a failed claim call the claimer pauses until then (epoch ms).
    claim_retry_at: i64,
    /// Failed claim calls in a row (backoff).
    claim_failures: u32,
    /// Claimed fires waiting for the previous run of the same task
    /// (`Overlap::Skip` after a late claim), by runnable.
    deferred: FxHashMap<usize, (Arc<Runnable>, VecDeque<i64>)>,
    /// The latest won fire time of tasks that left this node recently (a
    /// task coming back must not run a fire it already ran here).
    recent_won: FxHashMap<String, i64>,
    generation: u64,
    stopped: bool,
}

struct Entry {
    schedule: Arc<Schedule>,
    generation: u64,
    runnable: Arc<Runnable>,
}

/// What a due fire needs outside the lock: one reference-count bump.
struct Runnable {
    meta: Arc<TaskMeta>,
    body: Arc<dyn Task>,
    /// `meta` has one-shot or after-run flags (kept here so the common
    /// path reads one cache line less).
    flagged: bool,
    /// Runs of this task in flight on this node (for the overlap policy).
    running: AtomicUsize,
    /// Claimed fires of this task wait in `State::deferred`.
    deferred: std::sync::atomic::AtomicBool,
    /// The latest fire time this node won for the task: claims are
    /// idempotent per incarnation, so a second path to the same fire (a
    /// catch-up racing the regular fire) must not run it again.
    last_won: AtomicI64,
    /// The latest run started late (after a slow claim): a fire that finds
    /// it still going waits for it instead of being skipped.
    started_late: std::sync::atomic::AtomicBool,
}

/// A fire waiting for its claim.
struct Pending {
    fire: Fire,
    runnable: Arc<Runnable>,
}

/// Index key: the task name, borrowed from the entry's definition.
#[derive(Clone)]
struct Name(Arc<TaskMeta>);

impl std::hash::Hash for Name {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name.hash(state)
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for Name {}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0.name
    }
}

#[derive(Clone, Copy)]
struct Fire {
    slot: u32,
    generation: u64,
    fire_time: i64,
    /// Regular fires schedule the next one; catch-ups and retries don't.
    regular: bool,
    attempt: u8,
}

/// Longest pause between claim retries after registry errors.
const MAX_RETRY_PAUSE_MS: i64 = 800;
/// Pause before retrying the failed part of a call that was partly answered.
const PARTIAL_RETRY_PAUSE_MS: i64 = 50;
/// Fires handled per step of a batch (claims per registry call at most).
const CHUNK: usize = 2048;
/// Claim calls of one fire time in flight at once.
const MAX_CLAIMS_IN_FLIGHT: usize = 4;
/// A claim call not answered within its deadline is treated as failed and
/// retried (safe: claims are idempotent), so a registry that hangs during an
/// election does not hold fires for a full client timeout. The deadline is
/// four times what the call should take, between these bounds, and grows
/// with failures in a row (a registry that is merely slow gets time).
const CLAIM_DEADLINE_MIN: Duration = Duration::from_millis(1_000);
const CLAIM_DEADLINE_MAX: Duration = Duration::from_secs(5);
/// Longest claim lead: claims are never taken further ahead than this.
const MAX_LEAD_MS: i64 = 200;
/// A run starting later than this after its fire time is "late": a fire
/// finding it still going waits for it under `Overlap::Skip`.
const LATE_RUN_MS: i64 = 250;
/// Fires late by more than this are logged (WARN) when they run.
const LATE_LOG_MS: i64 = 1_000;
/// The late window is at least this long, even with `CatchUp::Skip`.
const MIN_LATE_WINDOW_MS: i64 = 5_000;
/// Missed fires logged one by one per batch; the rest are counted.
const MISSED_LOG_LINES: usize = 20;

impl Engine {
    pub fn new(cfg: EngineConfig) -> Arc<Engine> {
        Arc::new(Engine {
            cfg,
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

    async fn timer_loop(&self) {
        loop {
            let now = self.cfg.clock.now_ms();
            let (batch, wait) = {
                let mut st = self.lock();
                if st.stopped {
                    return;
                }
                let lead = st
                    .queue
                    .first_key_value()
                    .map_or(0, |(_, f)| self.lead_ms(f.len()));
                st.take_due(now, lead)
            };
            if batch.is_empty() {
                let notified = self.wake.notified();
                match wait {
                    Some(ms) => {
                        let pause = Duration::from_millis(u64::try_from(ms).unwrap_or(0).max(1));
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = notified => {}
                        }
                    }
                    None => notified.await,
                }
                continue;
            }
            self.queue_claims(batch, now);
        }
    }

    /// How long before its fire time a batch of `len` fires is claimed:
    /// half again what claiming that many took recently, at most
    /// [`MAX_LEAD_MS`].
    fn lead_ms(&self, len: usize) -> i64 {
        let ns = self
            .claim_ns
            .load(Ordering::Relaxed)
            .saturating_mul(len as u64);
        let ms = i64::try_from(ns.saturating_mul(3) / 2 / 1_000_000).unwrap_or(MAX_LEAD_MS);
        (ms + 1).min(MAX_LEAD_MS)
    }

    /// Moves the fires of `batch` to the claimer's queue (in chunks, so
    /// the lock is never held for long), scheduling each task's next fire.
    fn queue_claims(&self, mut batch: Vec<Fire>, now: i64) {
        batch.sort_by_key(|f| f.fire_time);
        let mut missed = Vec::new();
        for chunk in batch.chunks(CHUNK) {
            self.take_chunk(chunk, now, &mut missed);
        }
        batch.clear();
        self.lock().spare = batch;
        self.claim_wake.notify_one();
        for (runnable, fire_time, reason) in missed {
            self.report_missed(&runnable.meta, fire_time, reason);
        }
    }

    /// Under the lock: schedules the next fire of each regular fire of
    /// `chunk`, drops stale ones, skips overlapping ones (into `missed`),
    /// and queues the rest for claiming.
    fn take_chunk(
        &self,
        chunk: &[Fire],
        now: i64,
        missed: &mut Vec<(Arc<Runnable>, i64, MissReason)>,
    ) {
        let floor = now - self.late_window_ms();
        let mut st = self.lock();
        let mut next_cache: FxHashMap<(usize, i64), Option<i64>> = FxHashMap::default();
        for &fire in chunk {
            let Some(entry) = st.live(fire) else { continue };
            let runnable = entry.runnable.clone();
            if fire.regular {
                let schedule = entry.schedule.clone();
                // Normally the next fire follows this one. A node that did
                // not run for longer than the late window (paused, clock
                // jump) resumes at the window's start; this fire is
                // reported below, the ones in the gap with it.
                let from = fire.fire_time.max(floor);
                let key = (Arc::as_ptr(&schedule) as *const () as usize, from);
                let next = *next_cache
                    .entry(key)
                    .or_insert_with(|| schedule.next_after(from));
                if let Some(next) = next {
                    let next_fire = Fire {
                        fire_time: next,
                        attempt: 0,
                        ..fire
                    };
                    st.push_next(next, next_fire);
                }
            }
            if fire.fire_time < floor {
                missed.push((runnable, fire.fire_time, MissReason::NodeStalled));
                continue;
            }
            st.claims
                .entry(fire.fire_time)
                .or_default()
                .push(Pending { fire, runnable });
        }
    }

    /// The claimer: takes the oldest fire time's pending fires, claims them
    /// in chunks (several in flight, all of that one fire time, so no two
    /// claims of one task ever race), and moves on to the next fire time
    /// only when every claim of this one is answered or requeued.
    async fn claim_loop(self: Arc<Self>) {
        let mut in_flight: JoinSet<()> = JoinSet::new();
        let mut current: Option<i64> = None;
        loop {
            let woken = self.claim_wake.notified();
            let now = self.cfg.clock.now_ms();
            let (took, wait, expired) = {
                let mut st = self.lock();
                if st.stopped {
                    break;
                }
                let expired = st.expire_claims(now - self.late_window_ms());
                let mut took = Vec::new();
                let mut wait = None;
                if now < st.claim_retry_at {
                    wait = Some(st.claim_retry_at - now);
                } else {
                    while in_flight.len() + took.len() < MAX_CLAIMS_IN_FLIGHT {
                        match st.take_claims(current) {
                            Some((fire_time, group)) => {
                                current = Some(fire_time);
                                took.push((fire_time, group));
                            }
                            None => break,
                        }
                    }
                }
                (took, wait, expired)
            };
            self.report_expired(expired);
            for (fire_time, group) in took {
                let engine = self.clone();
                let busy = Busy::new(self.clone());
                in_flight.spawn(async move {
                    engine.claim_group(fire_time, group).await;
                    drop(busy);
                });
            }
            let pause = wait.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0).max(1)));
            tokio::select! {
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if in_flight.is_empty() {
                        current = None;
                    }
                }
                _ = woken => {}
                _ = sleep_opt(pause) => {}
            }
        }
        // Stopped: claims in flight finish (their won fires still run).
        while in_flight.join_next().await.is_some() {}
    }

    /// Claims one chunk of one fire time and handles each outcome: won
    /// fires run (at their fire time), lost ones are dropped, failed ones
    /// go back to the queue at their fire time for a retry.
    async fn claim_group(self: &Arc<Self>, fire_time: i64, group: Vec<Pending>) {
        let group = self.still_owned(group);
        if group.is_empty() {
            return;
        }
        let now = self.cfg.clock.now_ms();
        let token = self.token();
        let claim = Claim::new(fire_time, &self.cfg.node_id, &token, now);
        let names: Vec<&str> = group
            .iter()
            .map(|p| p.runnable.meta.name.as_str())
            .collect();
        let started = std::time::Instant::now();
        let call = self.cfg.registry.claim_many(&self.cfg.ns, &names, &claim);
        let deadline = self.claim_deadline(names.len());
        let outcomes = match tokio::time::timeout(deadline, call).await {
            Ok(outcomes) => outcomes,
            Err(_) => ClaimOutcome::fail_all(
                names.len(),
                Error::Timeout {
                    what: "claiming fires".into(),
                    after: deadline,
                },
            ),
        };
        drop(names);
        let mut won = Vec::new();
        let mut failed = Vec::new();
        let mut last_err = None;
        let total = group.len();
        let mut outcomes = outcomes.into_iter();
        for pending in group {
            match outcomes.next() {
                Some(ClaimOutcome::Won) => {
                    let before = pending
                        .runnable
                        .last_won
                        .fetch_max(fire_time, Ordering::SeqCst);
                    if before < fire_time {
                        won.push(pending.runnable);
                    } else {
                        tracing::debug!(task = %pending.runnable.meta.name, fire_time = %rfc3339(fire_time), "fire already won here; not running it again");
                    }
                }
                Some(ClaimOutcome::Lost) => {}
                Some(ClaimOutcome::Failed(err)) => {
                    last_err = Some(err);
                    failed.push(pending);
                }
                None => {
                    last_err = Some(Error::registry_msg(
                        self.cfg.registry.backend(),
                        "claim batch answered too few outcomes",
                    ));
                    failed.push(pending);
                }
            }
        }
        if failed.is_empty() {
            self.learn_claim_cost(started.elapsed(), total);
        }
        let answered = total - failed.len();
        self.settle_claims(fire_time, failed, answered, last_err);
        if won.is_empty() {
            return;
        }
        let early = fire_time - self.cfg.clock.now_ms();
        if early > 0 {
            let engine = self.clone();
            let busy = Busy::new(self.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(early as u64)).await;
                engine.dispatch_all(fire_time, &won);
                drop(busy);
            });
        } else {
            self.dispatch_all(fire_time, &won);
        }
    }

    /// Keeps the pending fires of tasks still scheduled here, moved to the
    /// task's current entry if it was replaced meanwhile (a changed
    /// definition, or the task left and came back during a rebalance), so a
    /// backlog survives; fires of tasks that left this node are dropped (the
    /// new owner's catch-up applies) with a WARN count.
    fn still_owned(&self, group: Vec<Pending>) -> Vec<Pending> {
        let before = group.len();
        let st = self.lock();
        let kept: Vec<Pending> = group
            .into_iter()
            .filter_map(|p| {
                if st.live(p.fire).is_some() {
                    return Some(p);
                }
                let slot = *st.index.get(p.runnable.meta.name.as_str())?;
                let entry = st.slots.get(slot as usize)?.as_ref()?;
                Some(Pending {
                    fire: Fire {
                        slot,
                        generation: entry.generation,
                        ..p.fire
                    },
                    runnable: entry.runnable.clone(),
                })
            })
            .collect();
        drop(st);
        let dropped = before - kept.len();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "fires of tasks that left this node dropped before their claim; the new owner's catch-up applies"
            );
        }
        kept
    }

    /// Requeues failed claims (with backoff for the claimer), or resets the
    /// backoff after a fully answered call.
    fn settle_claims(
        &self,
        fire_time: i64,
        failed: Vec<Pending>,
        answered: usize,
        err: Option<Error>,
    ) {
        let now = self.cfg.clock.now_ms();
        let mut st = self.lock();
        if failed.is_empty() {
            st.claim_failures = 0;
            return;
        }
        // A registry that answered part of the call is up: retry soon. One
        // that answered nothing backs off (no busy loop during an outage).
        let pause = if answered > 0 {
            PARTIAL_RETRY_PAUSE_MS
        } else {
            st.claim_failures = st.claim_failures.saturating_add(1);
            (50_i64 << st.claim_failures.min(5)).min(MAX_RETRY_PAUSE_MS)
        };
        st.claim_retry_at = st.claim_retry_at.max(now + pause);
        let retried = failed.len();
        let queue = st.claims.entry(fire_time).or_default();
        queue.extend(failed.into_iter().map(|mut p| {
            p.fire.attempt = p.fire.attempt.saturating_add(1);
            p
        }));
        let failures = st.claim_failures;
        drop(st);
        let err = err.map(|e| e.to_string()).unwrap_or_default();
        if failures <= 1 {
            tracing::warn!(%err, retried, fire_time = %rfc3339(fire_time), "claim failed; retrying in fire-time order");
        } else {
            tracing::debug!(%err, retried, failures, "claim failed again; retrying");
        }
    }

    /// Runs the won fires of one fire time; logs them if they are late.
    fn dispatch_all(self: &Arc<Self>, fire_time: i64, won: &[Arc<Runnable>]) {
        let late = self.cfg.clock.now_ms() - fire_time;
        if late > LATE_LOG_MS {
            tracing::warn!(
                fires = won.len(),
                fire_time = %rfc3339(fire_time),
                late_ms = late,
                "fires running late (the registry was slow to answer their claims)"
            );
        }
        let late = late > LATE_RUN_MS;
        for runnable in won {
            self.dispatch(runnable, fire_time, late);
        }
    }

    /// Reports fires that left the late window before their claim was
    /// answered.
    fn report_expired(&self, expired: Vec<Pending>) {
        if expired.is_empty() {
            return;
        }
        let total = expired.len();
        for (i, p) in expired.into_iter().enumerate() {
            self.missed_one(
                &p.runnable.meta,
                p.fire.fire_time,
                MissReason::ClaimFailed,
                i < MISSED_LOG_LINES,
            );
        }
        if total > MISSED_LOG_LINES {
            tracing::error!(
                missed = total,
                "fires missed: the registry did not take their claims within the late window"
            );
        }
    }

    /// Reports one missed fire: ERROR log, error handler, counter.
    fn report_missed(&self, meta: &TaskMeta, fire_time: i64, reason: MissReason) {
        self.missed_one(meta, fire_time, reason, true);
    }

    fn missed_one(&self, meta: &TaskMeta, fire_time: i64, reason: MissReason, log: bool) {
        self.missed.fetch_add(1, Ordering::Relaxed);
        if log {
            tracing::error!(task = %meta.name, fire_time = %rfc3339(fire_time), fire_time_ms = fire_time, %reason, "fire missed");
        }
        let err = Error::FireMissed {
            task: meta.name.clone(),
            fire_time,
            reason,
        };
        if let Some(handler) = &self.cfg.error_handler {
            if std::panic::catch_unwind(AssertUnwindSafe(|| handler(meta, &err))).is_err() {
                tracing::error!(task = %meta.name, "the error handler panicked");
            }
        }
    }

    fn claim_deadline(&self, len: usize) -> Duration {
        let expected_ns = self
            .claim_ns
            .load(Ordering::Relaxed)
            .saturating_mul(len as u64)
            .saturating_mul(4);
        let failures = self.lock().claim_failures;
        let base = Duration::from_nanos(expected_ns).max(CLAIM_DEADLINE_MIN);
        (base * (1 + failures.min(4))).min(CLAIM_DEADLINE_MAX)
    }

    fn learn_claim_cost(&self, took: Duration, claims: usize) {
        if claims == 0 {
            return;
        }
        let per = u64::try_from(took.as_nanos() / claims as u128).unwrap_or(u64::MAX);
        let old = self.claim_ns.load(Ordering::Relaxed);
        self.claim_ns.store(
            (old.saturating_mul(3) / 4).saturating_add(per / 4),
            Ordering::Relaxed,
        );
    }

    /// Runs a won fire. The body is polled once right here: bodies that
    /// finish without waiting (the common case for short jobs) cost no
    /// task spawn; the others continue on their own tokio task.
    fn dispatch(self: &Arc<Self>, r: &Arc<Runnable>, fire_time: i64, late: bool) {
        if self.cfg.overlap == Overlap::Skip && r.running.load(Ordering::SeqCst) > 0 {
            if !r.started_late.load(Ordering::SeqCst) {
                // The previous run started on time and outlasts the period.
                self.report_missed(&r.meta, fire_time, MissReason::Overlap);
                return;
            }
            // The previous run was late (a slow claim): run after it.
            let mut st = self.lock();
            let key = Arc::as_ptr(r) as usize;
            st.deferred
                .entry(key)
                .or_insert_with(|| (r.clone(), VecDeque::new()))
                .1
                .push_back(fire_time);
            r.deferred.store(true, Ordering::SeqCst);
            self.running.fetch_add(1, Ordering::SeqCst); // a claimed fire to run
            drop(st);
            // The previous run may have ended meanwhile.
            self.run_deferred(r);
            return;
        }
        if r.started_late.load(Ordering::Relaxed) != late {
            r.started_late.store(late, Ordering::Relaxed);
        }
        let meta = &r.meta;
        if r.flagged {
            let guard = self.count_run(r.clone());
            tokio::spawn(async move {
                guard
                    .engine
                    .run_with_flags(&guard.runnable, fire_time)
                    .await;
                drop(guard);
            });
            return;
        }
        let ctx = TaskContext {
            meta: meta.clone(),
            fire_time,
        };
        let mut run = CatchUnwind(r.body.run(ctx));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match Pin::new(&mut run).poll(&mut cx) {
            Poll::Ready(outcome) => self.finish(meta, fire_time, outcome),
            Poll::Pending => {
                let guard = self.count_run(r.clone());
                tokio::spawn(async move {
                    let outcome = run.await;
                    guard
                        .engine
                        .finish(&guard.runnable.meta, fire_time, outcome);
                    drop(guard);
                });
            }
        }
    }

    fn count_run(self: &Arc<Self>, runnable: Arc<Runnable>) -> RunGuard {
        runnable.running.fetch_add(1, Ordering::SeqCst);
        self.running.fetch_add(1, Ordering::SeqCst);
        RunGuard {
            engine: self.clone(),
            runnable,
        }
    }

    /// Reports a failed or panicked run.
    fn finish(&self, meta: &TaskMeta, fire_time: i64, outcome: Result<TaskResult, String>) {
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(source)) => self.report(
                meta,
                &Error::TaskFailed {
                    task: meta.name.clone(),
                    fire_time,
                    source,
                },
            ),
            Err(message) => self.report(
                meta,
                &Error::TaskPanicked {
                    task: meta.name.clone(),
                    fire_time,
                    message,
                },
            ),
        }
    }

    /// A run of a task with one-shot or after-run flags (see [`TaskMeta`]).
    async fn run_with_flags(&self, r: &Runnable, fire_time: i64) {
        let meta = &r.meta;
        let reg = &self.cfg.registry;
        let ns = self.cfg.ns.as_str();
        if meta.one_shot {
            // Tombstone before the body runs: a crash mid-run must not let
            // another node run the next fire of a one-shot task.
            if let Err(err) = retry(|| reg.put_tombstone(ns, &meta.name)).await {
                tracing::error!(task = %meta.name, %err, "could not tombstone a one-shot task; not running it");
                self.report(meta, &err);
                return;
            }
        }
        let ctx = TaskContext {
            meta: meta.clone(),
            fire_time,
        };
        let outcome = CatchUnwind(r.body.run(ctx)).await;
        self.finish(meta, fire_time, outcome);
        let after = if meta.executed_and_cleanup {
            let keep_tombstone = meta.one_shot;
            retry(|| async {
                reg.delete_task(ns, &meta.name).await?;
                reg.delete_claim(ns, &meta.name).await?;
                if !keep_tombstone {
                    reg.delete_tombstone(ns, &meta.name).await?;
                }
                Ok(())
            })
            .await
        } else if meta.executed_and_mark_deleted && !meta.one_shot {
            retry(|| reg.put_tombstone(ns, &meta.name)).await
        } else {
            Ok(())
        };
        if let Err(err) = after {
            tracing::error!(task = %meta.name, %err, "could not apply the task's after-run flags");
            self.report(meta, &err);
        }
    }

    fn report(&self, meta: &TaskMeta, err: &Error) {
        match &self.cfg.error_handler {
            Some(handler) => {
                if std::panic::catch_unwind(AssertUnwindSafe(|| handler(meta, err))).is_err() {
                    tracing::error!(task = %meta.name, "the error handler panicked");
                }
            }
            None => tracing::error!(task = %meta.name, %err, "task run failed"),
        }
    }
}

impl Engine {
    /// Runs the next claimed fire that waited for `r`'s previous run.
    fn run_deferred(self: &Arc<Self>, r: &Arc<Runnable>) {
        if r.running.load(Ordering::SeqCst) > 0 {
            return;
        }
        let next = {
            let mut st = self.lock();
            let key = Arc::as_ptr(r) as usize;
            let next = st.deferred.get_mut(&key).and_then(|(_, q)| q.pop_front());
            if st.deferred.get(&key).is_some_and(|(_, q)| q.is_empty()) {
                st.deferred.remove(&key);
                r.deferred.store(false, Ordering::SeqCst);
            }
            next
        };
        if let Some(fire_time) = next {
            self.dispatch(r, fire_time, true);
            // The deferred fire counted as in flight until now.
            if self.running.fetch_sub(1, Ordering::SeqCst) == 1 {
                self.idle.notify_waiters();
            }
        }
    }
}

/// Sleeps for `pause`, or forever without one.
async fn sleep_opt(pause: Option<Duration>) {
    match pause {
        Some(p) => tokio::time::sleep(p).await,
        None => std::future::pending().await,
    }
}

/// Retries a registry write a few times with short backoff.
async fn retry<F, Fut>(mut op: F) -> crate::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = crate::Result<()>>,
{
    let mut pause = Duration::from_millis(100);
    let mut last = None;
    for _ in 0..4 {
        match op().await {
            Ok(()) => return Ok(()),
            Err(err) => last = Some(err),
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
    Err(last.unwrap_or_else(|| Error::registry_msg("engine", "retry gave up")))
}

/// Counts claimed fires waiting for their time as in flight.
struct Busy(Arc<Engine>);

impl Busy {
    fn new(engine: Arc<Engine>) -> Busy {
        engine.running.fetch_add(1, Ordering::SeqCst);
        Busy(engine)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Counts a run in flight; decrements on drop, even after a panic.
struct RunGuard {
    engine: Arc<Engine>,
    runnable: Arc<Runnable>,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.runnable.running.fetch_sub(1, Ordering::SeqCst);
        if self.runnable.deferred.load(Ordering::SeqCst) {
            self.engine.run_deferred(&self.runnable);
        }
        if self.engine.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.engine.idle.notify_waiters();
        }
    }
}

/// Turns a panic while polling the inner future into `Err(message)`.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into());
                Poll::Ready(Err(message))
            }
        }
    }
}

impl State {
    fn live(&self, fire: Fire) -> Option<&Entry> {
        self.slots
            .get(fire.slot as usize)?
            .as_ref()
            .filter(|e| e.generation == fire.generation)
    }

    fn push(&mut self, due: i64, fire: Fire) {
        self.queue.entry(due).or_default().push(fire);
    }

    /// Pushes the next fire of a batch's fire: the first new bucket a batch
    /// creates reuses the previous batch's buffer, so a large batch moving
    /// on to its next fire time allocates nothing.
    fn push_next(&mut self, due: i64, fire: Fire) {
        let spare = &mut self.spare;
        self.queue
            .entry(due)
            .or_insert_with(|| std::mem::take(spare))
            .push(fire);
    }

    fn insert(&mut self, job: Job, next: Option<i64>) {
        self.generation += 1;
        let last_won = self
            .recent_won
            .remove(job.meta.name.as_str())
            .unwrap_or(i64::MIN);
        let name = Name(job.meta.clone());
        let flagged = job.meta.one_shot
            || job.meta.executed_and_cleanup
            || job.meta.executed_and_mark_deleted;
        let runnable = Arc::new(Runnable {
            flagged,
            meta: job.meta,
            body: job.body,
            running: AtomicUsize::new(0),
            deferred: std::sync::atomic::AtomicBool::new(false),
            last_won: AtomicI64::new(last_won),
            started_late: std::sync::atomic::AtomicBool::new(false),
        });
        let entry = Entry {
            schedule: job.schedule,
            generation: self.generation,
            runnable,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(entry);
                slot
            }
            None => {
                self.slots.push(Some(entry));
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.index.insert(name, slot);
        if let Some(next) = next {
            let fire = Fire {
                slot,
                generation: self.generation,
                fire_time: next,
                regular: true,
                attempt: 0,
            };
            self.push(next, fire);
        }
    }

    fn remove(&mut self, name: &str) {
        if let Some(slot) = self.index.remove(name) {
            // Queued fires for this slot become stale (generation mismatch).
            if let Some(entry) = self.slots[slot as usize].take() {
                let won = entry.runnable.last_won.load(Ordering::SeqCst);
                if won != i64::MIN {
                    // Kept for a while: the task may come back to this node.
                    self.recent_won.insert(name.to_string(), won);
                }
            }
            self.free.push(slot);
        }
    }

    /// Takes up to a chunk of the oldest fire time waiting for claims: only
    /// of fire time `current` while claims of it are in flight.
    fn take_claims(&mut self, current: Option<i64>) -> Option<(i64, Vec<Pending>)> {
        let mut entry = self.claims.first_entry()?;
        let fire_time = *entry.key();
        if current.is_some_and(|c| c != fire_time) {
            return None;
        }
        let pending = entry.get_mut();
        if pending.len() <= CHUNK {
            return Some((fire_time, entry.remove()));
        }
        let rest = pending.split_off(CHUNK);
        let group = std::mem::replace(pending, rest);
        Some((fire_time, group))
    }

    /// Removes the fires older than `floor` from the claim queue.
    fn expire_claims(&mut self, floor: i64) -> Vec<Pending> {
        let mut expired = Vec::new();
        while let Some(entry) = self.claims.first_entry() {
            if *entry.key() >= floor {
                break;
            }
            expired.extend(entry.remove());
        }
        expired
    }

    /// Takes every fire due by `now + lead`; otherwise says how long to
    /// wait until the first one is.
    fn take_due(&mut self, now: i64, lead: i64) -> (Vec<Fire>, Option<i64>) {
        let horizon = now.saturating_add(lead);
        let mut batch = Vec::new();
        while let Some(entry) = self.queue.first_entry() {
            if *entry.key() > horizon {
                break;
            }
            let mut fires = entry.remove();
            if batch.is_empty() {
                batch = fires;
            } else {
                batch.append(&mut fires);
            }
        }
        let wait = self.queue.keys().next().map(|due| due - horizon);
        (batch, wait)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;
    use crate::clock::TokioClock;
    use crate::registry::{FaultRegistry, MemoryRegistry};

    const START_MS: i64 = 1_800_000_000_000;

    type Runs = Arc<StdMutex<Vec<i64>>>;

    fn engine(registry: Arc<dyn Registry>, overlap: Overlap) -> Arc<Engine> {
        let engine = Engine::new(EngineConfig {
            registry,
            ns: "engine-test".into(),
            node_id: "n1".into(),
            clock: Arc::new(TokioClock::starting_at(START_MS)),
            overlap,
            catch_up: CatchUp::default(),
            error_handler: None,
        });
        engine.resume("n1/test");
        engine
    }

    /// A job on every second whose body records its fire time and then
    /// waits `busy`.
    fn job(name: &str, runs: &Runs, busy: Duration) -> Job {
        let runs = runs.clone();
        let body = move |ctx: TaskContext| {
            let runs = runs.clone();
            async move {
                runs.lock().unwrap().push(ctx.fire_time);
                if !busy.is_zero() {
                    tokio::time::sleep(busy).await;
                }
                Ok(())
            }
        };
        Job {
            meta: Arc::new(TaskMeta::new(name, "* * * * * *")),
            schedule: Arc::new(Schedule::parse("* * * * * *", chrono_tz::UTC).unwrap()),
            body: Arc::new(body),
        }
    }

    async fn advance(ms: u64) {
        for _ in 0..ms / 10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn catch_up_policies_pick_the_missed_fires() {
        let every_second = Schedule::parse("* * * * * *", chrono_tz::UTC).unwrap();
        let now = START_MS + 10_400;
        let window = Duration::from_secs(5);
        let all = CatchUp::RunAll { window };
        let expected: Vec<i64> = (6..=10).map(|s| START_MS + s * 1000).collect();
        assert_eq!(
            all.missed(&every_second, START_MS, now),
            expected,
            "window bounds"
        );
        let recent = START_MS + 8_000;
        assert_eq!(
            all.missed(&every_second, recent, now),
            vec![START_MS + 9_000, START_MS + 10_000],
            "watermark bounds"
        );
        let latest = CatchUp::RunLatest { window };
        assert_eq!(
            latest.missed(&every_second, START_MS, now),
            vec![START_MS + 10_000]
        );
        assert!(CatchUp::Skip
            .missed(&every_second, START_MS, now)
            .is_empty());
        let long = CatchUp::RunAll {
            window: Duration::from_secs(3_600),
        };
        let capped = long.missed(&every_second, START_MS, START_MS + 1_000_000);
        assert_eq!(capped.len(), CatchUp::MAX_FIRES);
        assert_eq!(
            capped.last(),
            Some(&(START_MS + 1_000_000)),
            "the most recent ones"
        );
    }

    /// A catch-up of a fire time that already ran here is answered "won"
    /// by the idempotent claim, and still does not run a second time.
    #[tokio::test(start_paused = true)]
    async fn a_fire_runs_once_even_when_queued_twice() {
        let runs: Runs = Arc::default();
        let e = engine(Arc::new(MemoryRegistry::new()), Overlap::Allow);
        e.set_jobs(vec![job("t", &runs, Duration::ZERO)]);
        tokio::spawn(e.clone().run());
        advance(2_500).await;
        let first = runs.lock().unwrap()[0];
        e.catch_up("t", first);
        advance(1_000).await;
        let runs = runs.lock().unwrap().clone();
        assert_eq!(runs.iter().filter(|t| **t == first).count(), 1, "{runs:?}");
        e.stop();
    }

    /// A 3 s claim stall: the fires of those seconds run after it, each
    /// once and in order, although each run outlasts the gap between them
    /// (`Skip` waits for late runs instead of skipping behind them).
    #[tokio::test(start_paused = true)]
    async fn a_stall_backlog_runs_in_order_under_skip() {
        let runs: Runs = Arc::default();
        let faults = FaultRegistry::wrap(MemoryRegistry::new());
        let e = engine(Arc::new(faults.clone()), Overlap::Skip);
        e.set_jobs(vec![job("t", &runs, Duration::from_millis(300))]);
        tokio::spawn(e.clone().run());
        advance(1_500).await;
        faults.stall_for(Duration::from_secs(3));
        advance(6_000).await;
        e.stop();
        let runs = runs.lock().unwrap().clone();
        let expected: Vec<i64> = (1..=7).map(|s| START_MS + s * 1000).collect();
        assert_eq!(runs, expected);
        assert_eq!(e.missed(), 0);
    }

    /// A run started on time that outlasts its period makes `Skip` skip the
    /// next fire, and each skip is counted as missed.
    #[tokio::test(start_paused = true)]
    async fn skip_reports_a_fire_behind_a_long_run() {
        let runs: Runs = Arc::default();
        let e = engine(Arc::new(MemoryRegistry::new()), Overlap::Skip);
        e.set_jobs(vec![job("t", &runs, Duration::from_millis(1_500))]);
        tokio::spawn(e.clone().run());
        advance(4_050).await;
        e.stop();
        let runs = runs.lock().unwrap().clone();
        // 1 s runs, 2 s skipped (1 s still going), 3 s runs, 4 s skipped.
        assert_eq!(runs, vec![START_MS + 1000, START_MS + 3000]);
        assert_eq!(e.missed(), 2);
    }
}
