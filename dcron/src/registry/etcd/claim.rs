//! The claim primitive: etcd's compare-and-set on a key's `mod_revision`,
//! offered to the shared claim algorithm ([`cas::claim_many`]).

use std::collections::HashSet;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse};
use tokio::time::Instant;

use super::{codec, key, EtcdRegistry, BACKEND};
use crate::error::{Error, Result};
use crate::registry::kit::cas::{self, CasStore, Stored};
use crate::registry::kit::keys::Kind;
use crate::registry::{Claim, ClaimOutcome};

/// Operations per transaction: etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;
/// Bound on the remembered claim revisions (cleared when exceeded).
const MAX_CLAIM_CACHE: usize = 100_000;

impl EtcdRegistry {
    /// Claims `claim.fire_time` of every task of `tasks` in namespace `ns`:
    /// one outcome per task, settled by the request timeout from now.
    pub(super) async fn claim_batch(
        &self,
        ns: &str,
        tasks: &[&str],
        claim: &Claim,
    ) -> Vec<ClaimOutcome> {
        let keys: Vec<Result<String>> = tasks.iter().map(|t| key(ns, Kind::Claim, t)).collect();
        let valid: Vec<&str> = keys.iter().filter_map(|k| k.as_deref().ok()).collect();
        let store = ClaimStore {
            registry: self,
            fire_time: claim.fire_time,
            deadline: Instant::now() + self.options.request_timeout,
        };
        let outcomes = cas::claim_many(&store, &valid, claim, store.deadline).await;
        let mut outcomes = outcomes.into_iter();
        keys.into_iter()
            .map(|key| match key {
                Err(err) => ClaimOutcome::Failed(err),
                Ok(_) => outcomes.next().unwrap_or_else(|| {
                    ClaimOutcome::Failed(Error::registry_msg(BACKEND, "claim not attempted"))
                }),
            })
            .collect()
    }
}

/// One claim batch's view of the claim keys.
struct ClaimStore<'a> {
    registry: &'a EtcdRegistry,
    fire_time: i64,
    /// Every request of the batch, retries included, ends by then.
    deadline: Instant,
}

impl ClaimStore<'_> {
    /// `txn`, retried with short attempts until the batch's deadline.
    async fn send(&self, what: &str, txn: Txn) -> Result<TxnResponse> {
        self.registry
            .retrying_until(what, self.deadline, |h| {
                let txn = txn.clone();
                async move {
                    let mut kv = h.kv;
                    kv.txn(txn).await
                }
            })
            .await
    }

    /// Remembers the revision our claim now has at `key`.
    fn remember(&self, key: &str, revision: i64) {
        let mut revs = self.registry.claim_revs();
        if revs.len() >= MAX_CLAIM_CACHE {
            revs.clear();
        }
        revs.insert(key.to_string(), (revision, self.fire_time));
    }
}

#[async_trait]
impl CasStore for ClaimStore<'_> {
    type Version = i64;

    fn backend(&self) -> &'static str {
        BACKEND
    }

    /// Our own last claim at `key`, of an earlier fire time: its revision,
    /// and a placeholder watermark of its fire time (older than this claim,
    /// so the first round writes at once).
    fn known(&self, key: &str) -> Option<Stored<i64>> {
        let (revision, fire_time) = *self.registry.claim_revs().get(key)?;
        (fire_time < self.fire_time).then(|| Stored {
            version: revision,
            claim: Some(Claim::new(fire_time, "", "", 0)),
        })
    }

    async fn read(&self, keys: &[&str]) -> Vec<Result<Option<Stored<i64>>>> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(MAX_TXN_OPS) {
            let gets: Vec<TxnOp> = chunk.iter().map(|key| TxnOp::get(*key, None)).collect();
            match self.send("read claims", Txn::new().and_then(gets)).await {
                Ok(resp) => {
                    let mut answers = resp.op_responses().into_iter();
                    out.extend(chunk.iter().map(|key| match answers.next() {
                        Some(TxnOpResponse::Get(get)) => Ok(get.kvs().first().map(stored)),
                        _ => Err(Error::registry_msg(
                            BACKEND,
                            format!("no answer for `{key}` in a read of claims"),
                        )),
                    }));
                }
                Err(err) => out.extend(fail_all(chunk.len(), err)),
            }
        }
        out
    }

    /// One transaction per chunk, all or nothing: a compare that fails
    /// answers "changed" for every key of the chunk (they are read again).
    async fn write(&self, writes: &[(&str, Option<&i64>)], value: &[u8]) -> Vec<Result<bool>> {
        // etcd refuses a key twice in one transaction: a repeat answers
        // "changed", and its next read finds the first one's write.
        let mut seen = HashSet::new();
        let (unique, repeats): (Vec<usize>, Vec<usize>) =
            (0..writes.len()).partition(|&i| seen.insert(writes[i].0));
        let mut out: Vec<Option<Result<bool>>> = (0..writes.len()).map(|_| None).collect();
        for i in repeats {
            out[i] = Some(Ok(false));
        }
        for chunk in unique.chunks(MAX_TXN_OPS) {
            let compares = chunk.iter().map(|&i| match writes[i] {
                (key, None) => Compare::create_revision(key, CompareOp::Equal, 0),
                (key, Some(&revision)) => Compare::mod_revision(key, CompareOp::Equal, revision),
            });
            let puts = chunk.iter().map(|&i| TxnOp::put(writes[i].0, value, None));
            let txn = Txn::new()
                .when(compares.collect::<Vec<_>>())
                .and_then(puts.collect::<Vec<_>>());
            let answers = match self.send("claim a fire time", txn).await {
                Ok(resp) if resp.succeeded() => {
                    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                    for &i in chunk {
                        self.remember(writes[i].0, revision);
                    }
                    chunk.iter().map(|_| Ok(true)).collect()
                }
                Ok(_) => chunk.iter().map(|_| Ok(false)).collect(),
                Err(err) => fail_all(chunk.len(), err),
            };
            for (&i, answer) in chunk.iter().zip(answers) {
                out[i] = Some(answer);
            }
        }
        out.into_iter()
            .map(|answer| answer.unwrap_or(Ok(false)))
            .collect()
    }
}

/// A stored watermark: its revision and value (`None` = corrupt).
fn stored(kv: &KeyValue) -> Stored<i64> {
    let key = String::from_utf8_lossy(kv.key());
    Stored {
        version: kv.mod_revision(),
        claim: codec::decode_claim(BACKEND, &key, kv.value()),
    }
}

/// `n` answers of one failed request, each an error of its kind.
fn fail_all<T>(n: usize, err: Error) -> Vec<Result<T>> {
    let mut out: Vec<Result<T>> = (1..n).map(|_| Err(err.duplicate())).collect();
    if n > 0 {
        out.push(Err(err));
    }
    out
}
