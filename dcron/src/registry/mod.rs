//! The registry: where nodes meet.
//!
//! A [`Registry`] stores node records with registry-side expiry, dynamic
//! task definitions, tombstones and per-task claim watermarks, and feeds
//! changes back through [`Registry::watch`]. Every backend implements the
//! same trait and passes the same conformance suite.
//!
//! The trait is object-safe (`Arc<dyn Registry>`): a node, and the `dcron`
//! command, pick the backend at run time, and every call crosses a network
//! anyway, so one boxed future per call costs nothing measurable.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::Result;
use crate::node::Node;
use crate::task::TaskMeta;

pub(crate) mod codec;
mod fault;
pub(crate) mod kit;
mod memory;
pub mod url;

pub use fault::FaultRegistry;
pub use memory::{MemoryRegistry, RawKind};
pub use url::{connect, redact, RegistryUrl};

/// A per-task watermark: the latest fire time claimed, by whom, and when.
///
/// Doubles as "last run" information for tooling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Scheduled fire time claimed, epoch ms (UTC).
    pub fire_time: i64,
    /// Node that claimed it.
    pub node: String,
    /// Claimer's wall clock at claim time, epoch ms (informational only).
    pub claimed_at: i64,
    /// Who claimed it: the node id plus the incarnation chosen at the
    /// node's start. Re-claiming the same fire time with the same token
    /// answers won, so a lost answer can never turn a won claim into a
    /// loss. Empty in watermarks written by older versions (never ours).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
}

impl Claim {
    /// A claim of `fire_time` by `node` under `token`, taken at `claimed_at`.
    pub fn new(fire_time: i64, node: &str, token: &str, claimed_at: i64) -> Claim {
        Claim {
            fire_time,
            node: node.to_string(),
            claimed_at,
            token: token.to_string(),
        }
    }

    /// Whether `stored` is this very claim, already taken: the same fire
    /// time under the same (non-empty) token.
    pub fn is_same(&self, stored: &Claim) -> bool {
        !self.token.is_empty() && stored.fire_time == self.fire_time && stored.token == self.token
    }

    /// What storing this claim over the watermark `stored` answers:
    /// `Some(true)` write it (won), `None` already ours (won, write
    /// nothing), `Some(false)` lost. A corrupt watermark is `stored == None`
    /// as is an absent one.
    pub fn against(&self, stored: Option<&Claim>) -> Option<bool> {
        match stored {
            None => Some(true),
            Some(s) if self.is_same(s) => None,
            Some(s) => Some(s.fire_time < self.fire_time),
        }
    }
}

/// The answer to one claim of a batch.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// The fire time is ours to run (taken now, or found taken by us).
    Won,
    /// A claim for this or a later fire time by someone else exists.
    Lost,
    /// The registry did not answer for this claim; it may or may not have
    /// been stored. Retrying with the same token is safe.
    Failed(crate::Error),
}

impl ClaimOutcome {
    /// `Won` for `true`, `Lost` for `false`, `Failed` for an error.
    pub fn from_result(r: Result<bool>) -> ClaimOutcome {
        match r {
            Ok(true) => ClaimOutcome::Won,
            Ok(false) => ClaimOutcome::Lost,
            Err(err) => ClaimOutcome::Failed(err),
        }
    }

    /// Whether the claim was won.
    pub fn is_won(&self) -> bool {
        matches!(self, ClaimOutcome::Won)
    }

    /// `n` failed outcomes for one error (a batch that got no answer); the
    /// copies keep its kind, so whether to retry is decided the same way.
    pub fn fail_all(n: usize, err: crate::Error) -> Vec<ClaimOutcome> {
        let mut out: Vec<ClaimOutcome> = (1..n)
            .map(|_| ClaimOutcome::Failed(err.duplicate()))
            .collect();
        if n > 0 {
            out.push(ClaimOutcome::Failed(err));
        }
        out
    }
}

/// A change seen in the registry, carrying the new value where there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A node registered or rewrote its record.
    NodePut(Node),
    /// A node's registration is gone (unregistered or expired).
    NodeDelete(String),
    /// A dynamic task was created or overwritten.
    TaskPut(TaskMeta),
    /// A dynamic task definition was removed.
    TaskDelete(String),
    /// A tombstone was written.
    TombstonePut(String),
    /// A tombstone was removed.
    TombstoneDelete(String),
    /// Events may have been lost (reconnect, overflow, compaction): the
    /// receiver should reload everything.
    Resync,
}

/// Timing defaults suited to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a node stays registered without a heartbeat.
    pub node_ttl: Duration,
    /// How often a node extends its liveness.
    pub heartbeat: Duration,
    /// How often a node reloads the whole state (safety net for lost events).
    pub reload: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            node_ttl: Duration::from_secs(10),
            heartbeat: Duration::from_secs(2),
            reload: Duration::from_secs(10),
        }
    }
}

/// Capacity of a watch channel; a backend that finds it full drops the event
/// and sends [`WatchEvent::Resync`] once there is room again.
pub const WATCH_CHANNEL_CAPACITY: usize = 4096;

/// The receiving end of a watch.
pub type WatchReceiver = mpsc::Receiver<WatchEvent>;

/// Storage and change feed shared by the nodes of a cluster.
///
/// Every method takes the namespace `ns`; two namespaces never see each
/// other's data. Names passed in have been validated (see
/// [`validate_task_name`](crate::task::validate_task_name)), so they are
/// always one key segment. Values found in the registry that do not decode
/// are logged (`tracing::warn!`) and skipped, never returned as errors and
/// never a panic.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Short backend name for logs and errors (`memory`, `redis`, ...).
    fn backend(&self) -> &'static str;

    /// Timing defaults for this backend.
    fn timing(&self) -> Timing {
        Timing::default()
    }

    /// Writes the node record, alive for `ttl` from now as measured by the
    /// registry itself (Redis server `TIME`, etcd lease, ZooKeeper session,
    /// Consul session). Overwrites an earlier registration of the same id.
    async fn register(&self, ns: &str, node: &Node, ttl: Duration) -> Result<()>;

    /// Extends the node's liveness by `ttl`, without rewriting the record
    /// and without waking watchers. `Ok(false)` means the registration is
    /// gone (expired, lease or session lost): the caller must `register`.
    async fn heartbeat(&self, ns: &str, node_id: &str, ttl: Duration) -> Result<bool>;

    /// Rewrites the record of a registered node (status or static task
    /// list changed), keeping its liveness binding. `Ok(false)` means the
    /// registration is gone.
    async fn update_node(&self, ns: &str, node: &Node) -> Result<bool>;

    /// Removes the node's registration. Removing an absent node is `Ok`.
    async fn unregister(&self, ns: &str, node_id: &str) -> Result<()>;

    /// Live nodes, in any order. Expired registrations are never returned.
    async fn nodes(&self, ns: &str) -> Result<Vec<Node>>;

    /// Stores a dynamic task. With `overwrite == false` an existing
    /// definition makes it fail with [`Error::TaskExists`](crate::Error::TaskExists)
    /// and changes nothing (atomically).
    async fn put_task(&self, ns: &str, meta: &TaskMeta, overwrite: bool) -> Result<()>;

    /// Removes a dynamic task definition; absent is `Ok`.
    async fn delete_task(&self, ns: &str, name: &str) -> Result<()>;

    /// All dynamic task definitions.
    async fn tasks(&self, ns: &str) -> Result<Vec<TaskMeta>>;

    /// Writes a tombstone for `name` (idempotent).
    async fn put_tombstone(&self, ns: &str, name: &str) -> Result<()>;

    /// Removes the tombstone for `name`; absent is `Ok`.
    async fn delete_tombstone(&self, ns: &str, name: &str) -> Result<()>;

    /// Names carrying a tombstone. A stored tombstone counts whatever its
    /// value, so corrupt data can never revive a deleted task.
    async fn tombstones(&self, ns: &str) -> Result<Vec<String>>;

    /// Claims fire time `claim.fire_time` of `task`, atomically: stores
    /// `claim` and answers `true` if the stored watermark is older (or
    /// absent, or corrupt); answers `true` and changes nothing if the stored
    /// watermark is this very claim ([`Claim::is_same`]: same fire time and
    /// token, taken by an earlier call whose answer was lost); answers
    /// `false` and changes nothing otherwise.
    async fn claim(&self, ns: &str, task: &str, claim: &Claim) -> Result<bool>;

    /// [`claim`](Self::claim) for several tasks at the same fire time: one
    /// outcome per task, in order, always `tasks.len()` of them. A failure
    /// fails only the claims it may have left unanswered; claims the
    /// registry answered keep their answer. Backends override this to batch
    /// round trips; each claim stays individually atomic and idempotent.
    async fn claim_many(&self, ns: &str, tasks: &[&str], claim: &Claim) -> Vec<ClaimOutcome> {
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            out.push(ClaimOutcome::from_result(self.claim(ns, task, claim).await));
        }
        out
    }

    /// The stored claim of every task that has one (corrupt ones skipped).
    async fn claims(&self, ns: &str) -> Result<Vec<(String, Claim)>>;

    /// Removes the claim watermark of `task`; absent is `Ok`.
    async fn delete_claim(&self, ns: &str, task: &str) -> Result<()>;

    /// Removes every task definition, tombstone and claim of the namespace
    /// (node registrations stay).
    async fn clear(&self, ns: &str) -> Result<()>;

    /// Starts a change feed for nodes, tasks and tombstones of `ns` (never
    /// claims: they change on every fire and would wake every node).
    ///
    /// The backend keeps the feed alive across reconnects and sends
    /// [`WatchEvent::Resync`] whenever events may have been lost. The feed
    /// ends when the receiver is dropped. A closed channel means the feed
    /// failed for good; the caller calls `watch` again with backoff.
    async fn watch(&self, ns: &str) -> Result<WatchReceiver>;
}

#[cfg(feature = "consul")]
pub mod consul;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "zookeeper")]
pub mod zookeeper;

#[cfg(feature = "consul")]
pub use self::consul::{ConsulRegistry, ConsulRegistryBuilder};
#[cfg(feature = "etcd")]
pub use self::etcd::{EtcdRegistry, EtcdRegistryBuilder};
#[cfg(feature = "redis")]
pub use self::redis::{RedisRegistry, RedisRegistryBuilder};
#[cfg(feature = "zookeeper")]
pub use self::zookeeper::{ZookeeperRegistry, ZookeeperRegistryBuilder};
