//! The one way to build an [`EtcdRegistry`]: [`EtcdRegistry::connect`] with
//! the defaults, or [`EtcdRegistry::builder`] and its setters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use super::cluster::Member;
use super::{EtcdRegistry, Shared};
use crate::error::{Error, Result};
use crate::registry::kit::options::{timeout_setters, Options, Secret};
use crate::registry::Timing;

/// Default bound on establishing a connection to an endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default bound on each request, its retries included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on one attempt of a small request (a claim, a keep-alive,
/// a single key): one etcd election timeout (1 s by default). It only ends
/// attempts that nothing else ends: one whose member loses its leader is
/// ended as soon as the member says so (see [`EtcdRegistry`]'s fail-over).
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// Options for [`EtcdRegistry`]; start with [`EtcdRegistry::builder`].
/// `Debug` never shows the password.
#[derive(Clone)]
pub struct EtcdRegistryBuilder {
    endpoints: Vec<String>,
    user: Option<(String, Secret)>,
    options: Options,
    attempt_timeout: Duration,
    keep_alive: Option<(Duration, Duration)>,
    client: Option<Client>,
}

impl std::fmt::Debug for EtcdRegistryBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistryBuilder")
            .field("endpoints", &self.endpoints)
            .field("user", &self.user)
            .field("options", &self.options)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("keep_alive", &self.keep_alive)
            .field("client", &self.client.as_ref().map(|_| "(given)"))
            .finish()
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
            options: Options {
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
                timing: Self::DEFAULT_TIMING,
            },
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            keep_alive: Some((Duration::from_secs(10), Duration::from_secs(5))),
            client: None,
        }
    }
}

impl EtcdRegistryBuilder {
    /// Authenticates as `name` with `password` (etcd auth enabled). The
    /// token is refreshed automatically when it expires.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((name.into(), Secret::new(password)));
        self
    }

    timeout_setters! {
        connect: "Bound on establishing the connection to a member, authentication included (default 3 s).",
        request: "Bound on each request, its retries included (default 5 s). An attempt that fails with a transport error, \"no leader\" or the [attempt timeout](Self::attempt_timeout) is tried again on the next member, with a short capped backoff, until this bound. Large requests (a page of a range read) get this bound for each of a few attempts instead.",
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
        self.options.timing = timing;
        self
    }

    /// Uses an existing client instead of connecting to the endpoints (its
    /// own endpoints, TLS, auth and timeouts apply; the connect timeout,
    /// user and keep-alive setters do not). Requests are retried on that
    /// one client, so prefer the endpoints of every member for fail-over.
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
    /// let registry = EtcdRegistry::builder(["(given client)"])
    ///     .client(client)
    ///     .connect()
    ///     .await?;
    /// # drop(registry);
    /// # Ok(())
    /// # }
    /// ```
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Connects and checks that the cluster answers (the client library
    /// connects lazily; this makes an unreachable cluster fail here, within
    /// a few connect and request timeouts, with a clear error).
    pub async fn connect(self) -> Result<EtcdRegistry> {
        self.check()?;
        let (members, connect) = match self.client.clone() {
            Some(client) => (
                vec![Member::new("(given client)".into(), Some(client))],
                None,
            ),
            None => {
                let members = self.endpoints.iter().map(|e| Member::new(e.clone(), None));
                (members.collect(), Some(self.connect_options()))
            }
        };
        // Start at a random member so that many nodes spread their load.
        let start = (uuid::Uuid::new_v4().as_u128() % members.len() as u128) as usize;
        let registry = EtcdRegistry {
            shared: Arc::new(Shared {
                members,
                current: AtomicUsize::new(start),
                term: AtomicU64::new(0),
                connect,
                // With credentials, connecting authenticates (a round trip).
                connect_bound: self.options.connect_timeout + self.options.request_timeout,
                leases: Mutex::new(HashMap::new()),
                claim_revs: Mutex::new(HashMap::new()),
            }),
            options: self.options,
            attempt_timeout: self.attempt_timeout,
        };
        // Fail fast: one cheap call that needs a live member with a leader.
        let endpoints = registry.endpoints().join(",");
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

    fn check(&self) -> Result<()> {
        if self.endpoints.is_empty() && self.client.is_none() {
            return Err(Error::InvalidConfig(
                "etcd: no endpoints given; pass e.g. \"http://127.0.0.1:2379\"".into(),
            ));
        }
        let o = &self.options;
        if [o.connect_timeout, o.request_timeout, self.attempt_timeout]
            .iter()
            .any(Duration::is_zero)
        {
            return Err(Error::InvalidConfig(
                "etcd: connect, request and attempt timeouts must be above zero".into(),
            ));
        }
        Ok(())
    }

    fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.options.connect_timeout)
            .with_timeout(self.options.request_timeout)
            .with_require_leader(true);
        if let Some((interval, timeout)) = self.keep_alive {
            options = options
                .with_keep_alive(interval, timeout)
                .with_keep_alive_while_idle(true);
        }
        if let Some((name, password)) = &self.user {
            options = options
                .with_user(name.clone(), password.expose())
                .with_auto_token_refresh(true);
        }
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let b = EtcdRegistry::builder(["http://a:2379, http://b:2379", "http://a:2379"])
            .user("dcron", "s3cret");
        assert_eq!(b.endpoints, ["http://a:2379", "http://b:2379"]);
        let shown = format!("{b:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("dcron"),
            "{shown}"
        );
    }
}
