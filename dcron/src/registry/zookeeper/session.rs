//! The one ZooKeeper session behind a registry: opening it (with its
//! chroot and authentication), handing it to calls while it is connected,
//! replacing it once it ended, and waiting for a reconnection where a call
//! must settle something.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use zookeeper_client::{Acls, Client, CreateMode, CreateOptions, SessionState};

use super::errors::{disconnected, renewing, timed_out, zk_err};
use super::BACKEND;
use crate::error::{Error, Result};
use crate::registry::kit::options::{Options, Secret};

/// How sessions are opened and calls bounded.
pub(super) struct Settings {
    /// `host:port[,host:port...][/chroot]`, to open new sessions.
    pub connect: String,
    pub session_timeout: Duration,
    pub options: Options,
    /// Whether `options.timing` was chosen by the user (otherwise it
    /// follows the negotiated session timeout).
    pub custom_timing: bool,
    pub digest: Option<(String, Secret)>,
    pub acls: Acls<'static>,
}

impl Settings {
    /// `user:password` for the `digest` scheme, for the wire only.
    pub fn digest_bytes(&self) -> Option<Vec<u8>> {
        self.digest
            .as_ref()
            .map(|(user, password)| format!("{user}:{}", password.expose()).into_bytes())
    }

    pub fn persistent(&self) -> CreateOptions<'static> {
        CreateMode::Persistent.with_acls(self.acls)
    }

    pub fn ephemeral(&self) -> CreateOptions<'static> {
        CreateMode::Ephemeral.with_acls(self.acls)
    }

    /// Opens a new session (bounded by the connect timeout). Sessions are
    /// detached: dropping the last client ends the connection without
    /// closing the session, exactly as a killed process would, so an
    /// ephemeral znode not explicitly removed lives until the session
    /// timeout, like a TTL in the other backends.
    pub async fn open(&self) -> Result<Client> {
        let what = format!("connecting to {}", self.connect);
        let mut connector = Client::connector()
            .with_session_timeout(self.session_timeout)
            .with_detached();
        if let Some(auth) = self.digest_bytes() {
            connector = connector.with_auth("digest", &auth);
        }
        let timeout = self.options.connect_timeout;
        let client = match tokio::time::timeout(timeout, connector.connect(&self.connect)).await {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => return Err(zk_err(what, err)),
            Err(_) => return Err(timed_out(what, timeout)),
        };
        if client.path() != "/" {
            self.ensure_chroot(&client).await?;
        }
        tracing::info!(
            backend = BACKEND,
            session = %client.session_id(),
            timeout_ms = client.session_timeout().as_millis() as u64,
            "ZooKeeper session opened"
        );
        Ok(client)
    }

    /// Creates the connect string's chroot if it does not exist yet.
    async fn ensure_chroot(&self, client: &Client) -> Result<()> {
        let chroot = client.path().to_string();
        let root = client.clone().chroot("/").unwrap_or_else(|c| c);
        let what = format!("creating chroot {chroot}");
        let made = tokio::time::timeout(self.options.request_timeout, async {
            match root.check_stat(&chroot).await? {
                Some(_) => Ok(()),
                None => root.mkdir(&chroot, &self.persistent()).await,
            }
        })
        .await;
        match made {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(zk_err(what, err)),
            Err(_) => Err(timed_out(what, self.options.request_timeout)),
        }
    }
}

/// Why a session is not usable right now.
enum NotReady {
    /// Connection down; the client library reconnects in the background.
    Disconnected(Client),
    /// Another call is opening a new session.
    Renewing,
    Failed(Error),
}

pub(super) fn is_connected(state: SessionState) -> bool {
    matches!(
        state,
        SessionState::SyncConnected | SessionState::ConnectedReadOnly
    )
}

/// The state every clone of a registry shares.
pub(super) struct Inner {
    pub settings: Settings,
    /// The current session; `None` after it was abandoned.
    slot: Mutex<Option<Client>>,
    /// Serialises the opening of a new session.
    renew: tokio::sync::Mutex<()>,
    /// Bumped when the session is abandoned, so watch feeds drop theirs.
    pub epoch: watch::Sender<u64>,
    /// Negotiated session timeout of the latest session, ms.
    negotiated_ms: AtomicU64,
}

impl Inner {
    pub fn new(settings: Settings, client: &Client) -> Inner {
        let inner = Inner {
            settings,
            slot: Mutex::new(None),
            renew: tokio::sync::Mutex::new(()),
            epoch: watch::channel(0).0,
            negotiated_ms: AtomicU64::new(0),
        };
        inner.store(client);
        inner
    }

    pub fn lock_slot(&self) -> MutexGuard<'_, Option<Client>> {
        // Every critical section is a single read or replace of the slot.
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store(&self, client: &Client) {
        let ms = u64::try_from(client.session_timeout().as_millis()).unwrap_or(u64::MAX);
        self.negotiated_ms.store(ms, Ordering::Relaxed);
        *self.lock_slot() = Some(client.clone());
    }

    /// The session timeout negotiated for the latest session.
    pub fn negotiated(&self) -> Duration {
        Duration::from_millis(self.negotiated_ms.load(Ordering::Relaxed))
    }

    /// The session in the slot if it is usable; `None` if it ended (or
    /// was abandoned) and a new one must be opened.
    fn current(slot: &Option<Client>) -> Option<Result<Client, NotReady>> {
        let client = slot.as_ref()?;
        let state = client.state();
        if is_connected(state) {
            return Some(Ok(client.clone()));
        }
        if !state.is_terminated() {
            return Some(Err(NotReady::Disconnected(client.clone())));
        }
        None
    }

    /// The current session if it is connected; opens a new one if it ended.
    /// With `wait_renew`, waits for another caller's renewal instead of
    /// failing at once.
    async fn acquire(&self, wait_renew: bool) -> Result<Client, NotReady> {
        if let Some(usable) = Self::current(&self.lock_slot()) {
            return usable;
        }
        let _guard = if wait_renew {
            self.renew.lock().await
        } else {
            self.renew.try_lock().map_err(|_| NotReady::Renewing)?
        };
        {
            let mut slot = self.lock_slot();
            if let Some(usable) = Self::current(&slot) {
                return usable;
            }
            if let Some(client) = slot.take() {
                tracing::warn!(
                    backend = BACKEND,
                    session = %client.session_id(),
                    state = %client.state(),
                    "ZooKeeper session ended; opening a new one"
                );
            }
        }
        let client = self.settings.open().await.map_err(NotReady::Failed)?;
        self.store(&client);
        Ok(client)
    }

    /// A connected session, failing at once while disconnected: a node
    /// stops claiming instead of queueing work behind a dead link.
    pub async fn session(&self) -> Result<Client> {
        match self.acquire(false).await {
            Ok(client) => Ok(client),
            Err(NotReady::Disconnected(_)) => Err(disconnected()),
            Err(NotReady::Renewing) => Err(renewing()),
            Err(NotReady::Failed(err)) => Err(err),
        }
    }

    /// A connected session, waiting until `deadline` for a reconnection or
    /// a renewal (to settle a claim whose answer was lost).
    pub async fn session_by(&self, deadline: Instant) -> Result<Client> {
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
                        return Err(disconnected());
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(disconnected());
            }
        }
    }

    /// `op` on a connected session (failing at once while disconnected),
    /// within the request timeout.
    pub async fn call<'a, T, Fut>(&'a self, what: &str, op: impl FnOnce(Client) -> Fut) -> Result<T>
    where
        Fut: Future<Output = Result<T>> + 'a,
    {
        self.bounded(what, async { op(self.session().await?).await })
            .await
    }

    /// Runs `fut` within the request timeout.
    pub async fn bounded<T>(&self, what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
        let after = self.settings.options.request_timeout;
        match tokio::time::timeout(after, fut).await {
            Ok(result) => result,
            Err(_) => Err(timed_out(what, after)),
        }
    }

    /// How long a claim call may take to settle: inside the call's own
    /// bound, so a batch with won claims is answered rather than timed out
    /// as a whole.
    pub fn claim_budget(&self) -> Duration {
        self.settings.options.request_timeout * 4 / 5
    }
}
