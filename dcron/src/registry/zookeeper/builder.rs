//! Building a [`ZookeeperRegistry`]: the options every backend takes, the
//! session timeout, digest authentication (and the ACL it implies), or an
//! existing client.

use std::sync::Arc;
use std::time::Duration;

use zookeeper_client::{Acl, Acls, Client, Permission};

use super::errors::{timed_out, zk_err};
use super::session::{Inner, Settings};
use super::{
    ZookeeperRegistry, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, DEFAULT_SESSION_TIMEOUT,
};
use crate::error::{Error, Result};
use crate::registry::kit::options::{timeout_setters, Options, Secret};
use crate::registry::Timing;

/// Creator-all plus world-read: only the authenticated identity that
/// created a znode may change or delete it; anyone may read.
static AUTH_ACLS: [Acl; 2] = [
    Acl::new_const(Permission::ALL, "auth", ""),
    Acl::new_const(Permission::READ, "world", "anyone"),
];

/// Builds a [`ZookeeperRegistry`]; made by [`ZookeeperRegistry::builder`].
///
/// ```no_run
/// # async fn demo() -> dcron::Result<()> {
/// use std::time::Duration;
/// use dcron::registry::ZookeeperRegistry;
///
/// let registry = ZookeeperRegistry::builder("zk1:2181,zk2:2181,zk3:2181/dcron")
///     .session_timeout(Duration::from_secs(10))
///     .request_timeout(Duration::from_secs(5))
///     .digest_auth("dcron", "secret")
///     .connect()
///     .await?;
/// # drop(registry);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ZookeeperRegistryBuilder {
    connect: String,
    session_timeout: Duration,
    options: Options,
    custom_timing: bool,
    digest: Option<(String, Secret)>,
    client: Option<Client>,
}

impl std::fmt::Debug for ZookeeperRegistryBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZookeeperRegistryBuilder")
            .field("connect", &self.connect)
            .field("session_timeout", &self.session_timeout)
            .field("options", &self.options)
            .field("digest", &self.digest)
            .field("client", &self.client.is_some())
            .finish()
    }
}

impl ZookeeperRegistryBuilder {
    pub(super) fn new(connect: String) -> Self {
        ZookeeperRegistryBuilder {
            connect,
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            options: Options {
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
                timing: Timing::default(),
            },
            custom_timing: false,
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

    timeout_setters! {
        connect: "Bound on opening a session, at start and after a session ends (default 10 s).",
        request: "Bound on each registry call (default 10 s); claims settle within 4/5 of it.",
    }

    /// Timing suggested to nodes, instead of the one derived from the
    /// negotiated session timeout (node TTL = session timeout, heartbeat a
    /// fifth of it).
    pub fn timing(mut self, timing: Timing) -> Self {
        self.options.timing = timing;
        self.custom_timing = true;
        self
    }

    /// Authenticates every session with the `digest` scheme. Znodes the
    /// registry creates then carry the ACL creator-all + world-read: other
    /// identities can read them but not change or delete them. The
    /// password is never printed.
    pub fn digest_auth(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.digest = Some((user.into(), Secret::new(password)));
        self
    }

    /// Uses `client` (and its session, and its chroot, which must exist)
    /// first; the connect string opens a new session once that one ends.
    /// With [`digest_auth`](Self::digest_auth), the identity is added to
    /// `client` too. A client handed in keeps its session alive as long as
    /// clones of it exist outside the registry.
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Connects (bounded by the connect timeout) and returns the registry.
    pub async fn connect(self) -> Result<ZookeeperRegistry> {
        let options = &self.options;
        if self.session_timeout.is_zero()
            || options.connect_timeout.is_zero()
            || options.request_timeout.is_zero()
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
            connect: self.connect,
            session_timeout: self.session_timeout,
            options: self.options,
            custom_timing: self.custom_timing,
            digest: self.digest,
            acls,
        };
        let client = match self.client {
            Some(client) => authenticate(&settings, client).await?,
            None => settings.open().await?,
        };
        let inner = Inner::new(settings, &client);
        Ok(ZookeeperRegistry {
            inner: Arc::new(inner),
        })
    }
}

/// Adds the digest identity (if any) to a client handed in.
async fn authenticate(settings: &Settings, client: Client) -> Result<Client> {
    let Some(auth) = settings.digest_bytes() else {
        return Ok(client);
    };
    let after = settings.options.connect_timeout;
    match tokio::time::timeout(after, client.auth("digest", &auth)).await {
        Ok(Ok(())) => Ok(client),
        Ok(Err(err)) => Err(zk_err("digest authentication", err)),
        Err(_) => Err(timed_out("authenticating the session", after)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let builder = ZookeeperRegistryBuilder::new("zk:2181".into())
            .digest_auth("dcron", "hunter2")
            .request_timeout(Duration::from_secs(3));
        let shown = format!("{builder:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("dcron") && shown.contains("3s"), "{shown}");
    }
}
