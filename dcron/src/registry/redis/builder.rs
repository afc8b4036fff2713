//! [`RedisRegistryBuilder`]: the URL or an existing client, the shared
//! options, and `connect`.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ProtocolVersion};

use super::conn::{registry_error, Req};
use super::{Inner, RedisRegistry, BACKEND, DEFAULT_CONNECT_TIMEOUT, DEFAULT_RETRIES};
use crate::error::{Error, Result};
use crate::registry::kit::options::{timeout_setters, Options, Secret};
use crate::registry::Timing;

/// Bounds of the connection manager's own reconnect backoff.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// Options for [`RedisRegistry`]; start with [`RedisRegistry::builder`],
/// end with [`connect`](Self::connect). Its `Debug` never shows the URL
/// (it may carry a password).
pub struct RedisRegistryBuilder {
    url: Secret,
    // Boxed: a client with TLS enabled is large.
    client: Option<Box<Client>>,
    manager: Option<ConnectionManager>,
    options: Options,
    retries: usize,
}

impl std::fmt::Debug for RedisRegistryBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRegistryBuilder")
            .field("url", &self.url)
            .field("client", &self.client.is_some())
            .field("connection_manager", &self.manager.is_some())
            .field("options", &self.options)
            .field("retries", &self.retries)
            .finish()
    }
}

impl RedisRegistryBuilder {
    pub(super) fn new(url: String) -> Self {
        RedisRegistryBuilder {
            url: Secret::new(url),
            client: None,
            manager: None,
            options: Options {
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                ..Options::default()
            },
            retries: DEFAULT_RETRIES,
        }
    }

    timeout_setters! {
        connect: "Bound on establishing one connection (default 2 s).",
        request: "Bound on each call, and on the answer to each command (default 5 s).",
    }

    /// Timing defaults the registry reports to nodes (default: node TTL
    /// 10 s, heartbeat 2 s, reload 10 s).
    pub fn timing(mut self, timing: Timing) -> Self {
        self.options.timing = timing;
        self
    }

    /// How many times the connection manager retries a failed (re)connect,
    /// with exponential backoff between 100 ms and 1 s (default 2).
    pub fn retries(mut self, retries: usize) -> Self {
        self.retries = retries;
        self
    }

    /// Uses this client instead of opening one from the URL (which is then
    /// not used): its connection info, TLS settings and credentials apply
    /// as they are.
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(Box::new(client));
        self
    }

    /// Uses this connection manager for commands instead of opening one;
    /// its own retry settings apply, each call is still bounded by the
    /// request timeout. It must reach the same server as the client (or
    /// URL), which still opens the pub/sub connections of watches.
    pub fn connection_manager(mut self, manager: ConnectionManager) -> Self {
        self.manager = Some(manager);
        self
    }

    /// Connects (unless a connection manager was given) and checks the
    /// server answers; fails within the connect bound with an error naming
    /// the address (never the password) when it is unreachable.
    pub async fn connect(self) -> Result<RedisRegistry> {
        let options = self.options;
        if options.connect_timeout.is_zero() || options.request_timeout.is_zero() {
            return Err(Error::InvalidConfig(
                "redis connect and request timeouts must be positive".into(),
            ));
        }
        let client = match self.client {
            Some(client) => *client,
            None => open_client(self.url.expose())?,
        };
        let info = client.get_connection_info();
        let addr = format!("{}/{}", info.addr(), info.redis_settings().db());
        let db = info.redis_settings().db();
        let pubsub_client = resp3_client(&client)?;
        let manager = match self.manager {
            Some(manager) => manager,
            None => open_manager(&client, &addr, &options, self.retries).await?,
        };
        let registry = RedisRegistry {
            inner: Arc::new(Inner {
                client,
                pubsub_client,
                manager,
                addr,
                db,
                options,
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

/// A connection manager with bounded retries and timeouts (its defaults
/// retry for ever), its first connection bounded by all its tries.
async fn open_manager(
    client: &Client,
    addr: &str,
    options: &Options,
    retries: usize,
) -> Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(retries)
        .set_connection_timeout(Some(options.connect_timeout))
        .set_response_timeout(Some(options.request_timeout))
        .set_min_delay(RECONNECT_MIN_DELAY)
        .set_max_delay(RECONNECT_MAX_DELAY);
    // Every try, the longest pause between two, and some slack.
    let attempts = u32::try_from(retries.saturating_add(1)).unwrap_or(u32::MAX);
    let pauses = u32::try_from(retries.min(60)).unwrap_or(60);
    let bound = options
        .connect_timeout
        .saturating_mul(attempts)
        .saturating_add(RECONNECT_MAX_DELAY.saturating_mul(pauses))
        .saturating_add(Duration::from_millis(500));
    let connecting = ConnectionManager::new_with_config(client.clone(), config);
    match tokio::time::timeout(bound, connecting).await {
        Ok(Ok(manager)) => Ok(manager),
        Ok(Err(err)) => Err(registry_error(format!("cannot connect to {addr}"), err)),
        Err(_) => Err(Error::Timeout {
            what: format!("connecting to redis at {addr}"),
            after: bound,
        }),
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

/// The same server with RESP3, for the pub/sub connections of watches.
fn resp3_client(client: &Client) -> Result<Client> {
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    Client::open(info.set_redis_settings(settings))
        .map_err(|err| Error::InvalidConfig(format!("redis pub/sub connection: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_are_config_errors_without_secrets() {
        let err = open_client("http://user:hunter2@localhost/").expect_err("bad scheme");
        assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn the_builder_never_shows_the_url() {
        let b = RedisRegistry::builder("redis://:hunter2@127.0.0.1:6379/0")
            .connect_timeout(Duration::from_secs(1))
            .retries(3);
        let shown = format!("{b:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("retries: 3"), "{shown}");
    }
}
