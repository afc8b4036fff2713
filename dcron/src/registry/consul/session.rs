//! Consul sessions, which carry a node's liveness: creating, renewing and
//! destroying them, and the table of the sessions this client created.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::http::{parse_json, Http};
use super::kv::is_session_id;
use super::BACKEND;
use crate::error::{Error, Result};
use crate::registry::codec;

/// Consul refuses session TTLs below 10 s.
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(10);
/// Consul refuses session TTLs above 24 h.
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(24 * 3600);

/// The TTL Consul accepts for a requested node TTL: whole seconds, 10 s – 24 h.
pub fn session_ttl(ttl: Duration) -> Duration {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Duration::from_secs(secs).clamp(MIN_SESSION_TTL, MAX_SESSION_TTL)
}

/// Sessions this client created, by (namespace, node id).
#[derive(Debug, Default)]
pub(super) struct Sessions(Mutex<HashMap<(String, String), String>>);

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), String>> {
        // Single inserts/removes only: a poisoned map is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session this client holds node `id` of `ns` with.
    pub(super) fn get(&self, ns: &str, id: &str) -> Option<String> {
        self.lock().get(&(ns.to_string(), id.to_string())).cloned()
    }

    /// Records `session` for the node; answers the one it replaces.
    pub(super) fn insert(&self, ns: &str, id: &str, session: &str) -> Option<String> {
        self.lock()
            .insert((ns.to_string(), id.to_string()), session.to_string())
    }

    /// Forgets the node's session, answering it.
    pub(super) fn remove(&self, ns: &str, id: &str) -> Option<String> {
        self.lock().remove(&(ns.to_string(), id.to_string()))
    }

    /// Forgets the node's session if it is still `session`.
    pub(super) fn forget(&self, ns: &str, id: &str, session: &str) {
        let mut sessions = self.lock();
        let k = (ns.to_string(), id.to_string());
        if sessions.get(&k).is_some_and(|s| s == session) {
            sessions.remove(&k);
        }
    }
}

#[derive(Debug, Deserialize)]
struct SessionCreated {
    #[serde(rename = "ID")]
    id: String,
}

impl Http {
    /// A new session for node `id` of `ns` (`Behavior=delete`, no lock
    /// delay, `ttl` clamped to what Consul accepts).
    pub(super) async fn create_session(&self, ns: &str, id: &str, ttl: Duration) -> Result<String> {
        let body = serde_json::json!({
            "Name": format!("dcron:{ns}:{id}"),
            "TTL": format!("{}s", session_ttl(ttl).as_secs()),
            "Behavior": "delete",
            "LockDelay": "0s",
        });
        let what = "create session";
        let body = Some(codec::encode(&body));
        let reply = self
            .call(Method::PUT, "/v1/session/create", &[], body, what)
            .await?;
        let created: SessionCreated = parse_json(&reply.success(what)?.body, what)?;
        if !is_session_id(&created.id) {
            return Err(Error::registry_msg(
                BACKEND,
                format!("{what}: consul returned a malformed session id"),
            ));
        }
        Ok(created.id)
    }

    /// Restarts the session's TTL; `Ok(false)` if it no longer exists.
    pub(super) async fn renew_session(&self, session: &str) -> Result<bool> {
        let what = "renew session";
        let path = format!("/v1/session/renew/{session}");
        let reply = self.call(Method::PUT, &path, &[], None, what).await?;
        match reply.status {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(reply.unexpected(what)),
        }
    }

    /// Destroys a session; Consul deletes the keys it holds.
    pub(super) async fn destroy_session(&self, session: &str) -> Result<()> {
        let what = "destroy session";
        let path = format!("/v1/session/destroy/{session}");
        let reply = self.call(Method::PUT, &path, &[], None, what).await?;
        if reply.status.is_success() || reply.status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(reply.unexpected(what))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ttl_is_clamped() {
        assert_eq!(session_ttl(Duration::from_millis(600)), MIN_SESSION_TTL);
        assert_eq!(
            session_ttl(Duration::from_millis(12_100)),
            Duration::from_secs(13)
        );
        assert_eq!(session_ttl(Duration::from_secs(100_000)), MAX_SESSION_TTL);
    }
}
