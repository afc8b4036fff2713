//! The timer queue: one loop over the next fire times of the tasks this
//! node owns. A batch leaves the queue a little before its fire time (the
//! claim lead) for the claimer; each task's next fire is queued as its
//! batch leaves. The timer never waits for the registry.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::FxHashMap;

use super::state::{Fire, Pending, Runnable, State};
use super::{Engine, CHUNK};
use crate::error::MissReason;

/// Longest claim lead: claims are never taken further ahead than this.
const MAX_LEAD_MS: i64 = 200;

impl Engine {
    pub(super) async fn timer_loop(&self) {
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
}

impl State {
    pub(super) fn push(&mut self, due: i64, fire: Fire) {
        self.queue.entry(due).or_default().push(fire);
    }

    /// Pushes the next fire of a batch's fire: the first new bucket a batch
    /// creates reuses the previous batch's buffer, so a large batch moving
    /// on to its next fire time allocates nothing.
    pub(super) fn push_next(&mut self, due: i64, fire: Fire) {
        let spare = &mut self.spare;
        self.queue
            .entry(due)
            .or_insert_with(|| std::mem::take(spare))
            .push(fire);
    }

    /// Takes every fire due by `now + lead`; otherwise says how long to
    /// wait until the first one is.
    pub(super) fn take_due(&mut self, now: i64, lead: i64) -> (Vec<Fire>, Option<i64>) {
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
