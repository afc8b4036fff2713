//! The etcd v3 registry (cargo feature `etcd`).
//!
//! Key layout for namespace `ns` (`docs/design.md`, section 3):
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
//!   compare inside JSON): decide with [`Claim::against`] on the stored
//!   watermark (absent, corrupt or older: write; the same fire time under
//!   our token: already ours, won without a write; otherwise lost), and
//!   write in a transaction that succeeds only if the key has not changed
//!   since it was read. A failed transaction returns the current value in
//!   the same round trip, and the loop decides again. A transaction whose
//!   outcome is unknown (timeout, transport error) is sent again as it is:
//!   if it was applied, its compare now fails and it returns the stored
//!   watermark, ours, found by its token (won), so our own write whose
//!   answer was lost counts as won. The revision of the registry's own last
//!   successful claim of a task is remembered, so the steady state (the
//!   owner claiming its task at each fire time) is one round trip.
//! * **Watch**: one range watch over `/ns/deleted/` .. `/ns/tasks/` — which
//!   covers tombstones, nodes and tasks, but not `/ns/claims/` (claims sort
//!   first), so claim writes never even reach a watcher. The feed resumes
//!   from the last seen revision + 1 after a disconnect (then sends
//!   [`WatchEvent::Resync`] anyway), and when that revision was compacted it
//!   sends `Resync` and restarts from the current revision.
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
//!   when the new leader is elected (measured: the election plus 50 to
//!   300 ms), not after a request timeout. Claims are safe to send again
//!   (see above).
//! * **TLS** is not compiled in (it needs `etcd-client`'s `tls` feature and a
//!   crypto library); build a TLS client yourself and use
//!   [`EtcdRegistry::from_client`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
use tokio::time::Instant;

use super::codec;
use super::{
    Claim, ClaimOutcome, Registry, Timing, WatchEvent, WatchReceiver, WATCH_CHANNEL_CAPACITY,
};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::task::{validate_task_name, TaskMeta};

const BACKEND: &str = "etcd";

/// Default bound on establishing a connection to an endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default bound on each request, its retries included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on one attempt of a small request (a claim, a keep-alive,
/// a single key): one etcd election timeout (1 s by default). It only ends
/// attempts that nothing else ends: one whose member loses its leader is
/// ended as soon as the member says so (see [`EtcdRegistry`]'s fail-over).
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// First pause before retrying a failed attempt, doubling up to the next.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(25);
/// Longest pause between two attempts of a small request, so that one
/// goes through soon after a new leader is elected.
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(250);
/// An attempt pending this long starts asking its member for its leader.
const PROBE_AFTER: Duration = Duration::from_millis(200);
/// How often a pending attempt's member is asked for its leader.
const PROBE_EVERY: Duration = Duration::from_millis(150);
/// Bound on one such question (answered locally by the member).
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// A member found unreachable is skipped this long when moving on.
const DOWN_FOR: Duration = Duration::from_secs(3);

/// Attempts of a large request (a page of a range read) that failed in a
/// way worth retrying (transport error, no leader, timeout): at least this
/// many, and at least one per member plus one.
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
    attempt_timeout: Duration,
}

struct Shared {
    /// One client per endpoint (or the one client given to
    /// [`EtcdRegistry::from_client`]). Requests go to the current member and
    /// move to the next one when it fails: the library's own balancing keeps
    /// sending requests to a dead member.
    members: Vec<Member>,
    current: AtomicUsize,
    /// The latest raft term seen in an answer (0: none yet).
    term: AtomicU64,
    /// How to connect a member that is not connected yet (`None` when the
    /// client was given).
    options: Option<ConnectOptions>,
    connect_bound: Duration,
    /// `(ns, node id)` → lease of the registration made through this registry.
    leases: Mutex<HashMap<(String, String), i64>>,
    /// `(ns, task)` → `(mod_revision, fire_time)` of this registry's last
    /// successful claim: the next claim tries that revision first.
    claim_revs: Mutex<HashMap<(String, String), (i64, i64)>>,
}

struct Member {
    endpoint: String,
    handles: Mutex<Option<Handles>>,
    /// Until when the member counts as unreachable (a transport error).
    down_until: Mutex<Option<Instant>>,
    /// The latest status probe of this member, shared by the requests
    /// waiting on it (one probe at a time).
    probe: tokio::sync::Mutex<Option<Probe>>,
}

impl Member {
    fn new(endpoint: String, handles: Option<Handles>) -> Member {
        Member {
            endpoint,
            handles: Mutex::new(handles),
            down_until: Mutex::new(None),
            probe: tokio::sync::Mutex::new(None),
        }
    }

    /// Marks the member unreachable for [`DOWN_FOR`] (skipped when moving
    /// on from another member), or reachable again.
    fn set_down(&self, down: bool) {
        let mut until = lock(&self.down_until);
        if down {
            *until = Some(Instant::now() + DOWN_FOR);
        } else if until.is_some() {
            *until = None;
        }
    }

    fn is_down(&self) -> bool {
        lock(&self.down_until).is_some_and(|until| until > Instant::now())
    }
}

/// What a member said about its leader.
#[derive(Clone, Copy)]
struct Probe {
    at: Instant,
    seen: Seen,
}

#[derive(Clone, Copy)]
enum Seen {
    /// It has a leader, in this raft term.
    Leader { term: u64 },
    /// It has no leader (an election is going on).
    NoLeader,
    /// No telling (slow, unreachable, or another error).
    Unknown,
}

/// The clients of one member.
#[derive(Clone)]
struct Handles {
    client: Client,
    kv: KvClient,
    lease: LeaseClient,
}

impl Handles {
    fn new(client: Client) -> Self {
        Handles {
            kv: client.kv_client().max_decoding_message_size(MAX_DECODING),
            lease: client.lease_client(),
            client,
        }
    }
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let endpoints: Vec<&str> = self
            .shared
            .members
            .iter()
            .map(|m| m.endpoint.as_str())
            .collect();
        let current = endpoints.get(self.current()).copied();
        f.debug_struct("EtcdRegistry")
            .field("endpoints", &endpoints)
            .field("current", &current)
            .field("timing", &self.timing)
            .field("request_timeout", &self.request_timeout)
            .field("attempt_timeout", &self.attempt_timeout)
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
    attempt_timeout: Duration,
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
            .field("attempt_timeout", &self.attempt_timeout)
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

    /// Bound on establishing the connection to a member, authentication
    /// included (default 3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on each request, its retries included (default 5 s). An
    /// attempt that fails with a transport error, "no leader" or the
    /// [attempt timeout](Self::attempt_timeout) is tried again on the next
    /// member, with a short capped backoff, until this bound. Large
    /// requests (a page of a range read) get this bound for each of a few
    /// attempts instead.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Bound on one attempt of a small request: a claim, a lease call, a
    /// single key (default 1 s, capped by the request timeout); the attempt
    /// is then abandoned and tried again on the next member. A write in
    /// flight at a member whose leader died is never answered (etcd drops
    /// the proposal): such an attempt is abandoned as soon as the member
    /// reports a new leader or none (it is asked every 150 ms once the
    /// attempt has taken 200 ms), so this bound only matters for a member
    /// that stops answering altogether. Too short for the cluster's normal
    /// latency, and requests are abandoned and retried needlessly.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
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
    /// a few connect and request timeouts, with a clear error).
    pub async fn connect(self) -> Result<EtcdRegistry> {
        if self.endpoints.is_empty() {
            return Err(Error::InvalidConfig(
                "etcd: no endpoints given; pass e.g. \"http://127.0.0.1:2379\"".into(),
            ));
        }
        if self.connect_timeout.is_zero()
            || self.request_timeout.is_zero()
            || self.attempt_timeout.is_zero()
        {
            return Err(Error::InvalidConfig(
                "etcd: connect, request and attempt timeouts must be above zero".into(),
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
        // Start at a random member so that many nodes spread their load.
        let start = (uuid::Uuid::new_v4().as_u128() % self.endpoints.len() as u128) as usize;
        let members = self
            .endpoints
            .iter()
            .map(|endpoint| Member::new(endpoint.clone(), None))
            .collect();
        let registry = EtcdRegistry {
            shared: Arc::new(Shared {
                members,
                current: AtomicUsize::new(start),
                term: AtomicU64::new(0),
                options: Some(options),
                // With credentials, connecting authenticates (a round trip).
                connect_bound: self.connect_timeout + self.request_timeout,
                leases: Mutex::new(HashMap::new()),
                claim_revs: Mutex::new(HashMap::new()),
            }),
            timing: self.timing,
            request_timeout: self.request_timeout,
            attempt_timeout: self.attempt_timeout,
        };
        // Fail fast: one cheap call that needs a live member with a leader.
        let endpoints = self.endpoints.join(",");
        let context = format!("cannot reach etcd at {endpoints} (is it running?)");
        registry
            .retrying_long(&context, |h| async move {
                let mut maintenance = h.client.maintenance_client();
                maintenance.status().await
            })
            .await
            .map_err(|err| match err {
                Error::Timeout { after, .. } => Error::Timeout {
                    what: format!("connecting to etcd at {endpoints}"),
                    after,
                },
                other => other,
            })?;
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
        let mut list: Vec<String> = Vec::new();
        for item in endpoints {
            for e in item.as_ref().split(',').map(str::trim) {
                if !e.is_empty() && !list.iter().any(|x| x == e) {
                    list.push(e.to_string());
                }
            }
        }
        EtcdRegistryBuilder {
            endpoints: list,
            user: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            keep_alive: Some((Duration::from_secs(10), Duration::from_secs(5))),
            timing: Self::DEFAULT_TIMING,
        }
    }

    /// Uses an existing client (its own endpoints, TLS, auth and timeouts
    /// apply; every call is also bounded by the request timeout, default
    /// 5 s, retries included, and each attempt of a small request by the
    /// attempt timeout, default 1 s). Nothing is sent until the first call.
    /// Requests are retried on the same client, so prefer
    /// [`connect`](Self::connect) with every member for fail-over.
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
        EtcdRegistry {
            shared: Arc::new(Shared {
                members: vec![Member::new(
                    "(given client)".into(),
                    Some(Handles::new(client)),
                )],
                current: AtomicUsize::new(0),
                term: AtomicU64::new(0),
                options: None,
                connect_bound: DEFAULT_CONNECT_TIMEOUT,
                leases: Mutex::new(HashMap::new()),
                claim_revs: Mutex::new(HashMap::new()),
            }),
            timing: Self::DEFAULT_TIMING,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
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

    /// Replaces the bound on one attempt of a small request (default 1 s,
    /// see [`EtcdRegistryBuilder::attempt_timeout`]).
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// A client of the member currently in use (connecting it if needed),
    /// for direct access to etcd.
    pub async fn client(&self) -> Result<Client> {
        match self.handles(self.current()).await {
            Ok(handles) => Ok(handles.client),
            Err(failure) => Err(failure.into_error()),
        }
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
            .retrying("read the current revision", |h| async move {
                let mut kv = h.kv;
                kv.get("/", Some(GetOptions::new().with_count_only())).await
            })
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    fn current(&self) -> usize {
        self.shared.current.load(Ordering::Relaxed) % self.shared.members.len().max(1)
    }

    /// Moves on from member `index` (unless another request already did),
    /// skipping members found unreachable lately.
    fn rotate(&self, index: usize) {
        let n = self.shared.members.len();
        if n > 1 {
            // The next member not found unreachable lately (else the next).
            let next = (1..n)
                .map(|k| (index + k) % n)
                .find(|&j| !self.shared.members[j].is_down())
                .unwrap_or((index + 1) % n);
            if self
                .shared
                .current
                .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                tracing::debug!(
                    backend = BACKEND,
                    from = %self.shared.members[index].endpoint,
                    to = %self.shared.members[next].endpoint,
                    "switching etcd member"
                );
            }
        }
    }

    /// The clients of member `index`, connecting it on first use.
    async fn handles(&self, index: usize) -> std::result::Result<Handles, Failure> {
        let Some(member) = self.shared.members.get(index) else {
            return Err(Failure::Final(Error::registry_msg(
                BACKEND,
                "no etcd member",
            )));
        };
        if let Some(handles) = lock(&member.handles).clone() {
            return Ok(handles);
        }
        let Some(options) = self.shared.options.clone() else {
            return Err(Failure::Final(Error::registry_msg(
                BACKEND,
                "no etcd client",
            )));
        };
        let bound = self.shared.connect_bound;
        let endpoint = member.endpoint.as_str();
        match tokio::time::timeout(bound, Client::connect([endpoint], Some(options))).await {
            Ok(Ok(client)) => {
                let mut slot = lock(&member.handles);
                // Another request may have connected meanwhile: keep one.
                Ok(slot.get_or_insert_with(|| Handles::new(client)).clone())
            }
            Ok(Err(err)) => Err(
                match Failure::of(err, format!("cannot connect to etcd at {endpoint}")) {
                    Failure::Retryable(err) => Failure::Down(err),
                    other => other,
                },
            ),
            Err(_) => Err(Failure::Down(Error::Timeout {
                what: format!("connecting to etcd at {endpoint}"),
                after: bound,
            })),
        }
    }

    /// A small request (one key, a transaction, a lease call): each attempt
    /// bounded by the attempt timeout, tried on the current member and then
    /// on the next ones while it fails in a retryable way, until the request
    /// timeout.
    async fn retrying<T: Answer, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: FnMut(Handles) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.retrying_until(what, Instant::now() + self.request_timeout, op)
            .await
    }

    /// [`retrying`](Self::retrying) until `deadline`.
    async fn retrying_until<T: Answer, F, Fut>(
        &self,
        what: &str,
        deadline: Instant,
        mut op: F,
    ) -> Result<T>
    where
        F: FnMut(Handles) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let mut pause = FIRST_RETRY_PAUSE;
        let mut attempt = 1;
        loop {
            let failure = match self
                .attempt(what, self.attempt_bound(deadline), &mut op)
                .await
            {
                Ok(v) => return Ok(v),
                Err(Failure::Final(err)) => return Err(err),
                Err(failure) => failure,
            };
            let wait = self.retry_pause(&failure, &mut pause);
            let err = failure.into_error();
            if Instant::now() + wait >= deadline {
                return Err(err);
            }
            tracing::debug!(backend = BACKEND, what, error = ?err, attempt, "retrying");
            attempt += 1;
            tokio::time::sleep(wait).await;
        }
    }

    /// A large request (a page of a range read, the probe at connect): each
    /// attempt bounded by the request timeout, a few attempts in all (at
    /// least one per member plus one).
    async fn retrying_long<T: Answer, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut(Handles) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let attempts = ATTEMPTS.max(self.shared.members.len() as u32 + 1);
        let mut pause = FIRST_RETRY_PAUSE;
        let mut attempt = 1;
        loop {
            let failure = match self.attempt(what, self.request_timeout, &mut op).await {
                Ok(v) => return Ok(v),
                Err(Failure::Final(err)) => return Err(err),
                Err(failure) => failure,
            };
            let wait = self.retry_pause(&failure, &mut pause);
            let err = failure.into_error();
            if attempt >= attempts {
                return Err(err);
            }
            tracing::debug!(backend = BACKEND, what, error = ?err, attempt, "retrying");
            attempt += 1;
            tokio::time::sleep(wait).await;
        }
    }

    /// The pause before trying again after `failure`: none after a leader
    /// change (the member knows the new leader), nor after an unreachable
    /// member when the request moved on to one not found unreachable; else
    /// `pause`, doubling up to [`MAX_RETRY_PAUSE`].
    fn retry_pause(&self, failure: &Failure, pause: &mut Duration) -> Duration {
        let at_once = match failure {
            Failure::Moved(_) => true,
            Failure::Down(_) => self
                .shared
                .members
                .get(self.current())
                .is_some_and(|m| !m.is_down()),
            Failure::Retryable(_) | Failure::Final(_) => false,
        };
        if at_once {
            return Duration::ZERO;
        }
        let wait = *pause;
        *pause = (*pause * 2).min(MAX_RETRY_PAUSE);
        wait
    }

    /// The bound on the next attempt of a request that must end by `deadline`.
    fn attempt_bound(&self, deadline: Instant) -> Duration {
        self.attempt_timeout
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1))
    }

    /// One attempt of a request on the current member, bounded by `bound`;
    /// a retryable failure (transport error, no leader, the bound) moves on
    /// to the next member.
    ///
    /// An attempt still pending after [`PROBE_AFTER`] is watched: the member
    /// is asked for its leader (a local status call) every [`PROBE_EVERY`].
    /// A write in flight when the leader died is never answered (the member
    /// forwarded it to the dead leader, and etcd drops it), so once the
    /// member has no leader or reports a new term, the attempt is abandoned
    /// and tried again at once, instead of waiting for the bound.
    async fn attempt<T: Answer, F, Fut>(
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
            Err(Failure::Retryable(_)) => self.rotate(index),
            Err(Failure::Down(_)) => {
                member.set_down(true);
                self.rotate(index);
            }
            Err(Failure::Moved(_) | Failure::Final(_)) => {}
        }
        result
    }

    /// Ends (with the failure to report) once member `index` has lost the
    /// leader it had when this started; never ends while that leader stays.
    async fn watch_leader(&self, index: usize, handles: &Handles) -> Failure {
        let Some(member) = self.shared.members.get(index) else {
            return std::future::pending().await;
        };
        // The latest raft term any member answered in before this request
        // (terms are cluster-wide), or else the first probe's. A term that
        // moved on without us only costs one needless retry.
        let mut known = self.shared.term.load(Ordering::Relaxed);
        tokio::time::sleep(PROBE_AFTER).await;
        loop {
            match self.probe(member, handles).await.seen {
                Seen::NoLeader => {
                    return Failure::Retryable(Error::registry_msg(
                        BACKEND,
                        format!("{} lost its leader while the request was pending", member.endpoint),
                    ))
                }
                Seen::Leader { term } if known == 0 => known = term,
                Seen::Leader { term } if term > known => {
                    return Failure::Moved(Error::registry_msg(
                        BACKEND,
                        format!(
                            "{} moved to raft term {term} while the request (sent in term {known}) was pending",
                            member.endpoint
                        ),
                    ))
                }
                Seen::Leader { .. } | Seen::Unknown => {}
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }

    /// Asks `member` for its leader, or returns a probe of the last
    /// [`PROBE_EVERY`] (requests waiting on one member share its probes).
    async fn probe(&self, member: &Member, handles: &Handles) -> Probe {
        let mut last = member.probe.lock().await;
        if let Some(probe) = *last {
            if probe.at.elapsed() < PROBE_EVERY / 2 {
                return probe;
            }
        }
        let mut maintenance = handles.client.maintenance_client();
        let seen = match tokio::time::timeout(PROBE_TIMEOUT, maintenance.status()).await {
            Ok(Ok(status)) if status.leader() != 0 => Seen::Leader {
                term: status.raft_term(),
            },
            Ok(Ok(_)) => Seen::NoLeader,
            // The probe itself requires a leader: "no leader" is an answer.
            Ok(Err(err)) if is_no_leader(&err) => Seen::NoLeader,
            Ok(Err(_)) | Err(_) => Seen::Unknown,
        };
        if let Seen::Leader { term } = seen {
            self.shared.term.fetch_max(term, Ordering::Relaxed);
        }
        let probe = Probe {
            at: Instant::now(),
            seen,
        };
        *last = Some(probe);
        probe
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
                .retrying_long(what, |h| {
                    let (from, options) = (from.clone(), options.clone());
                    async move {
                        let mut kv = h.kv;
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
        lock(&self.shared.leases)
    }

    fn claim_revs(&self) -> MutexGuard<'_, HashMap<(String, String), (i64, i64)>> {
        lock(&self.shared.claim_revs)
    }

    fn lease_of(&self, ns: &str, id: &str) -> Option<i64> {
        self.leases()
            .get(&(ns.to_string(), id.to_string()))
            .copied()
    }

    /// Revokes `lease`, ignoring "not found" (already expired or revoked).
    async fn revoke(&self, lease: i64) -> Result<()> {
        let res = self
            .retrying("revoke a node lease", |h| async move {
                let mut client = h.lease;
                client.revoke(lease).await
            })
            .await;
        match res {
            Err(err) if is_not_found(&err) => Ok(()),
            other => other.map(drop),
        }
    }

    /// One attempt of a transaction, bounded by `bound`.
    async fn txn(
        &self,
        what: &str,
        txn: &Txn,
        bound: Duration,
    ) -> std::result::Result<TxnResponse, Failure> {
        self.attempt(what, bound, &mut |h: Handles| {
            let txn = txn.clone();
            async move {
                let mut kv = h.kv;
                kv.txn(txn).await
            }
        })
        .await
    }

    /// The claim algorithm for one task (see the module docs): decide with
    /// [`Claim::against`] on what is stored, write with a compare-and-set on
    /// the key's revision, and after a failed compare or a request whose
    /// outcome is unknown, decide again on what is stored then (our own
    /// earlier write, whose answer was lost, is found as ours: won).
    async fn claim_one(&self, ns: &str, task: &str, claim: &Claim) -> Result<bool> {
        let key = key(ns, "claims", task);
        let cache_key = (ns.to_string(), task.to_string());
        let value = codec::encode(claim);
        // What we believe is stored: `None` = absent or unknown (try to
        // create; a failed create returns what is stored). Our last claim of
        // an older fire time is known without a read.
        let mut seen: Option<Stored> = self
            .claim_revs()
            .get(&cache_key)
            .filter(|(_, fire_time)| *fire_time < claim.fire_time)
            .map(|&(mod_revision, fire_time)| Stored {
                mod_revision,
                claim: Some(Claim::new(fire_time, "", "", 0)),
            });
        // Every attempt is short (the attempt timeout): one stalled at a
        // member that lost its leader is abandoned and tried again, on the
        // next member, until the request timeout.
        let deadline = Instant::now() + self.request_timeout;
        let mut pause = FIRST_RETRY_PAUSE;
        let mut rounds = 0;
        loop {
            let compare = match &seen {
                None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                Some(stored) => match claim.against(stored.claim.as_ref()) {
                    None => return Ok(true),
                    Some(false) => return Ok(false),
                    Some(true) => {
                        Compare::mod_revision(key.as_str(), CompareOp::Equal, stored.mod_revision)
                    }
                },
            };
            let txn = Txn::new()
                .when([compare])
                .and_then([TxnOp::put(key.as_str(), value.as_slice(), None)])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let bound = self.attempt_bound(deadline);
            let resp = match self.txn("claim a fire time", &txn, bound).await {
                Ok(resp) => resp,
                Err(Failure::Final(err)) => return Err(err),
                Err(failure) => {
                    let wait = self.retry_pause(&failure, &mut pause);
                    let err = failure.into_error();
                    if Instant::now() + wait >= deadline {
                        return Err(err);
                    }
                    // The write may have been applied. Sending the same
                    // transaction again settles it in one round trip: if it
                    // was applied, its compare now fails and the else branch
                    // returns the stored claim, ours (won by its token).
                    tracing::debug!(backend = BACKEND, task, error = ?err, "claim outcome unknown; trying again");
                    tokio::time::sleep(wait).await;
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
}

/// Locks a mutex whose data stays consistent even if a holder panicked
/// (every mutation is a single insert/remove/replace).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
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
        Ok(Err(err)) => Err(Failure::of(err, what.to_string())),
        Err(_) => Err(Failure::Retryable(Error::Timeout {
            what: format!("etcd: {what}"),
            after: bound,
        })),
    }
}

/// An answer of etcd, and the raft term it was given in (if it says).
trait Answer {
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
    TxnResponse,
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

/// How a request failed.
enum Failure {
    /// Worth another try on the next member after a short pause (no
    /// leader, timeout); may have been applied.
    Retryable(Error),
    /// The member is unreachable (connection refused or broken): another
    /// try on the next member, skipping this one for a while; may have
    /// been applied.
    Down(Error),
    /// The member's leader changed while the request was pending (so it
    /// was dropped, or applied): another try at once, on the same member,
    /// which knows the new leader.
    Moved(Error),
    /// Retrying cannot help.
    Final(Error),
}

impl Failure {
    fn into_error(self) -> Error {
        match self {
            Failure::Retryable(err)
            | Failure::Down(err)
            | Failure::Moved(err)
            | Failure::Final(err) => err,
        }
    }

    /// The failure of an etcd call, sorted.
    fn of(err: etcd_client::Error, context: String) -> Failure {
        let down = unreachable(&err);
        let retry = retryable(&err);
        let err = Error::registry(BACKEND, context, err);
        if down {
            Failure::Down(err)
        } else if retry {
            Failure::Retryable(err)
        } else {
            Failure::Final(err)
        }
    }
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

/// Whether `err` says the member could not be reached (a client-side
/// transport failure, not an answer of the member).
fn unreachable(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            status.code() as i32 == code::UNAVAILABLE && std::error::Error::source(status).is_some()
        }
        _ => false,
    }
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

/// Whether `err` is etcd's "no leader" answer (to a request requiring one).
fn is_no_leader(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(status)
        if status.code() as i32 == code::UNAVAILABLE && status.message().contains("no leader"))
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
        let key = &key(ns, "nodes", &node.id);
        let value = &codec::encode(node);
        let ttl = ttl_secs(ttl);
        let granted = self
            .retrying("grant a node lease", |h| async move {
                let mut lease = h.lease;
                lease.grant(ttl, None).await
            })
            .await?;
        let lease = granted.id();
        let put = self
            .retrying("register a node", |h| async move {
                let mut kv = h.kv;
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
        let key = &key(ns, "nodes", node_id);
        let keep_alive = self.retrying("send a lease keep-alive", |h| async move {
            let mut client = h.lease;
            client.keep_alive(lease).await.map(drop)
        });
        let record = self.retrying("check a node record", |h| async move {
            let mut kv = h.kv;
            kv.get(key.as_str(), Some(GetOptions::new().with_keys_only()))
                .await
        });
        let (alive, record) = tokio::join!(keep_alive, record);
        let alive = match alive {
            Ok(()) => true,
            Err(err) if is_lease_gone_error(&err) => false,
            Err(err) => return Err(err),
        };
        let attached = record?.kvs().first().is_some_and(|kv| kv.lease() == lease);
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
        let key = &key(ns, "nodes", &node.id);
        let value = &codec::encode(node);
        // Only while the key exists and carries our lease: a put without the
        // lease would detach it, and a put after expiry would resurrect the node.
        let resp = self
            .retrying("update a node record", |h| async move {
                let txn = Txn::new()
                    .when([Compare::lease(key.as_str(), CompareOp::Equal, lease)])
                    .and_then([TxnOp::put(
                        key.as_str(),
                        value.as_slice(),
                        Some(PutOptions::new().with_lease(lease)),
                    )]);
                let mut kv = h.kv;
                kv.txn(txn).await
            })
            .await?;
        Ok(resp.succeeded())
    }

    async fn unregister(&self, ns: &str, node_id: &str) -> Result<()> {
        let lease = self.leases().remove(&(ns.to_string(), node_id.to_string()));
        if let Some(lease) = lease {
            // Deletes the key (one NodeDelete event).
            self.revoke(lease).await?;
        }
        // The key may carry a lease this registry does not know.
        let key = &key(ns, "nodes", node_id);
        self.retrying("unregister a node", |h| async move {
            let mut kv = h.kv;
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
        let key = &key(ns, "tasks", &meta.name);
        let value = &codec::encode(meta);
        if overwrite {
            self.retrying("store a task", |h| async move {
                let mut kv = h.kv;
                kv.put(key.as_str(), value.as_slice(), None).await
            })
            .await?;
            return Ok(());
        }
        let resp = self
            .retrying("create a task", |h| async move {
                let txn = Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.as_str(), value.as_slice(), None)])
                    .or_else([TxnOp::get(key.as_str(), None)]);
                let mut kv = h.kv;
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
        let key = &key(ns, "tasks", name);
        self.retrying("delete a task", |h| async move {
            let mut kv = h.kv;
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
        let key = &key(ns, "deleted", name);
        let value = &codec::encode(&serde_json::json!({ "deleted": true }));
        // Create-only: an existing tombstone (whatever its value) stays, and
        // watchers see one TombstonePut.
        self.retrying("write a tombstone", |h| async move {
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.as_str(), value.as_slice(), None)]);
            let mut kv = h.kv;
            kv.txn(txn).await
        })
        .await?;
        Ok(())
    }

    async fn delete_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        let key = &key(ns, "deleted", name);
        self.retrying("delete a tombstone", |h| async move {
            let mut kv = h.kv;
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

    /// Claims run concurrently (at most 32 in flight), each its own atomic,
    /// idempotent compare-and-set with its own retries (short attempts, up
    /// to the request timeout). A claim still failing after them is
    /// `Failed`; every other one keeps its answer.
    async fn claim_many(&self, ns: &str, tasks: &[&str], claim: &Claim) -> Vec<ClaimOutcome> {
        let mut out: Vec<Option<ClaimOutcome>> = (0..tasks.len()).map(|_| None).collect();
        let mut running = JoinSet::new();
        let mut ids = HashMap::new();
        let mut queue = 0..tasks.len();
        loop {
            while running.len() < CLAIM_CONCURRENCY {
                let Some(index) = queue.next() else { break };
                let registry = self.clone();
                let (ns, task, claim) = (ns.to_string(), tasks[index].to_string(), claim.clone());
                let handle =
                    running.spawn(async move { registry.claim_one(&ns, &task, &claim).await });
                ids.insert(handle.id(), index);
            }
            let (index, result) = match running.join_next_with_id().await {
                Some(Ok((id, result))) => (ids.get(&id).copied(), result),
                Some(Err(err)) => (
                    ids.get(&err.id()).copied(),
                    Err(Error::registry(BACKEND, "a claim task failed", err)),
                ),
                None => break,
            };
            if let Some(slot) = index.and_then(|i| out.get_mut(i)) {
                *slot = Some(ClaimOutcome::from_result(result));
            }
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    ClaimOutcome::Failed(Error::registry_msg(BACKEND, "claim not attempted"))
                })
            })
            .collect()
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
        let key = &key(ns, "claims", task);
        self.claim_revs()
            .remove(&(ns.to_string(), task.to_string()));
        self.retrying("delete a claim", |h| async move {
            let mut kv = h.kv;
            kv.delete(key.as_str(), None).await
        })
        .await?;
        Ok(())
    }

    async fn clear(&self, ns: &str) -> Result<()> {
        self.claim_revs().retain(|(space, _), _| space != ns);
        let prefixes = &[
            prefix(ns, "tasks"),
            prefix(ns, "deleted"),
            prefix(ns, "claims"),
        ];
        // One transaction: all three go at once.
        self.retrying("clear the namespace", |h| async move {
            let ops: Vec<TxnOp> = prefixes
                .iter()
                .map(|p| TxnOp::delete(p.as_str(), Some(DeleteOptions::new().with_prefix())))
                .collect();
            let mut kv = h.kv;
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
        let registry = self.registry.clone();
        let member = registry.current();
        let start = self.start.as_str();
        let mut open_stream = |h: Handles| {
            let options = options.clone();
            async move {
                let mut client = h.client.watch_client();
                client.watch(start, Some(options)).await
            }
        };
        let open = registry.attempt(
            "open a watch stream",
            registry.request_timeout,
            &mut open_stream,
        );
        let opened = tokio::select! {
            _ = self.tx.closed() => return Ended::Closed,
            opened = open => opened,
        };
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(failure) => {
                let err = failure.into_error();
                tracing::warn!(backend = BACKEND, ns = %self.ns, %err, "watch: cannot open the stream; retrying");
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
                    registry.rotate(member);
                    return Ended::Broken;
                }
                Err(err) => {
                    tracing::warn!(backend = BACKEND, ns = %self.ns, %err, "watch: stream failed; reconnecting");
                    registry.rotate(member);
                    return Ended::Broken;
                }
            };
            if resp.compact_revision() > 0 {
                tracing::warn!(backend = BACKEND, ns = %self.ns, from = *next, compacted = resp.compact_revision(), "watch: revision compacted; resyncing");
                return Ended::Compacted;
            }
            if resp.canceled() {
                tracing::warn!(backend = BACKEND, ns = %self.ns, reason = resp.cancel_reason(), "watch: cancelled by the server; reconnecting");
                registry.rotate(member);
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
        let (nodes, tasks, deleted) = (
            prefix(ns, "nodes"),
            prefix(ns, "tasks"),
            prefix(ns, "deleted"),
        );
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
