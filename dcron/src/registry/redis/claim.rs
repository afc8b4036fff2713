//! Claims: one call of the claim script per chunk of tasks, each claim
//! atomic on the server (no compare-and-set rounds), with an outcome per
//! task.

use super::conn::Req;
use super::keys::Keys;
use super::scripts::CLAIM;
use super::{RedisRegistry, BACKEND};
use crate::error::{Error, Result};
use crate::registry::codec;
use crate::registry::kit::keys::check_segment;
use crate::registry::{Claim, ClaimOutcome};

/// Tasks per claim script call.
const CLAIM_CHUNK: usize = 1000;

impl RedisRegistry {
    /// One script call for `tasks`, each claim atomic on its own. With a
    /// token the script is idempotent, so it is retried once after a
    /// dropped connection (a run whose answer was lost answers won again).
    pub(super) async fn claim_chunk(
        &self,
        keys: &Keys,
        tasks: &[&str],
        claim: &Claim,
    ) -> Result<Vec<bool>> {
        let mut inv = CLAIM.prepare_invoke();
        inv.key(&keys.claims)
            .arg(claim.fire_time)
            .arg(codec::encode(claim))
            .arg(&claim.token);
        for task in tasks {
            inv.arg(*task);
        }
        let idempotent = !claim.token.is_empty();
        let won: Vec<i64> = self.query("claim", idempotent, Req::Script(inv)).await?;
        if won.len() != tasks.len() {
            return Err(Error::registry_msg(
                BACKEND,
                format!(
                    "claim script answered {} results for {} tasks",
                    won.len(),
                    tasks.len()
                ),
            ));
        }
        Ok(won.into_iter().map(|w| w == 1).collect())
    }

    /// One outcome per task, in order: a name that cannot be a key fails
    /// on its own, the others are claimed chunk by chunk.
    pub(super) async fn claim_each(
        &self,
        ns: &str,
        tasks: &[&str],
        claim: &Claim,
    ) -> Vec<ClaimOutcome> {
        let keys = match self.keys(ns) {
            Ok(keys) => keys,
            Err(err) => return ClaimOutcome::fail_all(tasks.len(), err),
        };
        let mut checked: Vec<Option<ClaimOutcome>> = tasks
            .iter()
            .map(|task| {
                check_segment("task name", task)
                    .err()
                    .map(ClaimOutcome::Failed)
            })
            .collect();
        let valid: Vec<&str> = tasks
            .iter()
            .zip(&checked)
            .filter(|(_, checked)| checked.is_none())
            .map(|(task, _)| *task)
            .collect();
        let mut answers = self.claim_chunks(&keys, &valid, claim).await.into_iter();
        checked
            .iter_mut()
            .map(|checked| {
                checked
                    .take()
                    .or_else(|| answers.next())
                    .unwrap_or_else(|| {
                        ClaimOutcome::Failed(Error::registry_msg(BACKEND, "claim left unanswered"))
                    })
            })
            .collect()
    }

    /// One script call per chunk of `CLAIM_CHUNK` tasks. A chunk that
    /// fails fails only its own claims and the chunks not sent after it
    /// (the server is likely down); answered chunks keep their answers.
    async fn claim_chunks(&self, keys: &Keys, tasks: &[&str], claim: &Claim) -> Vec<ClaimOutcome> {
        let mut out = Vec::with_capacity(tasks.len());
        for chunk in tasks.chunks(CLAIM_CHUNK) {
            match self.claim_chunk(keys, chunk, claim).await {
                Ok(won) => out.extend(won.into_iter().map(|w| ClaimOutcome::from_result(Ok(w)))),
                Err(err) => {
                    out.extend(ClaimOutcome::fail_all(chunk.len(), err));
                    break;
                }
            }
        }
        let unsent = tasks.len() - out.len();
        if unsent > 0 {
            out.extend(ClaimOutcome::fail_all(
                unsent,
                Error::registry_msg(
                    BACKEND,
                    "claim not sent: an earlier chunk of the batch failed",
                ),
            ));
        }
        out
    }
}
