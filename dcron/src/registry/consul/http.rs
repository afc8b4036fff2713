//! The HTTP side: one `reqwest` client, the token and datacenter sent with
//! every request, request counters, the one resend of a read whose pooled
//! connection was lost, and the conversion of failures into typed errors
//! (connect, timeout, reset, 5xx and 429: unavailable; 401 and 403, which is
//! how Consul's ACLs refuse: rejected; anything else: other).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::header::HeaderValue;
use reqwest::{Method, StatusCode, Url};

use super::BACKEND;
use crate::error::{Error, RegistryErrorKind, Result};
use crate::registry::kit::options::Secret;

/// Counters of the HTTP requests a [`ConsulRegistry`](super::ConsulRegistry)
/// made (all clones and watch feeds included), for monitoring and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestStats {
    /// Requests sent.
    pub requests: u64,
    /// Requests that failed in transport (connect, timeout) or with a 5xx.
    pub failures: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    requests: AtomicU64,
    failures: AtomicU64,
}

/// The agent, as every request reaches it.
pub(super) struct Http {
    pub(super) client: reqwest::Client,
    /// `scheme://host:port[/path]` without a trailing slash.
    pub(super) base: String,
    /// The ACL token, and the sensitive header that carries it.
    pub(super) token: Option<(Secret, HeaderValue)>,
    pub(super) datacenter: Option<String>,
    pub(super) request_timeout: Duration,
    pub(super) watch_wait: Duration,
    pub(super) stats: Counters,
}

impl fmt::Debug for Http {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulRegistry")
            .field("address", &self.base)
            .field("token", &self.token.as_ref().map(|(secret, _)| secret))
            .field("datacenter", &self.datacenter)
            .field("request_timeout", &self.request_timeout)
            .field("watch_wait", &self.watch_wait)
            .finish_non_exhaustive()
    }
}

/// A finished HTTP exchange.
pub(super) struct Reply {
    pub(super) status: StatusCode,
    /// `X-Consul-Index`, when present and numeric.
    pub(super) index: Option<u64>,
    pub(super) body: Vec<u8>,
}

impl Reply {
    /// Consul's plain `true` answer (KV writes).
    pub(super) fn is_true(&self) -> bool {
        std::str::from_utf8(&self.body).is_ok_and(|s| s.trim() == "true")
    }

    /// Itself if successful, else the error its status is.
    pub(super) fn success(self, what: &str) -> Result<Reply> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(self.unexpected(what))
        }
    }

    /// The JSON answer of a read; the empty value for 404 (absent).
    pub(super) fn json_or_absent<T: serde::de::DeserializeOwned + Default>(
        &self,
        what: &str,
    ) -> Result<T> {
        match self.status {
            StatusCode::NOT_FOUND => Ok(T::default()),
            s if s.is_success() => parse_json(&self.body, what),
            _ => Err(self.unexpected(what)),
        }
    }

    /// The error for a status `what` did not expect, classified by status.
    pub(super) fn unexpected(&self, what: &str) -> Error {
        let text = String::from_utf8_lossy(&self.body);
        let text: String = text.trim().chars().take(300).collect();
        Error::registry_msg(
            BACKEND,
            format!("{what}: consul answered {}: {text}", self.status),
        )
        .with_kind(status_kind(self.status))
    }
}

/// The kind of error an HTTP status is.
pub(super) fn status_kind(status: StatusCode) -> RegistryErrorKind {
    match status {
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
            RegistryErrorKind::Unavailable
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryErrorKind::Rejected,
        _ => RegistryErrorKind::Other,
    }
}

impl Http {
    /// Requests made so far, and how many failed.
    pub(super) fn request_stats(&self) -> RequestStats {
        RequestStats {
            requests: self.stats.requests.load(Ordering::Relaxed),
            failures: self.stats.failures.load(Ordering::Relaxed),
        }
    }

    /// Checks that the agent answers within `timeout`.
    pub(super) async fn check_agent(&self, timeout: Duration) -> Result<()> {
        let what = format!("connect to the agent at {}", self.base);
        let path = "/v1/status/leader";
        let reply = self.send(Method::GET, path, &[], None, timeout, &what);
        reply.await?.success(&what).map(drop)
    }

    /// [`send`](Self::send) bounded by the request timeout.
    pub(super) async fn call(
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

    /// Sends one request. `query` pairs with an empty value are sent as
    /// bare flags (`?recurse`).
    pub(super) async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Vec<u8>>,
        timeout: Duration,
        what: &str,
    ) -> Result<Reply> {
        let url = self.url(path, query, what)?;
        let idempotent = method == Method::GET;
        let mut request = self.client.request(method, url).timeout(timeout);
        if let Some((_, header)) = &self.token {
            request = request.header("X-Consul-Token", header.clone());
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let again = if idempotent {
            request.try_clone()
        } else {
            None
        };
        let mut result = self.exchange(request, timeout, what).await;
        if let (Err((err, lost_connection)), Some(again)) = (&result, again) {
            // A pooled connection the agent closed under us (idle timeout,
            // its per-client connection limit): a read is safe to send once
            // more. A refused connection or a timeout is the agent itself.
            if *lost_connection && err.is_retryable() {
                tracing::debug!(backend = BACKEND, what, %err, "read failed on a reused connection; retrying once");
                result = self.exchange(again, timeout, what).await;
            }
        }
        result.map_err(|(err, _)| err)
    }

    fn url(&self, path: &str, query: &[(&str, &str)], what: &str) -> Result<Url> {
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
        Ok(url)
    }

    /// One HTTP exchange, counted. A failure comes with whether it may be a
    /// lost pooled connection (neither a timeout nor a refused connect).
    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
        what: &str,
    ) -> std::result::Result<Reply, (Error, bool)> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let fail = |err: reqwest::Error| {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            let lost_connection = !err.is_timeout() && !err.is_connect();
            (transport_error(err, timeout, what), lost_connection)
        };
        let response = request.send().await.map_err(fail)?;
        let status = response.status();
        let index = response
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let body = response.bytes().await.map_err(fail)?.to_vec();
        if status.is_server_error() {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Reply {
            status,
            index,
            body,
        })
    }
}

/// A transport failure as a typed error: a timeout is [`Error::Timeout`];
/// a refused, reset or broken connection is unavailable.
fn transport_error(err: reqwest::Error, timeout: Duration, what: &str) -> Error {
    if err.is_timeout() {
        Error::Timeout {
            what: format!("{what} on the consul registry"),
            after: timeout,
        }
    } else if err.is_connect() || err.is_request() || err.is_body() {
        Error::unavailable(BACKEND, what.to_string(), err)
    } else {
        Error::registry(BACKEND, what.to_string(), err)
    }
}

/// Decodes a JSON answer of the agent.
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(body)
        .map_err(|e| Error::registry(BACKEND, format!("{what}: unexpected answer from consul"), e))
}

/// An error with its chain of causes, for logs (no secret is ever part of
/// it: the token travels in a header, which errors do not show).
pub(super) fn describe(err: &Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        for (status, kind) in [
            (500, RegistryErrorKind::Unavailable),
            (503, RegistryErrorKind::Unavailable),
            (429, RegistryErrorKind::Unavailable),
            (401, RegistryErrorKind::Rejected),
            (403, RegistryErrorKind::Rejected),
            (400, RegistryErrorKind::Other),
            (404, RegistryErrorKind::Other),
        ] {
            let status = StatusCode::from_u16(status).expect("status");
            assert_eq!(status_kind(status), kind, "{status}");
            let reply = Reply {
                status,
                index: None,
                body: b"nope".to_vec(),
            };
            let err = reply.unexpected("probe");
            assert_eq!(err.registry_kind(), Some(kind));
            assert_eq!(err.is_retryable(), kind == RegistryErrorKind::Unavailable);
        }
    }
}
