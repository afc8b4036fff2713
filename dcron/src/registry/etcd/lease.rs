//! Node liveness: one etcd lease per registered node, which the record is
//! attached to (see the module docs of the backend).

use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

use super::{codec, errors, key, EtcdRegistry, BACKEND};
use crate::error::Result;
use crate::node::Node;
use crate::registry::kit::keys::Kind;

impl EtcdRegistry {
    fn lease_of(&self, ns: &str, id: &str) -> Option<i64> {
        self.leases()
            .get(&(ns.to_string(), id.to_string()))
            .copied()
    }

    /// Forgets `lease` of node `id` (unless it was replaced meanwhile).
    fn forget_lease(&self, ns: &str, id: &str, lease: i64) {
        let mut leases = self.leases();
        let k = (ns.to_string(), id.to_string());
        if leases.get(&k) == Some(&lease) {
            leases.remove(&k);
        }
    }

    /// Revokes `lease`, ignoring "not found" (already expired or revoked).
    async fn revoke(&self, lease: i64) -> Result<()> {
        let res = self
            .retrying("revoke a node lease", |h| async move {
                let mut client = h.lease;
                client.revoke(lease).await
            })
            .await;
        match res {
            Err(err) if errors::is_not_found(&err) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Grants a lease of `ttl` and writes the node record with it.
    pub(super) async fn register_node(&self, ns: &str, node: &Node, ttl: Duration) -> Result<()> {
        let key = &key(ns, Kind::Node, &node.id)?;
        let value = &codec::encode(node);
        let ttl = ttl_secs(ttl);
        let granted = self
            .retrying("grant a node lease", |h| async move {
                let mut lease = h.lease;
                lease.grant(ttl, None).await
            })
            .await?;
        let lease = granted.id();
        let put = self
            .retrying("register a node", |h| async move {
                let mut kv = h.kv;
                let options = PutOptions::new().with_lease(lease);
                kv.put(key.as_str(), value.as_slice(), Some(options)).await
            })
            .await;
        if let Err(err) = put {
            let _ = self.revoke(lease).await;
            return Err(err);
        }
        let old = self
            .leases()
            .insert((ns.to_string(), node.id.clone()), lease);
        if let Some(old) = old.filter(|old| *old != lease) {
            // The key now carries the new lease: revoking the old one
            // deletes nothing. If this fails, the old lease expires anyway.
            if let Err(err) = self.revoke(old).await {
                tracing::debug!(backend = BACKEND, %err, "could not revoke a replaced lease");
            }
        }
        Ok(())
    }

    /// One keep-alive of the node's lease, and a check that its record
    /// still carries it; `false` (and the lease forgotten) otherwise.
    pub(super) async fn keep_alive(&self, ns: &str, node_id: &str) -> Result<bool> {
        let key = &key(ns, Kind::Node, node_id)?;
        let Some(lease) = self.lease_of(ns, node_id) else {
            return Ok(false);
        };
        let keep_alive = self.retrying("send a lease keep-alive", |h| async move {
            let mut client = h.lease;
            client.keep_alive(lease).await.map(drop)
        });
        let record = self.retrying("check a node record", |h| async move {
            let mut kv = h.kv;
            kv.get(key.as_str(), Some(GetOptions::new().with_keys_only()))
                .await
        });
        let (alive, record) = tokio::join!(keep_alive, record);
        let alive = match alive {
            Ok(()) => true,
            Err(err) if errors::is_lease_gone_error(&err) => false,
            Err(err) => return Err(err),
        };
        let attached = record?.kvs().first().is_some_and(|kv| kv.lease() == lease);
        if alive && attached {
            return Ok(true);
        }
        self.forget_lease(ns, node_id, lease);
        if alive {
            // The record is gone or carries another lease: ours is useless.
            let _ = self.revoke(lease).await;
        }
        Ok(false)
    }

    /// Rewrites the record, only while the key exists and carries our
    /// lease: a put without the lease would detach it, and a put after
    /// expiry would resurrect the node.
    pub(super) async fn rewrite_node(&self, ns: &str, node: &Node) -> Result<bool> {
        let key = &key(ns, Kind::Node, &node.id)?;
        let Some(lease) = self.lease_of(ns, &node.id) else {
            return Ok(false);
        };
        let value = &codec::encode(node);
        let resp = self
            .retrying("update a node record", |h| async move {
                let txn = Txn::new()
                    .when([Compare::lease(key.as_str(), CompareOp::Equal, lease)])
                    .and_then([TxnOp::put(
                        key.as_str(),
                        value.as_slice(),
                        Some(PutOptions::new().with_lease(lease)),
                    )]);
                let mut kv = h.kv;
                kv.txn(txn).await
            })
            .await?;
        Ok(resp.succeeded())
    }

    /// Revokes the node's lease (deleting its record: one NodeDelete
    /// event), and deletes the key in case it carries a lease this
    /// registry does not know.
    pub(super) async fn unregister_node(&self, ns: &str, node_id: &str) -> Result<()> {
        let key = key(ns, Kind::Node, node_id)?;
        let lease = self.leases().remove(&(ns.to_string(), node_id.to_string()));
        if let Some(lease) = lease {
            self.revoke(lease).await?;
        }
        self.delete(&key, "unregister a node").await
    }
}

/// Whole seconds of `ttl`, rounded up, at least 1 (etcd may raise it to its
/// minimum lease TTL, 2 s with the default election timeout).
fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(ttl_secs(Duration::from_secs(10)), 10);
        assert_eq!(ttl_secs(Duration::from_millis(10_001)), 11);
        assert_eq!(ttl_secs(Duration::ZERO), 1);
    }
}
