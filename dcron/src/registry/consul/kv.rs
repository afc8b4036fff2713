//! Consul's KV store: its entries, reads (point, recursive, blocking),
//! writes, deletes and transactions (`/v1/txn`).

use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::base64;
use super::http::{parse_json, Http};
use super::BACKEND;
use crate::error::Result;
use crate::registry::codec;

/// One KV entry as Consul returns it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct KvEntry {
    pub(super) key: String,
    #[serde(default)]
    pub(super) value: Option<String>,
    #[serde(default)]
    pub(super) session: Option<String>,
    #[serde(default)]
    pub(super) modify_index: u64,
}

impl KvEntry {
    /// The value's bytes (an empty value is `null` on the wire).
    pub(super) fn bytes(&self) -> Vec<u8> {
        match &self.value {
            None => Vec::new(),
            Some(b64) => base64::decode(b64).unwrap_or_else(|| {
                tracing::warn!(backend = BACKEND, key = %self.key, "value is not valid base64");
                Vec::new()
            }),
        }
    }

    /// The session holding the key. Session ids are UUIDs; anything else
    /// is ignored, so a value from the wire never lands in a request path.
    pub(super) fn holder(&self) -> Option<String> {
        self.session.clone().filter(|s| is_session_id(s))
    }

    /// Whether a session holds the key.
    pub(super) fn held(&self) -> bool {
        self.holder().is_some()
    }
}

/// Whether `s` looks like a session id (letters, digits, dashes).
pub(super) fn is_session_id(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The answer to a transaction.
pub(super) enum TxnAnswer {
    /// Applied; the results of its read and write operations, in order.
    Committed(Vec<TxnResult>),
    /// Rolled back: nothing was applied. The operations that failed (by
    /// position), as far as Consul said.
    RolledBack(Vec<TxnError>),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct TxnResult {
    #[serde(rename = "KV")]
    pub(super) kv: Option<KvEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct TxnError {
    pub(super) op_index: usize,
    pub(super) what: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TxnBody {
    #[serde(default)]
    results: Option<Vec<TxnResult>>,
    #[serde(default)]
    errors: Option<Vec<TxnError>>,
}

impl Http {
    /// `GET /v1/kv/<key>`: the entry, or `None` if absent.
    pub(super) async fn kv_get(&self, key: &str, what: &str) -> Result<Option<KvEntry>> {
        let reply = self
            .call(Method::GET, &format!("/v1/kv/{key}"), &[], None, what)
            .await?;
        let entries: Vec<KvEntry> = reply.json_or_absent(what)?;
        Ok(entries.into_iter().find(|e| e.key == key))
    }

    /// `GET /v1/kv/<prefix>?recurse`, blocking on `index` if given: the
    /// entries and the `X-Consul-Index`.
    pub(super) async fn kv_list(
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
        let path = format!("/v1/kv/{prefix}");
        let reply = self
            .send(Method::GET, &path, &query, None, timeout, what)
            .await?;
        Ok((reply.index, reply.json_or_absent(what)?))
    }

    /// `PUT /v1/kv/<key>` with extra query flags; Consul's `true`/`false`.
    pub(super) async fn kv_put(
        &self,
        key: &str,
        query: &[(&str, &str)],
        value: Vec<u8>,
        what: &str,
    ) -> Result<bool> {
        let path = format!("/v1/kv/{key}");
        let reply = self
            .call(Method::PUT, &path, query, Some(value), what)
            .await?;
        Ok(reply.success(what)?.is_true())
    }

    pub(super) async fn kv_delete(&self, key: &str, what: &str) -> Result<()> {
        let reply = self
            .call(Method::DELETE, &format!("/v1/kv/{key}"), &[], None, what)
            .await?;
        reply.success(what).map(drop)
    }

    /// `PUT /v1/txn` (at most 64 operations): committed with its results,
    /// or rolled back (409) with the failed operations.
    pub(super) async fn txn_ops(&self, ops: &[serde_json::Value], what: &str) -> Result<TxnAnswer> {
        let body = codec::encode(&ops);
        let reply = self
            .call(Method::PUT, "/v1/txn", &[], Some(body), what)
            .await?;
        match reply.status {
            s if s.is_success() => {
                let body: TxnBody = parse_json(&reply.body, what)?;
                Ok(TxnAnswer::Committed(body.results.unwrap_or_default()))
            }
            StatusCode::CONFLICT => {
                let errors = serde_json::from_slice::<TxnBody>(&reply.body)
                    .ok()
                    .and_then(|b| b.errors)
                    .unwrap_or_default();
                Ok(TxnAnswer::RolledBack(errors))
            }
            _ => Err(reply.unexpected(what)),
        }
    }

    /// A transaction of writes only: `Ok(true)` if committed, `Ok(false)`
    /// if an operation failed (nothing applied).
    pub(super) async fn txn(&self, ops: &[serde_json::Value], what: &str) -> Result<bool> {
        Ok(matches!(
            self.txn_ops(ops, what).await?,
            TxnAnswer::Committed(_)
        ))
    }

    /// Creates the folder key `prefix` (empty value) unless it exists.
    pub(super) async fn ensure_folder(&self, prefix: &str) -> Result<()> {
        self.kv_put(prefix, &[("cas", "0")], Vec::new(), "create folder key")
            .await
            .map(drop)
    }
}
