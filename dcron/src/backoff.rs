//! Exponential backoff, written once for every retry loop of the crate:
//! the node's background loops, the engine's claims and every backend.

use std::time::Duration;

/// Pauses between tries of a failing operation: `first`, doubling on every
/// failure in a row, at most `max`; [`reset`](Backoff::reset) on success.
///
/// It computes pauses and never sleeps itself, so callers on an injected
/// clock (the engine) and on tokio's (the backends) share it.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Starts at `first`, capped at `max`.
    pub(crate) const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            failures: 0,
        }
    }

    /// Counts a failure and answers the pause before the next try.
    pub(crate) fn fail(&mut self) -> Duration {
        let pause = self.peek();
        self.failures = self.failures.saturating_add(1);
        pause
    }

    /// The pause [`fail`](Backoff::fail) would answer now, without counting.
    pub(crate) fn peek(&self) -> Duration {
        // 2^20 × any sane `first` is past every cap; the shift cannot overflow.
        self.first
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max)
    }

    /// Failures in a row so far.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure starts again at `first`.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(800));
        let pauses: Vec<_> = (0..6).map(|_| b.fail()).collect();
        assert_eq!(
            pauses,
            [ms(100), ms(200), ms(400), ms(800), ms(800), ms(800)]
        );
        assert_eq!(b.failures(), 6);
        b.reset();
        assert_eq!((b.failures(), b.peek()), (0, ms(100)));
    }

    #[test]
    fn many_failures_never_overflow() {
        let mut b = Backoff::new(Duration::from_secs(3600), Duration::from_secs(10));
        for _ in 0..100 {
            assert_eq!(b.fail(), Duration::from_secs(10));
        }
    }
}
