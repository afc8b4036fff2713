//! The claim algorithm for backends with a compare-and-set, written once.
//!
//! etcd (mod revision), ZooKeeper (znode version) and Consul (modify index)
//! store a claim watermark per task and offer a write that succeeds only if
//! the key is unchanged since it was read. Over that primitive
//! ([`CasStore`]) every claim is decided the same way:
//!
//! 1. read the stored watermark (or use the one the backend knows it wrote
//!    last, see [`CasStore::known`]);
//! 2. decide with [`Claim::against`]: ours already (won, no write), a later
//!    or equal one by someone else (lost), or older / absent / corrupt
//!    (write, comparing the version just read);
//! 3. a write whose compare failed is decided again on a fresh read; a
//!    write whose answer was lost (it may have been applied) is settled by
//!    a read too: our own write is found by its token and answers won;
//! 4. every claim gets its own outcome. Whatever is not settled by the
//!    deadline, or after [`MAX_ROUNDS`] rounds, is `Failed` with the last
//!    error (retrying with the same token stays safe).
//!
//! Registry errors that can pass ([`Error::is_retryable`]) are retried
//! after a [`Backoff`] pause within the deadline; others fail the claim.

use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::registry::{Claim, ClaimOutcome};

/// Read-decide-write rounds before a claim that keeps losing its compare
/// to concurrent writers is given up as failed.
pub(crate) const MAX_ROUNDS: usize = 8;

/// A watermark as stored, with the version a compare-and-set compares.
#[derive(Debug, Clone)]
pub(crate) struct Stored<V> {
    /// The backend's version of the key (revision, znode version, index).
    pub version: V,
    /// The decoded watermark; `None` if the value is corrupt (it is then
    /// overwritten like an older one).
    pub claim: Option<Claim>,
}

/// What a backend offers the claim algorithm: batched reads and
/// compare-and-set writes of claim keys. Implementations batch as their
/// protocol allows (pipelines, transactions, concurrent requests) and bound
/// each call by their request timeout.
#[async_trait]
pub(crate) trait CasStore: Send + Sync {
    /// The version a compare-and-set compares.
    type Version: Clone + Send + Sync;

    /// The backend's name, for errors.
    fn backend(&self) -> &'static str;

    /// The watermark at `key` if the backend knows it without reading (its
    /// own last write there). Used on the first round only; a wrong guess
    /// just fails its compare.
    fn known(&self, _key: &str) -> Option<Stored<Self::Version>> {
        None
    }

    /// Reads the watermarks at `keys`: one answer per key, in order;
    /// `Ok(None)` when absent.
    async fn read(&self, keys: &[&str]) -> Vec<Result<Option<Stored<Self::Version>>>>;

    /// Writes `value` at each key if its version is still the given one
    /// (`None`: the key must be absent). One answer per write, in order:
    /// `Ok(true)` stored, `Ok(false)` the compare failed, `Err` not known
    /// whether it was stored.
    async fn write(
        &self,
        writes: &[(&str, Option<&Self::Version>)],
        value: &[u8],
    ) -> Vec<Result<bool>>;
}

/// Where one claim of the batch stands.
enum Step<V> {
    /// Needs a (fresh) read; `why` is the error that made it uncertain.
    Read { why: Option<Error> },
    /// Can win by writing over `expected`.
    Write { expected: Option<V> },
    /// Decided.
    Done(ClaimOutcome),
}

/// Claims `claim.fire_time` at every key of `keys` (one per task): one
/// outcome per key, in order, settled by `deadline` (see the module docs).
pub(crate) async fn claim_many<S: CasStore>(
    store: &S,
    keys: &[&str],
    claim: &Claim,
    deadline: Instant,
) -> Vec<ClaimOutcome> {
    let value = crate::registry::codec::encode(claim);
    let mut steps: Vec<Step<S::Version>> = keys
        .iter()
        .map(|key| match store.known(key) {
            Some(stored) => decide(claim, Ok(Some(stored))),
            None => Step::Read { why: None },
        })
        .collect();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(800));
    for round in 1..=MAX_ROUNDS {
        // Reads first: a write is only ever sent on a version just read.
        let reading: Vec<usize> = indices(&steps, |s| matches!(s, Step::Read { .. }));
        if !reading.is_empty() {
            let batch: Vec<&str> = reading.iter().map(|&i| keys[i]).collect();
            let answers = bounded(store.backend(), deadline, store.read(&batch), batch.len()).await;
            for (&i, answer) in reading.iter().zip(answers) {
                steps[i] = match answer {
                    Err(err) if err.is_retryable() => Step::Read { why: Some(err) },
                    answer => decide(claim, answer),
                };
            }
        }
        let writing: Vec<usize> = indices(&steps, |s| matches!(s, Step::Write { .. }));
        if !writing.is_empty() {
            let batch: Vec<(&str, Option<&S::Version>)> = writing
                .iter()
                .map(|&i| match &steps[i] {
                    Step::Write { expected } => (keys[i], expected.as_ref()),
                    _ => (keys[i], None),
                })
                .collect();
            let answers = bounded(
                store.backend(),
                deadline,
                store.write(&batch, &value),
                batch.len(),
            )
            .await;
            for (&i, answer) in writing.iter().zip(answers) {
                steps[i] = match answer {
                    Ok(true) => Step::Done(ClaimOutcome::Won),
                    // Changed since it was read: decide again on what is there.
                    Ok(false) => Step::Read { why: None },
                    // May have been stored: a read settles it (ours = won).
                    Err(err) if err.is_retryable() => Step::Read { why: Some(err) },
                    Err(err) => Step::Done(ClaimOutcome::Failed(err)),
                };
            }
        }
        let open: Vec<usize> = indices(&steps, |s| !matches!(s, Step::Done(_)));
        if open.is_empty() || round == MAX_ROUNDS {
            break;
        }
        // Lost compares are retried at once; registry errors after a pause.
        let errored = open
            .iter()
            .any(|&i| matches!(&steps[i], Step::Read { why: Some(_) }));
        if errored {
            let pause = backoff.fail();
            if Instant::now() + pause >= deadline {
                break;
            }
            tokio::time::sleep(pause).await;
        } else if Instant::now() >= deadline {
            break;
        }
    }
    let backend = store.backend();
    steps
        .into_iter()
        .map(|step| match step {
            Step::Done(outcome) => outcome,
            Step::Read { why: Some(err) } => ClaimOutcome::Failed(err),
            Step::Read { why: None } | Step::Write { .. } => ClaimOutcome::Failed(
                Error::registry_msg(
                    backend,
                    format!("claim not settled after {MAX_ROUNDS} compare-and-set rounds or by its deadline (concurrent writers)"),
                ),
            ),
        })
        .collect()
}

/// The decision on one watermark read (or known).
fn decide<V>(claim: &Claim, read: Result<Option<Stored<V>>>) -> Step<V> {
    match read {
        Err(err) => Step::Done(ClaimOutcome::Failed(err)),
        Ok(None) => Step::Write { expected: None },
        Ok(Some(stored)) => match claim.against(stored.claim.as_ref()) {
            None => Step::Done(ClaimOutcome::Won),
            Some(false) => Step::Done(ClaimOutcome::Lost),
            Some(true) => Step::Write {
                expected: Some(stored.version),
            },
        },
    }
}

fn indices<V>(steps: &[Step<V>], pred: impl Fn(&Step<V>) -> bool) -> Vec<usize> {
    (0..steps.len()).filter(|&i| pred(&steps[i])).collect()
}

/// `call` bounded by `deadline`, and always `n` answers: a call that runs
/// out of time, or answers short, leaves the rest uncertain (retryable).
async fn bounded<T>(
    backend: &'static str,
    deadline: Instant,
    call: impl std::future::Future<Output = Vec<Result<T>>>,
    n: usize,
) -> Vec<Result<T>> {
    let mut answers: Vec<Result<T>> = tokio::time::timeout_at(deadline, call)
        .await
        .unwrap_or_default();
    answers.truncate(n);
    while answers.len() < n {
        answers.push(Err(Error::unavailable(
            backend,
            "claim call unanswered by its deadline",
            "timed out",
        )));
    }
    answers
}

#[cfg(test)]
mod tests {
    //! The algorithm over an in-process compare-and-set map whose calls can
    //! be made to fail, lose their answer after applying, or race with
    //! another writer. Every backend runs the conformance suite as well.

    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Map {
        data: Mutex<HashMap<String, (u64, Vec<u8>)>>,
        /// Per call, in order: what the next write calls do.
        faults: Mutex<Vec<Fault>>,
        reads: Mutex<usize>,
    }

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Fault {
        /// The write is not applied and errors (retryable).
        Fail,
        /// The write is applied but its answer is lost.
        LoseAnswer,
        /// Another node writes a later claim just before ours.
        Race,
        /// The write is refused for good.
        Reject,
    }

    fn stored(raw: &[u8], version: u64) -> Stored<u64> {
        Stored {
            version,
            claim: serde_json::from_slice(raw).ok(),
        }
    }

    #[async_trait]
    impl CasStore for Map {
        type Version = u64;
        fn backend(&self) -> &'static str {
            "test"
        }
        async fn read(&self, keys: &[&str]) -> Vec<Result<Option<Stored<u64>>>> {
            *self.reads.lock().expect("lock") += 1;
            let data = self.data.lock().expect("lock");
            keys.iter()
                .map(|k| Ok(data.get(*k).map(|(v, raw)| stored(raw, *v))))
                .collect()
        }
        async fn write(&self, writes: &[(&str, Option<&u64>)], value: &[u8]) -> Vec<Result<bool>> {
            let fault = {
                let mut faults = self.faults.lock().expect("lock");
                (!faults.is_empty()).then(|| faults.remove(0))
            };
            let mut data = self.data.lock().expect("lock");
            writes
                .iter()
                .map(|(key, expected)| {
                    if fault == Some(Fault::Fail) {
                        return Err(Error::unavailable("test", "write", "injected"));
                    }
                    if fault == Some(Fault::Reject) {
                        return Err(Error::registry_msg("test", "refused"));
                    }
                    if fault == Some(Fault::Race) {
                        let other = Claim::new(i64::MAX, "other", "other/1", 0);
                        let v = data.get(*key).map_or(1, |(v, _)| v + 1);
                        data.insert(
                            key.to_string(),
                            (v, serde_json::to_vec(&other).expect("json")),
                        );
                    }
                    let current = data.get(*key).map(|(v, _)| *v);
                    if current != expected.copied() {
                        return Ok(false);
                    }
                    let v = current.map_or(1, |v| v + 1);
                    data.insert(key.to_string(), (v, value.to_vec()));
                    if fault == Some(Fault::LoseAnswer) {
                        return Err(Error::unavailable("test", "write", "answer lost"));
                    }
                    Ok(true)
                })
                .collect()
        }
    }

    fn claim(fire: i64, token: &str) -> Claim {
        Claim::new(fire, "n", token, 0)
    }

    async fn run(map: &Map, keys: &[&str], c: &Claim) -> Vec<&'static str> {
        let deadline = Instant::now() + Duration::from_secs(5);
        claim_many(map, keys, c, deadline)
            .await
            .into_iter()
            .map(|o| match o {
                ClaimOutcome::Won => "won",
                ClaimOutcome::Lost => "lost",
                ClaimOutcome::Failed(_) => "failed",
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn claims_are_decided_per_key_and_idempotent() {
        let map = Map::default();
        assert_eq!(
            run(&map, &["a", "b"], &claim(10, "n/1")).await,
            ["won", "won"]
        );
        // Same fire, same token: won again without a write; another token loses.
        assert_eq!(run(&map, &["a"], &claim(10, "n/1")).await, ["won"]);
        assert_eq!(run(&map, &["a"], &claim(10, "m/1")).await, ["lost"]);
        assert_eq!(run(&map, &["a"], &claim(9, "n/1")).await, ["lost"]);
        assert_eq!(
            run(&map, &["a", "c"], &claim(11, "m/1")).await,
            ["won", "won"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn corrupt_watermarks_are_overwritten() {
        let map = Map::default();
        map.data
            .lock()
            .expect("lock")
            .insert("a".into(), (7, b"not json".to_vec()));
        assert_eq!(run(&map, &["a"], &claim(1, "n/1")).await, ["won"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_answer_is_settled_as_won_by_reading_back() {
        let map = Map::default();
        map.faults.lock().expect("lock").push(Fault::LoseAnswer);
        assert_eq!(
            run(&map, &["a", "b"], &claim(10, "n/1")).await,
            ["won", "won"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_writes_are_retried_and_a_race_is_lost() {
        let map = Map::default();
        map.faults
            .lock()
            .expect("lock")
            .extend([Fault::Fail, Fault::Fail]);
        assert_eq!(run(&map, &["a"], &claim(10, "n/1")).await, ["won"]);
        map.faults.lock().expect("lock").push(Fault::Race);
        assert_eq!(run(&map, &["a"], &claim(11, "n/1")).await, ["lost"]);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_fail_at_once_and_outages_by_the_deadline() {
        let map = Map::default();
        map.faults.lock().expect("lock").push(Fault::Reject);
        assert_eq!(run(&map, &["a"], &claim(10, "n/1")).await, ["failed"]);
        assert_eq!(*map.reads.lock().expect("lock"), 1, "no retry of a refusal");
        map.faults
            .lock()
            .expect("lock")
            .extend([Fault::Fail; MAX_ROUNDS + 2]);
        let started = Instant::now();
        assert_eq!(run(&map, &["a"], &claim(11, "n/1")).await, ["failed"]);
        assert!(started.elapsed() <= Duration::from_secs(5));
    }
}
