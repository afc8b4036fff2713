//! The Redis registry (cargo feature `redis`), on redis-rs with tokio and a
//! [`ConnectionManager`].
//!
//! The contract every backend meets is `docs/design.md`, section 3. Key
//! layout for namespace `ns` (the kit's four kinds, as hashes and a sorted
//! set of one namespace): every key carries the hash tag `{ns}`, so a Redis
//! Cluster keeps a namespace in one slot and the scripts may touch all of
//! its keys. Namespaces, node ids and task names are checked to be one key
//! segment (the task-name alphabet, which has no `{`, `}` or spaces) before
//! any call: a bad task name fails with [`Error::InvalidTaskName`], a bad
//! namespace or node id with [`Error::InvalidConfig`].
//!
//! | data | key | value |
//! |---|---|---|
//! | node liveness | `{ns}:nodes` sorted set | member = node id, score = expiry (epoch ms of the server's `TIME`) |
//! | node record | `{ns}:node:<id>` string | [`Node`] JSON |
//! | dynamic task | `{ns}:tasks` hash | name → [`TaskMeta`] JSON |
//! | tombstone | `{ns}:deleted` hash | name → `{"deleted":true}` (any value counts) |
//! | claim watermark | `{ns}:claims` hash | name → [`Claim`] JSON |
//! | change feed | pub/sub channel `{ns}:events` (`{ns}:events:db<N>` on a database other than 0, since pub/sub ignores databases) | `<kind> <name>` |
//!
//! A node on Redis (the README's quick start shows more):
//!
//! ```no_run
//! use dcron::registry::RedisRegistry;
//! use dcron::{Dcron, TaskContext};
//!
//! # async fn demo() -> dcron::Result<()> {
//! let registry = RedisRegistry::connect("redis://127.0.0.1:6379/0").await?;
//! let node = Dcron::builder(registry).namespace("billing").build()?;
//! node.add_func("nightly-report", "0 30 2 * * *", |ctx: TaskContext| async move {
//!     println!("report for {} (fencing token {})", ctx.scheduled(), ctx.fire_time);
//!     Ok(())
//! })
//! .await?;
//! node.start().await?;
//! dcron::shutdown_signal().await; // Ctrl-C or SIGTERM
//! node.stop().await
//! # }
//! ```
//!
//! The code, one concept per file: [`RedisRegistryBuilder`] (`builder.rs`),
//! the keys (`keys.rs`), the Lua scripts (`lua/*.lua`, loaded by
//! `scripts.rs`), calls and error kinds (`conn.rs`), claims (`claim.rs`),
//! and the watch: its connection (`subscription.rs`), its messages
//! (`message.rs`) and its task (`feed.rs`).
//!
//! * **Liveness** is the server's clock only: every script that touches the
//!   node set reads `TIME` inside the script and computes the expiry there,
//!   so client clocks never matter. `register` scores the member at
//!   `TIME + ttl` and writes the record; `heartbeat` only moves the score
//!   (and the record's safety TTL, see below) and publishes nothing;
//!   `update_node` rewrites the record (`SET .. KEEPTTL`) only while the
//!   member is alive. A member is alive while its score is `>= TIME`.
//!   The record key also carries a Redis TTL of `ttl + 60 s`, renewed by
//!   every heartbeat: it never decides liveness, it only guarantees that the
//!   record of a node nobody reaps does not linger for ever.
//! * **Expired nodes and `NodeDelete`.** Redis has no expiry notification
//!   for sorted-set members, so dcron reaps them itself. One Lua snippet,
//!   shared by every node script, removes the members whose score is below
//!   `TIME`, deletes their records and publishes `node-delete <id>` for each,
//!   atomically: however many clients race, each expiry is published once.
//!   `nodes()`, `register`, `heartbeat` and `update_node` run it; and each
//!   watch feed runs a sweep script that reaps and answers how long until
//!   the next member expires (computed on the server). The feed sleeps that
//!   long (at least 20 ms, at most a quarter of the default node TTL), and
//!   sweeps again at once when a node registers (its TTL may be shorter).
//!   So a crashed node's `NodeDelete` arrives within milliseconds of its
//!   expiry, at a cost of about one cheap script call per watcher per node
//!   TTL.
//! * **Claims** are one Lua script: read the stored watermark, decode it with
//!   `cjson`, answer won without writing if it is this very claim (same fire
//!   time and token), else store the new claim if the stored fire time is
//!   older (or the value is absent or corrupt). Being idempotent, a claim
//!   script is retried once after a dropped connection. `claim_many` sends
//!   up to 1000 tasks per script call, each claim atomic on its own; a
//!   failed call fails only its own claims (and the calls not yet sent).
//!   Being one atomic script, a Redis claim needs no compare-and-set
//!   rounds.
//! * **Change feed**: every write script publishes a small message
//!   (`task-put <name>`, `node-delete <id>`, ...) in the same atomic step as
//!   the write. A watch has its own RESP3 connection subscribed to the
//!   channel (so it needs Redis 6 or later); for `task-put` / `node-put` it
//!   fetches the value (`HGET` / `GET`, pipelined per batch of messages).
//!   Pub/sub is lossy across disconnects: when the connection drops (or
//!   stops answering its ping), the feed resubscribes with capped backoff
//!   and sends [`WatchEvent::Resync`](crate::registry::WatchEvent::Resync); the node's periodic reload covers
//!   the rest. A receiver that lags gets one Resync instead of the events
//!   it could not take, and the feed skips fetching their values meanwhile.
//!   Claims are never published.
//! * **Connections**: a [`ConnectionManager`] with a bounded retry count,
//!   connection timeout and response timeout (its defaults retry for ever),
//!   and every call is bounded again by the request timeout. While the
//!   server is down, calls fail within that bound; once it is back, the
//!   manager reconnects on the next call. Redis errors are classified where
//!   they are converted: unreachable, dropped, timed out, `LOADING`,
//!   `TRYAGAIN`, `BUSY` are [`Unavailable`](crate::RegistryErrorKind::Unavailable)
//!   (retryable); `NOAUTH`, `WRONGPASS`, `NOPERM` are
//!   [`Rejected`](crate::RegistryErrorKind::Rejected). Idempotent calls are
//!   retried once after a retryable error, claims with a token too (they
//!   are idempotent); create-only writes never are. The URL may carry a
//!   password: it is never printed or logged, and errors name only
//!   `host:port/db`.
//! * **Reads of large sets** use `HSCAN` with a cursor (1000 per round
//!   trip), deduplicated, so 10,000 tasks are a handful of round trips and
//!   never one huge blocking reply.

mod builder;
mod claim;
mod conn;
mod feed;
mod keys;
mod message;
mod scripts;
mod subscription;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::Client;

pub use self::builder::RedisRegistryBuilder;
use self::conn::Req;
use self::keys::Keys;
use self::scripts::{
    CLEAR, HDEL_PUBLISH, HEARTBEAT, HSET_NEW, NODES, PUT_TASK, REGISTER, UNREGISTER, UPDATE_NODE,
};
use super::codec;
use super::kit::keys::check_segment;
use super::kit::options::Options;
use super::{Claim, ClaimOutcome, Registry, Timing, WatchReceiver};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::task::TaskMeta;

const BACKEND: &str = "redis";

/// Default bound on establishing one connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default bound on each call (including a reconnect it has to wait for).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default number of reconnect retries of the connection manager.
pub const DEFAULT_RETRIES: usize = 2;

/// A registry on Redis (6 or later), see the [module docs](self) for the
/// key layout and the algorithms.
///
/// Clones share the connection manager.
///
/// ```no_run
/// # async fn demo() -> dcron::Result<()> {
/// use std::time::Duration;
/// use dcron::registry::RedisRegistry;
///
/// // From a URL: `redis://[user:password@]host[:port][/db]`, or
/// // `rediss://` (TLS, with one of redis's TLS features enabled).
/// let registry = RedisRegistry::connect("redis://127.0.0.1:6379/0").await?;
///
/// // With other bounds.
/// let registry = RedisRegistry::builder("redis://:secret@10.0.0.5:6379/2")
///     .connect_timeout(Duration::from_secs(1))
///     .request_timeout(Duration::from_secs(3))
///     .retries(3)
///     .connect()
///     .await?;
///
/// // On an existing client (and, optionally, its connection manager).
/// let url = "redis://127.0.0.1/";
/// let client = redis::Client::open(url).expect("valid URL");
/// let manager = redis::aio::ConnectionManager::new(client.clone())
///     .await
///     .expect("connect");
/// let registry = RedisRegistry::builder(url)
///     .client(client)
///     .connection_manager(manager)
///     .connect()
///     .await?;
/// # drop(registry);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    /// The same server with RESP3, for pub/sub connections.
    pubsub_client: Client,
    manager: ConnectionManager,
    /// `host:port/db`, never the credentials.
    addr: String,
    db: i64,
    options: Options,
}

impl std::fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("addr", &self.inner.addr)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl RedisRegistry {
    /// Connects to `url` with the default bounds; see [`builder`](Self::builder).
    pub async fn connect(url: impl AsRef<str>) -> Result<Self> {
        Self::builder(url.as_ref()).connect().await
    }

    /// Options for a registry at `url`:
    /// `redis://[[user]:password@]host[:port][/db]` or `rediss://...` (TLS;
    /// enable redis's `tokio-rustls-comp` or `tokio-native-tls-comp` feature
    /// in your application), also `redis+unix:///path.sock`.
    pub fn builder(url: impl Into<String>) -> RedisRegistryBuilder {
        RedisRegistryBuilder::new(url.into())
    }

    /// The connection manager, for direct access to the server.
    pub fn connection_manager(&self) -> ConnectionManager {
        self.inner.manager.clone()
    }

    /// The client the registry was built from.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// `host:port/db` of the server (no credentials).
    pub fn address(&self) -> &str {
        &self.inner.addr
    }

    fn keys(&self, ns: &str) -> Result<Keys> {
        Keys::new(ns, self.inner.db)
    }
}

/// A TTL in ms for the scripts: at least 1, at most about 34 years (Lua
/// numbers are doubles; Redis wants integral expiries).
fn millis(d: Duration) -> u64 {
    const MAX_TTL_MS: u64 = 1 << 40;
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_TTL_MS)
}

#[async_trait]
impl Registry for RedisRegistry {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn timing(&self) -> Timing {
        self.inner.options.timing
    }

    async fn register(&self, ns: &str, node: &Node, ttl: Duration) -> Result<()> {
        let mut inv = self.keys(ns)?.for_node(&REGISTER, &node.id)?;
        inv.arg(codec::encode(node)).arg(millis(ttl));
        self.run("register", inv).await.map(drop)
    }

    async fn heartbeat(&self, ns: &str, node_id: &str, ttl: Duration) -> Result<bool> {
        let mut inv = self.keys(ns)?.for_node(&HEARTBEAT, node_id)?;
        inv.arg(millis(ttl));
        Ok(self.run("heartbeat", inv).await? == 1)
    }

    async fn update_node(&self, ns: &str, node: &Node) -> Result<bool> {
        let mut inv = self.keys(ns)?.for_node(&UPDATE_NODE, &node.id)?;
        inv.arg(codec::encode(node));
        Ok(self.run("update node", inv).await? == 1)
    }

    async fn unregister(&self, ns: &str, node_id: &str) -> Result<()> {
        let inv = self.keys(ns)?.for_node(&UNREGISTER, node_id)?;
        self.run("unregister", inv).await.map(drop)
    }

    async fn nodes(&self, ns: &str) -> Result<Vec<Node>> {
        let keys = self.keys(ns)?;
        let inv = keys.node_script(&NODES);
        let flat: Vec<Option<Vec<u8>>> = self.query("list nodes", true, Req::Script(inv)).await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks_exact(2) {
            let [Some(id), record] = pair else { continue };
            let Ok(id) = std::str::from_utf8(id) else {
                tracing::warn!(backend = BACKEND, "skipping a node id that is not UTF-8");
                continue;
            };
            match record {
                Some(raw) => out.extend(codec::decode_node(BACKEND, id, raw)),
                None => tracing::debug!(backend = BACKEND, id, "live node without a record"),
            }
        }
        Ok(out)
    }

    async fn put_task(&self, ns: &str, meta: &TaskMeta, overwrite: bool) -> Result<()> {
        let keys = self.keys(ns)?;
        let mut inv = keys.for_field(&PUT_TASK, &keys.tasks, &meta.name)?;
        inv.arg(codec::encode(meta))
            .arg(if overwrite { "1" } else { "0" });
        // Create-only is not retried: a lost answer would turn into TaskExists.
        match self.query("put task", overwrite, Req::Script(inv)).await? {
            1 => Ok(()),
            _ => Err(Error::TaskExists(meta.name.clone())),
        }
    }

    async fn delete_task(&self, ns: &str, name: &str) -> Result<()> {
        let keys = self.keys(ns)?;
        let mut inv = keys.for_field(&HDEL_PUBLISH, &keys.tasks, name)?;
        inv.arg("task-delete");
        self.run("delete task", inv).await.map(drop)
    }

    async fn tasks(&self, ns: &str) -> Result<Vec<TaskMeta>> {
        let keys = self.keys(ns)?;
        let all = self.scan_hash(&keys.tasks, "list tasks").await?;
        Ok(all
            .iter()
            .filter_map(|(name, raw)| codec::decode_task(BACKEND, name, raw))
            .collect())
    }

    async fn put_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        let keys = self.keys(ns)?;
        let mut inv = keys.for_field(&HSET_NEW, &keys.deleted, name)?;
        inv.arg(r#"{"deleted":true}"#).arg("tombstone-put");
        self.run("put tombstone", inv).await.map(drop)
    }

    async fn delete_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        let keys = self.keys(ns)?;
        let mut inv = keys.for_field(&HDEL_PUBLISH, &keys.deleted, name)?;
        inv.arg("tombstone-delete");
        self.run("delete tombstone", inv).await.map(drop)
    }

    async fn tombstones(&self, ns: &str) -> Result<Vec<String>> {
        let keys = self.keys(ns)?;
        let all = self.scan_hash(&keys.deleted, "list tombstones").await?;
        Ok(all.into_keys().collect())
    }

    async fn claim(&self, ns: &str, task: &str, claim: &Claim) -> Result<bool> {
        check_segment("task name", task)?;
        let keys = self.keys(ns)?;
        let won = self.claim_chunk(&keys, &[task], claim).await?;
        Ok(won.first().copied().unwrap_or(false))
    }

    async fn claim_many(&self, ns: &str, tasks: &[&str], claim: &Claim) -> Vec<ClaimOutcome> {
        self.claim_each(ns, tasks, claim).await
    }

    async fn claims(&self, ns: &str) -> Result<Vec<(String, Claim)>> {
        let keys = self.keys(ns)?;
        let all = self.scan_hash(&keys.claims, "list claims").await?;
        Ok(all
            .into_iter()
            .filter_map(|(name, raw)| {
                codec::decode_claim(BACKEND, &name, &raw).map(|claim| (name, claim))
            })
            .collect())
    }

    async fn delete_claim(&self, ns: &str, task: &str) -> Result<()> {
        check_segment("task name", task)?;
        let keys = self.keys(ns)?;
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(&keys.claims).arg(task);
        let _: i64 = self.query("delete claim", true, Req::Cmd(cmd)).await?;
        Ok(())
    }

    async fn clear(&self, ns: &str) -> Result<()> {
        let keys = self.keys(ns)?;
        let mut inv = CLEAR.prepare_invoke();
        inv.key(&keys.tasks).key(&keys.deleted).key(&keys.claims);
        inv.arg(&keys.events);
        self.run("clear", inv).await.map(drop)
    }

    async fn watch(&self, ns: &str) -> Result<WatchReceiver> {
        let keys = self.keys(ns)?;
        let first = subscription::subscribe(&self.inner, &keys.events).await?;
        let (out, rx) = super::kit::feed::channel(BACKEND, ns);
        tokio::spawn(self::feed::Feed::new(self.clone(), keys, out, first).run());
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_clamped() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::MAX), 1 << 40);
    }
}
