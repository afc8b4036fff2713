//! The two policies a node is configured with: what an overlapping fire
//! does, and which fires missed while nobody owned a task are caught up.

use std::collections::VecDeque;
use std::time::Duration;

use crate::schedule::Schedule;

/// What to do with a fire that comes while the previous run of the same
/// task still runs on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Skip the new fire while the previous run, started on time, still
    /// goes (nobody runs it); the skip is reported as a missed fire
    /// ([`MissReason::Overlap`](crate::MissReason::Overlap)). A fire that finds a *late* run still going
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::test_support::START_MS;

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
}
