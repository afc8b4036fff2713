//! This node's claim to its id: a start waits for a stale registration of
//! the id to expire; each heartbeat checks that the record under the id is
//! this start's, repairs or re-registers it, or stands down for an older
//! live process holding the id.

use std::time::Duration;

use super::Inner;
use crate::error::{Error, Result};
use crate::node::{Node, NodeStatus};
use crate::registry::WatchEvent;

/// What a heartbeat found.
pub(super) enum Beat {
    /// The registration is this node's (possibly just repaired).
    Alive,
    /// An older live process holds the node id: this one must yield.
    StandDown,
}

/// How many TTLs `start` waits for another registration of its node id to
/// expire (registries may take longer than one TTL: Consul up to two,
/// etcd rounds up to whole seconds, ZooKeeper uses its session timeout).
const STALE_WAIT_TTLS: u32 = 2;
/// A move of a record's `last_alive` by this much (ms) shows its node alive.
const LIFE_SIGN_MS: i64 = 200;

impl Inner {
    /// Before registering: returns once no other live record holds this
    /// node's id, or fails with [`Error::NodeIdInUse`].
    ///
    /// A record of the id that shows signs of life (it changes, or its
    /// `last_alive` moves) fails the start at once, unless it is `leaving`
    /// (that node is stopping: its record goes soon). One that stays still
    /// may be the registration of a crashed earlier run of this node,
    /// which the registry drops within its TTL: the start waits up to
    /// [`STALE_WAIT_TTLS`] TTLs for it to go, then fails. The
    /// registration of this very handle before a crash (`kill`) is
    /// replaced without waiting.
    pub(super) async fn wait_for_free_id(&self) -> Result<()> {
        let (id, before) = {
            let st = self.lock();
            let before = (st.me.create_time != 0).then(|| st.me.clone());
            (st.me.id.clone(), before)
        };
        let wait = self.ttl.saturating_mul(STALE_WAIT_TTLS);
        let poll = (self.ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let deadline = tokio::time::Instant::now() + wait;
        let mut first: Option<Node> = None;
        loop {
            let nodes = self
                .call("list nodes", self.registry.nodes(&self.ns))
                .await?;
            let Some(other) = nodes.into_iter().find(|n| n.id == id) else {
                if first.is_some() {
                    tracing::info!(node = %id, ns = %self.ns, "the other registration of this node id is gone; starting");
                }
                return Ok(());
            };
            if before.as_ref().is_some_and(|b| b.same_incarnation(&other)) {
                tracing::info!(node = %id, ns = %self.ns, "replacing this node's own registration left by a crash");
                return Ok(());
            }
            match &first {
                None => {
                    tracing::warn!(
                        node = %id,
                        ns = %self.ns,
                        host = %other.hostname,
                        ip = %other.ip,
                        created = other.create_time,
                        status = %other.status,
                        "node id is registered by another process; waiting up to {wait:?} for it to \
                         expire (a crashed earlier run of this node?)"
                    );
                    first = Some(other);
                }
                Some(seen) => {
                    // A node that is stopping (`leaving`) is on its way out:
                    // wait for it rather than fail.
                    let alive = other.status != NodeStatus::Leaving
                        && (!seen.same_record(&other)
                            || other.last_alive - seen.last_alive >= LIFE_SIGN_MS);
                    if alive {
                        return Err(Error::NodeIdInUse(id));
                    }
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::NodeIdInUse(id));
            }
            tokio::time::sleep(poll.min(deadline - now)).await;
        }
    }

    /// One heartbeat: extends the registration, then checks that the
    /// record under this node's id is its own (it decodes and carries this
    /// start's incarnation), repairing or re-registering it if need be.
    /// `reported` is whether the current trouble with the record was
    /// logged already (logged once, until the record is ours again).
    pub(super) async fn beat(&self, reported: &mut bool) -> Result<Beat> {
        let id = self.lock().me.id.clone();
        // The trait has no single-record read: one listing per heartbeat,
        // concurrent with the heartbeat itself.
        let (alive, listed) = tokio::join!(
            self.call(
                "heartbeat",
                self.registry.heartbeat(&self.ns, &id, self.ttl),
            ),
            self.call("list nodes", self.registry.nodes(&self.ns)),
        );
        let alive = alive?;
        let stored = listed?.into_iter().find(|n| n.id == id);
        let me = self.lock().me.clone();
        match stored {
            Some(own) if own.same_incarnation(&me) => {
                if std::mem::take(reported) {
                    tracing::info!(node = %id, "own node record is readable again");
                }
                if !alive {
                    self.registration_lost(&id).await?;
                }
                Ok(Beat::Alive)
            }
            Some(other) if other.is_older_than(&me) => {
                tracing::error!(
                    node = %id,
                    ns = %self.ns,
                    host = %other.hostname,
                    ip = %other.ip,
                    created = other.create_time,
                    "node id is in use by another live process that registered it first; this \
                     process stands down: it stops running tasks and leaves the registration to \
                     the other one. Give each process its own node id"
                );
                Ok(Beat::StandDown)
            }
            Some(other) => {
                if !std::mem::replace(reported, true) {
                    tracing::error!(
                        node = %id,
                        ns = %self.ns,
                        host = %other.hostname,
                        ip = %other.ip,
                        created = other.create_time,
                        "node id was registered over this node by a newer process; taking it \
                         back (the newer one stands down). Give each process its own node id"
                    );
                }
                self.reregister().await?;
                Ok(Beat::Alive)
            }
            None if !alive => {
                self.registration_lost(&id).await?;
                Ok(Beat::Alive)
            }
            None => {
                // Registered, but the record does not decode (or is gone).
                if !std::mem::replace(reported, true) {
                    tracing::error!(node = %id, ns = %self.ns, "own node record unreadable/missing; rewriting it");
                }
                self.rewrite_record().await?;
                Ok(Beat::Alive)
            }
        }
    }

    /// The registry dropped this node's registration: registers again.
    async fn registration_lost(&self, id: &str) -> Result<()> {
        tracing::warn!(node = %id, "registration lost (expired or evicted); re-registering");
        self.reregister().await
    }

    /// Rewrites this node's record, keeping its liveness binding if the
    /// registry still has one (registers again otherwise).
    async fn rewrite_record(&self) -> Result<()> {
        let record = {
            let mut st = self.lock();
            st.publish_statics = false;
            st.record()
        };
        let written = async {
            let updated = self
                .call("update node", self.registry.update_node(&self.ns, &record))
                .await?;
            if !updated {
                self.call(
                    "register",
                    self.registry.register(&self.ns, &record, self.ttl),
                )
                .await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(err) = written {
            self.lock().publish_statics = true;
            return Err(err);
        }
        self.apply(WatchEvent::NodePut(record));
        Ok(())
    }

    /// Re-registers after the registry lost this node.
    async fn reregister(&self) -> Result<()> {
        let record = {
            let mut st = self.lock();
            st.publish_statics = false;
            st.record()
        };
        self.call(
            "register",
            self.registry.register(&self.ns, &record, self.ttl),
        )
        .await?;
        self.apply(WatchEvent::NodePut(record));
        self.reload_view().await
    }
}
