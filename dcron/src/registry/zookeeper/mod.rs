//! The ZooKeeper registry (cargo feature `zookeeper`), on the async
//! [`zookeeper_client`] crate. The contract it implements is in
//! `docs/design.md`.
//!
//! Layout under the namespace `ns` (the key layout every backend shares,
//! below `/`), parents created as needed:
//!
//! | data | znode | kind |
//! |---|---|---|
//! | node | `/ns/nodes/<id>` | ephemeral, owned by the registry's session |
//! | dynamic task | `/ns/tasks/<name>` | persistent |
//! | tombstone | `/ns/deleted/<name>` | persistent |
//! | claim watermark | `/ns/claims/<name>` | persistent, compare-and-set by version |
//!
//! Namespaces, node ids and task names are one path segment each: a bad
//! task name fails with [`Error::InvalidTaskName`],
//! a bad namespace or node id with [`Error::InvalidConfig`].
//!
//! One registry is one ZooKeeper session (`session`). The session's own
//! keep-alive is the node's liveness: `heartbeat` only checks that the
//! session is alive and still owns the node's ephemeral znode (`nodes`).
//! When the session ends (expired, abandoned), the next call opens a new
//! one transparently; while the connection is down, calls fail at once
//! with a retryable error, so the node stops claiming instead of queueing
//! work behind a dead link. Client errors are classified where they are
//! converted (`errors`): connection loss, session moved, timeouts are
//! retryable; authentication and ACL refusals are rejections.
//!
//! Claims (`claim`) run the shared compare-and-set algorithm over the
//! znode version: a pipelined read of every watermark, one `multi` for
//! every claim that can win (one write each if a compare failed), and
//! whatever lost a race or lost its answer with the connection settled by
//! reading again, once the session is back; each claim gets its own
//! outcome, a claim still unsettled at the deadline (4/5 of the request
//! timeout) is `Failed`.
//!
//! When a server dies (the leader too), its clients reconnect to another
//! server within the session; an election with the usual short ticks takes
//! well under a second. Measured on a three-server ensemble (tick 500 ms),
//! a claim loop stalls about 0.5 s across a leader kill and 0.1 s across a
//! follower kill.
//!
//! Changes arrive by three persistent recursive watches (`feed`), on
//! `/ns/nodes`, `/ns/tasks` and `/ns/deleted`; `/ns/claims` is not
//! watched, so a fire costs no watch traffic.
//!
//! Build one with [`ZookeeperRegistry::connect`] or
//! [`ZookeeperRegistry::builder`], then hand it to [`Dcron::builder`](crate::Dcron::builder).

mod builder;
mod claim;
mod errors;
mod feed;
mod nodes;
mod session;
mod znodes;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use zookeeper_client::Client;

pub use self::builder::ZookeeperRegistryBuilder;
pub use zookeeper_client;

use self::session::Inner;
use self::znodes::Found;
use super::codec;
use super::kit::keys::{Kind, Layout};
use super::{Claim, ClaimOutcome, Registry, Timing, WatchReceiver};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::task::TaskMeta;

const BACKEND: &str = "zookeeper";

/// Default session timeout: a crashed node's znode disappears this long
/// after its last contact with the ensemble.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on opening a session.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on one registry call.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A [`Registry`] on ZooKeeper 3.6+ (ephemeral znodes, versioned
/// `setData`, persistent recursive watches). Clones share one session.
///
/// ```no_run
/// # async fn demo() -> dcron::Result<()> {
/// use dcron::registry::ZookeeperRegistry;
///
/// // Several servers and an optional chroot, as in every ZooKeeper client.
/// let registry = ZookeeperRegistry::connect("127.0.0.1:2181,127.0.0.1:2182/dcron").await?;
/// # drop(registry);
/// # Ok(())
/// # }
/// ```
///
/// Starting from an existing client of the same [`zookeeper_client`]
/// version:
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use dcron::registry::zookeeper::zookeeper_client::Client;
/// use dcron::registry::ZookeeperRegistry;
///
/// let client = Client::connect("127.0.0.1:2181").await?;
/// let registry = ZookeeperRegistry::builder("127.0.0.1:2181")
///     .client(client)
///     .connect()
///     .await?;
/// # drop(registry);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ZookeeperRegistry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ZookeeperRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let settings = &self.inner.settings;
        f.debug_struct("ZookeeperRegistry")
            .field("connect", &settings.connect)
            .field("session_timeout", &self.session_timeout())
            .field("options", &settings.options)
            .field("digest", &settings.digest)
            .finish_non_exhaustive()
    }
}

impl ZookeeperRegistry {
    /// Connects to `connect` (`host:port[,host:port...][/chroot]`) with the
    /// default options (10 s session timeout, no authentication). See
    /// [`builder`](Self::builder) for the others.
    pub async fn connect(connect: impl Into<String>) -> Result<Self> {
        Self::builder(connect).connect().await
    }

    /// A builder for the ensemble at `connect`
    /// (`host:port[,host:port...][/chroot]`; a chroot that does not exist
    /// yet is created).
    pub fn builder(connect: impl Into<String>) -> ZookeeperRegistryBuilder {
        ZookeeperRegistryBuilder::new(connect.into())
    }

    /// The session timeout negotiated with the ensemble: how long a crashed
    /// node stays listed.
    pub fn session_timeout(&self) -> Duration {
        self.inner.negotiated()
    }

    /// The client of the current session, if there is one.
    pub fn client(&self) -> Option<Client> {
        self.inner.lock_slot().clone()
    }

    /// Drops the connection of the current session without closing the
    /// session, as a killed process would: its ephemeral node stays until
    /// the ensemble expires the session (the session timeout), and other
    /// nodes then see it leave. The next call opens a new session; watch
    /// feeds move to it and send [`WatchEvent::Resync`](super::WatchEvent::Resync).
    /// For fault tests.
    pub fn abandon_session(&self) {
        let dropped = self.inner.lock_slot().take();
        if let Some(client) = &dropped {
            tracing::info!(backend = BACKEND, session = %client.session_id(), "abandoning ZooKeeper session");
        }
        self.inner.epoch.send_modify(|e| *e += 1);
        drop(dropped);
    }
}

/// The layout of namespace `ns`.
fn layout(ns: &str) -> Result<Layout> {
    Layout::new("/", ns)
}

#[async_trait]
impl Registry for ZookeeperRegistry {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn timing(&self) -> Timing {
        let settings = &self.inner.settings;
        if settings.custom_timing {
            return settings.options.timing;
        }
        let session = self.session_timeout().max(Duration::from_secs(1));
        Timing {
            node_ttl: session,
            // Cheap `exists` that only notices a lost session or znode.
            heartbeat: (session / 5).max(Duration::from_millis(200)),
            reload: Duration::from_secs(30),
        }
    }

    async fn register(&self, ns: &str, node: &Node, _ttl: Duration) -> Result<()> {
        let layout = layout(ns)?;
        let (path, dir) = (layout.key(Kind::Node, &node.id)?, layout.dir(Kind::Node));
        let inner = &*self.inner;
        inner
            .call("registering a node", |c| async move {
                inner
                    .register_at(&c, &dir, &path, &codec::encode(node))
                    .await
            })
            .await
    }

    async fn heartbeat(&self, ns: &str, node_id: &str, _ttl: Duration) -> Result<bool> {
        let path = layout(ns)?.key(Kind::Node, node_id)?;
        let inner = &*self.inner;
        inner
            .call("checking a node's registration", |c| async move {
                Ok(inner.owned(&c, &path).await?.is_some())
            })
            .await
    }

    async fn update_node(&self, ns: &str, node: &Node) -> Result<bool> {
        let path = layout(ns)?.key(Kind::Node, &node.id)?;
        let inner = &*self.inner;
        inner
            .call("updating a node", |c| async move {
                inner.update_at(&c, &path, &codec::encode(node)).await
            })
            .await
    }

    async fn unregister(&self, ns: &str, node_id: &str) -> Result<()> {
        let path = layout(ns)?.key(Kind::Node, node_id)?;
        self.delete_at("unregistering a node", path).await
    }

    async fn nodes(&self, ns: &str) -> Result<Vec<Node>> {
        let found = self.read_dir("listing nodes", ns, Kind::Node).await?;
        Ok(found
            .into_iter()
            .filter_map(|(id, found)| {
                let (raw, stat) = found?;
                if stat.ephemeral_owner == 0 {
                    tracing::warn!(backend = BACKEND, key = %id, "skipping a node record that is not an ephemeral znode");
                    return None;
                }
                codec::decode_node(BACKEND, &id, &raw)
            })
            .collect())
    }

    async fn put_task(&self, ns: &str, meta: &TaskMeta, overwrite: bool) -> Result<()> {
        let layout = layout(ns)?;
        let (path, dir) = (layout.key(Kind::Task, &meta.name)?, layout.dir(Kind::Task));
        let inner = &*self.inner;
        inner
            .call("storing a task", |c| async move {
                let data = codec::encode(meta);
                if overwrite {
                    inner.upsert(&c, &dir, &path, &data).await
                } else if inner.create_new(&c, &dir, &path, &data).await? {
                    Ok(())
                } else {
                    Err(Error::TaskExists(meta.name.clone()))
                }
            })
            .await
    }

    async fn delete_task(&self, ns: &str, name: &str) -> Result<()> {
        let path = layout(ns)?.key(Kind::Task, name)?;
        self.delete_at("deleting a task", path).await
    }

    async fn tasks(&self, ns: &str) -> Result<Vec<TaskMeta>> {
        let found = self.read_dir("listing tasks", ns, Kind::Task).await?;
        Ok(found
            .into_iter()
            .filter_map(|(name, found)| codec::decode_task(BACKEND, &name, &found?.0))
            .collect())
    }

    async fn put_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        let layout = layout(ns)?;
        let (path, dir) = (
            layout.key(Kind::Tombstone, name)?,
            layout.dir(Kind::Tombstone),
        );
        let data = codec::encode(&serde_json::json!({ "deleted": true }));
        let inner = &*self.inner;
        inner
            .call("writing a tombstone", |c| async move {
                inner.create_new(&c, &dir, &path, &data).await.map(drop)
            })
            .await
    }

    async fn delete_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        let path = layout(ns)?.key(Kind::Tombstone, name)?;
        self.delete_at("deleting a tombstone", path).await
    }

    async fn tombstones(&self, ns: &str) -> Result<Vec<String>> {
        let dir = layout(ns)?.dir(Kind::Tombstone);
        let inner = &*self.inner;
        inner
            .call("listing tombstones", |c| async move {
                inner.children(&c, &dir).await
            })
            .await
    }

    async fn claim(&self, ns: &str, task: &str, claim: &Claim) -> Result<bool> {
        match self.claim_many(ns, &[task], claim).await.pop() {
            Some(ClaimOutcome::Won) => Ok(true),
            Some(ClaimOutcome::Lost) => Ok(false),
            Some(ClaimOutcome::Failed(err)) => Err(err),
            None => Err(Error::registry_msg(BACKEND, "claim left unanswered")),
        }
    }

    async fn claim_many(&self, ns: &str, tasks: &[&str], claim: &Claim) -> Vec<ClaimOutcome> {
        let layout = match layout(ns) {
            Ok(layout) => layout,
            Err(err) => return ClaimOutcome::fail_all(tasks.len(), err),
        };
        if tasks.is_empty() {
            return Vec::new();
        }
        // Every step inside is bounded by the claim deadline (4/5 of the
        // request timeout); this outer bound is only a safety net.
        let after = self.inner.settings.options.request_timeout;
        let claiming = claim::claim_many(&self.inner, &layout, tasks, claim);
        match tokio::time::timeout(after, claiming).await {
            Ok(outcomes) => outcomes,
            Err(_) => ClaimOutcome::fail_all(tasks.len(), errors::timed_out("claiming", after)),
        }
    }

    async fn claims(&self, ns: &str) -> Result<Vec<(String, Claim)>> {
        let found = self.read_dir("listing claims", ns, Kind::Claim).await?;
        let mut out: Vec<(String, Claim)> = found
            .into_iter()
            .filter_map(|(name, found)| {
                let claim = codec::decode_claim(BACKEND, &name, &found?.0)?;
                Some((name, claim))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn delete_claim(&self, ns: &str, task: &str) -> Result<()> {
        let path = layout(ns)?.key(Kind::Claim, task)?;
        self.delete_at("deleting a claim", path).await
    }

    async fn clear(&self, ns: &str) -> Result<()> {
        let layout = layout(ns)?;
        let inner = &*self.inner;
        inner
            .call("clearing a namespace", |c| async move {
                for kind in [Kind::Task, Kind::Tombstone, Kind::Claim] {
                    inner.delete_children(&c, &layout.dir(kind)).await?;
                }
                Ok(())
            })
            .await
    }

    async fn watch(&self, ns: &str) -> Result<WatchReceiver> {
        feed::start(self, layout(ns)?).await
    }
}

/// What several calls share: reading a whole directory, deleting a znode.
impl ZookeeperRegistry {
    /// Every child of `kind`'s directory with its data and stat (`None`
    /// for one deleted meanwhile).
    async fn read_dir(&self, what: &str, ns: &str, kind: Kind) -> Result<Vec<(String, Found)>> {
        let dir = layout(ns)?.dir(kind);
        let inner = &*self.inner;
        inner
            .call(what, |c| async move { inner.read_children(&c, &dir).await })
            .await
    }

    /// Deletes `path` (absent is `Ok`).
    async fn delete_at(&self, what: &str, path: String) -> Result<()> {
        let inner = &*self.inner;
        inner
            .call(what, |c| async move { inner.delete(&c, &path).await })
            .await
    }
}
