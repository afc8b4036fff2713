//! The Consul backend: KV store, sessions and blocking queries over
//! Consul's HTTP API (`reqwest`, a handful of endpoints written by hand).
//!
//! Key layout for namespace `ns` (`docs/design.md`, section 3):
//!
//! | key | value | written with |
//! |---|---|---|
//! | `ns/nodes/<id>` | [`Node`] JSON | `?acquire=<session>`: the node's session holds it |
//! | `ns/tasks/<name>` | [`TaskMeta`] JSON | `?cas=0` (create only) or a plain PUT |
//! | `ns/deleted/<name>` | `{"deleted":true}` | `?cas=0` (idempotent, one watch event) |
//! | `ns/claims/<name>` | [`Claim`] JSON | `?cas=<ModifyIndex>` (`0` creates) |
//!
//! **Liveness.** Each registration creates a Consul session (`Behavior=delete`,
//! `LockDelay=0s`, TTL = the node TTL clamped to Consul's 10 s – 24 h range)
//! and acquires the node key with it. `heartbeat` renews the session, so the
//! record is never rewritten and watchers are not woken. A crashed node's
//! session expires and Consul deletes its key: Consul may take up to twice
//! the TTL to do so.
//!
//! **Watch.** Three blocking-query loops (`?recurse&index=&wait=`) on
//! `ns/nodes/`, `ns/tasks/` and `ns/deleted/` feed one channel; successive
//! snapshots are diffed into put and delete events. Claims live under
//! `ns/claims/`, which nobody watches, so fires wake no one. After an error
//! (agent down, restarted) a loop retries with capped backoff, diffs a fresh
//! read against its last snapshot and sends [`WatchEvent::Resync`]; an index
//! going backwards (data reset) does the same.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::HeaderValue;
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::codec;
use super::{
    Claim, ClaimOutcome, Registry, Timing, WatchEvent, WatchReceiver, WATCH_CHANNEL_CAPACITY,
};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::task::TaskMeta;

const BACKEND: &str = "consul";

/// Consul refuses session TTLs below 10 s.
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(10);
/// Consul refuses session TTLs above 24 h.
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(24 * 3600);

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_WATCH_WAIT: Duration = Duration::from_secs(30);
const MAX_WATCH_WAIT: Duration = Duration::from_secs(600);

/// Point reads (or claims) of one `claim_many` call in flight at once.
/// Each is a connection: Consul allows 200 per client address by default.
const CLAIM_CONCURRENCY: usize = 8;
/// `claim_many` reads the whole claims folder at once from this many tasks.
const RECURSIVE_READ_FROM: usize = 32;
/// Consul's limit of operations in one transaction.
const TXN_MAX_OPS: usize = 64;
/// Claim transactions of one `claim_many` call in flight at once.
const TXN_CONCURRENCY: usize = 4;
/// Read-compare-CAS rounds before a claim gives up (each lost round means
/// another claimer wrote in between, so this is only reached under a storm).
const CLAIM_ATTEMPTS: usize = 32;
/// Attempts to take the node key over from an older session.
const ACQUIRE_ATTEMPTS: usize = 3;

/// Watch retry backoff after errors: doubles from the base up to the cap.
const WATCH_BACKOFF_BASE: Duration = Duration::from_millis(200);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A blocking query on an *empty* prefix answers with the index of the
/// whole KV store and wakes on writes next to it (claims included), so each
/// watched prefix is kept non-empty with a folder key (`ns/tasks/`, the way
/// Consul's UI makes folders). If that key cannot be written (ACL), polls
/// that return early with nothing new pause this long instead.
const SPURIOUS_WAKE_PAUSE: Duration = Duration::from_millis(500);
/// Shortest interval between two polls of one watch loop.
const MIN_POLL_SPACING: Duration = Duration::from_millis(20);

/// Counters of the HTTP requests a [`ConsulRegistry`] made (all clones and
/// watch loops included), for monitoring and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestStats {
    /// Requests sent.
    pub requests: u64,
    /// Requests that failed in transport (connect, timeout) or with a 5xx.
    pub failures: u64,
}

/// A [`Registry`] on Consul's KV store and sessions.
///
/// Clones share one HTTP client and the table of sessions this client
/// created. Build one with [`ConsulRegistry::new`], [`ConsulRegistry::builder`]
/// (ACL token, datacenter, timeouts) or [`ConsulRegistry::from_client`].
///
/// ```no_run
/// # async fn demo() -> dcron::Result<()> {
/// use dcron::registry::ConsulRegistry;
///
/// let registry = ConsulRegistry::builder("http://127.0.0.1:8500")
///     .token("my-acl-token") // sent as X-Consul-Token, never logged
///     .datacenter("dc1")
///     .build()?;
/// let node = dcron::Dcron::builder(registry).namespace("billing").build()?;
/// node.start().await?;
/// # Ok(())
/// # }
/// ```
///
/// The node TTL is a Consul session TTL, which Consul requires to be at
/// least 10 s: shorter TTLs are raised to 10 s. Consul may take up to twice
/// the TTL to expire the session of a crashed node.
#[derive(Clone)]
pub struct ConsulRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    /// `scheme://host:port[/path]` without a trailing slash.
    base: String,
    token: Option<HeaderValue>,
    datacenter: Option<String>,
    request_timeout: Duration,
    watch_wait: Duration,
    /// Sessions this client created, by (namespace, node id).
    sessions: Mutex<HashMap<(String, String), String>>,
    requests: AtomicU64,
    failures: AtomicU64,
}

/// Options of a [`ConsulRegistry`].
///
/// ```
/// use std::time::Duration;
/// use dcron::registry::ConsulRegistry;
///
/// let registry = ConsulRegistry::builder("http://127.0.0.1:8500")
///     .connect_timeout(Duration::from_secs(2))
///     .request_timeout(Duration::from_secs(5))
///     .watch_wait(Duration::from_secs(60))
///     .build()
///     .expect("valid options");
/// # drop(registry);
/// ```
#[derive(Clone)]
pub struct ConsulBuilder {
    address: String,
    token: Option<String>,
    datacenter: Option<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
    watch_wait: Duration,
    client: Option<reqwest::Client>,
}

impl fmt::Debug for ConsulBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulBuilder")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("watch_wait", &self.watch_wait)
            .field("custom_client", &self.client.is_some())
            .finish()
    }
}

impl fmt::Debug for ConsulRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulRegistry")
            .field("address", &self.inner.base)
            .field("token", &self.inner.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.inner.datacenter)
            .field("request_timeout", &self.inner.request_timeout)
            .field("watch_wait", &self.inner.watch_wait)
            .finish_non_exhaustive()
    }
}

impl ConsulBuilder {
    /// ACL token, sent as the `X-Consul-Token` header (marked sensitive,
    /// redacted from `Debug`, never logged).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Datacenter to use (`?dc=`); default: the agent's own.
    pub fn datacenter(mut self, dc: impl Into<String>) -> Self {
        self.datacenter = Some(dc.into());
        self
    }

    /// Bound on establishing a connection (default 5 s). Ignored with
    /// [`client`](Self::client): configure that client instead.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on each ordinary request (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
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

    /// Checks the options and builds the registry. No request is made.
    pub fn build(self) -> Result<ConsulRegistry> {
        let bad = |msg: String| Error::InvalidConfig(format!("consul: {msg}"));
        let url = Url::parse(self.address.trim()).map_err(|e| {
            bad(format!(
                "address `{}` is not a URL ({e}); use http://host:port or https://host:port",
                self.address
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad(format!(
                "address `{}` must start with http:// or https://",
                self.address
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad(format!("address `{}` has no host", self.address)));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "the address must not carry credentials; use the ACL token (ConsulBuilder::token) or a client with default headers".into(),
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad(format!(
                "address `{}` must not have a query or fragment; use ConsulBuilder::datacenter for ?dc=",
                self.address
            )));
        }
        let base = url.as_str().trim_end_matches('/').to_string();
        let token = match self.token {
            None => None,
            Some(t) if t.is_empty() => None,
            Some(t) => {
                // Never echo the token in the error.
                let mut value = HeaderValue::from_str(&t).map_err(|_| {
                    bad(
                        "the ACL token contains characters that cannot be sent in an HTTP header"
                            .into(),
                    )
                })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        if let Some(dc) = &self.datacenter {
            if dc.is_empty() {
                return Err(bad("the datacenter name is empty".into()));
            }
        }
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(bad("timeouts must be positive".into()));
        }
        if self.watch_wait < Duration::from_secs(1) || self.watch_wait > MAX_WATCH_WAIT {
            return Err(bad(format!(
                "watch wait {:?} must be between 1 s and 10 min",
                self.watch_wait
            )));
        }
        let client = match self.client {
            Some(client) => client,
            None => reqwest::Client::builder()
                .connect_timeout(self.connect_timeout)
                .pool_idle_timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(16)
                .build()
                .map_err(|e| Error::registry(BACKEND, "building the HTTP client", e))?,
        };
        Ok(ConsulRegistry {
            inner: Arc::new(Inner {
                client,
                base,
                token,
                datacenter: self.datacenter,
                request_timeout: self.request_timeout,
                watch_wait: self.watch_wait,
                sessions: Mutex::new(HashMap::new()),
                requests: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        })
    }
}

impl ConsulRegistry {
    /// A registry on the Consul agent at `address` (`http://host:port` or
    /// `https://host:port`) with default options: no ACL token, the agent's
    /// datacenter, 5 s connect timeout, 10 s request timeout.
    ///
    /// `https://` needs a TLS backend in `reqwest`: enable one in your own
    /// `Cargo.toml` (`reqwest = { version = "0.13", features = ["rustls"] }`),
    /// or pass a configured client with [`from_client`](Self::from_client).
    ///
    /// ```no_run
    /// # fn demo() -> dcron::Result<()> {
    /// let registry = dcron::registry::ConsulRegistry::new("http://127.0.0.1:8500")?;
    /// # drop(registry);
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(address: &str) -> Result<Self> {
        Self::builder(address).build()
    }

    /// Options for a registry on the agent at `address`.
    pub fn builder(address: &str) -> ConsulBuilder {
        ConsulBuilder {
            address: address.to_string(),
            token: None,
            datacenter: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            watch_wait: DEFAULT_WATCH_WAIT,
            client: None,
        }
    }

    /// A registry using an existing `reqwest` client (for TLS with your own
    /// CA or client certificates, proxies, ...). Set its connect timeout
    /// yourself; request timeouts are applied per request.
    ///
    /// ```no_run
    /// # fn demo() -> dcron::Result<()> {
    /// let client = reqwest::Client::builder()
    ///     .connect_timeout(std::time::Duration::from_secs(3))
    ///     .build()
    ///     .expect("client");
    /// let registry = dcron::registry::ConsulRegistry::from_client(client, "http://127.0.0.1:8500")?;
    /// # drop(registry);
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_client(client: reqwest::Client, address: &str) -> Result<Self> {
        Self::builder(address).client(client).build()
    }

    /// Requests made so far, and how many failed.
    pub fn request_stats(&self) -> RequestStats {
        RequestStats {
            requests: self.inner.requests.load(Ordering::Relaxed),
            failures: self.inner.failures.load(Ordering::Relaxed),
        }
    }
}

// ----- wire types ------------------------------------------------------------

/// One KV entry as Consul returns it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KvEntry {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    modify_index: u64,
}

impl KvEntry {
    /// The value's bytes (an empty value is `null` on the wire).
    fn bytes(&self) -> Vec<u8> {
        match &self.value {
            None => Vec::new(),
            Some(b64) => base64_decode(b64).unwrap_or_else(|| {
                tracing::warn!(backend = BACKEND, key = %self.key, "value is not valid base64");
                Vec::new()
            }),
        }
    }

    /// The session holding the key. Session ids are UUIDs; anything else
    /// is ignored, so a value from the wire never lands in a request path.
    fn holder(&self) -> Option<String> {
        self.session
            .clone()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    }

    fn held(&self) -> bool {
        self.holder().is_some()
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SessionCreated {
    #[serde(rename = "ID")]
    id: String,
}

/// A finished HTTP exchange.
struct Reply {
    status: StatusCode,
    /// `X-Consul-Index`, when present and numeric.
    index: Option<u64>,
    body: Vec<u8>,
}

impl Reply {
    fn is_true(&self) -> bool {
        std::str::from_utf8(&self.body).is_ok_and(|s| s.trim() == "true")
    }

    fn unexpected(&self, what: &str) -> Error {
        let text = String::from_utf8_lossy(&self.body);
        let text: String = text.trim().chars().take(300).collect();
        Error::registry_msg(
            BACKEND,
            format!("{what}: consul answered {}: {text}", self.status),
        )
    }
}

// ----- keys --------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nodes,
    Tasks,
    Tombstones,
    Claims,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Nodes => "nodes",
            Kind::Tasks => "tasks",
            Kind::Tombstones => "deleted",
            Kind::Claims => "claims",
        }
    }
}

/// Names and namespaces are validated by the callers; this guard keeps a
/// direct caller from addressing another key (`/`, dot segments).
fn check_segment(what: &str, s: &str) -> Result<()> {
    if s.is_empty()
        || s == "."
        || s == ".."
        || s.contains('/')
        || s.contains('?')
        || s.contains('#')
        || s.contains('%')
    {
        return Err(Error::registry_msg(
            BACKEND,
            format!("{what} `{s}` cannot be a Consul key segment"),
        ));
    }
    Ok(())
}

fn prefix(ns: &str, kind: Kind) -> Result<String> {
    check_segment("namespace", ns)?;
    Ok(format!("{ns}/{}/", kind.dir()))
}

fn key(ns: &str, kind: Kind, name: &str) -> Result<String> {
    check_segment("name", name)?;
    Ok(format!("{}{name}", prefix(ns, kind)?))
}

/// The entry's name below `prefix`, if it is a direct child.
fn child_name<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    let name = key.strip_prefix(prefix)?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

// ----- HTTP ----------------------------------------------------------------------

impl Inner {
    fn lock_sessions(&self) -> MutexGuard<'_, HashMap<(String, String), String>> {
        // Single inserts/removes only: a poisoned map is still consistent.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn known_session(&self, ns: &str, id: &str) -> Option<String> {
        self.lock_sessions()
            .get(&(ns.to_string(), id.to_string()))
            .cloned()
    }

    /// Sends one request. `query` pairs with an empty value are sent as
    /// bare flags (`?recurse`).
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Vec<u8>>,
        timeout: Duration,
        what: &str,
    ) -> Result<Reply> {
        let mut url = Url::parse(&format!("{}{path}", self.base))
            .map_err(|e| Error::registry(BACKEND, format!("{what}: bad request URL"), e))?;
        {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in query {
                if v.is_empty() {
                    pairs.append_key_only(k);
                } else {
                    pairs.append_pair(k, v);
                }
            }
            if let Some(dc) = &self.datacenter {
                pairs.append_pair("dc", dc);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        let idempotent = method == Method::GET;
        let mut request = self.client.request(method, url).timeout(timeout);
        if let Some(token) = &self.token {
            request = request.header("X-Consul-Token", token.clone());
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let again = if idempotent {
            request.try_clone()
        } else {
            None
        };
        let mut result = self.exchange(request).await;
        if let (Err(err), Some(again)) = (&result, again) {
            // A pooled connection the agent closed under us (idle timeout,
            // its per-client connection limit): a read is safe to send once
            // more. Timeouts and refused connections are not retried.
            if !err.is_timeout() && !err.is_connect() {
                tracing::debug!(backend = BACKEND, what, %err, "read failed on a reused connection; retrying once");
                self.failures.fetch_add(1, Ordering::Relaxed);
                result = self.exchange(again).await;
            }
        }
        match result {
            Ok(reply) => {
                if reply.status.is_server_error() {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                }
                Ok(reply)
            }
            Err(err) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                if err.is_timeout() {
                    Err(Error::Timeout {
                        what: format!("{what} on the consul registry"),
                        after: timeout,
                    })
                } else {
                    Err(Error::registry(BACKEND, what.to_string(), err))
                }
            }
        }
    }

    /// One HTTP exchange, counted.
    async fn exchange(&self, request: reqwest::RequestBuilder) -> reqwest::Result<Reply> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let response = request.send().await?;
        let status = response.status();
        let index = response
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let body = response.bytes().await?.to_vec();
        Ok(Reply {
            status,
            index,
            body,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Vec<u8>>,
        what: &str,
    ) -> Result<Reply> {
        self.send(method, path, query, body, self.request_timeout, what)
            .await
    }

    /// `GET /v1/kv/<key>`: the entry, or `None` if absent.
    async fn kv_get(&self, key: &str, what: &str) -> Result<Option<KvEntry>> {
        let reply = self
            .call(Method::GET, &format!("/v1/kv/{key}"), &[], None, what)
            .await?;
        match reply.status {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let entries: Vec<KvEntry> = parse_json(&reply.body, what)?;
                Ok(entries.into_iter().find(|e| e.key == key))
            }
            _ => Err(reply.unexpected(what)),
        }
    }

    /// `GET /v1/kv/<prefix>?recurse`, optionally blocking: the entries and
    /// the `X-Consul-Index`.
    async fn kv_list(
        &self,
        prefix: &str,
        block: Option<u64>,
        what: &str,
    ) -> Result<(Option<u64>, Vec<KvEntry>)> {
        let (index, wait);
        let mut query: Vec<(&str, &str)> = vec![("recurse", "")];
        let timeout = match block {
            Some(i) => {
                index = i.to_string();
                wait = format!("{}ms", self.watch_wait.as_millis());
                query.push(("index", &index));
                query.push(("wait", &wait));
                self.watch_wait + self.watch_wait / 16 + self.request_timeout
            }
            None => self.request_timeout,
        };
        let reply = self
            .send(
                Method::GET,
                &format!("/v1/kv/{prefix}"),
                &query,
                None,
                timeout,
                what,
            )
            .await?;
        let entries = match reply.status {
            StatusCode::NOT_FOUND => Vec::new(),
            s if s.is_success() => parse_json(&reply.body, what)?,
            _ => return Err(reply.unexpected(what)),
        };
        Ok((reply.index, entries))
    }

    /// `PUT /v1/kv/<key>` with extra query flags; Consul's `true`/`false`.
    async fn kv_put(
        &self,
        key: &str,
        query: &[(&str, &str)],
        value: Vec<u8>,
        what: &str,
    ) -> Result<bool> {
        let reply = self
            .call(
                Method::PUT,
                &format!("/v1/kv/{key}"),
                query,
                Some(value),
                what,
            )
            .await?;
        if reply.status.is_success() {
            Ok(reply.is_true())
        } else {
            Err(reply.unexpected(what))
        }
    }

    async fn kv_delete(&self, key: &str, what: &str) -> Result<()> {
        let reply = self
            .call(Method::DELETE, &format!("/v1/kv/{key}"), &[], None, what)
            .await?;
        if reply.status.is_success() {
            Ok(())
        } else {
            Err(reply.unexpected(what))
        }
    }

    /// `PUT /v1/txn`: `Ok(true)` if committed, `Ok(false)` if an operation
    /// failed (409, nothing applied).
    async fn txn(&self, ops: serde_json::Value, what: &str) -> Result<bool> {
        let reply = self
            .call(Method::PUT, "/v1/txn", &[], Some(codec::encode(&ops)), what)
            .await?;
        match reply.status {
            s if s.is_success() => Ok(true),
            StatusCode::CONFLICT => Ok(false),
            _ => Err(reply.unexpected(what)),
        }
    }

    /// Creates the folder key `prefix` (empty value) unless it exists.
    async fn ensure_folder(&self, prefix: &str) -> Result<()> {
        self.kv_put(prefix, &[("cas", "0")], Vec::new(), "create folder key")
            .await
            .map(drop)
    }

    async fn create_session(&self, ns: &str, id: &str, ttl: Duration) -> Result<String> {
        let body = serde_json::json!({
            "Name": format!("dcron:{ns}:{id}"),
            "TTL": format!("{}s", session_ttl(ttl).as_secs()),
            "Behavior": "delete",
            "LockDelay": "0s",
        });
        let what = "create session";
        let reply = self
            .call(
                Method::PUT,
                "/v1/session/create",
                &[],
                Some(codec::encode(&body)),
                what,
            )
            .await?;
        if !reply.status.is_success() {
            return Err(reply.unexpected(what));
        }
        let created: SessionCreated = parse_json(&reply.body, what)?;
        if created.id.is_empty()
            || !created
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(Error::registry_msg(
                BACKEND,
                format!("{what}: consul returned a malformed session id"),
            ));
        }
        Ok(created.id)
    }

    /// `Ok(false)` if the session no longer exists.
    async fn renew_session(&self, session: &str) -> Result<bool> {
        let what = "renew session";
        let reply = self
            .call(
                Method::PUT,
                &format!("/v1/session/renew/{session}"),
                &[],
                None,
                what,
            )
            .await?;
        match reply.status {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(reply.unexpected(what)),
        }
    }

    /// Destroys a session; Consul deletes the keys it holds.
    async fn destroy_session(&self, session: &str) -> Result<()> {
        let what = "destroy session";
        let reply = self
            .call(
                Method::PUT,
                &format!("/v1/session/destroy/{session}"),
                &[],
                None,
                what,
            )
            .await?;
        if reply.status.is_success() || reply.status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(reply.unexpected(what))
        }
    }

    /// The session bound to node `id`: ours if we registered it, else the
    /// one holding the key (another client of the same node).
    async fn session_for(&self, ns: &str, id: &str, key: &str) -> Result<Option<String>> {
        if let Some(s) = self.known_session(ns, id) {
            return Ok(Some(s));
        }
        Ok(self
            .kv_get(key, "read node")
            .await?
            .and_then(|e| e.holder()))
    }

    /// One atomic watermark claim: read, decide with [`Claim::against`],
    /// CAS on the read ModifyIndex. A lost CAS means someone wrote in
    /// between, so read and decide again. Finding this very claim stored
    /// (an earlier write whose answer was lost) answers won without writing,
    /// so a caller retrying after an error gets the true answer.
    async fn claim_one(&self, key: &str, task: &str, claim: &Claim, value: &[u8]) -> Result<bool> {
        for _ in 0..CLAIM_ATTEMPTS {
            let entry = self.kv_get(key, "read claim").await?;
            let stored = entry
                .as_ref()
                .and_then(|e| codec::decode_claim(BACKEND, task, &e.bytes()));
            match claim.against(stored.as_ref()) {
                None => return Ok(true),
                Some(false) => return Ok(false),
                Some(true) => {}
            }
            let cas = entry.map_or(0, |e| e.modify_index).to_string();
            if self
                .kv_put(key, &[("cas", &cas)], value.to_vec(), "write claim")
                .await?
            {
                return Ok(true);
            }
        }
        Err(Error::registry_msg(
            BACKEND,
            format!("claim of `{task}`: gave up after {CLAIM_ATTEMPTS} conflicting writes"),
        ))
    }
}

/// Runs `f` on every item, at most `limit` at once, and returns one result
/// per item, in order. After the first error no new item starts (the agent
/// is likely unreachable): the items never started answer an error too.
async fn run_bounded<T, R, F, Fut>(items: Vec<T>, limit: usize, f: F) -> Vec<Result<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<R>> + Send + 'static,
{
    let n = items.len();
    let queue = Arc::new(Mutex::new(
        items.into_iter().enumerate().collect::<Vec<_>>(),
    ));
    let failed = Arc::new(AtomicBool::new(false));
    let f = Arc::new(f);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..limit.clamp(1, n.max(1)) {
        let (queue, failed, f) = (queue.clone(), failed.clone(), f.clone());
        workers.spawn(async move {
            let mut done = Vec::new();
            while !failed.load(Ordering::Relaxed) {
                // Items are taken from the back; order is restored below.
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
                let Some((i, item)) = next else { break };
                let result = f(item).await;
                if result.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                done.push((i, result));
            }
            done
        });
    }
    let mut out: Vec<Option<Result<R>>> = (0..n).map(|_| None).collect();
    let mut worker_error = None;
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(done) => {
                for (i, result) in done {
                    out[i] = Some(result);
                }
            }
            // A panicked worker: what it sent has no answer.
            Err(err) => worker_error = Some(err.to_string()),
        }
    }
    out.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(Error::registry_msg(
                    BACKEND,
                    match &worker_error {
                        Some(e) => format!("a request worker failed: {e}"),
                        None => "request not sent: an earlier request of the batch failed".into(),
                    },
                ))
            })
        })
        .collect()
}

/// An error with its chain of causes, for logs (no secret is ever part of
/// it: the token travels in a header, which errors do not show).
fn describe(err: &Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(body)
        .map_err(|e| Error::registry(BACKEND, format!("{what}: unexpected answer from consul"), e))
}

/// The TTL Consul accepts for a requested node TTL: whole seconds, 10 s – 24 h.
pub fn session_ttl(ttl: Duration) -> Duration {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Duration::from_secs(secs).clamp(MIN_SESSION_TTL, MAX_SESSION_TTL)
}

// ----- the trait -------------------------------------------------------------------

#[async_trait]
impl Registry for ConsulRegistry {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    /// 10 s TTL (Consul's minimum; expiry takes up to 20 s), heartbeat every
    /// 3 s, full reload every 10 s.
    fn timing(&self) -> Timing {
        Timing {
            node_ttl: MIN_SESSION_TTL,
            heartbeat: Duration::from_secs(3),
            reload: Duration::from_secs(10),
        }
    }

    async fn register(&self, ns: &str, node: &Node, ttl: Duration) -> Result<()> {
        let inner = &self.inner;
        let key = key(ns, Kind::Nodes, &node.id)?;
        let session = inner.create_session(ns, &node.id, ttl).await?;
        let value = codec::encode(node);
        let acquired = async {
            for _ in 0..ACQUIRE_ATTEMPTS {
                if inner
                    .kv_put(&key, &[("acquire", &session)], value.clone(), "acquire node key")
                    .await?
                {
                    return Ok(true);
                }
                // Held by another session: an older registration of this
                // node id (restarted process, or one we lost track of).
                // Registering overwrites it, so end that session.
                if let Some(holder) = inner
                    .kv_get(&key, "read node")
                    .await?
                    .and_then(|e| e.holder())
                    .filter(|s| *s != session)
                {
                    tracing::info!(node = %node.id, ns, "taking the registration over from an older session");
                    inner.destroy_session(&holder).await?;
                }
            }
            Ok::<_, Error>(false)
        }
        .await;
        let failure = match acquired {
            Ok(true) => None,
            Ok(false) => Some(Error::registry_msg(
                BACKEND,
                format!(
                    "register `{}`: its key stays held by another session (lock delay?)",
                    node.id
                ),
            )),
            Err(err) => Some(err),
        };
        if let Some(err) = failure {
            // Best effort: an unused session would expire anyway.
            let _ = inner.destroy_session(&session).await;
            return Err(err);
        }
        let old = inner
            .lock_sessions()
            .insert((ns.to_string(), node.id.clone()), session.clone());
        if let Some(old) = old.filter(|o| *o != session) {
            // It holds nothing any more; end it rather than let it linger.
            if let Err(err) = inner.destroy_session(&old).await {
                tracing::debug!(err = %describe(&err), "could not destroy a replaced session; it will expire");
            }
        }
        Ok(())
    }

    async fn heartbeat(&self, ns: &str, node_id: &str, _ttl: Duration) -> Result<bool> {
        // The TTL is fixed when the session is created; renewing restarts it.
        let inner = &self.inner;
        let key = key(ns, Kind::Nodes, node_id)?;
        let (session, entry) = match inner.known_session(ns, node_id) {
            Some(session) => {
                let (renewed, entry) = tokio::join!(
                    inner.renew_session(&session),
                    inner.kv_get(&key, "read node")
                );
                if !renewed? {
                    forget(inner, ns, node_id, &session);
                    return Ok(false);
                }
                (session, entry?)
            }
            None => {
                let entry = inner.kv_get(&key, "read node").await?;
                let Some(session) = entry.as_ref().and_then(KvEntry::holder) else {
                    return Ok(false);
                };
                if !inner.renew_session(&session).await? {
                    return Ok(false);
                }
                (session, entry)
            }
        };
        // The session lives, but the key must still be held by it (someone
        // may have deleted the key or taken it over).
        Ok(entry.is_some_and(|e| e.session.as_deref() == Some(session.as_str())))
    }

    async fn update_node(&self, ns: &str, node: &Node) -> Result<bool> {
        let inner = &self.inner;
        let key = key(ns, Kind::Nodes, &node.id)?;
        let Some(session) = inner.session_for(ns, &node.id, &key).await? else {
            return Ok(false);
        };
        // Atomically: only if our session still holds the key (a plain
        // `acquire` would re-create a deleted key), and a set keeps the lock.
        let ops = serde_json::json!([
            {"KV": {"Verb": "check-session", "Key": key, "Session": session}},
            {"KV": {"Verb": "set", "Key": key, "Value": base64_encode(&codec::encode(node))}},
        ]);
        inner.txn(ops, "update node").await
    }

    async fn unregister(&self, ns: &str, node_id: &str) -> Result<()> {
        let inner = &self.inner;
        let key = key(ns, Kind::Nodes, node_id)?;
        let known = inner
            .lock_sessions()
            .remove(&(ns.to_string(), node_id.to_string()));
        if let Some(session) = known {
            inner.destroy_session(&session).await?;
        }
        // Whatever still holds the key (another client of this node id, or
        // a record written without a session) goes too.
        if let Some(entry) = inner.kv_get(&key, "read node").await? {
            match entry.holder() {
                Some(holder) => inner.destroy_session(&holder).await?,
                None => inner.kv_delete(&key, "delete node").await?,
            }
        }
        Ok(())
    }

    async fn nodes(&self, ns: &str) -> Result<Vec<Node>> {
        let prefix = prefix(ns, Kind::Nodes)?;
        let (_, entries) = self.inner.kv_list(&prefix, None, "list nodes").await?;
        Ok(entries
            .iter()
            .filter(|e| e.held())
            .filter_map(|e| {
                let id = child_name(&prefix, &e.key)?;
                codec::decode_node(BACKEND, id, &e.bytes())
            })
            .collect())
    }

    async fn put_task(&self, ns: &str, meta: &TaskMeta, overwrite: bool) -> Result<()> {
        let key = key(ns, Kind::Tasks, &meta.name)?;
        let query: &[(&str, &str)] = if overwrite { &[] } else { &[("cas", "0")] };
        if self
            .inner
            .kv_put(&key, query, codec::encode(meta), "put task")
            .await?
        {
            Ok(())
        } else if overwrite {
            Err(Error::registry_msg(
                BACKEND,
                format!("put task `{}`: consul refused the write", meta.name),
            ))
        } else {
            Err(Error::TaskExists(meta.name.clone()))
        }
    }

    async fn delete_task(&self, ns: &str, name: &str) -> Result<()> {
        self.inner
            .kv_delete(&key(ns, Kind::Tasks, name)?, "delete task")
            .await
    }

    async fn tasks(&self, ns: &str) -> Result<Vec<TaskMeta>> {
        let prefix = prefix(ns, Kind::Tasks)?;
        let (_, entries) = self.inner.kv_list(&prefix, None, "list tasks").await?;
        Ok(entries
            .iter()
            .filter_map(|e| {
                let name = child_name(&prefix, &e.key)?;
                codec::decode_task(BACKEND, name, &e.bytes())
            })
            .collect())
    }

    async fn put_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        let key = key(ns, Kind::Tombstones, name)?;
        let value = codec::encode(&serde_json::json!({ "deleted": true }));
        // Create-only: an existing tombstone stays untouched (no second
        // watch event); either answer means the tombstone is there.
        self.inner
            .kv_put(&key, &[("cas", "0")], value, "put tombstone")
            .await
            .map(drop)
    }

    async fn delete_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        self.inner
            .kv_delete(&key(ns, Kind::Tombstones, name)?, "delete tombstone")
            .await
    }

    async fn tombstones(&self, ns: &str) -> Result<Vec<String>> {
        let prefix = prefix(ns, Kind::Tombstones)?;
        let what = "list tombstones";
        let reply = self
            .inner
            .call(
                Method::GET,
                &format!("/v1/kv/{prefix}"),
                &[("keys", "")],
                None,
                what,
            )
            .await?;
        let keys: Vec<String> = match reply.status {
            StatusCode::NOT_FOUND => Vec::new(),
            s if s.is_success() => parse_json(&reply.body, what)?,
            _ => return Err(reply.unexpected(what)),
        };
        Ok(keys
            .iter()
            .filter_map(|k| child_name(&prefix, k).map(str::to_string))
            .collect())
    }

    async fn claim(&self, ns: &str, task: &str, claim: &Claim) -> Result<bool> {
        let key = key(ns, Kind::Claims, task)?;
        self.inner
            .claim_one(&key, task, claim, &codec::encode(claim))
            .await
    }

    /// Reads the stored watermarks (one recursive read for a large batch,
    /// else concurrent point reads) and decides each claim with
    /// [`Claim::against`] (this very claim found stored is won, nothing
    /// written). Then writes every claim that can win in `/v1/txn` batches
    /// of CAS operations on the read ModifyIndex (one raft write per batch).
    /// A batch that conflicts (someone wrote in between: Consul then applies
    /// none of it) falls back to per-task read-decide-CAS, so every answer
    /// is exact and each claim atomic. A failed read, batch or fallback
    /// fails only the claims it left unanswered; a retry with the same
    /// token re-reads, so a batch committed with its answer lost answers won.
    async fn claim_many(&self, ns: &str, tasks: &[&str], claim: &Claim) -> Vec<ClaimOutcome> {
        match tasks {
            [] => return Vec::new(),
            [task] => return vec![ClaimOutcome::from_result(self.claim(ns, task, claim).await)],
            _ => {}
        }
        let n = tasks.len();
        let inner = &self.inner;
        let mut out: Vec<Option<ClaimOutcome>> = (0..n).map(|_| None).collect();
        // Keys of the claims still open (an invalid name fails on its own).
        let mut keys: Vec<String> = Vec::with_capacity(n);
        for (i, task) in tasks.iter().enumerate() {
            match key(ns, Kind::Claims, task) {
                Ok(k) => keys.push(k),
                Err(err) => {
                    out[i] = Some(ClaimOutcome::Failed(err));
                    keys.push(String::new());
                }
            }
        }
        let open: Vec<usize> = (0..n).filter(|&i| out[i].is_none()).collect();
        // The stored entry of every open claim, or why it could not be read.
        let stored: Vec<(usize, Result<Option<KvEntry>>)> = if open.len() >= RECURSIVE_READ_FROM {
            let listed = match prefix(ns, Kind::Claims) {
                Ok(prefix) => inner.kv_list(&prefix, None, "read claims").await,
                Err(err) => Err(err),
            };
            match listed {
                Ok((_, entries)) => {
                    let mut by_key: HashMap<String, KvEntry> =
                        entries.into_iter().map(|e| (e.key.clone(), e)).collect();
                    open.iter()
                        .map(|&i| (i, Ok(by_key.remove(&keys[i]))))
                        .collect()
                }
                Err(err) => {
                    let failed = ClaimOutcome::fail_all(open.len(), err);
                    for (&i, outcome) in open.iter().zip(failed) {
                        out[i] = Some(outcome);
                    }
                    Vec::new()
                }
            }
        } else {
            let reader = inner.clone();
            let open_keys: Vec<String> = open.iter().map(|&i| keys[i].clone()).collect();
            let read = run_bounded(open_keys, CLAIM_CONCURRENCY, move |key| {
                let inner = reader.clone();
                async move { inner.kv_get(&key, "read claim").await }
            })
            .await;
            open.iter().copied().zip(read).collect()
        };
        // (position, compare-and-set index) of each claim that can win.
        let mut candidates = Vec::new();
        for (i, entry) in stored {
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) => {
                    out[i] = Some(ClaimOutcome::Failed(err));
                    continue;
                }
            };
            let current = entry
                .as_ref()
                .and_then(|e| codec::decode_claim(BACKEND, tasks[i], &e.bytes()));
            match claim.against(current.as_ref()) {
                None => out[i] = Some(ClaimOutcome::Won),
                Some(false) => out[i] = Some(ClaimOutcome::Lost),
                Some(true) => candidates.push((i, entry.map_or(0, |e| e.modify_index))),
            }
        }
        let value = base64_encode(&codec::encode(claim));
        let batches: Vec<Vec<(usize, u64)>> =
            candidates.chunks(TXN_MAX_OPS).map(<[_]>::to_vec).collect();
        let keys = Arc::new(keys);
        let (writer, batch_keys) = (inner.clone(), keys.clone());
        let committed = run_bounded(batches.clone(), TXN_CONCURRENCY, move |batch| {
            let (inner, keys, value) = (writer.clone(), batch_keys.clone(), value.clone());
            async move {
                let ops: Vec<serde_json::Value> = batch
                    .iter()
                    .map(|&(i, index)| {
                        serde_json::json!({"KV": {"Verb": "cas", "Key": keys[i], "Value": value, "Index": index}})
                    })
                    .collect();
                inner.txn(serde_json::Value::Array(ops), "write claims").await
            }
        })
        .await;
        let mut conflicted = Vec::new();
        for (batch, result) in batches.into_iter().zip(committed) {
            match result {
                Ok(true) => {
                    for (i, _) in batch {
                        out[i] = Some(ClaimOutcome::Won);
                    }
                }
                Ok(false) => conflicted.extend(batch.into_iter().map(|(i, _)| i)),
                Err(err) => {
                    let failed = ClaimOutcome::fail_all(batch.len(), err);
                    for ((i, _), outcome) in batch.into_iter().zip(failed) {
                        out[i] = Some(outcome);
                    }
                }
            }
        }
        if !conflicted.is_empty() {
            let (retry, names) = (
                inner.clone(),
                Arc::new(tasks.iter().map(|t| t.to_string()).collect::<Vec<_>>()),
            );
            let (claim, value) = (Arc::new(claim.clone()), Arc::new(codec::encode(claim)));
            let results = run_bounded(conflicted.clone(), CLAIM_CONCURRENCY, move |i| {
                let (inner, keys, names, claim, value) = (
                    retry.clone(),
                    keys.clone(),
                    names.clone(),
                    claim.clone(),
                    value.clone(),
                );
                async move { inner.claim_one(&keys[i], &names[i], &claim, &value).await }
            })
            .await;
            for (i, result) in conflicted.into_iter().zip(results) {
                out[i] = Some(ClaimOutcome::from_result(result));
            }
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    ClaimOutcome::Failed(Error::registry_msg(BACKEND, "claim left unanswered"))
                })
            })
            .collect()
    }

    async fn claims(&self, ns: &str) -> Result<Vec<(String, Claim)>> {
        let prefix = prefix(ns, Kind::Claims)?;
        let (_, entries) = self.inner.kv_list(&prefix, None, "list claims").await?;
        let mut out: Vec<(String, Claim)> = entries
            .iter()
            .filter_map(|e| {
                let name = child_name(&prefix, &e.key)?;
                let claim = codec::decode_claim(BACKEND, name, &e.bytes())?;
                Some((name.to_string(), claim))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn delete_claim(&self, ns: &str, task: &str) -> Result<()> {
        self.inner
            .kv_delete(&key(ns, Kind::Claims, task)?, "delete claim")
            .await
    }

    async fn clear(&self, ns: &str) -> Result<()> {
        let ops: Vec<serde_json::Value> = [Kind::Tasks, Kind::Tombstones, Kind::Claims]
            .into_iter()
            .map(|kind| {
                Ok(serde_json::json!({"KV": {"Verb": "delete-tree", "Key": prefix(ns, kind)?}}))
            })
            .collect::<Result<_>>()?;
        if self
            .inner
            .txn(serde_json::Value::Array(ops), "clear")
            .await?
        {
            Ok(())
        } else {
            Err(Error::registry_msg(
                BACKEND,
                "clear: consul rejected the transaction",
            ))
        }
    }

    async fn watch(&self, ns: &str) -> Result<WatchReceiver> {
        let inner = &self.inner;
        let kinds = [Kind::Nodes, Kind::Tasks, Kind::Tombstones];
        let prefixes = [
            prefix(ns, kinds[0])?,
            prefix(ns, kinds[1])?,
            prefix(ns, kinds[2])?,
        ];
        // Baselines before returning: every change after `watch` returns is
        // reported, nothing before it is.
        let (f0, f1, f2) = tokio::join!(
            inner.ensure_folder(&prefixes[0]),
            inner.ensure_folder(&prefixes[1]),
            inner.ensure_folder(&prefixes[2]),
        );
        for err in [f0.err(), f1.err(), f2.err()].into_iter().flatten() {
            tracing::debug!(backend = BACKEND, err = %describe(&err), "cannot create a watched folder key; pacing polls instead");
        }
        let what = "watch: initial read";
        let (b0, b1, b2) = tokio::join!(
            inner.kv_list(&prefixes[0], None, what),
            inner.kv_list(&prefixes[1], None, what),
            inner.kv_list(&prefixes[2], None, what),
        );
        let baselines = [b0?, b1?, b2?];
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        for ((kind, prefix), (index, entries)) in kinds.into_iter().zip(prefixes).zip(baselines) {
            let feed = Feed {
                inner: inner.clone(),
                kind,
                snapshot: snapshot(kind, &prefix, &entries),
                prefix,
                index: index.unwrap_or(1).max(1),
                tx: tx.clone(),
            };
            tokio::spawn(feed.run());
        }
        Ok(rx)
    }
}

fn forget(inner: &Inner, ns: &str, id: &str, session: &str) {
    let mut sessions = inner.lock_sessions();
    let k = (ns.to_string(), id.to_string());
    if sessions.get(&k).is_some_and(|s| s == session) {
        sessions.remove(&k);
    }
}

// ----- watch -------------------------------------------------------------------------

/// What a watch loop last saw of the entries that count (node keys only
/// while a session holds them).
/// name → (ModifyIndex, hash of the value). The hash catches a changed
/// value behind a reused index (a restarted dev agent counts from 1 again).
type Snapshot = HashMap<String, (u64, u64)>;

fn snapshot(kind: Kind, prefix: &str, entries: &[KvEntry]) -> Snapshot {
    entries
        .iter()
        .filter(|e| kind != Kind::Nodes || e.held())
        .filter_map(|e| {
            let name = child_name(prefix, &e.key)?.to_string();
            let hash = xxhash_rust::xxh3::xxh3_64(e.value.as_deref().unwrap_or("").as_bytes());
            Some((name, (e.modify_index, hash)))
        })
        .collect()
}

/// Events turning `old` into the state of `entries` (`new` is its snapshot).
fn diff(
    kind: Kind,
    prefix: &str,
    old: &Snapshot,
    new: &Snapshot,
    entries: &[KvEntry],
) -> Vec<WatchEvent> {
    let mut events = Vec::new();
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        events.push(match kind {
            Kind::Nodes => WatchEvent::NodeDelete(name.clone()),
            Kind::Tasks => WatchEvent::TaskDelete(name.clone()),
            Kind::Tombstones | Kind::Claims => WatchEvent::TombstoneDelete(name.clone()),
        });
    }
    for entry in entries {
        let Some(name) = child_name(prefix, &entry.key) else {
            continue;
        };
        let Some(&index) = new.get(name) else {
            continue;
        };
        if old.get(name) == Some(&index) {
            continue;
        }
        let event = match kind {
            Kind::Nodes => {
                codec::decode_node(BACKEND, name, &entry.bytes()).map(WatchEvent::NodePut)
            }
            Kind::Tasks => {
                codec::decode_task(BACKEND, name, &entry.bytes()).map(WatchEvent::TaskPut)
            }
            // A tombstone counts whatever its value. (Claims are never watched.)
            Kind::Tombstones | Kind::Claims => {
                (!old.contains_key(name)).then(|| WatchEvent::TombstonePut(name.to_string()))
            }
        };
        events.extend(event);
    }
    events
}

/// One long-poll loop over one prefix.
struct Feed {
    inner: Arc<Inner>,
    kind: Kind,
    prefix: String,
    snapshot: Snapshot,
    index: u64,
    tx: mpsc::Sender<WatchEvent>,
}

impl Feed {
    async fn run(mut self) {
        let mut failures = 0u32;
        // After an error the next read is non-blocking and ends in a Resync.
        let mut gap = false;
        loop {
            let block = (!gap).then_some(self.index);
            let started = Instant::now();
            let fetched = tokio::select! {
                r = self.inner.kv_list(&self.prefix, block, "watch") => r,
                _ = self.tx.closed() => return,
            };
            // Without X-Consul-Index a blocking query cannot block: treat it
            // as an error (backoff) rather than polling in a tight loop.
            let fetched = fetched.and_then(|(index, entries)| match index {
                Some(index) => Ok((index, entries)),
                None => Err(Error::registry_msg(
                    BACKEND,
                    "watch: consul answered without X-Consul-Index",
                )),
            });
            let (index, entries) = match fetched {
                Ok(ok) => ok,
                Err(err) => {
                    failures = failures.saturating_add(1);
                    gap = true;
                    let pause = backoff(failures);
                    // First failure, then every doubling: bounded log volume.
                    if failures.is_power_of_two() {
                        tracing::warn!(backend = BACKEND, prefix = %self.prefix, err = %describe(&err), failures, ?pause, "watch failed; retrying with backoff");
                    }
                    if !self.pause(pause).await {
                        return;
                    }
                    continue;
                }
            };
            if failures > 0 {
                tracing::info!(backend = BACKEND, prefix = %self.prefix, failures, "watch reconnected; resyncing");
                failures = 0;
            }
            // An index going backwards means the data was reset (restored
            // snapshot, agent lost its state): start over from this read.
            let reset = index < self.index && !gap;
            if reset {
                tracing::info!(backend = BACKEND, prefix = %self.prefix, from = self.index, to = index, "consul index went backwards; resyncing");
            }
            let new = snapshot(self.kind, &self.prefix, &entries);
            let events = diff(self.kind, &self.prefix, &self.snapshot, &new, &entries);
            let changed = !events.is_empty() || new != self.snapshot;
            for event in events {
                if self.tx.send(event).await.is_err() {
                    return;
                }
            }
            if (gap || reset) && self.tx.send(WatchEvent::Resync).await.is_err() {
                return;
            }
            gap = false;
            self.snapshot = new;
            // Consul: an index of 0 must be treated as 1.
            self.index = index.max(1);
            // Keep the prefix non-empty so that its blocking query wakes
            // only for its own keys (see SPURIOUS_WAKE_PAUSE).
            let mut unfoldered = false;
            if !entries.iter().any(|e| e.key == self.prefix) {
                let created = tokio::select! {
                    r = self.inner.ensure_folder(&self.prefix) => r,
                    _ = self.tx.closed() => return,
                };
                if let Err(err) = created {
                    tracing::debug!(backend = BACKEND, prefix = %self.prefix, err = %describe(&err), "cannot create the folder key");
                    unfoldered = true;
                }
            }
            let elapsed = started.elapsed();
            let early = block.is_some() && elapsed < self.inner.watch_wait / 2;
            let pause = if unfoldered && early && !changed {
                SPURIOUS_WAKE_PAUSE
            } else {
                MIN_POLL_SPACING.saturating_sub(elapsed)
            };
            if !pause.is_zero() && !self.pause(pause).await {
                return;
            }
        }
    }

    /// Sleeps unless the receiver goes away; returns whether to go on.
    async fn pause(&self, pause: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(pause) => true,
            _ = self.tx.closed() => false,
        }
    }
}

fn backoff(failures: u32) -> Duration {
    WATCH_BACKOFF_BASE
        .saturating_mul(1 << failures.saturating_sub(1).min(10))
        .min(WATCH_BACKOFF_MAX)
}

// ----- base64 (Consul's KV values) ------------------------------------------------------

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=').as_bytes();
    if text.len() % 4 == 1 {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for data in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            b"\xff\x00\x10",
        ] {
            let enc = base64_encode(data);
            assert_eq!(base64_decode(&enc).as_deref(), Some(data), "{enc}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_decode("e30="), Some(b"{}".to_vec()));
        assert_eq!(base64_decode("a"), None);
        assert_eq!(base64_decode("ab!d"), None);
    }

    #[test]
    fn session_ttl_is_clamped() {
        assert_eq!(session_ttl(Duration::from_millis(600)), MIN_SESSION_TTL);
        assert_eq!(
            session_ttl(Duration::from_millis(12_100)),
            Duration::from_secs(13)
        );
        assert_eq!(session_ttl(Duration::from_secs(100_000)), MAX_SESSION_TTL);
    }

    #[test]
    fn keys_stay_one_segment() {
        assert_eq!(key("ns", Kind::Claims, "a:b@c").unwrap(), "ns/claims/a:b@c");
        for bad in ["", ".", "..", "a/b", "a?b", "a%2f"] {
            assert!(key("ns", Kind::Tasks, bad).is_err(), "{bad}");
            assert!(prefix(bad, Kind::Tasks).is_err(), "{bad}");
        }
        assert_eq!(child_name("ns/tasks/", "ns/tasks/x"), Some("x"));
        assert_eq!(child_name("ns/tasks/", "ns/tasks/x/y"), None);
        assert_eq!(child_name("ns/tasks/", "ns/tasks/"), None);
    }

    #[test]
    fn debug_redacts_the_token() {
        let r = ConsulRegistry::builder("http://127.0.0.1:8500/")
            .token("s3cr3t-token")
            .build()
            .unwrap();
        let shown = format!(
            "{r:?} {:?}",
            ConsulRegistry::builder("http://x:1").token("s3cr3t-token")
        );
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert!(shown.contains("http://127.0.0.1:8500"));
    }

    #[test]
    fn addresses_are_checked() {
        for bad in [
            "127.0.0.1:8500",
            "ftp://x:1",
            "http://u:p@x:1",
            "http://x:1/?dc=a",
            "not a url",
        ] {
            assert!(
                matches!(ConsulRegistry::new(bad), Err(Error::InvalidConfig(_))),
                "{bad}"
            );
        }
        assert!(ConsulRegistry::new("https://consul.example:8501").is_ok());
        assert!(ConsulRegistry::builder("http://x:1")
            .token("bad\ntoken")
            .build()
            .is_err());
    }

    fn entry(key: &str, index: u64, session: Option<&str>, value: &[u8]) -> KvEntry {
        KvEntry {
            key: key.into(),
            value: Some(base64_encode(value)),
            session: session.map(str::to_string),
            modify_index: index,
        }
    }

    #[test]
    fn diff_reports_puts_and_deletes() {
        let p = "ns/deleted/";
        let old = snapshot(
            Kind::Tombstones,
            p,
            &[
                entry("ns/deleted/a", 5, None, b"x"),
                entry("ns/deleted/b", 6, None, b""),
            ],
        );
        let entries = [
            entry("ns/deleted/a", 9, None, b"y"),
            entry("ns/deleted/c", 10, None, b"\x00"),
        ];
        let new = snapshot(Kind::Tombstones, p, &entries);
        let mut events = diff(Kind::Tombstones, p, &old, &new, &entries);
        events.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(
            events,
            vec![
                WatchEvent::TombstoneDelete("b".into()),
                WatchEvent::TombstonePut("c".into()),
            ]
        );
        // Node keys count only while a session holds them.
        let p = "ns/nodes/";
        let raw = br#"{"id":"n","ip":"","hostname":"","last_alive":0,"create_time":0,"status":"working","weight":1}"#;
        let old = snapshot(Kind::Nodes, p, &[entry("ns/nodes/n", 3, Some("s"), raw)]);
        let entries = [entry("ns/nodes/n", 4, None, raw)];
        let new = snapshot(Kind::Nodes, p, &entries);
        assert_eq!(
            diff(Kind::Nodes, p, &old, &new, &entries),
            vec![WatchEvent::NodeDelete("n".into())]
        );
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(backoff(1), WATCH_BACKOFF_BASE);
        assert_eq!(backoff(2), WATCH_BACKOFF_BASE * 2);
        assert_eq!(backoff(40), WATCH_BACKOFF_MAX);
    }
}
