//! The ZooKeeper registry (cargo feature `zookeeper`), on the async
//! [`zookeeper_client`] crate.
//!
//! Layout under the namespace `ns` (`docs/design.md`, section 3), parents created as needed:
//!
//! | data | znode | kind |
//! |---|---|---|
//! | node | `/ns/nodes/<id>` | ephemeral, owned by the registry's session |
//! | dynamic task | `/ns/tasks/<name>` | persistent |
//! | tombstone | `/ns/deleted/<name>` | persistent |
//! | claim watermark | `/ns/claims/<name>` | persistent, compare-and-set by version |
//!
//! One registry is one ZooKeeper session. The session's own keep-alive is
//! the node's liveness: `heartbeat` only checks that the session is alive and
//! still owns the node's ephemeral znode. When the session ends (expired,
//! abandoned), the next call opens a new one transparently; while the
//! connection is down, calls fail at once with an error, so the node stops
//! claiming instead of queueing work behind a dead link.
//!
//! A claim reads the watermark and decides with [`Claim::against`]
//! (absent, corrupt or older: write; the same fire time under our token:
//! already ours, won without a write; otherwise lost), then writes with
//! `setData` on the version read (or `create`). A write that fails because
//! the watermark moved is settled by reading again and deciding the same
//! way; one whose answer was lost with the connection is settled the same
//! way once the session is back (our own applied write is then found by
//! its token: won). `claim_many` reads all watermarks in one pipeline,
//! commits every claim that can win in one `multi` (falling back to
//! pipelined single writes when one of them lost a race), and settles the
//! rest concurrently; each claim gets its own outcome, a claim still
//! unsettled at the deadline (4/5 of the request timeout) is `Failed`.
//!
//! When a server dies (the leader too), its clients reconnect to another
//! server within the session; an election with the usual short ticks takes
//! well under a second, during which calls fail fast. Measured on a
//! three-server ensemble (tick 500 ms), a claim loop stalls about 0.5 s
//! across a leader kill and 0.1 s across a follower kill.
//!
//! Changes arrive by three persistent recursive watches, on `/ns/nodes`,
//! `/ns/tasks` and `/ns/deleted`; `/ns/claims` is not watched, so a fire
//! costs no watch traffic.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use dcron::registry::ZookeeperRegistry;
//! use dcron::{Dcron, Strategy, TaskContext, TaskMeta};
//!
//! #[tokio::main]
//! async fn main() -> dcron::Result<()> {
//!     // Several servers and an optional chroot (created if missing).
//!     let registry = ZookeeperRegistry::builder("zk1:2181,zk2:2181,zk3:2181/dcron")
//!         .session_timeout(Duration::from_secs(10)) // = how long a crashed node stays listed
//!         .connect()
//!         .await?;
//!
//!     let node = Dcron::builder(registry)
//!         .namespace("billing")
//!         .strategy(Strategy::Consistent)
//!         .task_handler(|ctx: TaskContext| async move {
//!             println!("{} payload={} fire={}", ctx.name(), ctx.payload(), ctx.fire_time);
//!             Ok(())
//!         })
//!         .build()?;
//!
//!     node.add_func("nightly-report", "0 30 2 * * *", |ctx: TaskContext| async move {
//!         println!("report for {}", ctx.scheduled());
//!         Ok(())
//!     })
//!     .await?;
//!     node.add_task_meta(TaskMeta::new("sync-invoices", "*/10 * * * * *").with_payload(r#"{"tenant":42}"#))
//!         .await?;
//!
//!     node.start().await?;
//!     dcron::shutdown_signal().await;
//!     node.stop().await
//! }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use zookeeper_client as zk;
use zookeeper_client::{
    Acl, Acls, AddWatchMode, Client, CreateMode, CreateOptions, EventType, Permission,
    PersistentWatcher, SessionState, Stat, WatchedEvent,
};

pub use zookeeper_client;

use super::codec;
use super::{
    Claim, ClaimOutcome, Registry, Timing, WatchEvent, WatchReceiver, WATCH_CHANNEL_CAPACITY,
};
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

/// Requests in flight at once in a pipelined batch.
const PIPELINE: usize = 512;
/// Watch events handled per batch (their data fetched in one pipeline).
const WATCH_BATCH: usize = 512;
/// Bound on compare-and-set rounds for one claim or registration.
const MAX_ATTEMPTS: usize = 32;
/// Claims of one batch settled at once (each a read and maybe a write).
const SETTLE_CONCURRENCY: usize = 64;
/// Bound on the watch feed's pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Creator-all plus world-read: only the authenticated identity that
/// created a znode may change or delete it; anyone may read.
static AUTH_ACLS: [Acl; 2] = [
    Acl::new_const(Permission::ALL, "auth", ""),
    Acl::new_const(Permission::READ, "world", "anyone"),
];

/// Builds a [`ZookeeperRegistry`]: connect string, session timeout, digest
/// authentication, or an existing client.
///
/// ```no_run
/// # async fn demo() -> dcron::Result<()> {
/// use std::time::Duration;
/// use dcron::registry::zookeeper::ZookeeperBuilder;
///
/// let registry = ZookeeperBuilder::new("zk1:2181,zk2:2181,zk3:2181/dcron")
///     .session_timeout(Duration::from_secs(10))
///     .digest_auth("dcron", "secret")
///     .connect()
///     .await?;
/// # drop(registry);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ZookeeperBuilder {
    connect: String,
    session_timeout: Duration,
    connect_timeout: Duration,
    request_timeout: Duration,
    digest: Option<(String, String)>,
    client: Option<Client>,
}

impl std::fmt::Debug for ZookeeperBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZookeeperBuilder")
            .field("connect", &self.connect)
            .field("session_timeout", &self.session_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("digest_user", &self.digest.as_ref().map(|(user, _)| user))
            .field("client", &self.client.is_some())
            .finish()
    }
}

impl ZookeeperBuilder {
    /// A builder for the ensemble at `connect`: `host:port[,host:port...][/chroot]`.
    /// A chroot that does not exist yet is created.
    pub fn new(connect: impl Into<String>) -> Self {
        ZookeeperBuilder {
            connect: connect.into(),
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            digest: None,
            client: None,
        }
    }

    /// Session timeout asked of the ensemble (default 10 s; the servers
    /// clamp it to their `minSessionTimeout..maxSessionTimeout`). It is the
    /// node TTL: a crashed node is dropped this long after its last contact.
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// Bound on opening a session, at start and after a session ends
    /// (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on each registry call (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Authenticates every session with the `digest` scheme. Znodes the
    /// registry creates then carry the ACL creator-all + world-read: other
    /// identities can read them but not change or delete them.
    pub fn digest_auth(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.digest = Some((user.into(), password.into()));
        self
    }

    /// Uses `client` (and its session) first; the connect string is used
    /// only to open a new session once that one ends. With
    /// [`digest_auth`](Self::digest_auth), the identity is added to
    /// `client` too.
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Connects (bounded by the connect timeout) and returns the registry.
    pub async fn connect(self) -> Result<ZookeeperRegistry> {
        if self.session_timeout.is_zero()
            || self.connect_timeout.is_zero()
            || self.request_timeout.is_zero()
        {
            return Err(Error::InvalidConfig(
                "ZooKeeper session, connect and request timeouts must be positive".into(),
            ));
        }
        let acls = if self.digest.is_some() {
            Acls::new(&AUTH_ACLS)
        } else {
            Acls::anyone_all()
        };
        let settings = Settings {
            connect: Some(self.connect),
            session_timeout: self.session_timeout,
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            digest: self.digest,
            acls,
        };
        let client = match self.client {
            Some(client) => {
                if let Some(auth) = settings.digest_bytes() {
                    let authed = tokio::time::timeout(
                        settings.connect_timeout,
                        client.auth("digest", &auth),
                    )
                    .await;
                    match authed {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => {
                            return Err(Error::registry(BACKEND, "digest authentication", err))
                        }
                        Err(_) => {
                            return Err(Error::Timeout {
                                what: "authenticating the ZooKeeper session".into(),
                                after: settings.connect_timeout,
                            })
                        }
                    }
                }
                client
            }
            None => settings.open().await?,
        };
        Ok(ZookeeperRegistry::with_settings(settings, client))
    }
}

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
/// From an existing client of the same [`zookeeper_client`] version:
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use dcron::registry::zookeeper::zookeeper_client::Client;
/// use dcron::registry::ZookeeperRegistry;
///
/// let client = Client::connect("127.0.0.1:2181").await?;
/// let registry = ZookeeperRegistry::from_client(client);
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
        f.debug_struct("ZookeeperRegistry")
            .field("connect", &self.inner.settings.connect)
            .field("session_timeout", &self.session_timeout())
            .finish_non_exhaustive()
    }
}

struct Settings {
    /// Connect string to open new sessions; `None` for [`ZookeeperRegistry::from_client`].
    connect: Option<String>,
    session_timeout: Duration,
    connect_timeout: Duration,
    request_timeout: Duration,
    digest: Option<(String, String)>,
    acls: Acls<'static>,
}

impl Settings {
    fn digest_bytes(&self) -> Option<Vec<u8>> {
        self.digest
            .as_ref()
            .map(|(user, password)| format!("{user}:{password}").into_bytes())
    }

    fn persistent(&self) -> CreateOptions<'static> {
        CreateMode::Persistent.with_acls(self.acls)
    }

    fn ephemeral(&self) -> CreateOptions<'static> {
        CreateMode::Ephemeral.with_acls(self.acls)
    }

    /// Opens a new session (bounded by the connect timeout). Sessions are
    /// detached: dropping the last client ends the connection without
    /// closing the session, exactly as a killed process would, so an
    /// ephemeral znode not explicitly removed lives until the session
    /// timeout, like a TTL in the other backends.
    async fn open(&self) -> Result<Client> {
        let Some(connect) = self.connect.as_deref() else {
            return Err(Error::registry_msg(
                BACKEND,
                "the ZooKeeper session ended and a registry built from_client cannot open a new one; \
                 build it with ZookeeperBuilder to let it reconnect",
            ));
        };
        let mut connector = Client::connector()
            .with_session_timeout(self.session_timeout)
            .with_detached();
        if let Some(auth) = self.digest_bytes() {
            connector = connector.with_auth("digest", &auth);
        }
        let client =
            match tokio::time::timeout(self.connect_timeout, connector.connect(connect)).await {
                Ok(Ok(client)) => client,
                Ok(Err(err)) => {
                    return Err(Error::registry(
                        BACKEND,
                        format!("connecting to ZooKeeper at {connect}"),
                        err,
                    ))
                }
                Err(_) => {
                    return Err(Error::Timeout {
                        what: format!("connecting to ZooKeeper at {connect}"),
                        after: self.connect_timeout,
                    })
                }
            };
        if client.path() != "/" {
            let chroot = client.path().to_string();
            let root = client.clone().chroot("/").unwrap_or_else(|c| c);
            let made = tokio::time::timeout(self.request_timeout, async {
                match root.check_stat(&chroot).await? {
                    Some(_) => Ok(()),
                    None => root.mkdir(&chroot, &self.persistent()).await,
                }
            })
            .await;
            match made {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    return Err(Error::registry(
                        BACKEND,
                        format!("creating chroot {chroot}"),
                        err,
                    ))
                }
                Err(_) => {
                    return Err(Error::Timeout {
                        what: format!("creating chroot {chroot}"),
                        after: self.request_timeout,
                    })
                }
            }
        }
        tracing::info!(
            backend = BACKEND,
            session = %client.session_id(),
            timeout_ms = client.session_timeout().as_millis() as u64,
            "ZooKeeper session opened"
        );
        Ok(client)
    }
}

struct Inner {
    settings: Settings,
    /// The current session; `None` after it was abandoned.
    slot: Mutex<Option<Client>>,
    /// Serialises the opening of a new session.
    renew: tokio::sync::Mutex<()>,
    /// Bumped when the session is abandoned, so watch feeds drop theirs.
    epoch: watch::Sender<u64>,
    /// Negotiated session timeout of the latest session, ms.
    negotiated_ms: AtomicU64,
}

/// Why a session is not usable right now.
enum NotReady {
    /// Connection down; the client library reconnects in the background.
    Disconnected(Client),
    /// Another call is opening a new session.
    Renewing,
    Failed(Error),
}

fn disconnected_error() -> Error {
    Error::registry_msg(
        BACKEND,
        "disconnected from ZooKeeper; the client is reconnecting, try again shortly",
    )
}

fn renewing_error() -> Error {
    Error::registry_msg(
        BACKEND,
        "a new ZooKeeper session is being opened; try again shortly",
    )
}

fn zk_err(context: impl Into<String>, err: zk::Error) -> Error {
    Error::registry(BACKEND, context, err)
}

fn is_connected(state: SessionState) -> bool {
    matches!(
        state,
        SessionState::SyncConnected | SessionState::ConnectedReadOnly
    )
}

/// A name that is one ZooKeeper path segment.
fn check_segment(what: &str, value: &str) -> Result<()> {
    if value.is_empty() || value == "." || value == ".." || value.contains('/') {
        return Err(Error::InvalidConfig(format!(
            "{what} `{value}` cannot be a ZooKeeper path segment: it must be non-empty, \
             not `.` or `..`, and contain no `/`"
        )));
    }
    Ok(())
}

impl Inner {
    fn lock_slot(&self) -> MutexGuard<'_, Option<Client>> {
        // Every critical section is a single read or replace of the slot.
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store(&self, client: &Client) {
        let ms = u64::try_from(client.session_timeout().as_millis()).unwrap_or(u64::MAX);
        self.negotiated_ms.store(ms, Ordering::Relaxed);
        *self.lock_slot() = Some(client.clone());
    }

    /// The current session if it is connected; opens a new one if it ended.
    /// With `wait_renew`, waits for another caller's renewal instead of
    /// failing at once.
    async fn acquire(&self, wait_renew: bool) -> Result<Client, NotReady> {
        if let Some(client) = self.lock_slot().clone() {
            let state = client.state();
            if is_connected(state) {
                return Ok(client);
            }
            if !state.is_terminated() {
                return Err(NotReady::Disconnected(client));
            }
        }
        let _guard = if wait_renew {
            self.renew.lock().await
        } else {
            match self.renew.try_lock() {
                Ok(guard) => guard,
                Err(_) => return Err(NotReady::Renewing),
            }
        };
        {
            let mut slot = self.lock_slot();
            if let Some(client) = slot.as_ref() {
                let state = client.state();
                if is_connected(state) {
                    return Ok(client.clone());
                }
                if !state.is_terminated() {
                    return Err(NotReady::Disconnected(client.clone()));
                }
                tracing::warn!(
                    backend = BACKEND,
                    session = %client.session_id(),
                    %state,
                    "ZooKeeper session ended; opening a new one"
                );
                *slot = None;
            }
        }
        let client = self.settings.open().await.map_err(NotReady::Failed)?;
        self.store(&client);
        Ok(client)
    }

    /// A connected session, failing at once while disconnected.
    async fn session(&self) -> Result<Client> {
        match self.acquire(false).await {
            Ok(client) => Ok(client),
            Err(NotReady::Disconnected(_)) => Err(disconnected_error()),
            Err(NotReady::Renewing) => Err(renewing_error()),
            Err(NotReady::Failed(err)) => Err(err),
        }
    }

    /// A connected session, waiting up to `bound` for a reconnection or a
    /// renewal (used to settle a write whose answer was lost).
    async fn session_waiting(&self, bound: Duration) -> Result<Client> {
        let deadline = Instant::now() + bound;
        loop {
            match self.acquire(true).await {
                Ok(client) => return Ok(client),
                Err(NotReady::Failed(err)) => return Err(err),
                Err(NotReady::Renewing) => {}
                Err(NotReady::Disconnected(client)) => {
                    let mut states = client.state_watcher();
                    let settle = async {
                        loop {
                            let state = states.state();
                            if is_connected(state) || state.is_terminated() {
                                return;
                            }
                            states.changed().await;
                        }
                    };
                    if tokio::time::timeout_at(deadline, settle).await.is_err() {
                        return Err(disconnected_error());
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(disconnected_error());
            }
        }
    }

    /// Runs `fut` within the request timeout.
    async fn bounded<T>(&self, what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.settings.request_timeout, fut).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                what: format!("{what} in ZooKeeper"),
                after: self.settings.request_timeout,
            }),
        }
    }

    /// `mkdir -p` of a persistent directory.
    async fn ensure_dir(&self, client: &Client, dir: &str) -> Result<()> {
        client
            .mkdir(dir, &self.settings.persistent())
            .await
            .map_err(|e| zk_err(format!("creating {dir}"), e))
    }

    /// Creates or overwrites the persistent znode `path` (parents as needed).
    async fn upsert(&self, client: &Client, dir: &str, path: &str, data: &[u8]) -> Result<()> {
        for _ in 0..MAX_ATTEMPTS {
            match client.create(path, data, &self.settings.persistent()).await {
                Ok(_) => return Ok(()),
                Err(zk::Error::NoNode) => self.ensure_dir(client, dir).await?,
                Err(zk::Error::NodeExists) => match client.set_data(path, data, None).await {
                    Ok(_) => return Ok(()),
                    Err(zk::Error::NoNode) => continue,
                    Err(err) => return Err(zk_err(format!("writing {path}"), err)),
                },
                Err(err) => return Err(zk_err(format!("creating {path}"), err)),
            }
        }
        Err(Error::registry_msg(
            BACKEND,
            format!("writing {path} kept racing with concurrent deletes"),
        ))
    }

    /// Creates the persistent znode `path` (parents as needed); `Ok(false)`
    /// if it already exists.
    async fn create_new(
        &self,
        client: &Client,
        dir: &str,
        path: &str,
        data: &[u8],
    ) -> Result<bool> {
        for _ in 0..2 {
            match client.create(path, data, &self.settings.persistent()).await {
                Ok(_) => return Ok(true),
                Err(zk::Error::NodeExists) => return Ok(false),
                Err(zk::Error::NoNode) => self.ensure_dir(client, dir).await?,
                Err(err) => return Err(zk_err(format!("creating {path}"), err)),
            }
        }
        Err(Error::registry_msg(
            BACKEND,
            format!("the parent of {path} vanished while creating it"),
        ))
    }

    async fn delete(&self, client: &Client, path: &str) -> Result<()> {
        match client.delete(path, None).await {
            Ok(()) | Err(zk::Error::NoNode) => Ok(()),
            Err(err) => Err(zk_err(format!("deleting {path}"), err)),
        }
    }

    /// Children of `dir`; a missing directory has none.
    async fn children(&self, client: &Client, dir: &str) -> Result<Vec<String>> {
        match client.list_children(dir).await {
            Ok(children) => Ok(children),
            Err(zk::Error::NoNode) => Ok(Vec::new()),
            Err(err) => Err(zk_err(format!("listing {dir}"), err)),
        }
    }

    /// Data of `dir/<child>` for every child, pipelined; `None` for
    /// children deleted meanwhile.
    async fn read_children(
        &self,
        client: &Client,
        dir: &str,
    ) -> Result<Vec<(String, Option<(Vec<u8>, Stat)>)>> {
        let names = self.children(client, dir).await?;
        let mut out = Vec::with_capacity(names.len());
        for chunk in names.chunks(PIPELINE) {
            let pending: Vec<_> = chunk
                .iter()
                .map(|name| client.get_data(&format!("{dir}/{name}")))
                .collect();
            for (name, fut) in chunk.iter().zip(pending) {
                match fut.await {
                    Ok(found) => out.push((name.clone(), Some(found))),
                    Err(zk::Error::NoNode) => out.push((name.clone(), None)),
                    Err(err) => return Err(zk_err(format!("reading {dir}/{name}"), err)),
                }
            }
        }
        Ok(out)
    }

    /// Deletes every child of `dir`, pipelined.
    async fn delete_children(&self, client: &Client, dir: &str) -> Result<()> {
        let names = self.children(client, dir).await?;
        for chunk in names.chunks(PIPELINE) {
            let paths: Vec<String> = chunk.iter().map(|name| format!("{dir}/{name}")).collect();
            let pending: Vec<_> = paths.iter().map(|path| client.delete(path, None)).collect();
            for (path, fut) in paths.iter().zip(pending) {
                match fut.await {
                    Ok(()) | Err(zk::Error::NoNode) => {}
                    Err(err) => return Err(zk_err(format!("deleting {path}"), err)),
                }
            }
        }
        Ok(())
    }
}

/// Paths of one namespace.
struct Paths {
    base: String,
}

impl Paths {
    fn new(ns: &str) -> Result<Paths> {
        check_segment("namespace", ns)?;
        Ok(Paths {
            base: format!("/{ns}"),
        })
    }

    fn dir(&self, kind: &str) -> String {
        format!("{}/{kind}", self.base)
    }

    fn nodes(&self) -> String {
        self.dir("nodes")
    }
    fn tasks(&self) -> String {
        self.dir("tasks")
    }
    fn deleted(&self) -> String {
        self.dir("deleted")
    }
    fn claims(&self) -> String {
        self.dir("claims")
    }

    fn node(&self, id: &str) -> Result<String> {
        check_segment("node id", id)?;
        Ok(format!("{}/nodes/{id}", self.base))
    }
    fn task(&self, name: &str) -> Result<String> {
        check_segment("task name", name)?;
        Ok(format!("{}/tasks/{name}", self.base))
    }
    fn tombstone(&self, name: &str) -> Result<String> {
        check_segment("task name", name)?;
        Ok(format!("{}/deleted/{name}", self.base))
    }
    fn claim(&self, name: &str) -> Result<String> {
        check_segment("task name", name)?;
        Ok(format!("{}/claims/{name}", self.base))
    }
}

impl ZookeeperRegistry {
    /// Connects to `connect` (`host:port[,host:port...][/chroot]`) with the
    /// default options (10 s session timeout, no authentication). See
    /// [`ZookeeperBuilder`] for the others.
    pub async fn connect(connect: &str) -> Result<Self> {
        ZookeeperBuilder::new(connect).connect().await
    }

    /// A builder for the ensemble at `connect`.
    pub fn builder(connect: impl Into<String>) -> ZookeeperBuilder {
        ZookeeperBuilder::new(connect)
    }

    /// Uses an existing client and its session (and its chroot, which must
    /// exist). Znodes are created with an open ACL. The registry cannot
    /// open a new session by itself once this one ends (calls then fail);
    /// use [`ZookeeperBuilder::client`] with a connect string for that, and
    /// [`ZookeeperBuilder::digest_auth`] for restrictive ACLs.
    pub fn from_client(client: Client) -> Self {
        let settings = Settings {
            connect: None,
            session_timeout: client.session_timeout(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            digest: None,
            acls: Acls::anyone_all(),
        };
        Self::with_settings(settings, client)
    }

    fn with_settings(settings: Settings, client: Client) -> Self {
        let inner = Inner {
            settings,
            slot: Mutex::new(None),
            renew: tokio::sync::Mutex::new(()),
            epoch: watch::channel(0).0,
            negotiated_ms: AtomicU64::new(0),
        };
        inner.store(&client);
        ZookeeperRegistry {
            inner: Arc::new(inner),
        }
    }

    /// The session timeout negotiated with the ensemble: how long a crashed
    /// node stays listed.
    pub fn session_timeout(&self) -> Duration {
        Duration::from_millis(self.inner.negotiated_ms.load(Ordering::Relaxed))
    }

    /// The client of the current session, if there is one.
    pub fn client(&self) -> Option<Client> {
        self.inner.lock_slot().clone()
    }

    /// Drops the connection of the current session without closing the
    /// session, as a killed process would: its ephemeral node stays until
    /// the ensemble expires the session (the session timeout), and other
    /// nodes then see it leave. The next call opens a new session; watch
    /// feeds move to it and send [`WatchEvent::Resync`]. For fault tests.
    ///
    /// A client handed in by [`from_client`](Self::from_client) keeps its
    /// session alive as long as clones of it exist outside the registry.
    pub fn abandon_session(&self) {
        let dropped = self.inner.lock_slot().take();
        if let Some(client) = &dropped {
            tracing::info!(backend = BACKEND, session = %client.session_id(), "abandoning ZooKeeper session");
        }
        self.inner.epoch.send_modify(|e| *e += 1);
        drop(dropped);
    }

    /// Claims one fire: compare-and-set on the znode version, bounded
    /// rounds, every decision taken with [`Claim::against`] on what is
    /// stored. `client: None` waits (until `deadline`) for a connected
    /// session. A write whose answer was lost (connection loss) is settled
    /// by waiting for the session to be back and reading again: our own
    /// write, if it was applied, is then found by its token (won).
    async fn claim_one(
        &self,
        client: Option<Client>,
        path: &str,
        claim: &Claim,
        deadline: Instant,
    ) -> Result<bool> {
        let inner = &*self.inner;
        let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or(path);
        let data = codec::encode(claim);
        let wait = || inner.session_waiting(deadline.saturating_duration_since(Instant::now()));
        let mut client = match client {
            Some(client) => client,
            None => wait().await?,
        };
        // Set once a write's answer was lost: from then on, settle it rather
        // than fail at once while disconnected.
        let mut maybe_written = false;
        for _ in 0..MAX_ATTEMPTS {
            let write = match client.get_data(path).await {
                Ok((raw, stat)) => {
                    let stored = codec::decode_claim(BACKEND, path, &raw);
                    match claim.against(stored.as_ref()) {
                        None => return Ok(true),
                        Some(false) => return Ok(false),
                        Some(true) => client
                            .set_data(path, &data, Some(stat.version))
                            .await
                            .map(|_| ()),
                    }
                }
                Err(zk::Error::NoNode) => client
                    .create(path, &data, &inner.settings.persistent())
                    .await
                    .map(|_| ()),
                Err(zk::Error::ConnectionLoss) if maybe_written => {
                    client = wait().await?;
                    continue;
                }
                Err(err) => return Err(zk_err(format!("reading claim {path}"), err)),
            };
            match write {
                Ok(()) => return Ok(true),
                // The watermark moved since it was read: decide again.
                Err(zk::Error::BadVersion | zk::Error::NodeExists) => {}
                Err(zk::Error::NoNode) => {
                    // Either the claim was deleted meanwhile or its parent is missing.
                    if client.check_stat(dir).await.ok().flatten().is_none() {
                        inner.ensure_dir(&client, dir).await?;
                    }
                }
                Err(zk::Error::ConnectionLoss) => {
                    maybe_written = true;
                    client = wait().await?;
                }
                Err(err) => return Err(zk_err(format!("writing claim {path}"), err)),
            }
        }
        Err(Error::registry_msg(
            BACKEND,
            format!("claim {path} did not settle after {MAX_ATTEMPTS} compare-and-set rounds"),
        ))
    }

    /// Settling waits end here, inside the call's own bound, so a batch
    /// with won claims is answered rather than timed out as a whole.
    fn claim_deadline(&self) -> Instant {
        Instant::now() + self.claim_budget()
    }

    fn claim_budget(&self) -> Duration {
        self.inner.settings.request_timeout * 4 / 5
    }

    /// `claim_many`: one pipelined read of every watermark, one multi-op
    /// (or pipelined compare-and-sets) for every claim that can win, then
    /// the contended or uncertain ones settled one by one, concurrently.
    /// Every step is bounded by the claim deadline; a claim whose answer is
    /// still unknown then is `Failed`, every other one keeps its answer.
    async fn claim_batch(&self, ns: &str, tasks: &[&str], claim: &Claim) -> Vec<ClaimOutcome> {
        let deadline = self.claim_deadline();
        let inner = &*self.inner;
        let timeout = || Error::Timeout {
            what: "claiming fires in ZooKeeper".into(),
            after: self.claim_budget(),
        };
        let paths = match Paths::new(ns) {
            Ok(paths) => paths,
            Err(err) => return ClaimOutcome::fail_all(tasks.len(), err),
        };
        let claim_paths: Vec<Result<String>> = tasks.iter().map(|t| paths.claim(t)).collect();
        let client = match inner.session().await {
            Ok(client) => client,
            Err(err) => return ClaimOutcome::fail_all(tasks.len(), err),
        };
        let data = codec::encode(claim);

        // Round 1: read every watermark, pipelined. Nothing is written yet,
        // so a failure here fails the whole batch.
        let read_all = async {
            let valid: Vec<&str> = claim_paths
                .iter()
                .filter_map(|p| p.as_deref().ok())
                .collect();
            let mut reads = Vec::with_capacity(valid.len());
            for chunk in valid.chunks(PIPELINE) {
                let pending: Vec<_> = chunk.iter().map(|p| client.get_data(p)).collect();
                for fut in pending {
                    reads.push(fut.await);
                }
            }
            if reads.iter().any(|r| matches!(r, Err(zk::Error::NoNode))) {
                inner.ensure_dir(&client, &paths.claims()).await?;
            }
            Ok::<_, Error>(reads)
        };
        let mut reads = match tokio::time::timeout_at(deadline, read_all).await {
            Ok(Ok(reads)) => reads.into_iter(),
            Ok(Err(err)) => return ClaimOutcome::fail_all(tasks.len(), err),
            Err(_) => return ClaimOutcome::fail_all(tasks.len(), timeout()),
        };

        // Round 2: compare-and-set every claim that can win. Uncontended
        // (the usual case: only the owner claims), one multi-op per chunk
        // commits them all in one transaction; if any of them lost a race,
        // the multi changed nothing and they are written one by one.
        let mut steps: Vec<ClaimStep> = Vec::with_capacity(tasks.len());
        let mut writes: Vec<(usize, Option<i32>)> = Vec::new();
        for (i, path) in claim_paths.iter().enumerate() {
            let path = match path {
                Ok(path) => path,
                Err(err) => {
                    steps.push(ClaimStep::Failed(Error::InvalidConfig(err.to_string())));
                    continue;
                }
            };
            let Some(read) = reads.next() else {
                steps.push(ClaimStep::Failed(Error::registry_msg(
                    BACKEND,
                    "claim read missing",
                )));
                continue;
            };
            match read {
                Ok((raw, stat)) => {
                    let stored = codec::decode_claim(BACKEND, path, &raw);
                    match claim.against(stored.as_ref()) {
                        None => steps.push(ClaimStep::Done(true)),
                        Some(false) => steps.push(ClaimStep::Done(false)),
                        Some(true) => {
                            writes.push((i, Some(stat.version)));
                            steps.push(ClaimStep::Write);
                        }
                    }
                }
                Err(zk::Error::NoNode) => {
                    writes.push((i, None));
                    steps.push(ClaimStep::Write);
                }
                // Nothing written: claim it again once reconnected.
                Err(zk::Error::ConnectionLoss) => steps.push(ClaimStep::Retry),
                Err(err) => steps.push(ClaimStep::Failed(zk_err(
                    format!("reading claim {path}"),
                    err,
                ))),
            }
        }
        let path_of = |i: usize| claim_paths[i].as_deref().unwrap_or_default();
        let persistent = inner.settings.persistent();
        for chunk in writes.chunks(PIPELINE) {
            if chunk.len() > 1 {
                let mut multi = client.new_multi_writer();
                let mut built = Ok(());
                for &(i, version) in chunk {
                    built = match version {
                        Some(v) => multi.add_set_data(path_of(i), &data, Some(v)),
                        None => multi.add_create(path_of(i), &data, &persistent),
                    };
                    if built.is_err() {
                        break;
                    }
                }
                if let Err(err) = built {
                    // Nothing of this chunk was sent.
                    for &(i, _) in chunk {
                        steps[i] =
                            ClaimStep::Failed(zk_err("building a claim transaction", err.clone()));
                    }
                    continue;
                }
                match tokio::time::timeout_at(deadline, multi.commit()).await {
                    Ok(Ok(_)) => {
                        for &(i, _) in chunk {
                            steps[i] = ClaimStep::Done(true);
                        }
                        continue;
                    }
                    // Nothing applied: fall through to one write per claim.
                    Ok(Err(zk::MultiWriteError::OperationFailed { .. })) => {}
                    Ok(Err(zk::MultiWriteError::RequestFailed { source })) => {
                        for &(i, _) in chunk {
                            steps[i] = write_step(Err(source.clone()));
                        }
                        continue;
                    }
                    // Unknown outcome: settle (if time is left).
                    Err(_) => {
                        for &(i, _) in chunk {
                            steps[i] = ClaimStep::Retry;
                        }
                        continue;
                    }
                }
            }
            // Pipelined single writes: sent together, awaited in order.
            type WriteFut<'a> =
                Pin<Box<dyn Future<Output = std::result::Result<(), zk::Error>> + Send + 'a>>;
            let pending: Vec<(usize, WriteFut<'_>)> = chunk
                .iter()
                .map(|&(i, version)| -> (usize, WriteFut<'_>) {
                    let path = path_of(i);
                    match version {
                        Some(v) => {
                            let fut = client.set_data(path, &data, Some(v));
                            (i, Box::pin(async move { fut.await.map(|_| ()) }))
                        }
                        None => {
                            let fut = client.create(path, &data, &persistent);
                            (i, Box::pin(async move { fut.await.map(|_| ()) }))
                        }
                    }
                })
                .collect();
            for (i, fut) in pending {
                steps[i] = match tokio::time::timeout_at(deadline, fut).await {
                    Ok(result) => write_step(result),
                    Err(_) => ClaimStep::Retry,
                };
            }
        }

        // Round 3: contended or uncertain claims, each settled by reading
        // again and deciding with `Claim::against`, several at once.
        let mut out: Vec<Option<ClaimOutcome>> = (0..tasks.len()).map(|_| None).collect();
        let mut settling = JoinSet::new();
        let mut ids = std::collections::HashMap::new();
        for (i, step) in steps.into_iter().enumerate() {
            let answer = match step {
                ClaimStep::Done(won) => ClaimOutcome::from_result(Ok(won)),
                ClaimStep::Failed(err) => ClaimOutcome::Failed(err),
                ClaimStep::Write => ClaimOutcome::Failed(Error::registry_msg(
                    BACKEND,
                    "claim write was not awaited",
                )),
                ClaimStep::Retry => {
                    while settling.len() >= SETTLE_CONCURRENCY {
                        Self::settled(&mut settling, &ids, &mut out).await;
                    }
                    let (registry, path, claim) =
                        (self.clone(), path_of(i).to_string(), claim.clone());
                    let budget = self.claim_budget();
                    let handle = settling.spawn(async move {
                        let one = registry.claim_one(None, &path, &claim, deadline);
                        match tokio::time::timeout_at(deadline, one).await {
                            Ok(result) => result,
                            Err(_) => Err(Error::Timeout {
                                what: format!("settling claim {path} in ZooKeeper"),
                                after: budget,
                            }),
                        }
                    });
                    ids.insert(handle.id(), i);
                    continue;
                }
            };
            out[i] = Some(answer);
        }
        while !settling.is_empty() {
            Self::settled(&mut settling, &ids, &mut out).await;
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    ClaimOutcome::Failed(Error::registry_msg(BACKEND, "claim not settled"))
                })
            })
            .collect()
    }

    /// Records the answer of the next claim of `settling` that finishes.
    async fn settled(
        settling: &mut JoinSet<Result<bool>>,
        ids: &std::collections::HashMap<tokio::task::Id, usize>,
        out: &mut [Option<ClaimOutcome>],
    ) {
        let (index, result) = match settling.join_next_with_id().await {
            Some(Ok((id, result))) => (ids.get(&id).copied(), result),
            Some(Err(err)) => (
                ids.get(&err.id()).copied(),
                Err(Error::registry(BACKEND, "a claim task failed", err)),
            ),
            None => return,
        };
        if let Some(slot) = index.and_then(|i| out.get_mut(i)) {
            *slot = Some(ClaimOutcome::from_result(result));
        }
    }
}

#[async_trait]
impl Registry for ZookeeperRegistry {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn timing(&self) -> Timing {
        let session = self.session_timeout().max(Duration::from_secs(1));
        Timing {
            node_ttl: session,
            // Cheap `exists` that only notices a lost session or znode.
            heartbeat: (session / 5).max(Duration::from_millis(200)),
            reload: Duration::from_secs(30),
        }
    }

    async fn register(&self, ns: &str, node: &Node, _ttl: Duration) -> Result<()> {
        let paths = Paths::new(ns)?;
        let path = paths.node(&node.id)?;
        let inner = &*self.inner;
        inner
            .bounded("registering a node", async {
                let client = inner.session().await?;
                let me = client.session_id().0;
                let data = codec::encode(node);
                for _ in 0..MAX_ATTEMPTS {
                    match client
                        .create(&path, &data, &inner.settings.ephemeral())
                        .await
                    {
                        Ok(_) => return Ok(()),
                        Err(zk::Error::NoNode) => inner.ensure_dir(&client, &paths.nodes()).await?,
                        Err(zk::Error::NodeExists) => {
                            let Some(stat) = client
                                .check_stat(&path)
                                .await
                                .map_err(|e| zk_err(format!("checking {path}"), e))?
                            else {
                                continue;
                            };
                            if stat.ephemeral_owner == me {
                                match client.set_data(&path, &data, Some(stat.version)).await {
                                    Ok(_) => return Ok(()),
                                    Err(zk::Error::BadVersion | zk::Error::NoNode) => continue,
                                    Err(err) => return Err(zk_err(format!("writing {path}"), err)),
                                }
                            }
                            // Left by an earlier session of this node (or a foreign
                            // writer): replace it with one this session owns.
                            match client.delete(&path, Some(stat.version)).await {
                                Ok(()) | Err(zk::Error::NoNode | zk::Error::BadVersion) => {}
                                Err(err) => return Err(zk_err(format!("replacing {path}"), err)),
                            }
                        }
                        Err(err) => return Err(zk_err(format!("creating {path}"), err)),
                    }
                }
                Err(Error::registry_msg(
                    BACKEND,
                    format!("registering {path} kept racing with another writer"),
                ))
            })
            .await
    }

    async fn heartbeat(&self, ns: &str, node_id: &str, _ttl: Duration) -> Result<bool> {
        let path = Paths::new(ns)?.node(node_id)?;
        let inner = &*self.inner;
        inner
            .bounded("checking a node's registration", async {
                let client = inner.session().await?;
                let stat = client
                    .check_stat(&path)
                    .await
                    .map_err(|e| zk_err(format!("checking {path}"), e))?;
                Ok(stat.is_some_and(|s| s.ephemeral_owner == client.session_id().0))
            })
            .await
    }

    async fn update_node(&self, ns: &str, node: &Node) -> Result<bool> {
        let path = Paths::new(ns)?.node(&node.id)?;
        let inner = &*self.inner;
        inner
            .bounded("updating a node", async {
                let client = inner.session().await?;
                let data = codec::encode(node);
                for _ in 0..MAX_ATTEMPTS {
                    let stat = client
                        .check_stat(&path)
                        .await
                        .map_err(|e| zk_err(format!("checking {path}"), e))?;
                    let Some(stat) = stat.filter(|s| s.ephemeral_owner == client.session_id().0)
                    else {
                        return Ok(false);
                    };
                    match client.set_data(&path, &data, Some(stat.version)).await {
                        Ok(_) => return Ok(true),
                        Err(zk::Error::NoNode) => return Ok(false),
                        Err(zk::Error::BadVersion) => continue,
                        Err(err) => return Err(zk_err(format!("writing {path}"), err)),
                    }
                }
                Err(Error::registry_msg(
                    BACKEND,
                    format!("updating {path} kept racing with another writer"),
                ))
            })
            .await
    }

    async fn unregister(&self, ns: &str, node_id: &str) -> Result<()> {
        let path = Paths::new(ns)?.node(node_id)?;
        let inner = &*self.inner;
        inner
            .bounded("unregistering a node", async {
                let client = inner.session().await?;
                inner.delete(&client, &path).await
            })
            .await
    }

    async fn nodes(&self, ns: &str) -> Result<Vec<Node>> {
        let dir = Paths::new(ns)?.nodes();
        let inner = &*self.inner;
        inner
            .bounded("listing nodes", async {
                let client = inner.session().await?;
                let found = inner.read_children(&client, &dir).await?;
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
            })
            .await
    }

    async fn put_task(&self, ns: &str, meta: &TaskMeta, overwrite: bool) -> Result<()> {
        let paths = Paths::new(ns)?;
        let path = paths.task(&meta.name)?;
        let inner = &*self.inner;
        inner
            .bounded("storing a task", async {
                let client = inner.session().await?;
                let data = codec::encode(meta);
                if overwrite {
                    inner.upsert(&client, &paths.tasks(), &path, &data).await
                } else if inner
                    .create_new(&client, &paths.tasks(), &path, &data)
                    .await?
                {
                    Ok(())
                } else {
                    Err(Error::TaskExists(meta.name.clone()))
                }
            })
            .await
    }

    async fn delete_task(&self, ns: &str, name: &str) -> Result<()> {
        let path = Paths::new(ns)?.task(name)?;
        let inner = &*self.inner;
        inner
            .bounded("deleting a task", async {
                let client = inner.session().await?;
                inner.delete(&client, &path).await
            })
            .await
    }

    async fn tasks(&self, ns: &str) -> Result<Vec<TaskMeta>> {
        let dir = Paths::new(ns)?.tasks();
        let inner = &*self.inner;
        inner
            .bounded("listing tasks", async {
                let client = inner.session().await?;
                let found = inner.read_children(&client, &dir).await?;
                Ok(found
                    .into_iter()
                    .filter_map(|(name, found)| codec::decode_task(BACKEND, &name, &found?.0))
                    .collect())
            })
            .await
    }

    async fn put_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        let paths = Paths::new(ns)?;
        let path = paths.tombstone(name)?;
        let inner = &*self.inner;
        inner
            .bounded("writing a tombstone", async {
                let client = inner.session().await?;
                let data = codec::encode(&serde_json::json!({ "deleted": true }));
                inner
                    .create_new(&client, &paths.deleted(), &path, &data)
                    .await
                    .map(|_| ())
            })
            .await
    }

    async fn delete_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        let path = Paths::new(ns)?.tombstone(name)?;
        let inner = &*self.inner;
        inner
            .bounded("deleting a tombstone", async {
                let client = inner.session().await?;
                inner.delete(&client, &path).await
            })
            .await
    }

    async fn tombstones(&self, ns: &str) -> Result<Vec<String>> {
        let dir = Paths::new(ns)?.deleted();
        let inner = &*self.inner;
        inner
            .bounded("listing tombstones", async {
                let client = inner.session().await?;
                inner.children(&client, &dir).await
            })
            .await
    }

    async fn claim(&self, ns: &str, task: &str, claim: &Claim) -> Result<bool> {
        let path = Paths::new(ns)?.claim(task)?;
        let inner = &*self.inner;
        inner
            .bounded("claiming a fire", async {
                let client = inner.session().await?;
                self.claim_one(Some(client), &path, claim, self.claim_deadline())
                    .await
            })
            .await
    }

    async fn claim_many(&self, ns: &str, tasks: &[&str], claim: &Claim) -> Vec<ClaimOutcome> {
        if tasks.is_empty() {
            return Vec::new();
        }
        // Every step inside is bounded by the claim deadline (4/5 of the
        // request timeout); this outer bound is only a safety net.
        match tokio::time::timeout(
            self.inner.settings.request_timeout,
            self.claim_batch(ns, tasks, claim),
        )
        .await
        {
            Ok(outcomes) => outcomes,
            Err(_) => ClaimOutcome::fail_all(
                tasks.len(),
                Error::Timeout {
                    what: "claiming fires in ZooKeeper".into(),
                    after: self.inner.settings.request_timeout,
                },
            ),
        }
    }

    async fn claims(&self, ns: &str) -> Result<Vec<(String, Claim)>> {
        let dir = Paths::new(ns)?.claims();
        let inner = &*self.inner;
        inner
            .bounded("listing claims", async {
                let client = inner.session().await?;
                let found = inner.read_children(&client, &dir).await?;
                let mut out: Vec<(String, Claim)> = found
                    .into_iter()
                    .filter_map(|(name, found)| {
                        let claim = codec::decode_claim(BACKEND, &name, &found?.0)?;
                        Some((name, claim))
                    })
                    .collect();
                out.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(out)
            })
            .await
    }

    async fn delete_claim(&self, ns: &str, task: &str) -> Result<()> {
        let path = Paths::new(ns)?.claim(task)?;
        let inner = &*self.inner;
        inner
            .bounded("deleting a claim", async {
                let client = inner.session().await?;
                inner.delete(&client, &path).await
            })
            .await
    }

    async fn clear(&self, ns: &str) -> Result<()> {
        let paths = Paths::new(ns)?;
        let inner = &*self.inner;
        inner
            .bounded("clearing a namespace", async {
                let client = inner.session().await?;
                for dir in [paths.tasks(), paths.deleted(), paths.claims()] {
                    inner.delete_children(&client, &dir).await?;
                }
                Ok(())
            })
            .await
    }

    async fn watch(&self, ns: &str) -> Result<WatchReceiver> {
        let paths = Paths::new(ns)?;
        let inner = &*self.inner;
        let epoch = inner.epoch.subscribe();
        let (client, watchers) = inner
            .bounded("starting a watch", async {
                let client = inner.session().await?;
                let watchers = add_watches(&client, &paths).await?;
                Ok((client, watchers))
            })
            .await?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        let feed = Feed {
            registry: self.clone(),
            paths,
            tx,
            epoch,
            overflow: false,
            gap: false,
        };
        tokio::spawn(feed.run(client, watchers));
        Ok(rx)
    }
}

/// The three watched directories, in the order of [`Feed::pump`]'s watchers.
const WATCHED: [Kind; 3] = [Kind::Node, Kind::Task, Kind::Tombstone];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Node,
    Task,
    Tombstone,
}

async fn add_watches(client: &Client, paths: &Paths) -> Result<Vec<PersistentWatcher>> {
    let dirs = [paths.nodes(), paths.tasks(), paths.deleted()];
    // Sent together (pipelined), awaited in order.
    let pending: Vec<_> = dirs
        .iter()
        .map(|dir| client.watch(dir, AddWatchMode::PersistentRecursive))
        .collect();
    let mut watchers = Vec::with_capacity(3);
    for (dir, fut) in dirs.iter().zip(pending) {
        watchers.push(
            fut.await
                .map_err(|e| zk_err(format!("watching {dir}"), e))?,
        );
    }
    Ok(watchers)
}

/// Why [`Feed::pump`] returned.
enum Pumped {
    /// The receiver is gone.
    Closed,
    /// The session ended or was abandoned: watch again on a new one.
    Lost,
}

/// One step of a batch of watch events, in arrival order.
enum Step<F> {
    Emit(WatchEvent),
    Fetch(Kind, String, F),
    Lost,
}

/// The background task behind [`ZookeeperRegistry::watch`].
struct Feed {
    registry: ZookeeperRegistry,
    paths: Paths,
    tx: mpsc::Sender<WatchEvent>,
    epoch: watch::Receiver<u64>,
    /// Events were dropped on a full channel: send `Resync` once there is room.
    overflow: bool,
    /// The connection dropped: send `Resync` once it is back.
    gap: bool,
}

impl Feed {
    async fn run(mut self, client: Client, watchers: Vec<PersistentWatcher>) {
        let (mut client, mut watchers) = (client, watchers);
        loop {
            match self.pump(&client, &mut watchers).await {
                Pumped::Closed => return,
                Pumped::Lost => {}
            }
            drop(watchers);
            drop(client);
            match self.rewatch().await {
                Some((c, w)) => (client, watchers) = (c, w),
                None => return,
            }
            self.gap = false;
            if !self.emit(WatchEvent::Resync) {
                return;
            }
        }
    }

    /// Watches again on the registry's current (or a new) session, with
    /// capped backoff; `None` once the receiver is gone.
    async fn rewatch(&mut self) -> Option<(Client, Vec<PersistentWatcher>)> {
        let inner = &*self.registry.inner;
        let mut pause = Duration::from_millis(100);
        loop {
            if self.tx.is_closed() {
                return None;
            }
            self.epoch.borrow_and_update();
            let attempt = inner
                .bounded("re-establishing a watch", async {
                    let client = inner.session().await?;
                    let watchers = add_watches(&client, &self.paths).await?;
                    Ok((client, watchers))
                })
                .await;
            match attempt {
                Ok(found) => return Some(found),
                Err(err) => {
                    tracing::warn!(backend = BACKEND, ns = %self.paths.base, %err, ?pause, "watch lost; retrying");
                }
            }
            tokio::select! {
                _ = self.tx.closed() => return None,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(MAX_BACKOFF);
        }
    }

    /// Queues `event`; on a full channel, drops it and remembers to send
    /// `Resync`. `false` once the receiver is gone.
    fn emit(&mut self, event: WatchEvent) -> bool {
        if self.overflow {
            return !self.tx.is_closed();
        }
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(backend = BACKEND, ns = %self.paths.base, "watch channel full; events dropped, Resync will follow");
                self.overflow = true;
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    async fn pump(&mut self, client: &Client, watchers: &mut [PersistentWatcher]) -> Pumped {
        let [w_nodes, w_tasks, w_deleted] = watchers else {
            return Pumped::Lost;
        };
        loop {
            let first = tokio::select! {
                biased;
                _ = self.tx.closed() => return Pumped::Closed,
                _ = self.epoch.changed() => return Pumped::Lost,
                permit = self.tx.reserve(), if self.overflow => {
                    match permit {
                        Ok(permit) => {
                            permit.send(WatchEvent::Resync);
                            self.overflow = false;
                            continue;
                        }
                        Err(_) => return Pumped::Closed,
                    }
                }
                ev = w_nodes.changed() => (0, ev),
                ev = w_tasks.changed() => (1, ev),
                ev = w_deleted.changed() => (2, ev),
            };
            // Take whatever else is already queued, without waiting. No
            // watcher is polled again once one reported a terminal state.
            let mut batch = vec![first];
            let mut open = [true; 3];
            while batch.len() < WATCH_BATCH && !batch.iter().any(|(_, e)| is_terminal(e)) {
                let mut got = false;
                for (i, w) in [&mut *w_nodes, &mut *w_tasks, &mut *w_deleted]
                    .into_iter()
                    .enumerate()
                {
                    if !open[i] || batch.iter().any(|(_, e)| is_terminal(e)) {
                        continue;
                    }
                    let next = tokio::select! {
                        biased;
                        ev = w.changed() => Some(ev),
                        _ = std::future::ready(()) => None,
                    };
                    match next {
                        Some(ev) => {
                            batch.push((i, ev));
                            got = true;
                        }
                        None => open[i] = false,
                    }
                }
                if !got {
                    break;
                }
            }
            if let Some(done) = self.handle(client, batch).await {
                return done;
            }
        }
    }

    /// The name of `kind`'s child at `path`, if `path` is exactly one level
    /// below that directory (the directory itself and deeper znodes are
    /// not ours).
    fn name_of(&self, kind: Kind, path: &str) -> Option<String> {
        let dir = match kind {
            Kind::Node => "nodes",
            Kind::Task => "tasks",
            Kind::Tombstone => "deleted",
        };
        let name = path
            .strip_prefix(self.paths.base.as_str())?
            .strip_prefix('/')?
            .strip_prefix(dir)?
            .strip_prefix('/')?;
        (!name.is_empty() && !name.contains('/')).then(|| name.to_string())
    }

    /// Turns a batch of notifications into watch events, fetching the new
    /// values of created and changed znodes in one pipeline. `Some` ends
    /// the pump.
    async fn handle(
        &mut self,
        client: &Client,
        batch: Vec<(usize, WatchedEvent)>,
    ) -> Option<Pumped> {
        // While the channel is full, node events are dropped unread: the
        // Resync that follows makes the receiver reload everything.
        let dropping = self.overflow;
        let mut steps = Vec::with_capacity(batch.len());
        for (i, event) in batch {
            let kind = WATCHED[i];
            match event.event_type {
                EventType::Session => match event.session_state {
                    SessionState::Disconnected => self.gap = true,
                    SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                        // Persistent watches may lose events across a
                        // reconnection (ZOOKEEPER-4698).
                        if std::mem::take(&mut self.gap) {
                            steps.push(Step::Emit(WatchEvent::Resync));
                        }
                    }
                    _ => steps.push(Step::Lost),
                },
                _ if dropping => {}
                EventType::NodeCreated | EventType::NodeDataChanged => {
                    let Some(name) = self.name_of(kind, &event.path) else {
                        continue;
                    };
                    match kind {
                        // A tombstone counts whatever its value: no fetch.
                        Kind::Tombstone => {
                            if event.event_type == EventType::NodeCreated {
                                steps.push(Step::Emit(WatchEvent::TombstonePut(name)));
                            }
                        }
                        Kind::Node | Kind::Task => {
                            steps.push(Step::Fetch(kind, name, client.get_data(&event.path)));
                        }
                    }
                }
                EventType::NodeDeleted => {
                    let Some(name) = self.name_of(kind, &event.path) else {
                        continue;
                    };
                    steps.push(Step::Emit(match kind {
                        Kind::Node => WatchEvent::NodeDelete(name),
                        Kind::Task => WatchEvent::TaskDelete(name),
                        Kind::Tombstone => WatchEvent::TombstoneDelete(name),
                    }));
                }
                EventType::NodeChildrenChanged => {}
            }
        }
        for step in steps {
            let event = match step {
                Step::Emit(event) => Some(event),
                Step::Lost => return Some(Pumped::Lost),
                Step::Fetch(kind, name, fetch) => match fetch.await {
                    Ok((raw, stat)) => match kind {
                        Kind::Node if stat.ephemeral_owner == 0 => {
                            tracing::warn!(backend = BACKEND, key = %name, "skipping a node record that is not an ephemeral znode");
                            None
                        }
                        Kind::Node => {
                            codec::decode_node(BACKEND, &name, &raw).map(WatchEvent::NodePut)
                        }
                        Kind::Task | Kind::Tombstone => {
                            codec::decode_task(BACKEND, &name, &raw).map(WatchEvent::TaskPut)
                        }
                    },
                    // Deleted since: its delete event follows.
                    Err(zk::Error::NoNode) => None,
                    Err(err) => {
                        tracing::warn!(backend = BACKEND, key = %name, %err, "could not fetch a changed value; asking for a reload");
                        if !is_connected(client.state()) {
                            self.gap = true;
                        }
                        Some(WatchEvent::Resync)
                    }
                },
            };
            if let Some(event) = event {
                if !self.emit(event) {
                    return Some(Pumped::Closed);
                }
            }
        }
        None
    }
}

fn is_terminal(event: &WatchedEvent) -> bool {
    event.event_type == EventType::Session && event.session_state.is_terminated()
}

/// Where one claim of a [`ZookeeperRegistry::claim_many`] batch stands.
enum ClaimStep {
    Done(bool),
    /// Its compare-and-set is queued.
    Write,
    /// Lost a race, or its answer was lost: read again and decide.
    Retry,
    Failed(Error),
}

fn write_step(result: std::result::Result<(), zk::Error>) -> ClaimStep {
    match result {
        Ok(()) => ClaimStep::Done(true),
        Err(zk::Error::BadVersion | zk::Error::NodeExists | zk::Error::NoNode) => ClaimStep::Retry,
        Err(zk::Error::ConnectionLoss) => ClaimStep::Retry,
        Err(err) => ClaimStep::Failed(zk_err("writing claim", err)),
    }
}
