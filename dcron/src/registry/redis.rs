//! The Redis registry (cargo feature `redis`), on redis-rs with tokio and a
//! [`ConnectionManager`].
//!
//! Key layout for namespace `ns` (`docs/design.md`, section 3). Every key carries the hash tag
//! `{ns}`, so a Redis Cluster keeps a namespace in one slot and the scripts
//! below may touch all of its keys:
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
//! A node on Redis, end to end (the quick start of the README):
//!
//! ```no_run
//! use dcron::registry::RedisRegistry;
//! use dcron::{Dcron, Strategy, TaskContext, TaskMeta};
//!
//! #[tokio::main]
//! async fn main() -> dcron::Result<()> {
//!     let registry = RedisRegistry::connect("redis://127.0.0.1:6379/0").await?;
//!     let node = Dcron::builder(registry)
//!         .namespace("billing")
//!         .strategy(Strategy::Consistent)
//!         // Runs the dynamic tasks (added with add_task_meta) this node owns.
//!         .task_handler(|ctx: TaskContext| async move {
//!             println!("{} ({}) for {}", ctx.name(), ctx.payload(), ctx.scheduled());
//!             Ok(())
//!         })
//!         .build()?;
//!     // A static task: defined in code on every node that adds it.
//!     node.add_func("nightly-report", "0 30 2 * * *", |ctx: TaskContext| async move {
//!         println!("report for {} (fencing token {})", ctx.scheduled(), ctx.fire_time);
//!         Ok(())
//!     })
//!     .await?;
//!     // A dynamic task: stored in Redis, seen by every node.
//!     match node
//!         .add_task_meta(TaskMeta::new("invoice-42", "0 */10 * * * *").with_payload(r#"{"customer":42}"#))
//!         .await
//!     {
//!         Ok(()) | Err(dcron::Error::TaskExists(_)) => {} // another node added it first
//!         Err(err) => return Err(err),
//!     }
//!     node.start().await?;
//!     dcron::shutdown_signal().await; // Ctrl-C or SIGTERM
//!     node.stop().await
//! }
//! ```
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
//! * **Change feed**: every write script publishes a small message
//!   (`task-put <name>`, `node-delete <id>`, ...) in the same atomic step as
//!   the write. A watch has its own RESP3 connection subscribed to the
//!   channel (so it needs Redis 6 or later); for `task-put` / `node-put` it
//!   fetches the value (`HGET` / `GET`, pipelined per batch of messages).
//!   Pub/sub is lossy across disconnects: when the connection drops, the
//!   feed reconnects with capped backoff, subscribes again and sends
//!   [`WatchEvent::Resync`]; the node's periodic reload covers the rest.
//!   Claims are never published.
//! * **Connections**: a [`ConnectionManager`] with a bounded retry count,
//!   connection timeout and response timeout (its defaults retry for ever),
//!   and every call is bounded again by the request timeout. While the
//!   server is down, calls fail within that bound; once it is back, the
//!   manager reconnects on the next call. Idempotent calls are retried once
//!   after a dropped connection, claims with a token too (they are
//!   idempotent); create-only writes never are.
//! * **Reads of large sets** use `HSCAN` with a cursor (1000 per round
//!   trip), deduplicated, so 10,000 tasks are a handful of round trips and
//!   never one huge blocking reply.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, Client, FromRedisValue, Msg, ProtocolVersion, PushInfo, PushKind,
    RedisError, Script, ScriptInvocation,
};
use tokio::sync::mpsc::{self, error::TrySendError, UnboundedReceiver};
use tokio::time::Instant;

use super::codec;
use super::{
    Claim, ClaimOutcome, Registry, Timing, WatchEvent, WatchReceiver, WATCH_CHANNEL_CAPACITY,
};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::task::{validate_task_name, TaskMeta};

const BACKEND: &str = "redis";

/// Default bound on establishing one connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default bound on each call (including a reconnect it has to wait for).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default number of reconnect retries of the connection manager.
pub const DEFAULT_RETRIES: usize = 2;

/// Extra lifetime of a node record key beyond its liveness (garbage guard).
const RECORD_GRACE_MS: u64 = 60_000;
/// Fields per `HSCAN` round trip.
const SCAN_COUNT: usize = 1000;
/// Tasks per claim script call.
const CLAIM_CHUNK: usize = 1000;
/// Messages handled (and values fetched) per batch by a watch feed.
const WATCH_BATCH: usize = 512;
/// Capped backoff of a watch feed between reconnect attempts.
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(100);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a watch feed pings its connection (detects half-open sockets).
const PING_EVERY: Duration = Duration::from_secs(5);
/// Shortest pause between two sweeps of a watch feed.
const SWEEP_FLOOR: Duration = Duration::from_millis(20);
/// Pause before sweeping again after a failed sweep.
const SWEEP_RETRY: Duration = Duration::from_secs(1);
/// Pause before the single retry of an idempotent call.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------
// Lua scripts. Node scripts take KEYS[1] = `{ns}:nodes`, ARGV[1] = the record
// key prefix `{ns}:node:`, ARGV[2] = the events channel; record keys are
// built inside the script (same hash tag, so the same cluster slot).

const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function reap(zkey, prefix, channel, now)
  local gone = redis.call('ZRANGEBYSCORE', zkey, '-inf', '(' .. string.format('%.0f', now), 'LIMIT', 0, 1000)
  for _, id in ipairs(gone) do
    redis.call('ZREM', zkey, id)
    redis.call('DEL', prefix .. id)
    redis.call('PUBLISH', channel, 'node-delete ' .. id)
  end
  return #gone
end
"#;

fn node_script(body: &str) -> Script {
    Script::new(&format!(
        "{PRELUDE}\nlocal GRACE = {RECORD_GRACE_MS}\n{body}"
    ))
}

/// ARGV[3] = id, ARGV[4] = record JSON, ARGV[5] = ttl ms.
static REGISTER: LazyLock<Script> = LazyLock::new(|| {
    node_script(
        r#"
local now = now_ms()
reap(KEYS[1], ARGV[1], ARGV[2], now)
local ttl = tonumber(ARGV[5])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
redis.call('SET', ARGV[1] .. ARGV[3], ARGV[4], 'PX', ttl + GRACE)
redis.call('PUBLISH', ARGV[2], 'node-put ' .. ARGV[3])
return 1
"#,
    )
});

/// Shared check of heartbeat/update: the member is alive and has a record.
const ALIVE: &str = r#"
local function alive(zkey, prefix, channel, id)
  if not redis.call('ZSCORE', zkey, id) then return false end
  if redis.call('EXISTS', prefix .. id) == 0 then
    redis.call('ZREM', zkey, id)
    redis.call('PUBLISH', channel, 'node-delete ' .. id)
    return false
  end
  return true
end
"#;

/// ARGV[3] = id, ARGV[4] = ttl ms. Publishes nothing (unless it reaps).
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    node_script(&format!(
        r#"{ALIVE}
local now = now_ms()
reap(KEYS[1], ARGV[1], ARGV[2], now)
if not alive(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
local ttl = tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[3])
redis.call('PEXPIRE', ARGV[1] .. ARGV[3], ttl + GRACE)
return 1
"#
    ))
});

/// ARGV[3] = id, ARGV[4] = record JSON.
static UPDATE: LazyLock<Script> = LazyLock::new(|| {
    node_script(&format!(
        r#"{ALIVE}
local now = now_ms()
reap(KEYS[1], ARGV[1], ARGV[2], now)
if not alive(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('SET', ARGV[1] .. ARGV[3], ARGV[4], 'KEEPTTL')
redis.call('PUBLISH', ARGV[2], 'node-put ' .. ARGV[3])
return 1
"#
    ))
});

/// ARGV[3] = id.
static UNREGISTER: LazyLock<Script> = LazyLock::new(|| {
    node_script(
        r#"
local removed = redis.call('ZREM', KEYS[1], ARGV[3])
redis.call('DEL', ARGV[1] .. ARGV[3])
if removed == 1 then redis.call('PUBLISH', ARGV[2], 'node-delete ' .. ARGV[3]) end
return removed
"#,
    )
});

/// Returns `[id1, record1, id2, record2, ...]` of the live members (a
/// missing record is nil).
static NODES: LazyLock<Script> = LazyLock::new(|| {
    node_script(
        r#"
local now = now_ms()
reap(KEYS[1], ARGV[1], ARGV[2], now)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], string.format('%.0f', now), '+inf')
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('GET', ARGV[1] .. id)
end
return out
"#,
    )
});

/// Reaps; returns ms until the next member expires, or -1 if none.
static SWEEP: LazyLock<Script> = LazyLock::new(|| {
    node_script(
        r#"
local now = now_ms()
reap(KEYS[1], ARGV[1], ARGV[2], now)
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then return -1 end
local left = tonumber(first[2]) - now
if left < 0 then return 0 end
return left
"#,
    )
});

/// KEYS[1] = tasks; ARGV[1] = channel, ARGV[2] = name, ARGV[3] = JSON,
/// ARGV[4] = `1` to overwrite. Returns 0 if it exists (create-only).
static PUT_TASK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
elseif redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3]) == 0 then
  return 0
end
redis.call('PUBLISH', ARGV[1], 'task-put ' .. ARGV[2])
return 1
"#,
    )
});

/// KEYS[1] = hash; ARGV[1] = channel, ARGV[2] = field, ARGV[3] = value,
/// ARGV[4] = message kind. Publishes only when the field is new.
static HSET_NEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local added = redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
if added == 1 then redis.call('PUBLISH', ARGV[1], ARGV[4] .. ' ' .. ARGV[2]) end
return added
"#,
    )
});

/// KEYS[1] = hash; ARGV[1] = channel, ARGV[2] = field, ARGV[3] = message
/// kind. Publishes only when the field existed.
static HDEL_PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local removed = redis.call('HDEL', KEYS[1], ARGV[2])
if removed == 1 then redis.call('PUBLISH', ARGV[1], ARGV[3] .. ' ' .. ARGV[2]) end
return removed
"#,
    )
});

/// KEYS[1] = claims; ARGV[1] = fire time, ARGV[2] = claim JSON, ARGV[3] =
/// claim token, ARGV[4..] = task names. Returns one 0/1 per task: 1 if the
/// claim was stored, or is already stored (same fire time and non-empty
/// token: a retry after a lost answer, nothing written); 0 if the stored
/// watermark is as new or newer. A stored value that is not a claim (as
/// dcron would decode it) counts as absent.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local function int(v)
  return type(v) == 'number' and v == math.floor(v) and v > -9.2e18 and v < 9.2e18
end
local ft = tonumber(ARGV[1])
local token = ARGV[3]
local out = {}
for i = 4, #ARGV do
  local won, write = 1, true
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur then
    local ok, c = pcall(cjson.decode, cur)
    if ok and type(c) == 'table' and int(c.fire_time) and int(c.claimed_at)
        and type(c.node) == 'string'
        and (c.token == nil or type(c.token) == 'string') then
      if token ~= '' and c.fire_time == ft and c.token == token then
        write = false
      elseif c.fire_time >= ft then
        won, write = 0, false
      end
    end
  end
  if write then redis.call('HSET', KEYS[1], ARGV[i], ARGV[2]) end
  out[#out + 1] = won
end
return out
"#,
    )
});

/// KEYS = tasks, deleted, claims; ARGV[1] = channel. Publishes one delete
/// per name, or a single `resync` when there are more than 1000.
static CLEAR: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = redis.call('HLEN', KEYS[1]) + redis.call('HLEN', KEYS[2])
if n > 1000 then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  redis.call('PUBLISH', ARGV[1], 'resync')
  return n
end
local tasks = redis.call('HKEYS', KEYS[1])
local dead = redis.call('HKEYS', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
for _, name in ipairs(tasks) do redis.call('PUBLISH', ARGV[1], 'task-delete ' .. name) end
for _, name in ipairs(dead) do redis.call('PUBLISH', ARGV[1], 'tombstone-delete ' .. name) end
return n
"#,
    )
});

// ---------------------------------------------------------------------------

/// The keys of one namespace.
struct Keys {
    nodes: String,
    node_prefix: String,
    tasks: String,
    deleted: String,
    claims: String,
    events: String,
}

impl Keys {
    fn new(ns: &str, db: i64) -> Self {
        let events = if db == 0 {
            format!("{{{ns}}}:events")
        } else {
            format!("{{{ns}}}:events:db{db}")
        };
        Keys {
            nodes: format!("{{{ns}}}:nodes"),
            node_prefix: format!("{{{ns}}}:node:"),
            tasks: format!("{{{ns}}}:tasks"),
            deleted: format!("{{{ns}}}:deleted"),
            claims: format!("{{{ns}}}:claims"),
            events,
        }
    }

    fn node_script<'a>(&self, script: &'a Script) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(&self.nodes)
            .arg(&self.node_prefix)
            .arg(&self.events);
        inv
    }
}

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
/// // From an existing client (and, optionally, its connection manager).
/// let client = redis::Client::open("redis://127.0.0.1/").expect("valid URL");
/// let registry = RedisRegistry::from_client(client.clone()).await?;
/// let manager = redis::aio::ConnectionManager::new(client.clone())
///     .await
///     .expect("connect");
/// let registry = RedisRegistry::from_connection_manager(client, manager);
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
    timing: Timing,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl std::fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("addr", &self.inner.addr)
            .field("timing", &self.inner.timing)
            .field("connect_timeout", &self.inner.connect_timeout)
            .field("request_timeout", &self.inner.request_timeout)
            .finish_non_exhaustive()
    }
}

enum Target {
    Url(String),
    // Boxed: a client with TLS enabled is large.
    Client(Box<Client>, Option<ConnectionManager>),
}

/// Options for [`RedisRegistry`]; start with [`RedisRegistry::builder`] or
/// [`RedisRegistry::builder_from_client`].
pub struct RedisRegistryBuilder {
    target: Target,
    connect_timeout: Duration,
    request_timeout: Duration,
    retries: usize,
    timing: Timing,
}

impl std::fmt::Debug for RedisRegistryBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the URL: it may carry a password.
        let target = match &self.target {
            Target::Url(_) => "url",
            Target::Client(_, None) => "client",
            Target::Client(_, Some(_)) => "client and connection manager",
        };
        f.debug_struct("RedisRegistryBuilder")
            .field("target", &target)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("retries", &self.retries)
            .field("timing", &self.timing)
            .finish()
    }
}

impl RedisRegistryBuilder {
    fn new(target: Target) -> Self {
        RedisRegistryBuilder {
            target,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            retries: DEFAULT_RETRIES,
            timing: default_timing(),
        }
    }

    /// Bound on establishing one connection (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on each call, and on the answer to each command (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How many times the connection manager retries a failed (re)connect,
    /// with exponential backoff between 100 ms and 1 s (default 2).
    pub fn retries(mut self, retries: usize) -> Self {
        self.retries = retries;
        self
    }

    /// Timing defaults the registry reports to nodes (default: node TTL
    /// 10 s, heartbeat 2 s, reload 10 s).
    pub fn timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// Uses this connection manager for commands instead of opening one
    /// (only with [`RedisRegistry::builder_from_client`]; the client still
    /// opens the pub/sub connections of watches).
    pub fn connection_manager(mut self, manager: ConnectionManager) -> Self {
        if let Target::Client(_, slot) = &mut self.target {
            *slot = Some(manager);
        }
        self
    }

    /// Connects (unless a connection manager was given) and checks the
    /// server answers; fails within the connect bound with an error naming
    /// the address (never the password) when it is unreachable.
    pub async fn connect(self) -> Result<RedisRegistry> {
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(Error::InvalidConfig(
                "redis connect and request timeouts must be positive".into(),
            ));
        }
        let (client, manager) = match self.target {
            Target::Url(url) => (open_client(&url)?, None),
            Target::Client(client, manager) => (*client, manager),
        };
        let addr = describe(&client);
        let db = client.get_connection_info().redis_settings().db();
        let pubsub_client = resp3_client(&client)?;
        let manager = match manager {
            Some(manager) => manager,
            None => {
                let config = ConnectionManagerConfig::new()
                    .set_number_of_retries(self.retries)
                    .set_connection_timeout(Some(self.connect_timeout))
                    .set_response_timeout(Some(self.request_timeout))
                    .set_min_delay(Duration::from_millis(100))
                    .set_max_delay(Duration::from_secs(1));
                let attempts = u32::try_from(self.retries.saturating_add(1)).unwrap_or(u32::MAX);
                let bound = self
                    .connect_timeout
                    .saturating_mul(attempts)
                    .saturating_add(Duration::from_secs(self.retries.min(60) as u64))
                    .saturating_add(Duration::from_millis(500));
                match tokio::time::timeout(
                    bound,
                    ConnectionManager::new_with_config(client.clone(), config),
                )
                .await
                {
                    Ok(Ok(manager)) => manager,
                    Ok(Err(err)) => {
                        return Err(Error::registry(
                            BACKEND,
                            format!("cannot connect to {addr}"),
                            err,
                        ))
                    }
                    Err(_) => {
                        return Err(Error::Timeout {
                            what: format!("connecting to redis at {addr}"),
                            after: bound,
                        })
                    }
                }
            }
        };
        let registry = RedisRegistry {
            inner: Arc::new(Inner {
                client,
                pubsub_client,
                manager,
                addr,
                db,
                timing: self.timing,
                connect_timeout: self.connect_timeout,
                request_timeout: self.request_timeout,
            }),
        };
        let pong: String = registry
            .query("PING", false, Req::Cmd(redis::cmd("PING")))
            .await?;
        if pong != "PONG" {
            return Err(Error::registry_msg(
                BACKEND,
                format!("unexpected answer to PING from {}", registry.inner.addr),
            ));
        }
        Ok(registry)
    }
}

fn default_timing() -> Timing {
    Timing {
        node_ttl: Duration::from_secs(10),
        heartbeat: Duration::from_secs(2),
        reload: Duration::from_secs(10),
    }
}

fn open_client(url: &str) -> Result<Client> {
    Client::open(url).map_err(|err| {
        // The parser's messages never echo the URL (it may hold a password).
        let mut msg = format!("redis URL: {err}");
        if url.starts_with("rediss:") {
            msg.push_str(
                "; rediss:// needs one of redis's TLS features (`tokio-rustls-comp` or \
                 `tokio-native-tls-comp`) enabled in your Cargo.toml",
            );
        }
        Error::InvalidConfig(msg)
    })
}

fn resp3_client(client: &Client) -> Result<Client> {
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    Client::open(info.set_redis_settings(settings))
        .map_err(|err| Error::InvalidConfig(format!("redis pub/sub connection: {err}")))
}

fn describe(client: &Client) -> String {
    let info = client.get_connection_info();
    format!("{}/{}", info.addr(), info.redis_settings().db())
}

/// One request, sent again as-is on a retry.
enum Req<'a> {
    Cmd(redis::Cmd),
    Script(ScriptInvocation<'a>),
    Pipe(redis::Pipeline),
}

impl Req<'_> {
    async fn send<T: FromRedisValue>(&self, con: &mut ConnectionManager) -> redis::RedisResult<T> {
        match self {
            Req::Cmd(cmd) => cmd.query_async(con).await,
            Req::Script(inv) => inv.invoke_async(con).await,
            Req::Pipe(pipe) => pipe.query_async(con).await,
        }
    }
}

fn retryable(err: &RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error()
}

/// A TTL in ms for the scripts: at least 1, at most about 34 years (Lua
/// numbers are doubles; Redis wants integral expiries).
fn millis(d: Duration) -> u64 {
    const MAX_TTL_MS: u64 = 1 << 40;
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_TTL_MS)
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
        RedisRegistryBuilder::new(Target::Url(url.into()))
    }

    /// Options for a registry on an existing client (its connection info,
    /// TLS settings and credentials are used as they are).
    pub fn builder_from_client(client: Client) -> RedisRegistryBuilder {
        RedisRegistryBuilder::new(Target::Client(Box::new(client), None))
    }

    /// A registry on an existing client, with the default bounds.
    pub async fn from_client(client: Client) -> Result<Self> {
        Self::builder_from_client(client).connect().await
    }

    /// A registry on an existing connection manager, without any I/O. The
    /// client must point at the same server: it opens the pub/sub
    /// connections of watches. The manager's own retry settings apply; each
    /// call is still bounded by the default request timeout.
    pub fn from_connection_manager(client: Client, manager: ConnectionManager) -> Self {
        let addr = describe(&client);
        let db = client.get_connection_info().redis_settings().db();
        let pubsub_client = resp3_client(&client).unwrap_or_else(|_| client.clone());
        RedisRegistry {
            inner: Arc::new(Inner {
                client,
                pubsub_client,
                manager,
                addr,
                db,
                timing: default_timing(),
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
            }),
        }
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

    /// Sends `req`, bounded by the request timeout; an idempotent request is
    /// sent once more after a dropped connection (the manager reconnects).
    async fn query<T: FromRedisValue>(
        &self,
        what: &str,
        idempotent: bool,
        req: Req<'_>,
    ) -> Result<T> {
        let inner = &self.inner;
        let attempt = async {
            let mut con = inner.manager.clone();
            match req.send::<T>(&mut con).await {
                Err(err) if idempotent && retryable(&err) => {
                    tracing::debug!(backend = BACKEND, what, %err, "retrying once");
                    tokio::time::sleep(RETRY_PAUSE).await;
                    req.send::<T>(&mut con).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(inner.request_timeout, attempt).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(Error::registry(
                BACKEND,
                format!("{what} on {}", inner.addr),
                err,
            )),
            Err(_) => Err(Error::Timeout {
                what: format!("redis {what} on {}", inner.addr),
                after: inner.request_timeout,
            }),
        }
    }

    /// Every field of hash `key` (HSCAN with a cursor, deduplicated).
    async fn scan_hash(&self, key: &str, what: &str) -> Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("HSCAN");
            cmd.arg(key).arg(cursor).arg("COUNT").arg(SCAN_COUNT);
            let (next, flat): (u64, Vec<Vec<u8>>) = self.query(what, true, Req::Cmd(cmd)).await?;
            for pair in flat.chunks_exact(2) {
                if let [field, value] = pair {
                    match String::from_utf8(field.clone()) {
                        Ok(name) => {
                            out.insert(name, value.clone());
                        }
                        Err(_) => tracing::warn!(
                            backend = BACKEND,
                            key,
                            "skipping a field whose name is not UTF-8"
                        ),
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                return Ok(out);
            }
        }
    }

    /// One script call for `tasks`, each claim atomic on its own. With a
    /// token the script is idempotent, so it is retried once after a
    /// dropped connection (a run whose answer was lost answers won again).
    async fn claim_chunk(&self, keys: &Keys, tasks: &[&str], claim: &Claim) -> Result<Vec<bool>> {
        let mut inv = CLAIM.prepare_invoke();
        inv.key(&keys.claims)
            .arg(claim.fire_time)
            .arg(codec::encode(claim))
            .arg(&claim.token);
        for task in tasks {
            inv.arg(*task);
        }
        let idempotent = !claim.token.is_empty();
        let won: Vec<i64> = self.query("claim", idempotent, Req::Script(inv)).await?;
        if won.len() != tasks.len() {
            return Err(Error::registry_msg(
                BACKEND,
                format!(
                    "claim script answered {} results for {} tasks",
                    won.len(),
                    tasks.len()
                ),
            ));
        }
        Ok(won.into_iter().map(|w| w == 1).collect())
    }
}

#[async_trait]
impl Registry for RedisRegistry {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn timing(&self) -> Timing {
        self.inner.timing
    }

    async fn register(&self, ns: &str, node: &Node, ttl: Duration) -> Result<()> {
        let keys = Keys::new(ns, self.inner.db);
        let mut inv = keys.node_script(&REGISTER);
        inv.arg(&node.id).arg(codec::encode(node)).arg(millis(ttl));
        let _: i64 = self.query("register", true, Req::Script(inv)).await?;
        Ok(())
    }

    async fn heartbeat(&self, ns: &str, node_id: &str, ttl: Duration) -> Result<bool> {
        let keys = Keys::new(ns, self.inner.db);
        let mut inv = keys.node_script(&HEARTBEAT);
        inv.arg(node_id).arg(millis(ttl));
        let alive: i64 = self.query("heartbeat", true, Req::Script(inv)).await?;
        Ok(alive == 1)
    }

    async fn update_node(&self, ns: &str, node: &Node) -> Result<bool> {
        let keys = Keys::new(ns, self.inner.db);
        let mut inv = keys.node_script(&UPDATE);
        inv.arg(&node.id).arg(codec::encode(node));
        let alive: i64 = self.query("update node", true, Req::Script(inv)).await?;
        Ok(alive == 1)
    }

    async fn unregister(&self, ns: &str, node_id: &str) -> Result<()> {
        let keys = Keys::new(ns, self.inner.db);
        let mut inv = keys.node_script(&UNREGISTER);
        inv.arg(node_id);
        let _: i64 = self.query("unregister", true, Req::Script(inv)).await?;
        Ok(())
    }

    async fn nodes(&self, ns: &str) -> Result<Vec<Node>> {
        let keys = Keys::new(ns, self.inner.db);
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
        let keys = Keys::new(ns, self.inner.db);
        let mut inv = PUT_TASK.prepare_invoke();
        inv.key(&keys.tasks)
            .arg(&keys.events)
            .arg(&meta.name)
            .arg(codec::encode(meta))
            .arg(if overwrite { "1" } else { "0" });
        // Create-only is not retried: a lost answer would turn into TaskExists.
        let stored: i64 = self.query("put task", overwrite, Req::Script(inv)).await?;
        if stored == 1 {
            Ok(())
        } else {
            Err(Error::TaskExists(meta.name.clone()))
        }
    }

    async fn delete_task(&self, ns: &str, name: &str) -> Result<()> {
        let keys = Keys::new(ns, self.inner.db);
        let mut inv = HDEL_PUBLISH.prepare_invoke();
        inv.key(&keys.tasks)
            .arg(&keys.events)
            .arg(name)
            .arg("task-delete");
        let _: i64 = self.query("delete task", true, Req::Script(inv)).await?;
        Ok(())
    }

    async fn tasks(&self, ns: &str) -> Result<Vec<TaskMeta>> {
        let keys = Keys::new(ns, self.inner.db);
        let all = self.scan_hash(&keys.tasks, "list tasks").await?;
        Ok(all
            .iter()
            .filter_map(|(name, raw)| codec::decode_task(BACKEND, name, raw))
            .collect())
    }

    async fn put_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        let keys = Keys::new(ns, self.inner.db);
        let mut inv = HSET_NEW.prepare_invoke();
        inv.key(&keys.deleted)
            .arg(&keys.events)
            .arg(name)
            .arg(r#"{"deleted":true}"#)
            .arg("tombstone-put");
        let _: i64 = self.query("put tombstone", true, Req::Script(inv)).await?;
        Ok(())
    }

    async fn delete_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        let keys = Keys::new(ns, self.inner.db);
        let mut inv = HDEL_PUBLISH.prepare_invoke();
        inv.key(&keys.deleted)
            .arg(&keys.events)
            .arg(name)
            .arg("tombstone-delete");
        let _: i64 = self
            .query("delete tombstone", true, Req::Script(inv))
            .await?;
        Ok(())
    }

    async fn tombstones(&self, ns: &str) -> Result<Vec<String>> {
        let keys = Keys::new(ns, self.inner.db);
        let all = self.scan_hash(&keys.deleted, "list tombstones").await?;
        Ok(all.into_keys().collect())
    }

    async fn claim(&self, ns: &str, task: &str, claim: &Claim) -> Result<bool> {
        let keys = Keys::new(ns, self.inner.db);
        let won = self.claim_chunk(&keys, &[task], claim).await?;
        Ok(won.first().copied().unwrap_or(false))
    }

    /// One script call per chunk of `CLAIM_CHUNK` tasks. A chunk that
    /// fails fails only its own claims and the chunks not sent after it
    /// (the server is likely down); answered chunks keep their answers.
    async fn claim_many(&self, ns: &str, tasks: &[&str], claim: &Claim) -> Vec<ClaimOutcome> {
        let keys = Keys::new(ns, self.inner.db);
        let mut out = Vec::with_capacity(tasks.len());
        for chunk in tasks.chunks(CLAIM_CHUNK) {
            match self.claim_chunk(&keys, chunk, claim).await {
                Ok(won) => out.extend(won.into_iter().map(|w| ClaimOutcome::from_result(Ok(w)))),
                Err(err) => {
                    out.extend(ClaimOutcome::fail_all(chunk.len(), err));
                    break;
                }
            }
        }
        let unsent = tasks.len() - out.len();
        if unsent > 0 {
            out.extend(ClaimOutcome::fail_all(
                unsent,
                Error::registry_msg(
                    BACKEND,
                    "claim not sent: an earlier chunk of the batch failed",
                ),
            ));
        }
        out
    }

    async fn claims(&self, ns: &str) -> Result<Vec<(String, Claim)>> {
        let keys = Keys::new(ns, self.inner.db);
        let all = self.scan_hash(&keys.claims, "list claims").await?;
        Ok(all
            .into_iter()
            .filter_map(|(name, raw)| {
                codec::decode_claim(BACKEND, &name, &raw).map(|claim| (name, claim))
            })
            .collect())
    }

    async fn delete_claim(&self, ns: &str, task: &str) -> Result<()> {
        let keys = Keys::new(ns, self.inner.db);
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(&keys.claims).arg(task);
        let _: i64 = self.query("delete claim", true, Req::Cmd(cmd)).await?;
        Ok(())
    }

    async fn clear(&self, ns: &str) -> Result<()> {
        let keys = Keys::new(ns, self.inner.db);
        let mut inv = CLEAR.prepare_invoke();
        inv.key(&keys.tasks)
            .key(&keys.deleted)
            .key(&keys.claims)
            .arg(&keys.events);
        let _: i64 = self.query("clear", true, Req::Script(inv)).await?;
        Ok(())
    }

    async fn watch(&self, ns: &str) -> Result<WatchReceiver> {
        let keys = Keys::new(ns, self.inner.db);
        let conn = open_feed(&self.inner, &keys.events).await?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        let sweep_cap = (self.inner.timing.node_ttl / 4).max(Duration::from_millis(100));
        let feed = Feed {
            registry: self.clone(),
            keys,
            tx,
            pending_resync: false,
            sweep_cap,
        };
        tokio::spawn(feed.run(conn));
        Ok(rx)
    }
}

// ---------------------------------------------------------------------------
// The watch feed.

type Subscription = (MultiplexedConnection, UnboundedReceiver<PushInfo>);

/// Opens a RESP3 connection subscribed to `channel`, its pushes going to
/// the returned receiver.
async fn open_feed(inner: &Inner, channel: &str) -> Result<Subscription> {
    let (push_tx, push_rx) = mpsc::unbounded_channel();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(inner.connect_timeout))
        .set_response_timeout(Some(inner.request_timeout))
        .set_push_sender(push_tx);
    let subscribe = async {
        let mut con = inner
            .pubsub_client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        con.subscribe(channel).await?;
        Ok::<_, RedisError>(con)
    };
    let bound = inner.connect_timeout + inner.request_timeout;
    match tokio::time::timeout(bound, subscribe).await {
        Ok(Ok(con)) => Ok((con, push_rx)),
        Ok(Err(err)) => {
            // A server that answers but refuses RESP3 or SUBSCRIBE is too old.
            let hint = if err.is_io_error() || err.is_timeout() || err.is_connection_dropped() {
                ""
            } else {
                " (the watch needs RESP3 pub/sub: Redis 6 or later)"
            };
            Err(Error::registry(
                BACKEND,
                format!("cannot subscribe to {channel} on {}{hint}", inner.addr),
                err,
            ))
        }
        Err(_) => Err(Error::Timeout {
            what: format!("subscribing to {channel} on redis {}", inner.addr),
            after: bound,
        }),
    }
}

/// A parsed feed message, before its value is fetched.
enum Pending {
    Ready(WatchEvent),
    Task(String),
    Node(String),
}

fn parse_message(payload: &[u8]) -> Option<Pending> {
    let text = std::str::from_utf8(payload).ok()?;
    if text == "resync" {
        return Some(Pending::Ready(WatchEvent::Resync));
    }
    let (kind, name) = text.split_once(' ')?;
    validate_task_name(name).ok()?;
    let name = name.to_string();
    Some(match kind {
        "task-put" => Pending::Task(name),
        "node-put" => Pending::Node(name),
        "task-delete" => Pending::Ready(WatchEvent::TaskDelete(name)),
        "node-delete" => Pending::Ready(WatchEvent::NodeDelete(name)),
        "tombstone-put" => Pending::Ready(WatchEvent::TombstonePut(name)),
        "tombstone-delete" => Pending::Ready(WatchEvent::TombstoneDelete(name)),
        _ => return None,
    })
}

#[derive(PartialEq, Eq)]
enum Flow {
    Go,
    Stop,
}

enum Step {
    Stop,
    Resynced,
    Pushes(Vec<PushInfo>, bool),
    Lost,
    Sweep,
    Ping,
    Retry,
}

struct Feed {
    registry: RedisRegistry,
    keys: Keys,
    tx: mpsc::Sender<WatchEvent>,
    /// Events were lost (reconnect or full channel): send `Resync` first.
    pending_resync: bool,
    sweep_cap: Duration,
}

impl Feed {
    async fn run(mut self, first: Subscription) {
        let mut conn = Some(first);
        let mut backoff = WATCH_BACKOFF_MIN;
        let mut retry_at = Instant::now();
        let mut sweep_at = Instant::now();
        let mut ping_at = Instant::now() + PING_EVERY;
        loop {
            let step = match conn.as_mut() {
                Some((_, pushes)) => {
                    tokio::select! {
                        biased;
                        _ = self.tx.closed() => Step::Stop,
                        permit = self.tx.reserve(), if self.pending_resync => match permit {
                            Ok(permit) => {
                                permit.send(WatchEvent::Resync);
                                Step::Resynced
                            }
                            Err(_) => Step::Stop,
                        },
                        push = pushes.recv() => match push {
                            Some(push) if push.kind != PushKind::Disconnection => {
                                let mut batch = vec![push];
                                let mut lost = false;
                                while batch.len() < WATCH_BATCH {
                                    match pushes.try_recv() {
                                        Ok(p) if p.kind == PushKind::Disconnection => {
                                            lost = true;
                                            break;
                                        }
                                        Ok(p) => batch.push(p),
                                        Err(_) => break,
                                    }
                                }
                                Step::Pushes(batch, lost)
                            }
                            _ => Step::Lost,
                        },
                        _ = tokio::time::sleep_until(sweep_at) => Step::Sweep,
                        _ = tokio::time::sleep_until(ping_at) => Step::Ping,
                    }
                }
                None => {
                    tokio::select! {
                        biased;
                        _ = self.tx.closed() => Step::Stop,
                        permit = self.tx.reserve(), if self.pending_resync => match permit {
                            Ok(permit) => {
                                permit.send(WatchEvent::Resync);
                                Step::Resynced
                            }
                            Err(_) => Step::Stop,
                        },
                        _ = tokio::time::sleep_until(retry_at) => Step::Retry,
                    }
                }
            };
            match step {
                Step::Stop => return,
                Step::Resynced => self.pending_resync = false,
                Step::Pushes(batch, lost) => {
                    let mut node_put = false;
                    if self.handle(batch, &mut node_put).await == Flow::Stop {
                        return;
                    }
                    if node_put {
                        // A new node may have a shorter TTL than any before.
                        sweep_at = Instant::now();
                    }
                    if lost {
                        conn = None;
                        retry_at = Instant::now();
                        self.lost();
                    }
                }
                Step::Lost => {
                    conn = None;
                    retry_at = Instant::now();
                    self.lost();
                }
                Step::Sweep => sweep_at = Instant::now() + self.sweep().await,
                Step::Ping => {
                    ping_at = Instant::now() + PING_EVERY;
                    if let Some((con, _)) = conn.as_mut() {
                        if let Err(err) = ping(con, self.registry.inner.request_timeout).await {
                            tracing::warn!(backend = BACKEND, channel = %self.keys.events, %err, "watch connection does not answer; reconnecting");
                            conn = None;
                            retry_at = Instant::now();
                        }
                    }
                }
                Step::Retry => match open_feed(&self.registry.inner, &self.keys.events).await {
                    Ok(sub) => {
                        tracing::info!(backend = BACKEND, channel = %self.keys.events, "watch feed resubscribed; sending Resync");
                        conn = Some(sub);
                        backoff = WATCH_BACKOFF_MIN;
                        self.pending_resync = true;
                        sweep_at = Instant::now();
                        ping_at = Instant::now() + PING_EVERY;
                    }
                    Err(err) => {
                        tracing::warn!(backend = BACKEND, %err, retry_in = ?backoff, "watch feed cannot resubscribe");
                        retry_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
                    }
                },
            }
        }
    }

    fn lost(&self) {
        tracing::warn!(backend = BACKEND, channel = %self.keys.events, "watch connection lost; reconnecting");
    }

    /// Sends `event`, or marks a resync when the channel is full.
    fn emit(&mut self, event: WatchEvent) -> Flow {
        if self.pending_resync {
            match self.tx.try_send(WatchEvent::Resync) {
                Ok(()) => self.pending_resync = false,
                // Still full: this event is covered by the pending Resync.
                Err(TrySendError::Full(_)) => return Flow::Go,
                Err(TrySendError::Closed(_)) => return Flow::Stop,
            }
            if event == WatchEvent::Resync {
                return Flow::Go;
            }
        }
        match self.tx.try_send(event) {
            Ok(()) => Flow::Go,
            Err(TrySendError::Full(_)) => {
                self.pending_resync = true;
                Flow::Go
            }
            Err(TrySendError::Closed(_)) => Flow::Stop,
        }
    }

    /// Turns a batch of pushes into events, fetching the values of puts in
    /// one pipeline.
    async fn handle(&mut self, batch: Vec<PushInfo>, node_put: &mut bool) -> Flow {
        if self.pending_resync && self.tx.capacity() == 0 {
            // The receiver lags: these events are covered by the pending
            // Resync, so don't even fetch their values.
            return Flow::Go;
        }
        let mut pending = Vec::with_capacity(batch.len());
        for push in batch {
            if push.kind != PushKind::Message {
                continue; // subscription confirmations and the like
            }
            let Some(msg) = Msg::from_push_info(push) else {
                continue;
            };
            if msg.get_channel_name() != self.keys.events {
                continue;
            }
            match parse_message(msg.get_payload_bytes()) {
                Some(p) => pending.push(p),
                None => tracing::warn!(
                    backend = BACKEND,
                    channel = %self.keys.events,
                    payload = %String::from_utf8_lossy(msg.get_payload_bytes()),
                    "skipping an unknown message on the events channel"
                ),
            }
        }
        let mut pipe = redis::pipe();
        let mut fetches = 0;
        for p in &pending {
            match p {
                Pending::Task(name) => {
                    pipe.cmd("HGET").arg(&self.keys.tasks).arg(name);
                    fetches += 1;
                }
                Pending::Node(id) => {
                    pipe.cmd("GET")
                        .arg(format!("{}{id}", self.keys.node_prefix));
                    fetches += 1;
                    *node_put = true;
                }
                Pending::Ready(_) => {}
            }
        }
        let mut values = Vec::new();
        if fetches > 0 {
            match self
                .registry
                .query::<Vec<Option<Vec<u8>>>>("fetch changed values", true, Req::Pipe(pipe))
                .await
            {
                Ok(v) if v.len() == fetches => values = v,
                Ok(v) => {
                    tracing::warn!(
                        backend = BACKEND,
                        got = v.len(),
                        fetches,
                        "pipeline answered a wrong count; resyncing"
                    );
                    self.pending_resync = true;
                    return Flow::Go;
                }
                Err(err) => {
                    tracing::warn!(backend = BACKEND, %err, "cannot fetch changed values; resyncing");
                    self.pending_resync = true;
                    return Flow::Go;
                }
            }
        }
        let mut values = values.into_iter();
        for p in pending {
            let event = match p {
                Pending::Ready(event) => Some(event),
                Pending::Task(name) => values
                    .next()
                    .flatten()
                    .and_then(|raw| codec::decode_task(BACKEND, &name, &raw))
                    .map(WatchEvent::TaskPut),
                Pending::Node(id) => values
                    .next()
                    .flatten()
                    .and_then(|raw| codec::decode_node(BACKEND, &id, &raw))
                    .map(WatchEvent::NodePut),
            };
            // A value gone by now is followed by its delete message.
            if let Some(event) = event {
                if self.emit(event) == Flow::Stop {
                    return Flow::Stop;
                }
            }
        }
        Flow::Go
    }

    /// Reaps expired nodes; returns how long to wait until the next sweep.
    async fn sweep(&self) -> Duration {
        let inv = self.keys.node_script(&SWEEP);
        match self
            .registry
            .query::<i64>("sweep expired nodes", true, Req::Script(inv))
            .await
        {
            Ok(left) if left < 0 => self.sweep_cap,
            Ok(left) => {
                let left = Duration::from_millis(left.unsigned_abs().saturating_add(1));
                left.clamp(SWEEP_FLOOR, self.sweep_cap)
            }
            Err(err) => {
                tracing::debug!(backend = BACKEND, %err, "sweep failed");
                SWEEP_RETRY.min(self.sweep_cap)
            }
        }
    }
}

async fn ping(con: &mut MultiplexedConnection, bound: Duration) -> Result<()> {
    match tokio::time::timeout(bound, redis::cmd("PING").query_async::<redis::Value>(con)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(Error::registry(BACKEND, "ping", err)),
        Err(_) => Err(Error::Timeout {
            what: "redis ping".into(),
            after: bound,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse() {
        assert!(matches!(
            parse_message(b"task-put job-1"),
            Some(Pending::Task(n)) if n == "job-1"
        ));
        assert!(matches!(
            parse_message(b"node-delete n:1"),
            Some(Pending::Ready(WatchEvent::NodeDelete(n))) if n == "n:1"
        ));
        assert!(matches!(
            parse_message(b"resync"),
            Some(Pending::Ready(WatchEvent::Resync))
        ));
        for bad in [
            &b"task-put"[..],
            b"task-put ",
            b"task-put a/b",
            b"bogus x",
            b"\xff\xfe",
        ] {
            assert!(parse_message(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn ttls_are_clamped() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::MAX), 1 << 40);
    }

    #[test]
    fn keys_share_a_hash_tag() {
        let k = Keys::new("billing", 0);
        assert_eq!(k.nodes, "{billing}:nodes");
        assert_eq!(k.node_prefix, "{billing}:node:");
        assert_eq!(k.tasks, "{billing}:tasks");
        assert_eq!(k.deleted, "{billing}:deleted");
        assert_eq!(k.claims, "{billing}:claims");
        assert_eq!(k.events, "{billing}:events");
        assert_eq!(Keys::new("billing", 3).events, "{billing}:events:db3");
    }

    #[test]
    fn bad_urls_are_config_errors_without_secrets() {
        let err = open_client("http://user:hunter2@localhost/").expect_err("bad scheme");
        assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
