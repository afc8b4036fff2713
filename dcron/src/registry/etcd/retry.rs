//! How a request is sent: short attempts on the current member, moving on
//! to the next member and pausing (a [`Backoff`]) after a failure that
//! [can pass](Error::is_retryable), until the request's budget is spent.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::cluster::Handles;
use super::{errors, EtcdRegistry, BACKEND};
use crate::backoff::Backoff;
use crate::error::{Error, Result};

/// First pause before retrying a failed attempt, doubling up to the next.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(25);
/// Longest pause between two attempts of a small request, so that one
/// goes through soon after a new leader is elected.
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(250);
/// Attempts of a large request (a page of a range read): at least this
/// many, and at least one per member plus one.
const ATTEMPTS: u32 = 3;

/// A failed attempt: the error (its kind says whether to try again) and
/// what it says about the member.
pub(super) struct Failure {
    pub error: Error,
    pub cause: Cause,
}

/// What a failed attempt says about its member.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    /// It answered with an error, or not in time: try the next member
    /// after a pause.
    Failed,
    /// It is unreachable (connection refused or broken): try the next
    /// member, skipping this one for a while.
    Down,
    /// Its leader changed while the request was pending (so it was
    /// dropped, or applied): try again at once; it knows the new leader.
    Moved,
}

impl Failure {
    pub(super) fn new(error: Error) -> Failure {
        Failure {
            error,
            cause: Cause::Failed,
        }
    }

    /// The failure of an etcd call made while doing `what`.
    fn of(err: etcd_client::Error, what: &str) -> Failure {
        let cause = if errors::unreachable(&err) {
            Cause::Down
        } else {
            Cause::Failed
        };
        Failure {
            error: errors::convert(err, what),
            cause,
        }
    }
}

/// How long a request may keep trying.
#[derive(Clone, Copy)]
enum Budget {
    /// Short attempts (the attempt timeout) until this instant.
    Until(Instant),
    /// This many attempts of the request timeout each.
    Attempts(u32),
}

/// An answer of etcd, and the raft term it was given in (if it says).
pub(super) trait Answer {
    fn term(&self) -> Option<u64>;
}

macro_rules! answer_with_header {
    ($($t:ty),* $(,)?) => {$(
        impl Answer for $t {
            fn term(&self) -> Option<u64> {
                self.header().map(|h| h.raft_term())
            }
        }
    )*};
}

answer_with_header!(
    etcd_client::GetResponse,
    etcd_client::PutResponse,
    etcd_client::DeleteResponse,
    etcd_client::TxnResponse,
    etcd_client::LeaseGrantResponse,
    etcd_client::LeaseRevokeResponse,
    etcd_client::StatusResponse,
);

impl Answer for () {
    fn term(&self) -> Option<u64> {
        None
    }
}

impl Answer for etcd_client::WatchStream {
    fn term(&self) -> Option<u64> {
        None
    }
}

impl EtcdRegistry {
    /// A small request (one key, a transaction, a lease call), retried
    /// with short attempts until the request timeout.
    pub(super) async fn retrying<T: Answer, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: FnMut(Handles) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.options.request_timeout;
        self.retry(what, Budget::Until(deadline), op).await
    }

    /// [`retrying`](Self::retrying) until `deadline`.
    pub(super) async fn retrying_until<T: Answer, F, Fut>(
        &self,
        what: &str,
        deadline: Instant,
        op: F,
    ) -> Result<T>
    where
        F: FnMut(Handles) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.retry(what, Budget::Until(deadline), op).await
    }

    /// A large request (a page of a range read, the probe at connect): a
    /// few attempts, each bounded by the request timeout.
    pub(super) async fn retrying_long<T: Answer, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: FnMut(Handles) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let attempts = ATTEMPTS.max(self.shared.members.len() as u32 + 1);
        self.retry(what, Budget::Attempts(attempts), op).await
    }

    async fn retry<T: Answer, F, Fut>(&self, what: &str, budget: Budget, mut op: F) -> Result<T>
    where
        F: FnMut(Handles) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let mut backoff = Backoff::new(FIRST_RETRY_PAUSE, MAX_RETRY_PAUSE);
        let mut attempt = 1;
        loop {
            let bound = match budget {
                Budget::Until(deadline) => self.attempt_bound(deadline),
                Budget::Attempts(_) => self.options.request_timeout,
            };
            let failure = match self.attempt(what, bound, &mut op).await {
                Ok(answer) => return Ok(answer),
                Err(failure) => failure,
            };
            let wait = self.retry_pause(&failure, &mut backoff);
            let spent = match budget {
                Budget::Until(deadline) => Instant::now() + wait >= deadline,
                Budget::Attempts(attempts) => attempt >= attempts,
            };
            if spent || !failure.error.is_retryable() {
                return Err(failure.error);
            }
            tracing::debug!(backend = BACKEND, what, error = ?failure.error, attempt, "retrying");
            attempt += 1;
            tokio::time::sleep(wait).await;
        }
    }

    /// The pause before trying again after `failure`: none after a leader
    /// change (the member knows the new leader), nor after an unreachable
    /// member when the request moved on to one not found unreachable; else
    /// the next pause of `backoff`.
    fn retry_pause(&self, failure: &Failure, backoff: &mut Backoff) -> Duration {
        let at_once = match failure.cause {
            Cause::Moved => true,
            Cause::Down => self
                .shared
                .members
                .get(self.current())
                .is_some_and(|m| !m.is_down()),
            Cause::Failed => false,
        };
        if at_once {
            Duration::ZERO
        } else {
            backoff.fail()
        }
    }

    /// The bound on the next attempt of a request that must end by `deadline`.
    fn attempt_bound(&self, deadline: Instant) -> Duration {
        self.attempt_timeout
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1))
    }

    /// One attempt of a request on the current member, bounded by `bound`;
    /// a retryable failure moves on to the next member.
    ///
    /// An attempt still pending after a moment is watched: a write in
    /// flight when the leader died is never answered (the member forwarded
    /// it to the dead leader, and etcd drops it), so once the member has no
    /// leader or reports a new term, the attempt is abandoned and tried
    /// again at once, instead of waiting for the bound.
    pub(super) async fn attempt<T: Answer, F, Fut>(
        &self,
        what: &str,
        bound: Duration,
        op: &mut F,
    ) -> std::result::Result<T, Failure>
    where
        F: FnMut(Handles) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let index = self.current();
        let result = match self.handles(index).await {
            Ok(handles) => {
                let watch = self.watch_leader(index, &handles);
                once(what, bound, op(handles.clone()), watch).await
            }
            Err(failure) => Err(failure),
        };
        let member = &self.shared.members[index];
        match &result {
            Ok(answer) => {
                if let Some(term) = answer.term() {
                    self.shared.term.fetch_max(term, Ordering::Relaxed);
                }
                member.set_down(false);
            }
            Err(failure) if !failure.error.is_retryable() => {}
            Err(Failure { cause, .. }) => match cause {
                Cause::Failed => self.rotate(index),
                Cause::Down => {
                    member.set_down(true);
                    self.rotate(index);
                }
                Cause::Moved => {}
            },
        }
        result
    }
}

/// Bounds `fut` by `bound`, abandons it when `watch` ends first, and sorts
/// its failure. A request cut off is cancelled (its HTTP/2 stream reset);
/// it may have been applied.
async fn once<T>(
    what: &str,
    bound: Duration,
    fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    watch: impl Future<Output = Failure>,
) -> std::result::Result<T, Failure> {
    let result = tokio::select! {
        result = tokio::time::timeout(bound, fut) => result,
        failure = watch => return Err(failure),
    };
    match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(err)) => Err(Failure::of(err, what)),
        Err(_) => Err(Failure::new(Error::Timeout {
            what: format!("etcd: {what}"),
            after: bound,
        })),
    }
}
