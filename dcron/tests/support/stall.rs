//! A node's claim loop under a registry fault, for the leader-kill tests
//! of the clustered backends (etcd, ZooKeeper).

use std::sync::Arc;
use std::time::Duration;

use dcron::registry::{Claim, ClaimOutcome, Registry};
use tokio::time::Instant;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Which member of the cluster a fault kills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Victim {
    Leader,
    Follower,
}

/// Answers of one claim loop: when each fully answered claim came back.
pub struct LoopAnswers {
    pub label: String,
    pub answered: Vec<Instant>,
    pub failures: usize,
}

impl LoopAnswers {
    /// The stall across a fault at `at`: the longest gap between two
    /// answers that ends after `at` and begins before `at + 1 s` (the calls
    /// that meet the fault: the one in flight then, and the ones sent before
    /// the ensemble noticed; a gap beginning later began after the loop was
    /// answered again).
    pub fn stall_across(&self, at: Instant) -> Duration {
        let mut worst = Duration::ZERO;
        for w in self.answered.windows(2) {
            if w[1] > at && w[0] <= at + Duration::from_secs(1) {
                worst = worst.max(w[1] - w[0]);
            }
        }
        if self.answered.last().is_none_or(|t| *t <= at) {
            return Duration::MAX;
        }
        worst
    }

    /// The longest gap between two answers after `at`.
    pub fn worst_gap_after(&self, at: Instant) -> Duration {
        self.answered
            .windows(2)
            .filter(|w| w[1] > at)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(Duration::MAX)
    }
}

/// A claim loop as a node runs it: every 100 ms the next fire time of its
/// tasks is claimed (with `claim`, or with `claim_many` for four tasks),
/// one call in flight at a time; a claim that fails is claimed again (same
/// fire time, same token) at the next tick. Only this loop claims its
/// tasks, so every answer must be won.
pub async fn claim_loop(
    r: Arc<dyn Registry>,
    ns: String,
    label: String,
    batch: bool,
    stop: Instant,
) -> LoopAnswers {
    let token = format!("{label}/1");
    let tasks: Vec<String> = if batch {
        (0..4).map(|t| format!("{label}-{t}")).collect()
    } else {
        vec![label.clone()]
    };
    let names: Vec<&str> = tasks.iter().map(String::as_str).collect();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fire_time = 1_000_i64;
    let mut answers = LoopAnswers {
        label: label.clone(),
        answered: Vec::new(),
        failures: 0,
    };
    while Instant::now() < stop {
        tick.tick().await;
        let c = Claim::new(fire_time, &label, &token, now_ms());
        let won = if batch {
            let outcomes = r.claim_many(&ns, &names, &c).await;
            assert_eq!(outcomes.len(), names.len());
            assert!(
                !outcomes.iter().any(|o| matches!(o, ClaimOutcome::Lost)),
                "{label}: own claim of {fire_time} answered lost: {outcomes:?}"
            );
            outcomes.iter().all(ClaimOutcome::is_won)
        } else {
            match r.claim(&ns, names[0], &c).await {
                Ok(won) => {
                    assert!(won, "{label}: own claim of {fire_time} answered lost");
                    true
                }
                Err(err) => {
                    tracing::debug!(%label, %err, "claim failed");
                    false
                }
            }
        };
        if won {
            answers.answered.push(Instant::now());
            fire_time += 100;
        } else {
            answers.failures += 1;
        }
    }
    answers
}
