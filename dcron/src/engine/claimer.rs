//! The claimer: claims due fires in the registry, in batches per fire
//! time, with a deadline on every call and retries after failures; won
//! fires go on to dispatch, fires whose claim is never answered within the
//! late window are reported missed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use super::dispatch::Busy;
use super::state::{Fire, Pending, Runnable, State};
use super::{Engine, CHUNK};
use crate::backoff::Backoff;
use crate::clock::rfc3339;
use crate::error::Error;
use crate::registry::{Claim, ClaimOutcome};

/// Pause before the first retry after a claim call that answered nothing;
/// it doubles with every such call in a row.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between claim retries after registry errors.
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(800);
/// Pause before retrying the failed part of a call that was partly answered.
const PARTIAL_RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Claim calls of one fire time in flight at once.
const MAX_CLAIMS_IN_FLIGHT: usize = 4;
/// A claim call not answered within its deadline is treated as failed and
/// retried (safe: claims are idempotent), so a registry that hangs during an
/// election does not hold fires for a full client timeout. The deadline is
/// four times what the call should take, between these bounds, and grows
/// with failures in a row (a registry that is merely slow gets time).
const CLAIM_DEADLINE_MIN: Duration = Duration::from_millis(1_000);
const CLAIM_DEADLINE_MAX: Duration = Duration::from_secs(5);

/// When the claimer may call the registry again after failed calls.
#[derive(Debug, Clone)]
pub(super) struct ClaimRetry {
    /// Counts the calls in a row that answered nothing.
    backoff: Backoff,
    /// No claim call before this (epoch ms).
    at: i64,
}

impl Default for ClaimRetry {
    fn default() -> Self {
        ClaimRetry {
            backoff: Backoff::new(FIRST_RETRY_PAUSE, MAX_RETRY_PAUSE),
            at: 0,
        }
    }
}

/// What one claim call decided for its fires.
struct Outcomes {
    /// Won here for the first time: to run.
    won: Vec<Arc<Runnable>>,
    /// Not answered: to claim again.
    failed: Vec<Pending>,
    /// The error of the last failed claim.
    last_err: Option<Error>,
}

impl Engine {
    /// The claimer: takes the oldest fire time's pending fires, claims them
    /// in chunks (several in flight, all of that one fire time, so no two
    /// claims of one task ever race), and moves on to the next fire time
    /// only when every claim of this one is answered or requeued.
    pub(super) async fn claim_loop(self: Arc<Self>) {
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
                if now < st.claim_retry.at {
                    wait = Some(st.claim_retry.at - now);
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
        let total = group.len();
        let started = std::time::Instant::now();
        let answers = self.claim_call(fire_time, &group).await;
        let outcomes = self.sort_outcomes(fire_time, group, answers);
        if outcomes.failed.is_empty() {
            self.learn_claim_cost(started.elapsed(), total);
        }
        let answered = total - outcomes.failed.len();
        self.settle_claims(fire_time, outcomes.failed, answered, outcomes.last_err);
        self.run_won(fire_time, outcomes.won);
    }

    /// One `claim_many` call for `group`, bounded by the claim deadline: a
    /// call not answered in time fails every claim it carried.
    async fn claim_call(&self, fire_time: i64, group: &[Pending]) -> Vec<ClaimOutcome> {
        let now = self.cfg.clock.now_ms();
        let token = self.token();
        let claim = Claim::new(fire_time, &self.cfg.node_id, &token, now);
        let names: Vec<&str> = group
            .iter()
            .map(|p| p.runnable.meta.name.as_str())
            .collect();
        let call = self.cfg.registry.claim_many(&self.cfg.ns, &names, &claim);
        let deadline = self.claim_deadline(names.len());
        match tokio::time::timeout(deadline, call).await {
            Ok(outcomes) => outcomes,
            Err(_) => ClaimOutcome::fail_all(
                names.len(),
                Error::Timeout {
                    what: "claiming fires".into(),
                    after: deadline,
                },
            ),
        }
    }

    /// Pairs each pending fire with its answer. A won fire this node won
    /// before (claims are idempotent per incarnation) does not run again.
    fn sort_outcomes(
        &self,
        fire_time: i64,
        group: Vec<Pending>,
        answers: Vec<ClaimOutcome>,
    ) -> Outcomes {
        let mut out = Outcomes {
            won: Vec::new(),
            failed: Vec::new(),
            last_err: None,
        };
        let mut answers = answers.into_iter();
        for pending in group {
            match answers.next() {
                Some(ClaimOutcome::Won) => {
                    let before = pending
                        .runnable
                        .last_won
                        .fetch_max(fire_time, Ordering::SeqCst);
                    if before < fire_time {
                        out.won.push(pending.runnable);
                    } else {
                        tracing::debug!(task = %pending.runnable.meta.name, fire_time = %rfc3339(fire_time), "fire already won here; not running it again");
                    }
                }
                Some(ClaimOutcome::Lost) => {}
                Some(ClaimOutcome::Failed(err)) => {
                    out.last_err = Some(err);
                    out.failed.push(pending);
                }
                None => {
                    out.last_err = Some(Error::registry_msg(
                        self.cfg.registry.backend(),
                        "claim batch answered too few outcomes",
                    ));
                    out.failed.push(pending);
                }
            }
        }
        out
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
            st.claim_retry.backoff.reset();
            return;
        }
        // A registry that answered part of the call is up: retry soon. One
        // that answered nothing backs off (no busy loop during an outage).
        let pause = if answered > 0 {
            PARTIAL_RETRY_PAUSE
        } else {
            st.claim_retry.backoff.fail()
        };
        let pause_ms = i64::try_from(pause.as_millis()).unwrap_or(i64::MAX);
        st.claim_retry.at = st.claim_retry.at.max(now.saturating_add(pause_ms));
        let retried = failed.len();
        let queue = st.claims.entry(fire_time).or_default();
        queue.extend(failed.into_iter().map(|mut p| {
            p.fire.attempt = p.fire.attempt.saturating_add(1);
            p
        }));
        let failures = st.claim_retry.backoff.failures();
        drop(st);
        let err = err.map(|e| e.to_string()).unwrap_or_default();
        if failures <= 1 {
            tracing::warn!(%err, retried, fire_time = %rfc3339(fire_time), "claim failed; retrying in fire-time order");
        } else {
            tracing::debug!(%err, retried, failures, "claim failed again; retrying");
        }
    }

    fn claim_deadline(&self, len: usize) -> Duration {
        let expected_ns = self
            .claim_ns
            .load(Ordering::Relaxed)
            .saturating_mul(len as u64)
            .saturating_mul(4);
        let failures = self.lock().claim_retry.backoff.failures();
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
}

impl State {
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
}

/// Sleeps for `pause`, or forever without one.
async fn sleep_opt(pause: Option<Duration>) {
    match pause {
        Some(p) => tokio::time::sleep(p).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::engine::test_support::{advance, engine, job, Runs};
    use crate::engine::Overlap;
    use crate::registry::MemoryRegistry;

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
}
