//! The claim primitive: Consul's compare-and-set for the shared claim
//! algorithm ([`cas::claim_many`]). The version compared is a key's
//! `ModifyIndex`; reads are `/v1/txn` `get` operations and writes `/v1/txn`
//! `cas` operations (index 0: the key must be absent), in transactions of
//! at most 64 operations, a few in flight at once.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use async_trait::async_trait;
use tokio::time::Instant;

use super::http::Http;
use super::kv::{KvEntry, TxnAnswer};
use super::{base64, ConsulRegistry, BACKEND};
use crate::error::{Error, RegistryErrorKind, Result};
use crate::registry::codec;
use crate::registry::kit::cas::{self, CasStore, Stored};
use crate::registry::kit::keys::{Kind, Layout};
use crate::registry::{Claim, ClaimOutcome};

/// Consul's limit of operations in one transaction.
const TXN_MAX_OPS: usize = 64;
/// Transactions of one call in flight at once.
const TXN_CONCURRENCY: usize = 4;
/// Transactions of one batch: a rolled-back one is sent again without the
/// operations Consul named as failed.
const TXN_ROUNDS: usize = 3;

impl ConsulRegistry {
    /// Claims `claim.fire_time` of every task of `tasks` in `ns`, decided
    /// by the shared claim algorithm by the request timeout from now. An
    /// invalid name fails its own claim only.
    pub(super) async fn claim_tasks(
        &self,
        ns: &str,
        tasks: &[&str],
        claim: &Claim,
    ) -> Vec<ClaimOutcome> {
        let layout = match Layout::new("", ns) {
            Ok(layout) => layout,
            Err(err) => {
                return copies(err, tasks.len())
                    .into_iter()
                    .map(ClaimOutcome::Failed)
                    .collect()
            }
        };
        let keys: Vec<Result<String>> = tasks
            .iter()
            .map(|task| layout.key(Kind::Claim, task))
            .collect();
        let valid: Vec<&str> = keys.iter().filter_map(|k| k.as_deref().ok()).collect();
        let deadline = Instant::now() + self.http.request_timeout;
        let store = ClaimStore { http: &self.http };
        let mut decided = cas::claim_many(&store, &valid, claim, deadline)
            .await
            .into_iter();
        keys.into_iter()
            .map(|key| match key {
                Err(err) => ClaimOutcome::Failed(err),
                Ok(_) => decided.next().unwrap_or_else(|| {
                    ClaimOutcome::Failed(Error::registry_msg(BACKEND, "claim left unanswered"))
                }),
            })
            .collect()
    }
}

/// Claim watermarks in Consul's KV store, as the claim algorithm sees them.
struct ClaimStore<'a> {
    http: &'a Http,
}

#[async_trait]
impl CasStore for ClaimStore<'_> {
    type Version = u64;

    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn read(&self, keys: &[&str]) -> Vec<Result<Option<Stored<u64>>>> {
        per_batch(keys, |batch| self.read_batch(batch)).await
    }

    async fn write(&self, writes: &[(&str, Option<&u64>)], value: &[u8]) -> Vec<Result<bool>> {
        let value = base64::encode(value);
        per_batch(writes, |batch| self.write_batch(batch, &value)).await
    }
}

/// What a transaction did with one of its operations.
enum Op {
    /// Applied, with the entry Consul answered for it.
    Applied(Option<KvEntry>),
    /// Named by Consul as a reason for the rollback, with why.
    Refused(String),
    /// Not applied: the transaction kept rolling back for others, or
    /// Consul did not say which operation failed.
    Unsettled,
}

impl ClaimStore<'_> {
    /// `get`s; Consul rolls the transaction back for absent keys and names
    /// every one of them.
    async fn read_batch(&self, keys: &[&str]) -> Vec<Result<Option<Stored<u64>>>> {
        let what = "read claims";
        let ops = keys
            .iter()
            .map(|key| serde_json::json!({"KV": {"Verb": "get", "Key": key}}))
            .collect();
        let done = self.transact(ops, what).await;
        done.into_iter()
            .zip(keys)
            .map(|(op, key)| match op? {
                Op::Applied(Some(entry)) => Ok(Some(Stored {
                    version: entry.modify_index,
                    claim: codec::decode_claim(BACKEND, key, &entry.bytes()),
                })),
                // "key \"...\" doesn't exist"
                Op::Refused(why) if why.contains("exist") => Ok(None),
                Op::Refused(why) => Err(Error::registry_msg(BACKEND, format!("{what}: {why}"))),
                Op::Applied(None) | Op::Unsettled => Err(Error::unavailable(
                    BACKEND,
                    what,
                    "consul gave no answer for this key",
                )),
            })
            .collect()
    }

    /// `cas` operations (index 0: must be absent). Whatever was not applied
    /// answers `false`: the algorithm reads it again and decides.
    async fn write_batch(&self, writes: &[(&str, Option<&u64>)], value: &str) -> Vec<Result<bool>> {
        let ops = writes
            .iter()
            .map(|(key, version)| {
                let index = version.copied().unwrap_or(0);
                serde_json::json!({"KV": {"Verb": "cas", "Key": key, "Value": value, "Index": index}})
            })
            .collect();
        let done = self.transact(ops, "write claims").await;
        done.into_iter()
            .map(|op| Ok(matches!(op?, Op::Applied(_))))
            .collect()
    }

    /// `ops` in one transaction; after a rollback, again without the
    /// operations Consul named (nothing of a rolled-back one is applied).
    async fn transact(&self, ops: Vec<serde_json::Value>, what: &str) -> Vec<Result<Op>> {
        let mut answers: Vec<Option<Result<Op>>> = ops.iter().map(|_| None).collect();
        for _ in 0..TXN_ROUNDS {
            let open: Vec<usize> = (0..ops.len()).filter(|&i| answers[i].is_none()).collect();
            if open.is_empty() {
                break;
            }
            let sent: Vec<serde_json::Value> = open.iter().map(|&i| ops[i].clone()).collect();
            match self.http.txn_ops(&sent, what).await {
                Err(err) => {
                    for (&i, err) in open.iter().zip(copies(err, open.len())) {
                        answers[i] = Some(Err(err));
                    }
                }
                Ok(TxnAnswer::Committed(results)) => {
                    let mut results = results.into_iter();
                    for &i in &open {
                        answers[i] = Some(Ok(Op::Applied(results.next().and_then(|r| r.kv))));
                    }
                }
                Ok(TxnAnswer::RolledBack(errors)) => {
                    let named: Vec<(usize, String)> = errors
                        .into_iter()
                        .filter_map(|e| Some((*open.get(e.op_index)?, e.what)))
                        .collect();
                    if named.is_empty() {
                        break;
                    }
                    for (i, why) in named {
                        answers[i] = Some(Ok(Op::Refused(why)));
                    }
                }
            }
        }
        answers
            .into_iter()
            .map(|a| a.unwrap_or(Ok(Op::Unsettled)))
            .collect()
    }
}

/// `n` copies of `err`, one per claim it answers, keeping what decides a
/// retry ([`Error::is_retryable`]) and what makes it typed.
fn copies(err: Error, n: usize) -> Vec<Error> {
    let copy = |e: &Error| match e {
        Error::Timeout { what, after } => Error::Timeout {
            what: what.clone(),
            after: *after,
        },
        Error::InvalidConfig(msg) => Error::InvalidConfig(msg.clone()),
        Error::Registry { kind, context, .. } => {
            Error::registry_msg(BACKEND, context.clone()).with_kind(*kind)
        }
        other => {
            Error::registry_msg(BACKEND, other.to_string()).with_kind(RegistryErrorKind::Other)
        }
    };
    let mut out: Vec<Error> = (1..n).map(|_| copy(&err)).collect();
    if n > 0 {
        out.push(err);
    }
    out
}

/// `batch` over every chunk of at most [`TXN_MAX_OPS`] items,
/// [`TXN_CONCURRENCY`] at once: the answers, in order.
async fn per_batch<'a, I, T, Fut>(items: &'a [I], batch: impl Fn(&'a [I]) -> Fut) -> Vec<T>
where
    Fut: Future<Output = Vec<T>>,
{
    let chunks: Vec<&'a [I]> = items.chunks(TXN_MAX_OPS).collect();
    let mut out = Vec::with_capacity(items.len());
    for group in chunks.chunks(TXN_CONCURRENCY) {
        let mut running: Vec<Pin<Box<Fut>>> = group.iter().map(|c| Box::pin(batch(c))).collect();
        let mut done: Vec<Option<Vec<T>>> = running.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (fut, answer) in running.iter_mut().zip(done.iter_mut()) {
                if answer.is_none() {
                    match fut.as_mut().poll(cx) {
                        Poll::Ready(v) => *answer = Some(v),
                        Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        out.extend(done.into_iter().flatten().flatten());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_keep_the_kind() {
        let err = Error::unavailable(BACKEND, "read claims", "refused");
        let all = copies(err, 3);
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(Error::is_retryable));
        assert!(copies(Error::registry_msg(BACKEND, "x"), 0).is_empty());
    }

    #[tokio::test]
    async fn batches_keep_their_order() {
        let items: Vec<usize> = (0..300).collect();
        let out = per_batch(&items, |chunk| async move { chunk.to_vec() }).await;
        assert_eq!(out, items);
    }
}
