//! The etcd v3 registry (cargo feature `etcd`).
//!
//! Key layout for namespace `ns` (the contract is in `docs/design.md`,
//! section 3):
//!
//! | data | key | value |
//! |---|---|---|
//! | node | `/ns/nodes/<id>` | [`Node`] JSON, attached to the node's lease |
//! | dynamic task | `/ns/tasks/<name>` | [`TaskMeta`] JSON |
//! | tombstone | `/ns/deleted/<name>` | `{"deleted":true}` (any value counts) |
//! | claim watermark | `/ns/claims/<name>` | [`Claim`] JSON |
//!
//! Namespaces, node ids and task names are one key segment each (an
//! invalid task name fails with [`Error::InvalidTaskName`], an invalid
//! namespace or node id with [`Error::InvalidConfig`]).
//!
//! * **Liveness** is an etcd lease per node: `register` grants a lease of the
//!   node TTL and writes the record with it, `heartbeat` sends one lease
//!   keep-alive, `update_node` rewrites the record with the same lease inside
//!   a transaction that checks the key still carries it (so a put can never
//!   detach the lease, nor resurrect an expired node), `unregister` revokes
//!   it. The registry keeps the lease of every node it registered; when the
//!   lease is gone, `heartbeat` and `update_node` answer `Ok(false)` and the
//!   node registers again with a new lease.
//! * **Claims** are the shared compare-and-set algorithm on the key's
//!   `mod_revision` (etcd cannot compare inside JSON): watermarks are read
//!   in batched transactions of gets and written in transactions comparing
//!   each key's revision (`create_revision == 0` for an absent key), at most
//!   128 keys per transaction (etcd's default limit). A transaction that
//!   fails its compare answers "changed" for all its keys, which are read
//!   and decided again; one whose outcome is unknown is sent again as it
//!   is, and if it was applied its compare now fails and the read finds our
//!   own watermark by its token (won). The revision of the registry's own
//!   last successful claim of a task is remembered, so the steady state
//!   (the owner claiming its task at each fire time) is one round trip.
//! * **Watch**: one range watch over `/ns/deleted/` .. `/ns/tasks/` — which
//!   covers tombstones, nodes and tasks, but not `/ns/claims/` (claims sort
//!   first), so claim writes never even reach a watcher. The feed resumes
//!   from the last seen revision + 1 after a disconnect (then sends
//!   [`WatchEvent::Resync`](super::WatchEvent::Resync) anyway), and when
//!   that revision was compacted it sends `Resync` and restarts from the
//!   current revision. A receiver too slow for the feed gets a `Resync`.
//! * **Fail-over**: one client per endpoint; requests go to the current
//!   member and move on to the next one after a transport error (that
//!   member is then skipped for a few seconds), "no leader" or a timeout
//!   (the library's own balancing keeps sending part of the requests to a
//!   dead member). A small request (a claim, a lease call, a single key)
//!   is retried with short attempts (the attempt timeout, 1 s) and short
//!   pauses (25 ms doubling to 250 ms) until the request timeout (5 s); a
//!   page of a range read gets the request timeout for each of a few
//!   attempts. When the leader dies, a write in flight at a follower is
//!   never answered (etcd drops the forwarded proposal): an attempt
//!   pending for 200 ms asks its member for its leader every 150 ms (a
//!   local status call, shared by the requests waiting on that member),
//!   and is abandoned as soon as the member has no leader or a new raft
//!   term, then sent again at once to the member that knows the new
//!   leader. A request in flight when a leader dies is thus answered about
//!   when the new leader is elected (the election plus 50 to 300 ms), not
//!   after a request timeout. Errors are sorted where etcd's are converted:
//!   unreachable, timed out or leaderless is retryable, authentication and
//!   permission are rejected (see [`RegistryErrorKind`](crate::RegistryErrorKind)).
//! * **TLS** is not compiled in (it needs `etcd-client`'s `tls` feature and a
//!   crypto library); build a TLS client yourself and pass it with
//!   [`EtcdRegistryBuilder::client`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, ConnectOptions, DeleteOptions, Txn, TxnOp};

use super::{codec, Claim, ClaimOutcome, Registry, Timing, WatchReceiver};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::registry::kit::keys::{Kind, Layout};
use crate::registry::kit::options::Options;
use crate::task::TaskMeta;

mod builder;
mod claim;
mod cluster;
mod errors;
mod feed;
mod kv;
mod lease;
mod retry;

pub use builder::{
    EtcdRegistryBuilder, DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT,
};

const BACKEND: &str = "etcd";
/// Every namespace is a directory at the root of the key space.
const ROOT: &str = "/";

/// A registry on etcd v3 (`etcd-client` 0.21), see the [module docs](self)
/// for the key layout and the algorithms.
///
/// Clones share the connection and the node leases.
///
/// ```no_run
/// # async fn demo() -> dcron::Result<()> {
/// use dcron::registry::EtcdRegistry;
///
/// // One endpoint, or every member of the cluster.
/// let registry = EtcdRegistry::connect([
///     "http://10.0.0.1:2379",
///     "http://10.0.0.2:2379",
///     "http://10.0.0.3:2379",
/// ])
/// .await?;
///
/// // With credentials and other bounds.
/// let registry = EtcdRegistry::builder(["http://127.0.0.1:2379"])
///     .user("dcron", "secret")
///     .connect_timeout(std::time::Duration::from_secs(2))
///     .request_timeout(std::time::Duration::from_secs(3))
///     .connect()
///     .await?;
/// # drop(registry);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct EtcdRegistry {
    shared: Arc<Shared>,
    options: Options,
    attempt_timeout: Duration,
}

/// What clones of a registry share.
struct Shared {
    /// One client per endpoint (or the one client given to the builder).
    members: Vec<cluster::Member>,
    /// Index of the member requests go to.
    current: AtomicUsize,
    /// The latest raft term seen in an answer (0: none yet).
    term: AtomicU64,
    /// How to connect a member that is not connected yet (`None` when the
    /// client was given).
    connect: Option<ConnectOptions>,
    connect_bound: Duration,
    /// `(ns, node id)` → lease of the registration made through this registry.
    leases: Mutex<HashMap<(String, String), i64>>,
    /// Claim key → `(mod_revision, fire_time)` of this registry's last
    /// successful claim there: the next claim compares that revision first.
    claim_revs: Mutex<HashMap<String, (i64, i64)>>,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let endpoints = self.endpoints();
        let current = endpoints.get(self.current()).copied();
        f.debug_struct("EtcdRegistry")
            .field("endpoints", &endpoints)
            .field("current", &current)
            .field("options", &self.options)
            .field("attempt_timeout", &self.attempt_timeout)
            .finish_non_exhaustive()
    }
}

impl EtcdRegistry {
    /// A client of the member currently in use (connecting it if needed),
    /// for direct access to etcd.
    pub async fn client(&self) -> Result<Client> {
        match self.handles(self.current()).await {
            Ok(handles) => Ok(handles.client),
            Err(failure) => Err(failure.error),
        }
    }

    /// The endpoint of every member.
    fn endpoints(&self) -> Vec<&str> {
        self.shared.members.iter().map(|m| m.endpoint()).collect()
    }

    fn leases(&self) -> MutexGuard<'_, HashMap<(String, String), i64>> {
        lock(&self.shared.leases)
    }

    fn claim_revs(&self) -> MutexGuard<'_, HashMap<String, (i64, i64)>> {
        lock(&self.shared.claim_revs)
    }

    /// Deletes `key` (absent is fine).
    async fn delete(&self, key: &str, what: &str) -> Result<()> {
        self.retrying(what, |h| async move {
            let mut kv = h.kv;
            kv.delete(key, None).await
        })
        .await
        .map(drop)
    }
}

/// The layout of namespace `ns` (checked to be one segment).
fn layout(ns: &str) -> Result<Layout> {
    Layout::new(ROOT, ns)
}

/// The key of `name` of `kind` in namespace `ns`, both checked.
fn key(ns: &str, kind: Kind, name: &str) -> Result<String> {
    layout(ns)?.key(kind, name)
}

/// The name of `kind` in a stored `key`, if it is one (UTF-8, one segment).
fn name_in<'k>(layout: &Layout, kind: Kind, key: &'k [u8]) -> Option<&'k str> {
    layout.name_of(kind, std::str::from_utf8(key).ok()?)
}

/// Locks a mutex whose data stays consistent even if a holder panicked
/// (every mutation is a single insert/remove/replace).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Registry for EtcdRegistry {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn timing(&self) -> Timing {
        self.options.timing
    }

    async fn register(&self, ns: &str, node: &Node, ttl: Duration) -> Result<()> {
        self.register_node(ns, node, ttl).await
    }

    async fn heartbeat(&self, ns: &str, node_id: &str, _ttl: Duration) -> Result<bool> {
        // The lease keeps the TTL it was granted with at `register`.
        self.keep_alive(ns, node_id).await
    }

    async fn update_node(&self, ns: &str, node: &Node) -> Result<bool> {
        self.rewrite_node(ns, node).await
    }

    async fn unregister(&self, ns: &str, node_id: &str) -> Result<()> {
        self.unregister_node(ns, node_id).await
    }

    async fn nodes(&self, ns: &str) -> Result<Vec<Node>> {
        let layout = layout(ns)?;
        let kvs = self.list(&layout, Kind::Node, false, "list nodes").await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let id = name_in(&layout, Kind::Node, kv.key())?;
                codec::decode_node(BACKEND, id, kv.value())
            })
            .collect())
    }

    async fn put_task(&self, ns: &str, meta: &TaskMeta, overwrite: bool) -> Result<()> {
        let key = &key(ns, Kind::Task, &meta.name)?;
        let value = &codec::encode(meta);
        if overwrite {
            self.retrying("store a task", |h| async move {
                let mut kv = h.kv;
                kv.put(key.as_str(), value.as_slice(), None).await
            })
            .await?;
            return Ok(());
        }
        if self.create(key, value, "create a task").await? {
            Ok(())
        } else {
            Err(Error::TaskExists(meta.name.clone()))
        }
    }

    async fn delete_task(&self, ns: &str, name: &str) -> Result<()> {
        self.delete(&key(ns, Kind::Task, name)?, "delete a task")
            .await
    }

    async fn tasks(&self, ns: &str) -> Result<Vec<TaskMeta>> {
        let layout = layout(ns)?;
        let kvs = self.list(&layout, Kind::Task, false, "list tasks").await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let name = name_in(&layout, Kind::Task, kv.key())?;
                codec::decode_task(BACKEND, name, kv.value())
            })
            .collect())
    }

    async fn put_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        let key = &key(ns, Kind::Tombstone, name)?;
        let value = &codec::encode(&serde_json::json!({ "deleted": true }));
        // Create-only: an existing tombstone (whatever its value) stays, and
        // watchers see one TombstonePut.
        self.create(key, value, "write a tombstone").await.map(drop)
    }

    async fn delete_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        self.delete(&key(ns, Kind::Tombstone, name)?, "delete a tombstone")
            .await
    }

    async fn tombstones(&self, ns: &str) -> Result<Vec<String>> {
        let layout = layout(ns)?;
        let kvs = self
            .list(&layout, Kind::Tombstone, true, "list tombstones")
            .await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| tombstone_name(&layout, kv.key()).map(str::to_string))
            .collect())
    }

    async fn claim(&self, ns: &str, task: &str, claim: &Claim) -> Result<bool> {
        match self.claim_many(ns, &[task], claim).await.pop() {
            Some(ClaimOutcome::Won) => Ok(true),
            Some(ClaimOutcome::Lost) => Ok(false),
            Some(ClaimOutcome::Failed(err)) => Err(err),
            None => Err(Error::registry_msg(BACKEND, "claim not attempted")),
        }
    }

    /// One run of the shared compare-and-set algorithm for the batch, bounded
    /// by the request timeout (see the module docs).
    async fn claim_many(&self, ns: &str, tasks: &[&str], claim: &Claim) -> Vec<ClaimOutcome> {
        self.claim_batch(ns, tasks, claim).await
    }

    async fn claims(&self, ns: &str) -> Result<Vec<(String, Claim)>> {
        let layout = layout(ns)?;
        let kvs = self
            .list(&layout, Kind::Claim, false, "list claims")
            .await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let name = name_in(&layout, Kind::Claim, kv.key())?;
                let claim = codec::decode_claim(BACKEND, name, kv.value())?;
                Some((name.to_string(), claim))
            })
            .collect())
    }

    async fn delete_claim(&self, ns: &str, task: &str) -> Result<()> {
        let key = key(ns, Kind::Claim, task)?;
        self.claim_revs().remove(&key);
        self.delete(&key, "delete a claim").await
    }

    async fn clear(&self, ns: &str) -> Result<()> {
        let layout = layout(ns)?;
        let claims = layout.prefix(Kind::Claim);
        self.claim_revs().retain(|key, _| !key.starts_with(&claims));
        let prefixes = &[Kind::Task, Kind::Tombstone, Kind::Claim].map(|k| layout.prefix(k));
        // One transaction: all three go at once.
        self.retrying("clear the namespace", |h| async move {
            let ops: Vec<TxnOp> = prefixes
                .iter()
                .map(|p| TxnOp::delete(p.as_str(), Some(DeleteOptions::new().with_prefix())))
                .collect();
            let mut kv = h.kv;
            kv.txn(Txn::new().and_then(ops)).await
        })
        .await
        .map(drop)
    }

    async fn watch(&self, ns: &str) -> Result<WatchReceiver> {
        // Events after this revision are delivered, even if the stream takes
        // a while to open: nothing written after `watch` returns is missed.
        let revision = self.revision().await?;
        self.watch_from(ns, revision).await
    }
}

/// The tombstone name in `key`, skipping (with a warning) keys that are not
/// a valid task name: a tombstone counts whatever its value.
fn tombstone_name<'k>(layout: &Layout, key: &'k [u8]) -> Option<&'k str> {
    let name = name_in(layout, Kind::Tombstone, key);
    if name.is_none_or(|n| crate::registry::kit::keys::check_segment("task name", n).is_err()) {
        tracing::warn!(backend = BACKEND, key = %String::from_utf8_lossy(key), "skipping a tombstone key that is not a valid task name");
        return None;
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_keys() {
        let l = layout("ns").expect("valid");
        assert_eq!(name_in(&l, Kind::Task, b"/ns/tasks/a"), Some("a"));
        assert_eq!(name_in(&l, Kind::Task, b"/ns/tasks/"), None);
        assert_eq!(name_in(&l, Kind::Task, b"/ns/tasks/\xff"), None);
        assert_eq!(name_in(&l, Kind::Task, b"/ns/nodes/a"), None);
        assert_eq!(tombstone_name(&l, b"/ns/deleted/a b"), None);
        assert_eq!(tombstone_name(&l, b"/ns/deleted/a"), Some("a"));
    }

    #[test]
    fn invalid_names_are_typed_errors() {
        assert!(matches!(
            key("ns", Kind::Task, "a/b"),
            Err(Error::InvalidTaskName { .. })
        ));
        assert!(matches!(
            key("ns", Kind::Node, "a b"),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            key("a/b", Kind::Task, "t"),
            Err(Error::InvalidConfig(_))
        ));
    }
}
