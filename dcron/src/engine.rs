//! The timer: one loop over a queue of next fire times for the tasks this
//! node owns. Due fires are claimed in the registry in one batch per fire
//! time, and only the won fires run.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::error::Error;
use crate::registry::{Claim, ClaimOutcome, Registry};
use crate::schedule::Schedule;
use crate::task::{Task, TaskContext, TaskMeta, TaskResult};

/// What to do with a fire that comes while the previous run of the same
/// task still runs on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Skip the new fire (its claim is not taken, so nobody runs it).
    #[default]
    Skip,
    /// Run it anyway, concurrently.
    Allow,
}

/// What a node does about fires missed while nobody owned a task (a crash,
/// a rebalance, a restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Forget missed fires.
    Skip,
    /// Run the most recent missed fire if it is at most `window` old and
    /// newer than the task's claim watermark. Tasks that never ran are not
    /// caught up (a fire before a task existed is not "missed").
    RunLatest {
        /// How old a missed fire may be.
        window: Duration,
    },
}

impl Default for CatchUp {
    fn default() -> Self {
        CatchUp::RunLatest {
            window: Duration::from_secs(60),
        }
    }
}

impl CatchUp {
    pub(crate) fn window_ms(self) -> i64 {
        match self {
            CatchUp::Skip => 0,
            CatchUp::RunLatest { window } => i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
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
}

/// A won-or-to-claim fire taken out of the queue.
struct Ready {
    fire_time: i64,
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
const MAX_RETRY_PAUSE_MS: i64 = 5_000;
/// Fires handled per step of a batch (claims per registry call at most).
const CHUNK: usize = 2048;
/// Longest claim lead: claims are never taken further ahead than this.
const MAX_LEAD_MS: i64 = 200;

impl Engine {
    pub fn new(cfg: EngineConfig) -> Arc<Engine> {
        Arc::new(Engine {
            cfg,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            running: AtomicUsize::new(0),
            idle: Notify::new(),
            claim_ns: AtomicU64::new(1_000),
        })
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

    /// Stops firing; runs in flight continue.
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.wake.notify_one();
    }

    /// Clears the queue (after `stop`), so a later start begins afresh.
    pub fn reset(&self) {
        *self.lock() = State::default();
    }

    /// Allows firing again after `stop`.
    pub fn resume(&self) {
        self.lock().stopped = false;
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

    /// The timer loop. Ends after `stop`.
    ///
    /// A batch is taken out of the queue a little before its fire time (the
    /// claim lead, sized from how long recent claims took), claimed, and
    /// run at the fire time, so claims don't delay the runs.
    pub async fn run(self: Arc<Self>) {
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
            self.fire_batch(batch, now).await;
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

    /// Claims the fires of `batch` (in chunks, one registry call per fire
    /// time and chunk) and runs the won ones at their fire time. Claiming
    /// ahead (by the claim lead) keeps registry latency out of the runs'
    /// start times; the price is that a node crashing inside that window
    /// loses the fires it claimed. Chunks keep every buffer small, so a
    /// large batch each second doesn't fragment the heap.
    async fn fire_batch(self: &Arc<Self>, mut batch: Vec<Fire>, now: i64) {
        // Counts as a run in flight so `stop` waits for claimed fires.
        let _busy = Busy::new(self.clone());
        batch.sort_by_key(|f| f.fire_time);
        let mut won: Vec<Vec<Ready>> = Vec::new();
        for chunk in batch.chunks(CHUNK) {
            let ready = self.take_chunk(chunk, now);
            let mut rest = ready.as_slice();
            while let Some((first, _)) = rest.first() {
                let n = rest
                    .iter()
                    .take_while(|(f, _)| f.fire_time == first.fire_time)
                    .count();
                let (group, tail) = rest.split_at(n);
                rest = tail;
                if let Some(winners) = self.claim(group, now).await {
                    won.push(winners);
                }
            }
        }
        batch.clear();
        self.lock().spare = batch;
        let mut reached = i64::MIN;
        for ready in won.iter().flatten() {
            // Fires are sorted: wait once per fire time, not per fire.
            if ready.fire_time > reached {
                let early = ready.fire_time - self.cfg.clock.now_ms();
                if early > 0 {
                    tokio::time::sleep(Duration::from_millis(early as u64)).await;
                }
                reached = ready.fire_time;
            }
            self.dispatch(ready);
        }
    }

    /// Under the lock: schedules the next fire of each regular fire of
    /// `chunk`, drops stale and overlapping ones, and returns what to claim.
    fn take_chunk(&self, chunk: &[Fire], now: i64) -> Vec<(Fire, Ready)> {
        let mut ready = Vec::with_capacity(chunk.len());
        let mut st = self.lock();
        let mut next_cache: FxHashMap<(usize, i64), Option<i64>> = FxHashMap::default();
        for &fire in chunk {
            let Some(entry) = st.live(fire) else { continue };
            let runnable = entry.runnable.clone();
            if fire.regular {
                let schedule = &entry.schedule;
                let key = (Arc::as_ptr(schedule) as *const () as usize, fire.fire_time);
                let next = *next_cache
                    .entry(key)
                    .or_insert_with(|| schedule.next_after(fire.fire_time.max(now - 1)));
                if let Some(next) = next {
                    let next_fire = Fire {
                        fire_time: next,
                        attempt: 0,
                        ..fire
                    };
                    st.push_next(next, next_fire);
                }
            }
            if self.cfg.overlap == Overlap::Skip && runnable.running.load(Ordering::Relaxed) > 0 {
                tracing::debug!(task = %runnable.meta.name, fire_time = fire.fire_time, "previous run still running; fire skipped");
                continue;
            }
            ready.push((
                fire,
                Ready {
                    fire_time: fire.fire_time,
                    runnable,
                },
            ));
        }
        ready
    }

    /// Claims one fire time's fires in one registry call; returns the won
    /// ones, or `None` after scheduling a retry on a registry error.
    async fn claim(&self, group: &[(Fire, Ready)], now: i64) -> Option<Vec<Ready>> {
        let fire_time = group.first()?.0.fire_time;
        let claim = Claim::new(fire_time, &self.cfg.node_id, &self.cfg.node_id, now);
        let names: Vec<&str> = group
            .iter()
            .map(|(_, r)| r.runnable.meta.name.as_str())
            .collect();
        let started = std::time::Instant::now();
        let outcomes = self
            .cfg
            .registry
            .claim_many(&self.cfg.ns, &names, &claim)
            .await;
        self.learn_claim_cost(started.elapsed(), names.len());
        let mut won = Vec::new();
        let mut failed = Vec::new();
        let mut last_err = None;
        for ((f, r), outcome) in group.iter().zip(outcomes) {
            match outcome {
                ClaimOutcome::Won => won.push(Ready {
                    fire_time,
                    runnable: r.runnable.clone(),
                }),
                ClaimOutcome::Lost => {}
                ClaimOutcome::Failed(err) => {
                    failed.push(*f);
                    last_err = Some(err);
                }
            }
        }
        if let Some(err) = last_err {
            self.retry_later(failed.into_iter(), &err);
        }
        Some(won)
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

    fn retry_later(&self, fires: impl Iterator<Item = Fire>, err: &Error) {
        let now = self.cfg.clock.now_ms();
        let window = self.cfg.catch_up.window_ms().max(5_000);
        let mut st = self.lock();
        let mut dropped = 0usize;
        let mut retried = 0usize;
        for fire in fires {
            if now - fire.fire_time > window {
                dropped += 1;
                continue;
            }
            let attempt = fire.attempt.saturating_add(1);
            let pause = (100_i64 << attempt.min(6)).min(MAX_RETRY_PAUSE_MS);
            st.push(
                now + pause,
                Fire {
                    regular: false,
                    attempt,
                    ..fire
                },
            );
            retried += 1;
        }
        drop(st);
        if dropped > 0 {
            tracing::error!(%err, dropped, "could not claim fires within the retry window; they are lost");
        }
        if retried > 0 {
            tracing::warn!(%err, retried, "claim failed; retrying");
        }
        self.wake.notify_one();
    }

    /// Runs a won fire. The body is polled once right here: bodies that
    /// finish without waiting (the common case for short jobs) cost no
    /// task spawn; the others continue on their own tokio task.
    fn dispatch(self: &Arc<Self>, ready: &Ready) {
        let r = &ready.runnable;
        let meta = &r.meta;
        if r.flagged {
            let guard = self.count_run(r.clone());
            let fire_time = ready.fire_time;
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
            fire_time: ready.fire_time,
        };
        let mut run = CatchUnwind(r.body.run(ctx));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match Pin::new(&mut run).poll(&mut cx) {
            Poll::Ready(outcome) => self.finish(meta, ready.fire_time, outcome),
            Poll::Pending => {
                let guard = self.count_run(r.clone());
                let fire_time = ready.fire_time;
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
        let name = Name(job.meta.clone());
        let flagged = job.meta.one_shot
            || job.meta.executed_and_cleanup
            || job.meta.executed_and_mark_deleted;
        let runnable = Arc::new(Runnable {
            flagged,
            meta: job.meta,
            body: job.body,
            running: AtomicUsize::new(0),
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
            self.slots[slot as usize] = None;
            self.free.push(slot);
        }
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
