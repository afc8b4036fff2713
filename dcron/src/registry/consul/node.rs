//! Node registrations: a node key acquired by the node's own session, so
//! that Consul deletes it when the session ends or expires.

use std::time::Duration;

use super::http::describe;
use super::kv::KvEntry;
use super::{base64, ConsulRegistry, BACKEND};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::registry::codec;
use crate::registry::kit::keys::{Kind, Layout};

/// Attempts to take the node key over from an older session.
const ACQUIRE_ATTEMPTS: usize = 3;

impl ConsulRegistry {
    /// A new session, holding the node key with `node`'s record; an older
    /// registration of the same id is taken over.
    pub(super) async fn register_node(&self, ns: &str, node: &Node, ttl: Duration) -> Result<()> {
        let key = Layout::new("", ns)?.key(Kind::Node, &node.id)?;
        let session = self.http.create_session(ns, &node.id, ttl).await?;
        let failure = match self.acquire(&key, &session, node).await {
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
            let _ = self.http.destroy_session(&session).await;
            return Err(err);
        }
        let old = self.sessions.insert(ns, &node.id, &session);
        if let Some(old) = old.filter(|o| *o != session) {
            // It holds nothing any more; end it rather than let it linger.
            if let Err(err) = self.http.destroy_session(&old).await {
                tracing::debug!(err = %describe(&err), "could not destroy a replaced session; it will expire");
            }
        }
        Ok(())
    }

    /// Acquires `key` with `session`, ending an older session holding it.
    async fn acquire(&self, key: &str, session: &str, node: &Node) -> Result<bool> {
        let value = codec::encode(node);
        for _ in 0..ACQUIRE_ATTEMPTS {
            let query = [("acquire", session)];
            let what = "acquire node key";
            if self.http.kv_put(key, &query, value.clone(), what).await? {
                return Ok(true);
            }
            // Held by another session: an older registration of this node
            // id (restarted process, or one we lost track of). Registering
            // overwrites it, so end that session.
            if let Some(holder) = self
                .http
                .kv_get(key, "read node")
                .await?
                .and_then(|e| e.holder())
                .filter(|s| s != session)
            {
                tracing::info!(node = %node.id, "taking the registration over from an older session");
                self.http.destroy_session(&holder).await?;
            }
        }
        Ok(false)
    }

    /// Renews the node's session; `Ok(false)` if the session is gone or no
    /// longer holds the node key.
    pub(super) async fn heartbeat_node(&self, ns: &str, node_id: &str) -> Result<bool> {
        // The TTL is fixed when the session is created; renewing restarts it.
        let key = Layout::new("", ns)?.key(Kind::Node, node_id)?;
        let (session, entry) = match self.sessions.get(ns, node_id) {
            Some(session) => {
                let (renewed, entry) = tokio::join!(
                    self.http.renew_session(&session),
                    self.http.kv_get(&key, "read node")
                );
                if !renewed? {
                    self.sessions.forget(ns, node_id, &session);
                    return Ok(false);
                }
                (session, entry?)
            }
            None => {
                let entry = self.http.kv_get(&key, "read node").await?;
                let Some(session) = entry.as_ref().and_then(KvEntry::holder) else {
                    return Ok(false);
                };
                if !self.http.renew_session(&session).await? {
                    return Ok(false);
                }
                (session, entry)
            }
        };
        // The session lives, but the key must still be held by it (someone
        // may have deleted the key or taken it over).
        Ok(entry.is_some_and(|e| e.session.as_deref() == Some(session.as_str())))
    }

    /// Rewrites the record if the node's session still holds its key.
    pub(super) async fn update_node_record(&self, ns: &str, node: &Node) -> Result<bool> {
        let key = Layout::new("", ns)?.key(Kind::Node, &node.id)?;
        let Some(session) = self.session_for(ns, &node.id, &key).await? else {
            return Ok(false);
        };
        // Atomically: only if our session still holds the key (a plain
        // `acquire` would re-create a deleted key), and a set keeps the lock.
        let value = base64::encode(&codec::encode(node));
        let ops = [
            serde_json::json!({"KV": {"Verb": "check-session", "Key": key, "Session": session}}),
            serde_json::json!({"KV": {"Verb": "set", "Key": key, "Value": value}}),
        ];
        self.http.txn(&ops, "update node").await
    }

    /// Ends the node's session and whatever else holds its key.
    pub(super) async fn unregister_node(&self, ns: &str, node_id: &str) -> Result<()> {
        let key = Layout::new("", ns)?.key(Kind::Node, node_id)?;
        if let Some(session) = self.sessions.remove(ns, node_id) {
            self.http.destroy_session(&session).await?;
        }
        // Whatever still holds the key (another client of this node id, or
        // a record written without a session) goes too.
        if let Some(entry) = self.http.kv_get(&key, "read node").await? {
            match entry.holder() {
                Some(holder) => self.http.destroy_session(&holder).await?,
                None => self.http.kv_delete(&key, "delete node").await?,
            }
        }
        Ok(())
    }

    /// Records of the nodes whose key a session holds.
    pub(super) async fn live_nodes(&self, ns: &str) -> Result<Vec<Node>> {
        let layout = Layout::new("", ns)?;
        let prefix = layout.prefix(Kind::Node);
        let (_, entries) = self.http.kv_list(&prefix, None, "list nodes").await?;
        Ok(entries
            .iter()
            .filter(|e| e.held())
            .filter_map(|e| {
                let id = layout.name_of(Kind::Node, &e.key)?;
                codec::decode_node(BACKEND, id, &e.bytes())
            })
            .collect())
    }

    /// The session bound to node `id`: ours if we registered it, else the
    /// one holding the key (another client of the same node).
    async fn session_for(&self, ns: &str, id: &str, key: &str) -> Result<Option<String>> {
        if let Some(s) = self.sessions.get(ns, id) {
            return Ok(Some(s));
        }
        Ok(self
            .http
            .kv_get(key, "read node")
            .await?
            .and_then(|e| e.holder()))
    }
}
