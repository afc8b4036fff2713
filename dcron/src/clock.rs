//! Wall-clock time, injectable for tests.

/// The source of "now" for scheduling, in epoch milliseconds (UTC).
///
/// Only used to decide *when* to fire; which fire time runs is decided by
/// the cron schedule and the registry's claim, never by this clock.
pub trait Clock: Send + Sync + 'static {
    /// Current time, epoch milliseconds.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }
}

/// A clock that starts at a given instant and advances with tokio's clock,
/// so tests with `tokio::time::pause()` control it completely.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start_ms: i64,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading `start_ms` now.
    pub fn starting_at(start_ms: i64) -> Self {
        TokioClock {
            start_ms,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> i64 {
        let elapsed = i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.start_ms.saturating_add(elapsed)
    }
}

/// Formats epoch milliseconds as RFC 3339 UTC with milliseconds, for logs
/// and messages (`2026-12-01T22:45:00.000Z`); out-of-range values print as
/// the raw number.
pub fn rfc3339(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => ms.to_string(),
    }
}
