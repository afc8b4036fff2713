//! Running won fires: a body that finishes without waiting costs no task
//! spawn; the overlap policy decides about a fire whose previous run still
//! goes (skipped, or run after a late previous run, in order); every run
//! and every claimed fire waiting to run counts as in flight for `drain`.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::state::Runnable;
use super::{Engine, Overlap};
use crate::clock::rfc3339;
use crate::error::{Error, MissReason};
use crate::task::{TaskContext, TaskMeta, TaskResult};

/// A run starting later than this after its fire time is "late": a fire
/// finding it still going waits for it under `Overlap::Skip`.
const LATE_RUN_MS: i64 = 250;
/// Fires late by more than this are logged (WARN) when they run.
const LATE_LOG_MS: i64 = 1_000;

impl Engine {
    /// Runs the won fires of `fire_time` at that time (claims are taken a
    /// little ahead of it), or now if it has come.
    pub(super) fn run_won(self: &Arc<Self>, fire_time: i64, won: Vec<Arc<Runnable>>) {
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

    /// Runs the won fires of one fire time; logs them if they are late.
    fn dispatch_all(self: &Arc<Self>, fire_time: i64, won: &[Arc<Runnable>]) {
        let late = self.cfg.clock.now_ms() - fire_time;
        if late > LATE_LOG_MS {
            tracing::warn!(
                fires = won.len(),
                fire_time = %rfc3339(fire_time),
                late_ms = late,
                "fires running late (caught up after a takeover, or their claims were slow to be answered)"
            );
        }
        let late = late > LATE_RUN_MS;
        for runnable in won {
            self.dispatch(runnable, fire_time, late);
        }
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

    pub(super) fn count_run(self: &Arc<Self>, runnable: Arc<Runnable>) -> RunGuard {
        runnable.running.fetch_add(1, Ordering::SeqCst);
        self.running.fetch_add(1, Ordering::SeqCst);
        RunGuard {
            engine: self.clone(),
            runnable,
        }
    }

    /// Reports a failed or panicked run.
    pub(super) fn finish(
        &self,
        meta: &TaskMeta,
        fire_time: i64,
        outcome: Result<TaskResult, String>,
    ) {
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

    /// Reports a failed run (or a failed registry write around it) to the
    /// error handler, or logs it without one.
    pub(super) fn report(&self, meta: &TaskMeta, err: &Error) {
        match &self.cfg.error_handler {
            Some(handler) => {
                if std::panic::catch_unwind(AssertUnwindSafe(|| handler(meta, err))).is_err() {
                    tracing::error!(task = %meta.name, "the error handler panicked");
                }
            }
            None => tracing::error!(task = %meta.name, %err, "task run failed"),
        }
    }

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

/// Counts claimed fires waiting for their time as in flight.
pub(super) struct Busy(Arc<Engine>);

impl Busy {
    pub(super) fn new(engine: Arc<Engine>) -> Busy {
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
pub(super) struct RunGuard {
    pub(super) engine: Arc<Engine>,
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
pub(super) struct CatchUnwind<F>(pub(super) F);

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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::engine::test_support::{advance, engine, job, Runs, START_MS};
    use crate::engine::Overlap;
    use crate::registry::{FaultRegistry, MemoryRegistry};

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
