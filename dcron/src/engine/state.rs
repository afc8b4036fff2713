//! The engine's shared state: one slot per task this node owns (its
//! schedule and what a run needs), the timer queue of next fires, and the
//! claim queue between the timer and the claimer.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::claimer::ClaimRetry;
use super::Job;
use crate::schedule::Schedule;
use crate::task::{Task, TaskMeta};

#[derive(Default)]
pub(super) struct State {
    pub(super) slots: Vec<Option<Entry>>,
    pub(super) free: Vec<u32>,
    pub(super) index: FxHashMap<Name, u32>,
    /// Due time (epoch ms) → fires due then.
    pub(super) queue: BTreeMap<i64, Vec<Fire>>,
    /// The buffer of the last batch, reused for the next new bucket.
    pub(super) spare: Vec<Fire>,
    /// Fires waiting for their claim, by fire time: the claimer always
    /// takes the oldest first, so a task's older fire is claimed before
    /// any newer one (a retry goes back to its own fire time).
    pub(super) claims: BTreeMap<i64, Vec<Pending>>,
    /// When the claimer may call the registry again after failed calls.
    pub(super) claim_retry: ClaimRetry,
    /// Claimed fires waiting for the previous run of the same task
    /// (`Overlap::Skip` after a late claim), by runnable.
    pub(super) deferred: FxHashMap<usize, (Arc<Runnable>, VecDeque<i64>)>,
    /// The latest won fire time of tasks that left this node recently (a
    /// task coming back must not run a fire it already ran here).
    pub(super) recent_won: FxHashMap<String, i64>,
    pub(super) generation: u64,
    pub(super) stopped: bool,
}

pub(super) struct Entry {
    pub(super) schedule: Arc<Schedule>,
    pub(super) generation: u64,
    pub(super) runnable: Arc<Runnable>,
}

impl Entry {
    /// Whether the entry already runs `job` as given.
    pub(super) fn same_as(&self, job: &Job) -> bool {
        Arc::ptr_eq(&self.schedule, &job.schedule)
            && Arc::ptr_eq(&self.runnable.body, &job.body)
            && (Arc::ptr_eq(&self.runnable.meta, &job.meta) || self.runnable.meta == job.meta)
    }
}

/// What a due fire needs outside the lock: one reference-count bump.
pub(super) struct Runnable {
    pub(super) meta: Arc<TaskMeta>,
    pub(super) body: Arc<dyn Task>,
    /// `meta` has one-shot or after-run flags (kept here so the common
    /// path reads one cache line less).
    pub(super) flagged: bool,
    /// Runs of this task in flight on this node (for the overlap policy).
    pub(super) running: AtomicUsize,
    /// Claimed fires of this task wait in `State::deferred`.
    pub(super) deferred: AtomicBool,
    /// The latest fire time this node won for the task: claims are
    /// idempotent per incarnation, so a second path to the same fire (a
    /// catch-up racing the regular fire) must not run it again.
    pub(super) last_won: AtomicI64,
    /// The latest run started late (after a slow claim): a fire that finds
    /// it still going waits for it instead of being skipped.
    pub(super) started_late: AtomicBool,
}

/// A fire waiting for its claim.
pub(super) struct Pending {
    pub(super) fire: Fire,
    pub(super) runnable: Arc<Runnable>,
}

/// Index key: the task name, borrowed from the entry's definition.
#[derive(Clone)]
pub(super) struct Name(pub(super) Arc<TaskMeta>);

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
pub(super) struct Fire {
    pub(super) slot: u32,
    pub(super) generation: u64,
    pub(super) fire_time: i64,
    /// Regular fires schedule the next one; catch-ups and retries don't.
    pub(super) regular: bool,
    pub(super) attempt: u8,
}

impl State {
    pub(super) fn live(&self, fire: Fire) -> Option<&Entry> {
        self.slots
            .get(fire.slot as usize)?
            .as_ref()
            .filter(|e| e.generation == fire.generation)
    }

    pub(super) fn insert(&mut self, job: Job, next: Option<i64>) {
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
            deferred: AtomicBool::new(false),
            last_won: AtomicI64::new(last_won),
            started_late: AtomicBool::new(false),
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

    pub(super) fn remove(&mut self, name: &str) {
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
}
