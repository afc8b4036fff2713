//! Runs of tasks with one-shot or after-run flags (see [`TaskMeta`]): the
//! registry writes around the body (tombstone before a one-shot run;
//! delete, or clean up, after the run), each retried a few times.

use std::future::Future;
use std::time::Duration;

use super::dispatch::CatchUnwind;
use super::state::Runnable;
use super::Engine;
use crate::admin::Forget;
use crate::backoff::Backoff;
use crate::error::Result;
use crate::task::{TaskContext, TaskMeta};

/// Tries of one after-run write before it is reported as failed.
const WRITE_TRIES: u32 = 4;
/// Pause after the first failed try; it doubles after each further one.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_millis(800);

impl Engine {
    /// A run of a task with one-shot or after-run flags.
    pub(super) async fn run_with_flags(&self, r: &Runnable, fire_time: i64) {
        let meta = &r.meta;
        if meta.one_shot {
            // Tombstone before the body runs: a crash mid-run must not let
            // another node run the next fire of a one-shot task.
            if let Err(err) = self.tombstone(meta).await {
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
        if let Err(err) = self.after_run(meta).await {
            tracing::error!(task = %meta.name, %err, "could not apply the task's after-run flags");
            self.report(meta, &err);
        }
    }

    /// Marks the task deleted.
    async fn tombstone(&self, meta: &TaskMeta) -> Result<()> {
        retry(|| self.admin.mark_deleted(&meta.name)).await
    }

    /// The after-run flags: cleanup removes the definition and the claim
    /// (and the tombstone, except a one-shot task's, which keeps it from
    /// running again); delete-after-run writes a tombstone (a one-shot
    /// task has one already).
    async fn after_run(&self, meta: &TaskMeta) -> Result<()> {
        if meta.executed_and_cleanup {
            let what = if meta.one_shot {
                Forget::KeepTombstone
            } else {
                Forget::Everything
            };
            retry(|| self.admin.forget(&meta.name, what)).await
        } else if meta.executed_and_mark_deleted && !meta.one_shot {
            self.tombstone(meta).await
        } else {
            Ok(())
        }
    }
}

/// Tries a registry write up to [`WRITE_TRIES`] times, pausing with
/// backoff between tries; answers the last error.
async fn retry<F, Fut>(mut op: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut backoff = Backoff::new(FIRST_PAUSE, MAX_PAUSE);
    loop {
        match op().await {
            Ok(()) => return Ok(()),
            Err(err) if backoff.failures() + 1 >= WRITE_TRIES => return Err(err),
            Err(_) => tokio::time::sleep(backoff.fail()).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[tokio::test(start_paused = true)]
    async fn retry_pauses_with_backoff_and_answers_the_last_error() {
        let started = tokio::time::Instant::now();
        let mut tries = 0;
        let out = retry(|| {
            tries += 1;
            let n = tries;
            async move { Err(Error::registry_msg("test", format!("try {n}"))) }
        })
        .await;
        assert_eq!(tries, WRITE_TRIES);
        assert!(out.unwrap_err().to_string().contains("try 4"));
        // 100 + 200 + 400 ms between the four tries.
        assert_eq!(started.elapsed(), Duration::from_millis(700));
        let mut tries = 0;
        let ok = retry(|| {
            tries += 1;
            let n = tries;
            async move {
                if n < 3 {
                    Err(Error::registry_msg("test", "not yet"))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert!(ok.is_ok());
        assert_eq!(tries, 3);
    }
}
