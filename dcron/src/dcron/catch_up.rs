//! Catch-up at a takeover: fires of the tasks this node just took over that
//! came due after their claim watermark while nobody (or another node)
//! owned them run now, as the catch-up policy says.

use std::collections::HashMap;
use std::sync::Arc;

use super::Inner;
use crate::engine::CatchUp;
use crate::schedule::Schedule;

impl Inner {
    /// Queues the missed fires of the tasks in `added` (just taken over).
    /// Only tasks that ran before (have a claim) are caught up.
    pub(super) async fn catch_up(&self, added: Vec<(String, Arc<Schedule>)>) {
        if added.is_empty() || self.catch_up == CatchUp::Skip {
            return;
        }
        let claims = match self
            .call("list claims", self.registry.claims(&self.ns))
            .await
        {
            Ok(claims) => claims.into_iter().collect::<HashMap<_, _>>(),
            Err(err) => {
                tracing::error!(%err, tasks = added.len(), "cannot read claims; fires missed by the tasks just taken over are not caught up");
                return;
            }
        };
        let now = self.clock.now_ms();
        let (mut tasks, mut fires) = (0usize, 0usize);
        for (name, schedule) in added {
            let Some(claim) = claims.get(&name) else {
                continue;
            };
            let missed = self.catch_up.missed(&schedule, claim.fire_time, now);
            if missed.is_empty() {
                continue;
            }
            tracing::debug!(task = %name, fires = missed.len(), first = %crate::clock::rfc3339(missed[0]), "catching up missed fires");
            tasks += 1;
            fires += missed.len();
            for fire_time in missed {
                self.engine.catch_up(&name, fire_time);
            }
        }
        if fires > 0 {
            tracing::info!(
                tasks,
                fires,
                "catching up fires missed while nobody ran these tasks"
            );
        }
    }
}
