//! The etcd v3 registry (cargo feature `etcd`).
//!
//! Key layout for namespace `ns` (DESIGN §4):
//!
//! | data | key | value |
//! |---|---|---|
//! | node | `/ns/nodes/<id>` | [`Node`] JSON, attached to the node's lease |
//! | dynamic task | `/ns/tasks/<name>` | [`TaskMeta`] JSON |
//! | tombstone | `/ns/deleted/<name>` | `{"deleted":true}` (any value counts) |
//! | claim watermark | `/ns/claims/<name>` | [`Claim`] JSON |
//!
//! * **Liveness** is an etcd lease per node: `register` grants a lease of the
//!   node TTL and writes the record with it, `heartbeat` sends one lease
//!   keep-alive, `update_node` rewrites the record with the same lease inside
//!   a transaction that checks the key still carries it (so a put can never
//!   detach the lease, nor resurrect an expired node), `unregister` revokes
//!   it. The registry keeps the lease of every node it registered; when the
//!   lease is gone, `heartbeat` and `update_node` answer `Ok(false)` and the
//!   node registers again with a new lease.
//! * **Claims** are a compare-and-set on the key's `mod_revision` (etcd cannot
//!   compare inside JSON): read the stored watermark, and if it is older (or
//!   absent, or corrupt) write the new one in a transaction that succeeds only
//!   if the key has not changed since it was read. A failed transaction
//!   returns the current value in the same round trip, and the loop decides
//!   again. The revision of the registry's own last successful claim of a
//!   task is remembered, so the steady state (the owner claiming its task at
//!   each fire time) is one round trip.
//! * **Watch**: one range watch over `/ns/deleted/` .. `/ns/tasks/` — which
//!   covers tombstones, nodes and tasks, but not `/ns/claims/` (claims sort
//!   first), so claim writes never even reach a watcher. The feed resumes
//!   from the last seen revision + 1 after a disconnect (then sends
//!   [`WatchEvent::Resync`] anyway), and when that revision was compacted it
//!   sends `Resync` and restarts from the current revision.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue,
    KvClient, LeaseClient, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
    WatchResponse,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::codec;
use super::{Claim, Registry, Timing, WatchEvent, WatchReceiver, WATCH_CHANNEL_CAPACITY};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::task::{validate_task_name, TaskMeta};

const BACKEND: &str = "etcd";

/// Default bound on establishing a connection to an endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default bound on each request (and on each retry of it).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Attempts of a request that failed in a way worth retrying (transport
/// error, no leader, timeout): the first try plus two retries.
const ATTEMPTS: u32 = 3;
/// Transactions a single `claim` may lose to concurrent writers before it
/// gives up with an error (each loss means another claimer made progress).
const MAX_CLAIM_ROUNDS: u32 = 32;
/// Claims of one `claim_many` in flight at once.
const CLAIM_CONCURRENCY: usize = 32;
/// Keys per page of a range read.
const PAGE: i64 = 256;
/// Largest response accepted (a page of large task payloads).
const MAX_DECODING: usize = 64 * 1024 * 1024;
/// Bound on the remembered claim revisions (cleared when exceeded).
const MAX_CLAIM_CACHE: usize = 100_000;
/// Capped backoff of the watch feed between reconnects.
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

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
    timing: Timing,
    request_timeout: Duration,
}

struct Shared {
    client: Client,
    kv: KvClient,
    lease: LeaseClient,
    /// `(ns, node id)` → lease of the registration made through this registry.
    leases: Mutex<HashMap<(String, String), i64>>,
    /// `(ns, task)` → `(mod_revision, fire_time)` of this registry's last
    /// successful claim: the next claim tries that revision first.
    claim_revs: Mutex<HashMap<(String, String), (i64, i64)>>,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("timing", &self.timing)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

/// Options for [`EtcdRegistry`]; start with [`EtcdRegistry::builder`].
#[derive(Clone)]
pub struct EtcdRegistryBuilder {
    endpoints: Vec<String>,
    user: Option<(String, String)>,
    connect_timeout: Duration,
    request_timeout: Duration,
    keep_alive: Option<(Duration, Duration)>,
    timing: Timing,
}

impl std::fmt::Debug for EtcdRegistryBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("EtcdRegistryBuilder")
            .field("endpoints", &self.endpoints)
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("keep_alive", &self.keep_alive)
            .field("timing", &self.timing)
            .finish()
    }
}

impl EtcdRegistryBuilder {
    /// Authenticates as `name` with `password` (etcd auth enabled). The
    /// token is refreshed automatically when it expires.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((name.into(), password.into()));
        self
    }

    /// Bound on establishing the TCP/HTTP2 connection to an endpoint
    /// (default 3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on each request (default 5 s). A request that fails with a
    /// transport error, "no leader" or this timeout is tried up to three
    /// times in all, with a short backoff.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// HTTP/2 keep-alive pings: every `interval`, the connection counts as
    /// dead if one gets no answer within `timeout` (default 10 s / 5 s;
    /// etcd rejects pings more often than every 5 s by default). `None`
    /// disables them.
    pub fn keep_alive(mut self, keep_alive: Option<(Duration, Duration)>) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    /// Timing defaults handed to the nodes (see [`EtcdRegistry::DEFAULT_TIMING`]).
    pub fn timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// Connects and checks that the cluster answers (the client library
    /// connects lazily; this makes an unreachable cluster fail here, within
    /// the connect timeout plus the request timeout, with a clear error).
    pub async fn connect(self) -> Result<EtcdRegistry> {
        if self.endpoints.is_empty() {
            return Err(Error::InvalidConfig(
                "etcd: no endpoints given; pass e.g. \"http://127.0.0.1:2379\"".into(),
            ));
        }
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(Error::InvalidConfig(
                "etcd: connect and request timeouts must be above zero".into(),
            ));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_timeout(self.request_timeout)
            .with_require_leader(true);
        if let Some((interval, timeout)) = self.keep_alive {
            options = options
                .with_keep_alive(interval, timeout)
                .with_keep_alive_while_idle(true);
        }
        if let Some((name, password)) = &self.user {
            options = options
                .with_user(name.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        let endpoints = self.endpoints.join(",");
        let bound = self.connect_timeout + self.request_timeout;
        // With credentials, `connect` authenticates (a round trip).
        let client = match tokio::time::timeout(bound, Client::connect(&self.endpoints, Some(options))).await {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => {
                return Err(Error::registry(
                    BACKEND,
                    format!("cannot connect to etcd at {endpoints}"),
                    err,
                ))
            }
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!("connecting to etcd at {endpoints}"),
                    after: bound,
                })
            }
        };
        let registry = EtcdRegistry::from_client(client)
            .with_request_timeout(self.request_timeout)
            .with_timing(self.timing);
        // Fail fast: one cheap call that needs a live member with a leader.
        let context = format!("cannot reach etcd at {endpoints} (is it running?)");
        registry
            .retrying(&context, || async {
                let mut maintenance = registry.shared.client.maintenance_client();
                maintenance.status().await
            })
            .await?;
        Ok(registry)
    }
}

impl EtcdRegistry {
    /// Timing defaults: node TTL 10 s (the lease), heartbeat every 2 s (a
    /// node survives four lost keep-alives, e.g. an etcd leader election),
    /// full reload every 10 s (the watch resumes by revision, so the reload
    /// is only a safety net).
    pub const DEFAULT_TIMING: Timing = Timing {
        node_ttl: Duration::from_secs(10),
        heartbeat: Duration::from_secs(2),
        reload: Duration::from_secs(10),
    };

    /// Connects to `endpoints` (`http://host:port`; several members of one
    /// cluster for fail-over; an item may also be a comma-separated list)
    /// with the default options, checking that the cluster answers.
    pub async fn connect<I, S>(endpoints: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::builder(endpoints).connect().await
    }

    /// Options for connecting to `endpoints` (see [`connect`](Self::connect)).
    pub fn builder<I, S>(endpoints: I) -> EtcdRegistryBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let endpoints = endpoints
            .into_iter()
            .flat_map(|e| {
                e.as_ref()
                    .split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        EtcdRegistryBuilder {
            endpoints,
            user: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            keep_alive: Some((Duration::from_secs(10), Duration::from_secs(5))),
            timing: Self::DEFAULT_TIMING,
        }
    }

    /// Uses an existing client (its own TLS, auth and timeouts apply; every
    /// call is also bounded by the request timeout, default 5 s). Nothing is
    /// sent until the first call.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use dcron::registry::EtcdRegistry;
    /// use etcd_client::{Client, ConnectOptions};
    ///
    /// let options = ConnectOptions::new()
    ///     .with_connect_timeout(std::time::Duration::from_secs(2))
    ///     .with_timeout(std::time::Duration::from_secs(5));
    /// let client = Client::connect(["http://127.0.0.1:2379"], Some(options)).await?;
    /// let registry = EtcdRegistry::from_client(client);
    /// # drop(registry);
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_client(client: Client) -> Self {
        let kv = client.kv_client().max_decoding_message_size(MAX_DECODING);
        let lease = client.lease_client();
        EtcdRegistry {
            shared: Arc::new(Shared {
                client,
                kv,
                lease,
                leases: Mutex::new(HashMap::new()),
                claim_revs: Mutex::new(HashMap::new()),
            }),
            timing: Self::DEFAULT_TIMING,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Replaces the timing defaults handed to the nodes.
    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// Replaces the bound on each request (default 5 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// Starts a change feed like [`Registry::watch`], but from the events
    /// after `revision` (an etcd store revision). If that revision was
    /// compacted, the feed sends [`WatchEvent::Resync`] and continues from
    /// the current revision.
    pub async fn watch_from(&self, ns: &str, revision: i64) -> Result<WatchReceiver> {
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        let feed = Feed {
            registry: self.clone(),
            start: prefix(ns, "deleted"),
            end: prefix_end(&prefix(ns, "tasks")),
            ns: ns.to_string(),
            tx,
            overflowed: false,
        };
        tokio::spawn(feed.run(revision.max(0) + 1));
        Ok(rx)
    }

    /// The current store revision of the cluster.
    pub async fn revision(&self) -> Result<i64> {
        let resp = self
            .retrying("read the current revision", || async {
                let mut kv = self.shared.kv.clone();
                kv.get("/", Some(GetOptions::new().with_count_only())).await
            })
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// One request bounded by the request timeout, tried up to [`ATTEMPTS`]
    /// times while it fails in a retryable way.
    async fn retrying<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let mut pause = Duration::from_millis(50);
        let mut attempt = 1;
        loop {
            match self.once(what, op()).await {
                Ok(v) => return Ok(v),
                Err(Failure::Final(err)) => return Err(err),
                Err(Failure::Retryable(err)) => {
                    if attempt >= ATTEMPTS {
                        return Err(err);
                    }
                    tracing::debug!(backend = BACKEND, what, %err, attempt, "retrying");
                }
            }
            attempt += 1;
            tokio::time::sleep(pause).await;
            pause = (pause * 4).min(Duration::from_secs(1));
        }
    }

    /// One attempt of a request, bounded by the request timeout.
    async fn once<T>(
        &self,
        what: &str,
        fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> std::result::Result<T, Failure> {
        match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(err)) => {
                let retry = retryable(&err);
                let err = Error::registry(BACKEND, what.to_string(), err);
                Err(if retry {
                    Failure::Retryable(err)
                } else {
                    Failure::Final(err)
                })
            }
            Err(_) => Err(Failure::Retryable(Error::Timeout {
                what: format!("etcd: {what}"),
                after: self.request_timeout,
            })),
        }
    }

    /// Every key/value under `prefix`, in key order, read page by page at
    /// one revision (a consistent snapshot).
    async fn range(&self, prefix: &str, keys_only: bool, what: &str) -> Result<Vec<KeyValue>> {
        let end = prefix_end(prefix);
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            if keys_only {
                options = options.with_keys_only();
            }
            let mut resp = self
                .retrying(what, || {
                    let (from, options) = (from.clone(), options.clone());
                    async move {
                        let mut kv = self.shared.kv.clone();
                        kv.get(from, Some(options)).await
                    }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last() else { break };
            from = last.key().to_vec();
            from.push(0);
            out.extend(kvs);
            if !more {
                break;
            }
        }
        Ok(out)
    }

    fn leases(&self) -> MutexGuard<'_, HashMap<(String, String), i64>> {
        // Every mutation is a single insert/remove: poisoning cannot leave
        // the map half-updated.
        self.shared.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn claim_revs(&self) -> MutexGuard<'_, HashMap<(String, String), (i64, i64)>> {
        self.shared.claim_revs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease_of(&self, ns: &str, id: &str) -> Option<i64> {
        self.leases().get(&(ns.to_string(), id.to_string())).copied()
    }

    /// Revokes `lease`, ignoring "not found" (already expired or revoked).
    async fn revoke(&self, lease: i64) -> Result<()> {
        let res = self
            .retrying("revoke a node lease", || async {
                let mut client = self.shared.lease.clone();
                client.revoke(lease).await
            })
            .await;
        match res {
            Err(err) if is_not_found(&err) => Ok(()),
            other => other.map(drop),
        }
    }

    async fn txn(&self, what: &str, txn: Txn) -> std::result::Result<TxnResponse, Failure> {
        let mut kv = self.shared.kv.clone();
        self.once(what, kv.txn(txn)).await
    }

    /// The claim algorithm for one task (see the module docs).
    async fn claim_one(&self, ns: &str, task: &str, claim: &Claim) -> Result<bool> {
        let key = key(ns, "claims", task);
        let cache_key = (ns.to_string(), task.to_string());
        let value = codec::encode(claim);
        // What we believe is stored: None = absent or unknown (try to create).
        let mut seen: Option<Stored> = self
            .claim_revs()
            .get(&cache_key)
            .filter(|(_, fire_time)| *fire_time < claim.fire_time)
            .map(|&(mod_revision, fire_time)| Stored {
                mod_revision,
                claim: Some(Claim {
                    fire_time,
                    node: String::new(),
                    claimed_at: 0,
                }),
            });
        // Set after a request whose outcome is unknown (it may have been
        // applied): finding exactly our claim stored then means we won.
        let mut uncertain = false;
        let mut errors = 0;
        let mut rounds = 0;
        loop {
            let compare = match &seen {
                None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                Some(stored) => {
                    if let Some(current) = &stored.claim {
                        if current.fire_time >= claim.fire_time {
                            return Ok(uncertain && current == claim);
                        }
                    }
                    Compare::mod_revision(key.clone(), CompareOp::Equal, stored.mod_revision)
                }
            };
            let txn = Txn::new()
                .when([compare])
                .and_then([TxnOp::put(key.clone(), value.clone(), None)])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = match self.txn("claim a fire time", txn).await {
                Ok(resp) => resp,
                Err(Failure::Final(err)) => return Err(err),
                Err(Failure::Retryable(err)) => {
                    errors += 1;
                    if errors >= ATTEMPTS {
                        return Err(err);
                    }
                    tracing::debug!(backend = BACKEND, task, %err, "claim outcome unknown; reading back");
                    uncertain = true;
                    tokio::time::sleep(Duration::from_millis(50) * errors).await;
                    seen = match self.read_claim(&key).await {
                        Ok(stored) => stored,
                        Err(err) => return Err(err),
                    };
                    continue;
                }
            };
            if resp.succeeded() {
                let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                let mut revs = self.claim_revs();
                if revs.len() >= MAX_CLAIM_CACHE {
                    revs.clear();
                }
                revs.insert(cache_key, (revision, claim.fire_time));
                return Ok(true);
            }
            rounds += 1;
            if rounds >= MAX_CLAIM_ROUNDS {
                return Err(Error::registry_msg(
                    BACKEND,
                    format!("claim of `{task}` lost {rounds} transactions in a row to concurrent writers"),
                ));
            }
            seen = stored_from_get(&key, &resp);
        }
    }

    async fn read_claim(&self, key: &str) -> Result<Option<Stored>> {
        let resp = self
            .retrying("read a claim", || async {
                let mut kv = self.shared.kv.clone();
                kv.get(key, None).await
            })
            .await?;
        Ok(resp.kvs().first().map(|kv| stored(key, kv)))
    }
}

/// How a request failed.
enum Failure {
    /// Worth another try (transport, no leader, timeout); may have been applied.
    Retryable(Error),
    /// Retrying cannot help.
    Final(Error),
}

/// A stored claim watermark as read: its revision and value (`None` = corrupt).
struct Stored {
    mod_revision: i64,
    claim: Option<Claim>,
}

fn stored(key: &str, kv: &KeyValue) -> Stored {
    Stored {
        mod_revision: kv.mod_revision(),
        claim: codec::decode_claim(BACKEND, key, kv.value()),
    }
}

/// The claim returned by the `else` branch of a claim transaction.
fn stored_from_get(key: &str, resp: &TxnResponse) -> Option<Stored> {
    resp.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| stored(key, kv)),
        _ => None,
    })
}

/// gRPC status codes (numbers fixed by the gRPC spec) that etcd returns.
mod code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const ABORTED: i32 = 10;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
}

fn retryable(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code() as i32,
            code::UNAVAILABLE
                | code::UNKNOWN
                | code::CANCELLED
                | code::DEADLINE_EXCEEDED
                | code::ABORTED
                | code::RESOURCE_EXHAUSTED
                | code::INTERNAL
        ),
        etcd_client::Error::LeaseKeepAliveError(msg) => !is_lease_gone(msg),
        etcd_client::Error::WatchError(_) => true,
        _ => false,
    }
}

/// The library's words for a keep-alive answered with TTL <= 0.
fn is_lease_gone(msg: &str) -> bool {
    msg.contains("not found")
}

/// The etcd client error inside a registry error, if any.
fn etcd_cause(err: &Error) -> Option<&etcd_client::Error> {
    match err {
        Error::Registry {
            source: Some(source),
            ..
        } => source.downcast_ref::<etcd_client::Error>(),
        _ => None,
    }
}

fn is_not_found(err: &Error) -> bool {
    matches!(etcd_cause(err), Some(etcd_client::Error::GRpcStatus(status)) if status.code() as i32 == code::NOT_FOUND)
}

fn is_lease_gone_error(err: &Error) -> bool {
    matches!(etcd_cause(err), Some(etcd_client::Error::LeaseKeepAliveError(msg)) if is_lease_gone(msg))
}

fn prefix(ns: &str, kind: &str) -> String {
    format!("/{ns}/{kind}/")
}

fn key(ns: &str, kind: &str, name: &str) -> String {
    format!("/{ns}/{kind}/{name}")
}

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: no end (etcd's "\0" = to the end of the key space).
    vec![0]
}

/// Whole seconds of `ttl`, rounded up, at least 1 (etcd may raise it to its
/// minimum lease TTL, 2 s with the default election timeout).
fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// The name after `prefix` in `key`, if it is one.
fn name_after<'k>(key: &'k [u8], prefix: &str) -> Option<&'k str> {
    let rest = key.strip_prefix(prefix.as_bytes())?;
    std::str::from_utf8(rest).ok().filter(|n| !n.is_empty())
}

#[async_trait]
impl Registry for EtcdRegistry {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn timing(&self) -> Timing {
        self.timing
    }

    async fn register(&self, ns: &str, node: &Node, ttl: Duration) -> Result<()> {
        let key = key(ns, "nodes", &node.id);
        let value = codec::encode(node);
        let ttl = ttl_secs(ttl);
        let granted = self
            .retrying("grant a node lease", || async {
                let mut lease = self.shared.lease.clone();
                lease.grant(ttl, None).await
            })
            .await?;
        let lease = granted.id();
        let put = self
            .retrying("register a node", || async {
                let mut kv = self.shared.kv.clone();
                let options = PutOptions::new().with_lease(lease);
                kv.put(key.as_str(), value.as_slice(), Some(options)).await
            })
            .await;
        if let Err(err) = put {
            let _ = self.revoke(lease).await;
            return Err(err);
        }
        let old = self
            .leases()
            .insert((ns.to_string(), node.id.clone()), lease);
        if let Some(old) = old.filter(|old| *old != lease) {
            // The key now carries the new lease: revoking the old one
            // deletes nothing. If this fails, the old lease expires anyway.
            if let Err(err) = self.revoke(old).await {
                tracing::debug!(backend = BACKEND, %err, "could not revoke a replaced lease");
            }
        }
        Ok(())
    }

    async fn heartbeat(&self, ns: &str, node_id: &str, _ttl: Duration) -> Result<bool> {
        // The lease keeps the TTL it was granted with at `register`.
        let Some(lease) = self.lease_of(ns, node_id) else {
            return Ok(false);
        };
        let key = key(ns, "nodes", node_id);
        let keep_alive = self.retrying("send a lease keep-alive", || async {
            let mut client = self.shared.lease.clone();
            client.keep_alive(lease).await.map(drop)
        });
        let record = self.retrying("check a node record", || async {
            let mut kv = self.shared.kv.clone();
            kv.get(key.as_str(), Some(GetOptions::new().with_keys_only()))
                .await
        });
        let (alive, record) = tokio::join!(keep_alive, record);
        let alive = match alive {
            Ok(()) => true,
            Err(err) if is_lease_gone_error(&err) => false,
            Err(err) => return Err(err),
        };
        let attached = record?
            .kvs()
            .first()
            .is_some_and(|kv| kv.lease() == lease);
        if !alive || !attached {
            {
                let mut leases = self.leases();
                let k = (ns.to_string(), node_id.to_string());
                if leases.get(&k) == Some(&lease) {
                    leases.remove(&k);
                }
            }
            if alive {
                // The record is gone or carries another lease: ours is useless.
                let _ = self.revoke(lease).await;
            }
            return Ok(false);
        }
        Ok(true)
    }

    async fn update_node(&self, ns: &str, node: &Node) -> Result<bool> {
        let Some(lease) = self.lease_of(ns, &node.id) else {
            return Ok(false);
        };
        let key = key(ns, "nodes", &node.id);
        let value = codec::encode(node);
        // Only while the key exists and carries our lease: a put without the
        // lease would detach it, and a put after expiry would resurrect the node.
        let resp = self
            .retrying("update a node record", || async {
                let txn = Txn::new()
                    .when([Compare::lease(key.as_str(), CompareOp::Equal, lease)])
                    .and_then([TxnOp::put(
                        key.as_str(),
                        value.as_slice(),
                        Some(PutOptions::new().with_lease(lease)),
                    )]);
                let mut kv = self.shared.kv.clone();
                kv.txn(txn).await
            })
            .await?;
        Ok(resp.succeeded())
    }

    async fn unregister(&self, ns: &str, node_id: &str) -> Result<()> {
        let lease = self
            .leases()
            .remove(&(ns.to_string(), node_id.to_string()));
        if let Some(lease) = lease {
            // Deletes the key (one NodeDelete event).
            self.revoke(lease).await?;
        }
        // The key may carry a lease this registry does not know.
        let key = key(ns, "nodes", node_id);
        self.retrying("unregister a node", || async {
            let mut kv = self.shared.kv.clone();
            kv.delete(key.as_str(), None).await
        })
        .await?;
        Ok(())
    }

    async fn nodes(&self, ns: &str) -> Result<Vec<Node>> {
        let prefix = prefix(ns, "nodes");
        let kvs = self.range(&prefix, false, "list nodes").await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let id = name_after(kv.key(), &prefix)?;
                codec::decode_node(BACKEND, id, kv.value())
            })
            .collect())
    }

    async fn put_task(&self, ns: &str, meta: &TaskMeta, overwrite: bool) -> Result<()> {
        let key = key(ns, "tasks", &meta.name);
        let value = codec::encode(meta);
        if overwrite {
            self.retrying("store a task", || async {
                let mut kv = self.shared.kv.clone();
                kv.put(key.as_str(), value.as_slice(), None).await
            })
            .await?;
            return Ok(());
        }
        let resp = self
            .retrying("create a task", || async {
                let txn = Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.as_str(), value.as_slice(), None)])
                    .or_else([TxnOp::get(key.as_str(), None)]);
                let mut kv = self.shared.kv.clone();
                kv.txn(txn).await
            })
            .await?;
        if resp.succeeded() {
            return Ok(());
        }
        // A retried create whose first attempt was applied finds its own value.
        let ours = resp.op_responses().into_iter().any(|op| {
            matches!(op, TxnOpResponse::Get(get)
                if get.kvs().first().is_some_and(|kv| kv.value() == value.as_slice() && kv.version() == 1))
        });
        if ours {
            Ok(())
        } else {
            Err(Error::TaskExists(meta.name.clone()))
        }
    }

    async fn delete_task(&self, ns: &str, name: &str) -> Result<()> {
        let key = key(ns, "tasks", name);
        self.retrying("delete a task", || async {
            let mut kv = self.shared.kv.clone();
            kv.delete(key.as_str(), None).await
        })
        .await?;
        Ok(())
    }

    async fn tasks(&self, ns: &str) -> Result<Vec<TaskMeta>> {
        let prefix = prefix(ns, "tasks");
        let kvs = self.range(&prefix, false, "list tasks").await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let name = name_after(kv.key(), &prefix)?;
                codec::decode_task(BACKEND, name, kv.value())
            })
            .collect())
    }

    async fn put_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        let key = key(ns, "deleted", name);
        let value = codec::encode(&serde_json::json!({ "deleted": true }));
        // Create-only: an existing tombstone (whatever its value) stays, and
        // watchers see one TombstonePut.
        self.retrying("write a tombstone", || async {
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.as_str(), value.as_slice(), None)]);
            let mut kv = self.shared.kv.clone();
            kv.txn(txn).await
        })
        .await?;
        Ok(())
    }

    async fn delete_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        let key = key(ns, "deleted", name);
        self.retrying("delete a tombstone", || async {
            let mut kv = self.shared.kv.clone();
            kv.delete(key.as_str(), None).await
        })
        .await?;
        Ok(())
    }

    async fn tombstones(&self, ns: &str) -> Result<Vec<String>> {
        let prefix = prefix(ns, "deleted");
        let kvs = self.range(&prefix, true, "list tombstones").await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let Some(name) = name_after(kv.key(), &prefix) else {
                    tracing::warn!(backend = BACKEND, key = %String::from_utf8_lossy(kv.key()), "skipping a tombstone key that is not UTF-8");
                    return None;
                };
                if validate_task_name(name).is_err() {
                    tracing::warn!(backend = BACKEND, key = name, "skipping a tombstone with an invalid task name");
                    return None;
                }
                Some(name.to_string())
            })
            .collect())
    }

    async fn claim(&self, ns: &str, task: &str, claim: &Claim) -> Result<bool> {
        self.claim_one(ns, task, claim).await
    }

    async fn claim_many(&self, ns: &str, tasks: &[&str], claim: &Claim) -> Result<Vec<bool>> {
        let mut won = vec![false; tasks.len()];
        let mut running = JoinSet::new();
        let mut next = 0;
        while next < tasks.len() || !running.is_empty() {
            while next < tasks.len() && running.len() < CLAIM_CONCURRENCY {
                let registry = self.clone();
                let (ns, task, claim) = (ns.to_string(), tasks[next].to_string(), claim.clone());
                let index = next;
                running.spawn(async move { (index, registry.claim_one(&ns, &task, &claim).await) });
                next += 1;
            }
            match running.join_next().await {
                Some(Ok((index, result))) => won[index] = result?,
                Some(Err(err)) => {
                    return Err(Error::registry(BACKEND, "a claim task failed", err));
                }
                None => break,
            }
        }
        Ok(won)
    }

    async fn claims(&self, ns: &str) -> Result<Vec<(String, Claim)>> {
        let prefix = prefix(ns, "claims");
        let kvs = self.range(&prefix, false, "list claims").await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let name = name_after(kv.key(), &prefix)?;
                let claim = codec::decode_claim(BACKEND, name, kv.value())?;
                Some((name.to_string(), claim))
            })
            .collect())
    }

    async fn delete_claim(&self, ns: &str, task: &str) -> Result<()> {
        let key = key(ns, "claims", task);
        self.claim_revs()
            .remove(&(ns.to_string(), task.to_string()));
        self.retrying("delete a claim", || async {
            let mut kv = self.shared.kv.clone();
            kv.delete(key.as_str(), None).await
        })
        .await?;
        Ok(())
    }

    async fn clear(&self, ns: &str) -> Result<()> {
        self.claim_revs().retain(|(space, _), _| space != ns);
        let prefixes = [
            prefix(ns, "tasks"),
            prefix(ns, "deleted"),
            prefix(ns, "claims"),
        ];
        // One transaction: all three go at once.
        self.retrying("clear the namespace", || async {
            let ops: Vec<TxnOp> = prefixes
                .iter()
                .map(|p| TxnOp::delete(p.as_str(), Some(DeleteOptions::new().with_prefix())))
                .collect();
            let mut kv = self.shared.kv.clone();
            kv.txn(Txn::new().and_then(ops)).await
        })
        .await?;
        Ok(())
    }

    async fn watch(&self, ns: &str) -> Result<WatchReceiver> {
        // Events after this revision are delivered, even if the stream takes
        // a while to open: nothing written after `watch` returns is missed.
        let revision = self.revision().await?;
        self.watch_from(ns, revision).await
    }
}

/// The background task behind a watch.
struct Feed {
    registry: EtcdRegistry,
    ns: String,
    start: String,
    end: Vec<u8>,
    tx: mpsc::Sender<WatchEvent>,
    /// An event was dropped on a full channel: send Resync once there is room.
    overflowed: bool,
}

/// How a watch stream ended.
enum Ended {
    /// The receiver is gone: stop.
    Closed,
    /// Disconnected or cancelled: reconnect from `next`.
    Broken,
    /// `next` was compacted: resync and restart from the current revision.
    Compacted,
}

impl Feed {
    async fn run(mut self, mut next: i64) {
        let mut pause = Duration::from_millis(100);
        let mut gap = false;
        loop {
            if self.tx.is_closed() {
                return;
            }
            match self.stream(&mut next, &mut gap, &mut pause).await {
                Ended::Closed => return,
                Ended::Broken => gap = true,
                Ended::Compacted => {
                    // Restart from now; the receiver reloads everything.
                    match self.registry.revision().await {
                        Ok(revision) => {
                            next = revision + 1;
                            if !self.emit(WatchEvent::Resync) {
                                return;
                            }
                            gap = false;
                            continue;
                        }
                        Err(err) => {
                            tracing::warn!(backend = BACKEND, ns = %self.ns, %err, "watch: cannot read the current revision");
                        }
                    }
                }
            }
            tokio::select! {
                _ = self.tx.closed() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(WATCH_BACKOFF_MAX);
        }
    }

    /// Runs one watch stream from `next` until it ends.
    async fn stream(&mut self, next: &mut i64, gap: &mut bool, pause: &mut Duration) -> Ended {
        let options = WatchOptions::new()
            .with_range(self.end.clone())
            .with_start_revision(*next);
        let mut client = self.registry.shared.client.watch_client();
        let timeout = self.registry.request_timeout;
        let opened = tokio::select! {
            _ = self.tx.closed() => return Ended::Closed,
            opened = tokio::time::timeout(timeout, client.watch(self.start.as_str(), Some(options))) => opened,
        };
        let mut stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                tracing::warn!(backend = BACKEND, ns = %self.ns, %err, "watch: cannot open the stream; retrying");
                return Ended::Broken;
            }
            Err(_) => {
                tracing::warn!(backend = BACKEND, ns = %self.ns, ?timeout, "watch: opening the stream timed out; retrying");
                return Ended::Broken;
            }
        };
        loop {
            let message = tokio::select! {
                _ = self.tx.closed() => return Ended::Closed,
                permit = self.tx.reserve(), if self.overflowed => {
                    match permit {
                        Ok(permit) => {
                            permit.send(WatchEvent::Resync);
                            self.overflowed = false;
                            continue;
                        }
                        Err(_) => return Ended::Closed,
                    }
                }
                message = stream.message() => message,
            };
            let resp = match message {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    tracing::warn!(backend = BACKEND, ns = %self.ns, "watch: stream ended; reconnecting");
                    return Ended::Broken;
                }
                Err(err) => {
                    tracing::warn!(backend = BACKEND, ns = %self.ns, %err, "watch: stream failed; reconnecting");
                    return Ended::Broken;
                }
            };
            if resp.compact_revision() > 0 {
                tracing::warn!(backend = BACKEND, ns = %self.ns, from = *next, compacted = resp.compact_revision(), "watch: revision compacted; resyncing");
                return Ended::Compacted;
            }
            if resp.canceled() {
                tracing::warn!(backend = BACKEND, ns = %self.ns, reason = resp.cancel_reason(), "watch: cancelled by the server; reconnecting");
                return Ended::Broken;
            }
            if resp.created() {
                *pause = Duration::from_millis(100);
                if *gap {
                    // Resumed by revision, so nothing should be lost; the
                    // receiver reloads anyway, cheaply, after a reconnect.
                    *gap = false;
                    if !self.emit(WatchEvent::Resync) {
                        return Ended::Closed;
                    }
                }
            }
            if !self.deliver(&resp, next) {
                return Ended::Closed;
            }
        }
    }

    /// Turns the events of `resp` into watch events; false if the receiver is gone.
    fn deliver(&mut self, resp: &WatchResponse, next: &mut i64) -> bool {
        let ns = &self.ns;
        let (nodes, tasks, deleted) = (prefix(ns, "nodes"), prefix(ns, "tasks"), prefix(ns, "deleted"));
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            *next = (*next).max(kv.mod_revision() + 1);
            let put = event.event_type() == EventType::Put;
            let key = kv.key();
            let ev = if let Some(id) = name_after(key, &nodes) {
                if put {
                    match codec::decode_node(BACKEND, id, kv.value()) {
                        Some(node) => WatchEvent::NodePut(node),
                        None => continue,
                    }
                } else {
                    WatchEvent::NodeDelete(id.to_string())
                }
            } else if let Some(name) = name_after(key, &tasks) {
                if put {
                    match codec::decode_task(BACKEND, name, kv.value()) {
                        Some(meta) => WatchEvent::TaskPut(meta),
                        None => continue,
                    }
                } else {
                    WatchEvent::TaskDelete(name.to_string())
                }
            } else if let Some(name) = name_after(key, &deleted) {
                if validate_task_name(name).is_err() {
                    continue;
                }
                if put {
                    WatchEvent::TombstonePut(name.to_string())
                } else {
                    WatchEvent::TombstoneDelete(name.to_string())
                }
            } else {
                // Something else between the prefixes (not ours).
                continue;
            };
            if !self.emit(ev) {
                return false;
            }
        }
        true
    }

    /// Sends without blocking; on a full channel the event is dropped and a
    /// Resync follows once there is room. False if the receiver is gone.
    fn emit(&mut self, event: WatchEvent) -> bool {
        if self.overflowed {
            match self.tx.try_reserve() {
                Ok(permit) => {
                    permit.send(WatchEvent::Resync);
                    self.overflowed = false;
                }
                Err(mpsc::error::TrySendError::Full(())) => return true,
                Err(mpsc::error::TrySendError::Closed(())) => return false,
            }
        }
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(backend = BACKEND, ns = %self.ns, "watch: receiver too slow; events dropped, Resync follows");
                self.overflowed = true;
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end("/ns/tasks/"), b"/ns/tasks0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn watched_range_skips_claims_only() {
        let (start, end) = (prefix("ns", "deleted"), prefix_end(&prefix("ns", "tasks")));
        let inside = |k: &str| k.as_bytes() >= start.as_bytes() && k.as_bytes() < end.as_slice();
        assert!(inside("/ns/deleted/a"));
        assert!(inside("/ns/nodes/n1"));
        assert!(inside("/ns/tasks/t"));
        assert!(!inside("/ns/claims/t"));
        assert!(!inside("/ns2/tasks/t"));
        assert!(!inside("/ns-x/nodes/n"));
    }

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(ttl_secs(Duration::from_secs(10)), 10);
        assert_eq!(ttl_secs(Duration::from_millis(10_001)), 11);
        assert_eq!(ttl_secs(Duration::ZERO), 1);
    }

    #[test]
    fn names_after_prefixes() {
        assert_eq!(name_after(b"/ns/tasks/a", "/ns/tasks/"), Some("a"));
        assert_eq!(name_after(b"/ns/tasks/", "/ns/tasks/"), None);
        assert_eq!(name_after(b"/ns/tasks/\xff", "/ns/tasks/"), None);
        assert_eq!(name_after(b"/ns/nodes/a", "/ns/tasks/"), None);
    }
}
