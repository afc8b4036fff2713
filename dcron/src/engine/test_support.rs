//! Helpers of the engine's unit tests: an engine on a paused tokio
//! clock, and jobs that record their runs.

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use super::{CatchUp, Engine, EngineConfig, Job, Overlap};
use crate::clock::TokioClock;
use crate::registry::Registry;
use crate::schedule::Schedule;
use crate::task::{TaskContext, TaskMeta};

pub(super) const START_MS: i64 = 1_800_000_000_000;

/// The fire times a job ran, in order.
pub(super) type Runs = Arc<StdMutex<Vec<i64>>>;

pub(super) fn engine(registry: Arc<dyn Registry>, overlap: Overlap) -> Arc<Engine> {
    let engine = Engine::new(EngineConfig {
        registry,
        ns: "engine-test".into(),
        node_id: "n1".into(),
        clock: Arc::new(TokioClock::starting_at(START_MS)),
        overlap,
        catch_up: CatchUp::default(),
        error_handler: None,
    });
    engine.resume("n1/test");
    engine
}

/// A job on every second whose body records its fire time and then
/// waits `busy`.
pub(super) fn job(name: &str, runs: &Runs, busy: Duration) -> Job {
    let runs = runs.clone();
    let body = move |ctx: TaskContext| {
        let runs = runs.clone();
        async move {
            runs.lock().unwrap().push(ctx.fire_time);
            if !busy.is_zero() {
                tokio::time::sleep(busy).await;
            }
            Ok(())
        }
    };
    Job {
        meta: Arc::new(TaskMeta::new(name, "* * * * * *")),
        schedule: Arc::new(Schedule::parse("* * * * * *", chrono_tz::UTC).unwrap()),
        body: Arc::new(body),
    }
}

/// Advances the paused clock by `ms` in 10 ms steps (timers fire on the way).
pub(super) async fn advance(ms: u64) {
    for _ in 0..ms / 10 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
