//! Reporting missed fires: each one is logged at ERROR (a large batch is
//! summed up after the first lines), passed to the error handler as
//! [`Error::FireMissed`] and counted.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;

use super::state::Pending;
use super::Engine;
use crate::clock::rfc3339;
use crate::error::{Error, MissReason};
use crate::task::TaskMeta;

/// Missed fires logged one by one per batch; the rest are counted.
const MISSED_LOG_LINES: usize = 20;

impl Engine {
    /// Reports fires that left the late window before their claim was
    /// answered.
    pub(super) fn report_expired(&self, expired: Vec<Pending>) {
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
    pub(super) fn report_missed(&self, meta: &TaskMeta, fire_time: i64, reason: MissReason) {
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
}
