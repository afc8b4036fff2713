//! The claim primitive: a compare-and-set on the znode version of
//! `/ns/claims/<task>`, over which [`cas::claim_many`] decides every claim
//! (see `docs/design.md`).
//!
//! Reads are pipelined `getData` (no znode: absent); writes are `setData`
//! on the version read, or `create` for an absent watermark (creating the
//! claims directory first if it is missing). Uncontended, every write of a
//! batch goes in one `multi`; if one of them lost a race the multi changed
//! nothing and they are sent one by one. While the connection is down,
//! reads and writes wait for it to come back (or a new session), up to the
//! claim's deadline; a write whose answer the connection took comes back
//! retryable, and the algorithm settles it by reading.

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use tokio::time::Instant;
use zookeeper_client as zk;
use zookeeper_client::Client;

use super::errors::{copies, zk_err};
use super::session::Inner;
use super::znodes::PIPELINE;
use super::BACKEND;
use crate::error::{Error, Result};
use crate::registry::codec;
use crate::registry::kit::cas::{self, CasStore, Stored};
use crate::registry::kit::keys::{Kind, Layout};
use crate::registry::{Claim, ClaimOutcome};

/// Claims `claim.fire_time` of every task of `tasks` in the namespace of
/// `layout`: one outcome per task, in order, settled within the claim
/// budget.
pub(super) async fn claim_many(
    inner: &Inner,
    layout: &Layout,
    tasks: &[&str],
    claim: &Claim,
) -> Vec<ClaimOutcome> {
    // While disconnected, fail at once rather than queue behind a dead link.
    if let Err(err) = inner.session().await {
        return ClaimOutcome::fail_all(tasks.len(), err);
    }
    let keys: Vec<Result<String>> = tasks.iter().map(|t| layout.key(Kind::Claim, t)).collect();
    let valid: Vec<&str> = keys.iter().filter_map(|k| k.as_deref().ok()).collect();
    let store = ClaimStore {
        inner,
        dir: layout.dir(Kind::Claim),
        deadline: Instant::now() + inner.claim_budget(),
    };
    let mut decided = cas::claim_many(&store, &valid, claim, store.deadline)
        .await
        .into_iter();
    keys.into_iter()
        .map(|key| match key {
            Ok(_) => decided.next().unwrap_or_else(|| {
                ClaimOutcome::Failed(Error::registry_msg(BACKEND, "claim left undecided"))
            }),
            Err(err) => ClaimOutcome::Failed(err),
        })
        .collect()
}

/// The claim watermarks of one namespace, for one claim call.
struct ClaimStore<'a> {
    inner: &'a Inner,
    /// `/ns/claims`, created on the first write that needs it.
    dir: String,
    /// Waits for a connected session end here.
    deadline: Instant,
}

type Write<'a> = Pin<Box<dyn Future<Output = std::result::Result<(), zk::Error>> + Send + 'a>>;

impl ClaimStore<'_> {
    /// A connected session, waited for until the deadline.
    async fn session<T>(&self, n: usize) -> std::result::Result<Client, Vec<Result<T>>> {
        match self.inner.session_by(self.deadline).await {
            Ok(client) => Ok(client),
            Err(err) => Err(copies(err, n).into_iter().map(Err).collect()),
        }
    }

    /// The writes of `chunk` in one transaction: `None` if one of them
    /// failed its compare (nothing was applied).
    async fn commit(
        &self,
        client: &Client,
        chunk: &[(&str, Option<&i32>)],
        value: &[u8],
    ) -> Option<Vec<Result<bool>>> {
        let persistent = self.inner.settings.persistent();
        let mut multi = client.new_multi_writer();
        for (key, version) in chunk {
            let built = match version {
                Some(v) => multi.add_set_data(key, value, Some(**v)),
                None => multi.add_create(key, value, &persistent),
            };
            if let Err(err) = built {
                return Some(each(chunk, "building a claim transaction", &err));
            }
        }
        match multi.commit().await {
            Ok(_) => Some(chunk.iter().map(|_| Ok(true)).collect()),
            Err(zk::MultiWriteError::OperationFailed { .. }) => None,
            Err(zk::MultiWriteError::RequestFailed { source }) => {
                Some(each(chunk, "committing claims", &source))
            }
        }
    }

    /// The writes of `chunk` one by one, pipelined.
    async fn write_each(
        &self,
        client: &Client,
        chunk: &[(&str, Option<&i32>)],
        value: &[u8],
    ) -> Vec<Result<bool>> {
        let persistent = self.inner.settings.persistent();
        // Sent together (pipelined), awaited in order.
        let pending: Vec<Write<'_>> = chunk
            .iter()
            .map(|(key, version)| -> Write<'_> {
                match version {
                    Some(v) => {
                        let fut = client.set_data(key, value, Some(**v));
                        Box::pin(async move { fut.await.map(|_| ()) })
                    }
                    None => {
                        let fut = client.create(key, value, &persistent);
                        Box::pin(async move { fut.await.map(|_| ()) })
                    }
                }
            })
            .collect();
        let mut out = Vec::with_capacity(chunk.len());
        for ((key, version), fut) in chunk.iter().zip(pending) {
            out.push(match (fut.await, version) {
                // No parent: the claims directory is missing.
                (Err(zk::Error::NoNode), None) => self.create_in_new_dir(client, key, value).await,
                (result, _) => answer(key, result),
            });
        }
        out
    }

    /// Creates the claims directory, then the watermark at `key`.
    async fn create_in_new_dir(&self, client: &Client, key: &str, value: &[u8]) -> Result<bool> {
        self.inner.ensure_dir(client, &self.dir).await?;
        let created = client
            .create(key, value, &self.inner.settings.persistent())
            .await;
        answer(key, created.map(|_| ()))
    }
}

/// What one write's result answers the algorithm.
fn answer(key: &str, result: std::result::Result<(), zk::Error>) -> Result<bool> {
    match result {
        Ok(()) => Ok(true),
        // Moved, created or deleted since it was read: read again.
        Err(zk::Error::BadVersion | zk::Error::NodeExists | zk::Error::NoNode) => Ok(false),
        Err(err) => Err(zk_err(format!("writing claim {key}"), err)),
    }
}

/// One error per write of `chunk`, for a failure of all of them.
fn each(chunk: &[(&str, Option<&i32>)], context: &str, err: &zk::Error) -> Vec<Result<bool>> {
    chunk
        .iter()
        .map(|(key, _)| Err(zk_err(format!("{context} ({key})"), err.clone())))
        .collect()
}

#[async_trait]
impl CasStore for ClaimStore<'_> {
    /// The znode version.
    type Version = i32;

    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn read(&self, keys: &[&str]) -> Vec<Result<Option<Stored<i32>>>> {
        let client = match self.session(keys.len()).await {
            Ok(client) => client,
            Err(errs) => return errs,
        };
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(PIPELINE) {
            let pending: Vec<_> = chunk.iter().map(|key| client.get_data(key)).collect();
            for (key, fut) in chunk.iter().zip(pending) {
                out.push(match fut.await {
                    Ok((raw, stat)) => Ok(Some(Stored {
                        version: stat.version,
                        claim: codec::decode_claim(BACKEND, key, &raw),
                    })),
                    Err(zk::Error::NoNode) => Ok(None),
                    Err(err) => Err(zk_err(format!("reading claim {key}"), err)),
                });
            }
        }
        out
    }

    async fn write(&self, writes: &[(&str, Option<&i32>)], value: &[u8]) -> Vec<Result<bool>> {
        let client = match self.session(writes.len()).await {
            Ok(client) => client,
            Err(errs) => return errs,
        };
        let mut out = Vec::with_capacity(writes.len());
        for chunk in writes.chunks(PIPELINE) {
            if chunk.len() > 1 {
                if let Some(answers) = self.commit(&client, chunk, value).await {
                    out.extend(answers);
                    continue;
                }
            }
            out.extend(self.write_each(&client, chunk, value).await);
        }
        out
    }
}
