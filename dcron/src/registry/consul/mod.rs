//! The Consul backend: KV store, sessions and blocking queries over
//! Consul's HTTP API (`reqwest`, a handful of endpoints written by hand).
//! The contract is in `docs/design.md`, section 3.
//!
//! Key layout for namespace `ns`:
//!
//! | key | value | written with |
//! |---|---|---|
//! | `ns/nodes/<id>` | [`Node`] JSON | `?acquire=<session>`: the node's session holds it |
//! | `ns/tasks/<name>` | [`TaskMeta`] JSON | `?cas=0` (create only) or a plain PUT |
//! | `ns/deleted/<name>` | `{"deleted":true}` | `?cas=0` (idempotent, one watch event) |
//! | `ns/claims/<name>` | [`Claim`] JSON | `/v1/txn` `cas` on the read `ModifyIndex` (`0` creates) |
//! | `ns/nodes/`, `ns/tasks/`, `ns/deleted/` | empty | folder keys, so blocking queries wake only for their prefix |
//!
//! **Liveness.** Each registration creates a Consul session (`Behavior=delete`,
//! `LockDelay=0s`, TTL = the node TTL clamped to Consul's 10 s – 24 h range)
//! and acquires the node key with it. `heartbeat` renews the session, so the
//! record is never rewritten and watchers are not woken. A crashed node's
//! session expires and Consul deletes its key: Consul may take up to twice
//! the TTL to do so.
//!
//! **Claims.** The claim algorithm shared by every compare-and-set backend
//! decides each claim; here its reads are `/v1/txn` `get` batches and its
//! writes `/v1/txn` `cas` batches of up to 64 operations, bounded by the
//! request timeout (see `claim`).
//!
//! **Watch.** One blocking query (`?recurse&index=&wait=`) per prefix
//! `ns/nodes/`, `ns/tasks/` and `ns/deleted/`, all feeding one channel;
//! successive snapshots are diffed into put and delete events. Claims live
//! under `ns/claims/`, which nobody watches, so fires wake no one. After an
//! error (agent down, restarted) a prefix is polled again with capped
//! backoff, a fresh read is diffed against its last snapshot and
//! [`WatchEvent::Resync`](crate::registry::WatchEvent::Resync) follows; an
//! index going backwards (data reset) does the same (see `feed`).

mod base64;
mod builder;
mod claim;
mod feed;
mod http;
mod kv;
mod node;
mod session;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use self::http::Http;
use self::session::Sessions;
use super::codec;
use super::kit::keys::{Kind, Layout};
use super::{Claim, ClaimOutcome, Registry, Timing, WatchReceiver};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::task::TaskMeta;

pub use self::builder::ConsulRegistryBuilder;
pub use self::http::RequestStats;
pub use self::session::{session_ttl, MAX_SESSION_TTL, MIN_SESSION_TTL};

const BACKEND: &str = "consul";

/// A [`Registry`] on Consul's KV store and sessions.
///
/// Clones share one HTTP client and the table of sessions this client
/// created. Connect with [`ConsulRegistry::connect`] (defaults) or
/// [`ConsulRegistry::builder`] (ACL token, datacenter, timeouts, your own
/// `reqwest` client).
///
/// ```no_run
/// # async fn demo() -> dcron::Result<()> {
/// use dcron::registry::ConsulRegistry;
///
/// let registry = ConsulRegistry::builder("http://127.0.0.1:8500")
///     .token("my-acl-token") // sent as X-Consul-Token, never logged
///     .datacenter("dc1")
///     .connect()
///     .await?;
/// let node = dcron::Dcron::builder(registry).namespace("billing").build()?;
/// node.start().await?;
/// # Ok(())
/// # }
/// ```
///
/// The node TTL is a Consul session TTL, which Consul requires to be at
/// least 10 s: shorter TTLs are raised to 10 s. Consul may take up to twice
/// the TTL to expire the session of a crashed node.
#[derive(Clone)]
pub struct ConsulRegistry {
    http: Arc<Http>,
    sessions: Arc<Sessions>,
    timing: Timing,
}

impl fmt::Debug for ConsulRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token shows as `***`.
        self.http.fmt(f)
    }
}

impl ConsulRegistry {
    /// A registry on the Consul agent at `address` (`http://host:port` or
    /// `https://host:port`) with default options: no ACL token, the agent's
    /// datacenter, 5 s connect timeout, 10 s request timeout.
    ///
    /// `https://` needs a TLS backend in `reqwest`: enable one in your own
    /// `Cargo.toml` (`reqwest = { version = "0.13", features = ["rustls"] }`),
    /// or pass a configured client with [`ConsulRegistryBuilder::client`].
    ///
    /// ```no_run
    /// # async fn demo() -> dcron::Result<()> {
    /// let registry = dcron::registry::ConsulRegistry::connect("http://127.0.0.1:8500").await?;
    /// # drop(registry);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(address: &str) -> Result<Self> {
        Self::builder(address).connect().await
    }

    /// Options for a registry on the agent at `address`.
    pub fn builder(address: &str) -> ConsulRegistryBuilder {
        ConsulRegistryBuilder::new(address)
    }

    fn from_parts(http: Http, timing: Timing) -> Self {
        ConsulRegistry {
            http: Arc::new(http),
            sessions: Arc::default(),
            timing,
        }
    }

    /// Requests made so far, and how many failed.
    pub fn request_stats(&self) -> RequestStats {
        self.http.request_stats()
    }

    /// Names and entries of `kind` below the namespace (not the folder key).
    async fn list(&self, ns: &str, kind: Kind, what: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let layout = Layout::new("", ns)?;
        let prefix = layout.prefix(kind);
        let (_, entries) = self.http.kv_list(&prefix, None, what).await?;
        Ok(entries
            .iter()
            .filter_map(|e| Some((layout.name_of(kind, &e.key)?.to_string(), e.bytes())))
            .collect())
    }
}

#[async_trait]
impl Registry for ConsulRegistry {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    /// By default a 10 s TTL (Consul's minimum; expiry takes up to 20 s),
    /// a heartbeat every 3 s, a full reload every 10 s.
    fn timing(&self) -> Timing {
        self.timing
    }

    async fn register(&self, ns: &str, node: &Node, ttl: Duration) -> Result<()> {
        self.register_node(ns, node, ttl).await
    }

    async fn heartbeat(&self, ns: &str, node_id: &str, _ttl: Duration) -> Result<bool> {
        self.heartbeat_node(ns, node_id).await
    }

    async fn update_node(&self, ns: &str, node: &Node) -> Result<bool> {
        self.update_node_record(ns, node).await
    }

    async fn unregister(&self, ns: &str, node_id: &str) -> Result<()> {
        self.unregister_node(ns, node_id).await
    }

    async fn nodes(&self, ns: &str) -> Result<Vec<Node>> {
        self.live_nodes(ns).await
    }

    async fn put_task(&self, ns: &str, meta: &TaskMeta, overwrite: bool) -> Result<()> {
        let key = Layout::new("", ns)?.key(Kind::Task, &meta.name)?;
        let query: &[(&str, &str)] = if overwrite { &[] } else { &[("cas", "0")] };
        let value = codec::encode(meta);
        if self.http.kv_put(&key, query, value, "put task").await? {
            Ok(())
        } else if overwrite {
            Err(Error::registry_msg(
                BACKEND,
                format!("put task `{}`: consul refused the write", meta.name),
            ))
        } else {
            Err(Error::TaskExists(meta.name.clone()))
        }
    }

    async fn delete_task(&self, ns: &str, name: &str) -> Result<()> {
        let key = Layout::new("", ns)?.key(Kind::Task, name)?;
        self.http.kv_delete(&key, "delete task").await
    }

    async fn tasks(&self, ns: &str) -> Result<Vec<TaskMeta>> {
        let listed = self.list(ns, Kind::Task, "list tasks").await?;
        Ok(listed
            .iter()
            .filter_map(|(name, raw)| codec::decode_task(BACKEND, name, raw))
            .collect())
    }

    async fn put_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        let key = Layout::new("", ns)?.key(Kind::Tombstone, name)?;
        let value = codec::encode(&serde_json::json!({ "deleted": true }));
        // Create-only: an existing tombstone stays untouched (no second
        // watch event); either answer means the tombstone is there.
        let query = [("cas", "0")];
        self.http
            .kv_put(&key, &query, value, "put tombstone")
            .await
            .map(drop)
    }

    async fn delete_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        let key = Layout::new("", ns)?.key(Kind::Tombstone, name)?;
        self.http.kv_delete(&key, "delete tombstone").await
    }

    async fn tombstones(&self, ns: &str) -> Result<Vec<String>> {
        let listed = self.list(ns, Kind::Tombstone, "list tombstones").await?;
        Ok(listed.into_iter().map(|(name, _)| name).collect())
    }

    async fn claim(&self, ns: &str, task: &str, claim: &Claim) -> Result<bool> {
        // A bad name is a typed error of its own, not a failed claim.
        Layout::new("", ns)?.key(Kind::Claim, task)?;
        let outcome = self.claim_tasks(ns, &[task], claim).await.pop();
        match outcome {
            Some(ClaimOutcome::Won) => Ok(true),
            Some(ClaimOutcome::Lost) => Ok(false),
            Some(ClaimOutcome::Failed(err)) => Err(err),
            None => Err(Error::registry_msg(BACKEND, "claim left unanswered")),
        }
    }

    /// Every claim decided by the shared claim algorithm, in transactions
    /// of up to 64 reads or compare-and-sets (see `claim`).
    async fn claim_many(&self, ns: &str, tasks: &[&str], claim: &Claim) -> Vec<ClaimOutcome> {
        self.claim_tasks(ns, tasks, claim).await
    }

    async fn claims(&self, ns: &str) -> Result<Vec<(String, Claim)>> {
        let listed = self.list(ns, Kind::Claim, "list claims").await?;
        let mut out: Vec<(String, Claim)> = listed
            .into_iter()
            .filter_map(|(name, raw)| {
                let claim = codec::decode_claim(BACKEND, &name, &raw)?;
                Some((name, claim))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn delete_claim(&self, ns: &str, task: &str) -> Result<()> {
        let key = Layout::new("", ns)?.key(Kind::Claim, task)?;
        self.http.kv_delete(&key, "delete claim").await
    }

    async fn clear(&self, ns: &str) -> Result<()> {
        let layout = Layout::new("", ns)?;
        let ops: Vec<serde_json::Value> = [Kind::Task, Kind::Tombstone, Kind::Claim]
            .into_iter()
            .map(|kind| {
                serde_json::json!({"KV": {"Verb": "delete-tree", "Key": layout.prefix(kind)}})
            })
            .collect();
        if self.http.txn(&ops, "clear").await? {
            Ok(())
        } else {
            Err(Error::registry_msg(
                BACKEND,
                "clear: consul rejected the transaction",
            ))
        }
    }

    async fn watch(&self, ns: &str) -> Result<WatchReceiver> {
        feed::start(&self.http, ns).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_one_segment() {
        let l = Layout::new("", "ns").expect("valid");
        assert_eq!(
            l.key(Kind::Claim, "a:b@c").expect("valid"),
            "ns/claims/a:b@c"
        );
        for bad in ["", ".", "..", "a/b", "a?b", "a%2f"] {
            assert!(
                matches!(l.key(Kind::Task, bad), Err(Error::InvalidTaskName { .. })),
                "{bad}"
            );
            assert!(
                matches!(l.key(Kind::Node, bad), Err(Error::InvalidConfig(_))),
                "{bad}"
            );
            assert!(
                matches!(Layout::new("", bad), Err(Error::InvalidConfig(_))),
                "{bad}"
            );
        }
        assert_eq!(l.name_of(Kind::Task, "ns/tasks/x"), Some("x"));
        assert_eq!(l.name_of(Kind::Task, "ns/tasks/x/y"), None);
        assert_eq!(l.name_of(Kind::Task, "ns/tasks/"), None);
    }
}
