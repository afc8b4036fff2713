//! The builder: options, the checks on the agent's address, and `connect`.

use std::fmt;
use std::time::Duration;

use reqwest::header::HeaderValue;
use reqwest::Url;

use super::http::Http;
use super::session::MIN_SESSION_TTL;
use super::{ConsulRegistry, BACKEND};
use crate::error::{Error, Result};
use crate::registry::kit::options::{timeout_setters, Options, Secret};
use crate::registry::Timing;

const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_WATCH_WAIT: Duration = Duration::from_secs(30);
const MAX_WATCH_WAIT: Duration = Duration::from_secs(600);

/// The timing a Consul registry suggests: a 10 s TTL (Consul's minimum;
/// expiry takes up to 20 s), a heartbeat every 3 s, a reload every 10 s.
pub(super) const DEFAULT_TIMING: Timing = Timing {
    node_ttl: MIN_SESSION_TTL,
    heartbeat: Duration::from_secs(3),
    reload: Duration::from_secs(10),
};

/// Options of a [`ConsulRegistry`]; [`connect`](Self::connect) builds it.
///
/// ```no_run
/// # async fn demo() -> dcron::Result<()> {
/// use std::time::Duration;
/// use dcron::registry::ConsulRegistry;
///
/// let registry = ConsulRegistry::builder("http://127.0.0.1:8500")
///     .connect_timeout(Duration::from_secs(2))
///     .request_timeout(Duration::from_secs(5))
///     .watch_wait(Duration::from_secs(60))
///     .connect()
///     .await?;
/// # drop(registry);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ConsulRegistryBuilder {
    address: String,
    token: Option<Secret>,
    datacenter: Option<String>,
    options: Options,
    watch_wait: Duration,
    client: Option<reqwest::Client>,
}

impl fmt::Debug for ConsulRegistryBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A client's own Debug may show its default headers: not shown.
        f.debug_struct("ConsulRegistryBuilder")
            .field("address", &self.address)
            .field("token", &self.token)
            .field("datacenter", &self.datacenter)
            .field("options", &self.options)
            .field("watch_wait", &self.watch_wait)
            .field("custom_client", &self.client.is_some())
            .finish()
    }
}

impl ConsulRegistryBuilder {
    pub(super) fn new(address: &str) -> Self {
        ConsulRegistryBuilder {
            address: address.to_string(),
            token: None,
            datacenter: None,
            options: Options {
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
                timing: DEFAULT_TIMING,
                ..Options::default()
            },
            watch_wait: DEFAULT_WATCH_WAIT,
            client: None,
        }
    }

    /// ACL token, sent as the `X-Consul-Token` header (marked sensitive,
    /// shown as `***` by `Debug`, never logged).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Secret::new(token));
        self
    }

    /// Datacenter to use (`?dc=`); default: the agent's own.
    pub fn datacenter(mut self, dc: impl Into<String>) -> Self {
        self.datacenter = Some(dc.into());
        self
    }

    timeout_setters! {
        connect: "Bound on establishing a connection, and on the agent's first answer in [`connect`](Self::connect) (default 5 s). With [`client`](Self::client), configure that client's own connect timeout as well.",
        request: "Bound on each ordinary request (default 10 s), and on a whole `claim_many`.",
    }

    /// Timing suggested to nodes (default: 10 s TTL, 3 s heartbeat, 10 s
    /// reload). Session TTLs below Consul's 10 s minimum are raised to it.
    pub fn timing(mut self, timing: Timing) -> Self {
        self.options.timing = timing;
        self
    }

    /// How long a watch's blocking query waits for a change (default 30 s,
    /// at most 10 min). Its request timeout is this wait plus Consul's
    /// jitter (wait/16) plus the request timeout.
    pub fn watch_wait(mut self, wait: Duration) -> Self {
        self.watch_wait = wait;
        self
    }

    /// Uses an existing `reqwest` client (TLS settings, client
    /// certificates, proxies, default headers). Per-request timeouts are
    /// still applied.
    pub fn client(mut self, client: reqwest::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Checks the options, builds the HTTP client and checks that the
    /// agent answers (`GET /v1/status/leader` within the connect timeout).
    ///
    /// Fails with [`Error::InvalidConfig`] for bad options and with an
    /// unavailable registry error ([`Error::is_retryable`]) when the agent
    /// cannot be reached.
    pub async fn connect(self) -> Result<ConsulRegistry> {
        let connect_timeout = self.options.connect_timeout;
        let registry = self.assemble()?;
        registry
            .http
            .check_agent(connect_timeout)
            .await
            .map_err(|err| match err {
                Error::Timeout { what, .. } => {
                    Error::unavailable(BACKEND, what, "the agent did not answer in time")
                }
                err => err,
            })?;
        Ok(registry)
    }

    /// The registry these options describe, without any request.
    pub(super) fn assemble(self) -> Result<ConsulRegistry> {
        let base = check_address(&self.address)?;
        let header = self.token.as_ref().map(token_header).transpose()?;
        if self.datacenter.as_deref() == Some("") {
            return Err(invalid("the datacenter name is empty".into()));
        }
        let options = self.options;
        if options.connect_timeout.is_zero() || options.request_timeout.is_zero() {
            return Err(invalid("timeouts must be positive".into()));
        }
        if self.watch_wait < Duration::from_secs(1) || self.watch_wait > MAX_WATCH_WAIT {
            return Err(invalid(format!(
                "watch wait {:?} must be between 1 s and 10 min",
                self.watch_wait
            )));
        }
        let client = match self.client {
            Some(client) => client,
            None => reqwest::Client::builder()
                .connect_timeout(options.connect_timeout)
                .pool_idle_timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(16)
                .build()
                .map_err(|e| Error::registry(BACKEND, "building the HTTP client", e))?,
        };
        let http = Http {
            client,
            base,
            token: self.token.zip(header),
            datacenter: self.datacenter,
            request_timeout: options.request_timeout,
            watch_wait: self.watch_wait,
            stats: Default::default(),
        };
        Ok(ConsulRegistry::from_parts(http, options.timing))
    }
}

fn invalid(msg: String) -> Error {
    Error::InvalidConfig(format!("consul: {msg}"))
}

/// The agent's base URL (`scheme://host:port[/path]`, no trailing slash).
fn check_address(address: &str) -> Result<String> {
    let url = Url::parse(address.trim()).map_err(|e| {
        invalid(format!(
            "address `{address}` is not a URL ({e}); use http://host:port or https://host:port"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "address `{address}` must start with http:// or https://"
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(format!("address `{address}` has no host")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "the address must not carry credentials; use the ACL token (ConsulRegistryBuilder::token) or a client with default headers".into(),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(format!(
            "address `{address}` must not have a query or fragment; use ConsulRegistryBuilder::datacenter for ?dc="
        )));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// The `X-Consul-Token` header for `token`, marked sensitive.
fn token_header(token: &Secret) -> Result<HeaderValue> {
    // Never echo the token in the error.
    let mut value = HeaderValue::from_str(token.expose()).map_err(|_| {
        invalid("the ACL token contains characters that cannot be sent in an HTTP header".into())
    })?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_token() {
        let builder = ConsulRegistry::builder("http://127.0.0.1:8500/").token("s3cr3t-token");
        let registry = builder.clone().assemble().expect("valid");
        let shown = format!("{registry:?} {builder:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
        assert!(shown.contains("http://127.0.0.1:8500"), "{shown}");
    }

    #[test]
    fn addresses_and_options_are_checked() {
        for bad in [
            "127.0.0.1:8500",
            "ftp://x:1",
            "http://u:p@x:1",
            "http://x:1/?dc=a",
            "not a url",
        ] {
            assert!(
                matches!(
                    ConsulRegistry::builder(bad).assemble(),
                    Err(Error::InvalidConfig(_))
                ),
                "{bad}"
            );
        }
        assert!(ConsulRegistry::builder("https://consul.example:8501")
            .assemble()
            .is_ok());
        for bad in [
            ConsulRegistry::builder("http://x:1").token("bad\ntoken"),
            ConsulRegistry::builder("http://x:1").datacenter(""),
            ConsulRegistry::builder("http://x:1").request_timeout(Duration::ZERO),
            ConsulRegistry::builder("http://x:1").watch_wait(Duration::from_secs(3600)),
        ] {
            assert!(
                matches!(bad.clone().assemble(), Err(Error::InvalidConfig(_))),
                "{bad:?}"
            );
        }
    }
}
