//! Start, stop, crash (tests) and standing down: the node's registration
//! and its background loops come and go together.

use tokio::sync::watch;

use super::loops;
use super::{Dcron, Inner, Running};
use crate::error::{Error, Result};
use crate::node::NodeStatus;
use crate::registry::{WatchEvent, WatchReceiver};

impl Dcron {
    /// Registers (`starting`), loads the cluster state, starts watching,
    /// turns `working`, and returns. Fires begin right away.
    pub async fn start(&self) -> Result<()> {
        let inner = &self.inner;
        let mut lifecycle = inner.lifecycle.lock().await;
        if lifecycle.is_some() {
            return Err(Error::AlreadyRunning);
        }
        inner.wait_for_free_id().await?;
        let now = inner.clock.now_ms();
        let record = {
            let mut st = inner.lock();
            st.me.status = NodeStatus::Starting;
            // Tells this start's record from any other one of the same id.
            st.me.create_time = unique_create_time(now);
            st.me.last_alive = now;
            st.publish_statics = false;
            st.record()
        };
        inner
            .call(
                "register",
                inner.registry.register(&inner.ns, &record, inner.ttl),
            )
            .await?;
        let watch = match inner.join().await {
            Ok(watch) => watch,
            Err(err) => {
                // Leave nothing half-registered behind.
                let _ = inner.registry.unregister(&inner.ns, &record.id).await;
                inner.lock().me.status = NodeStatus::Starting;
                return Err(err);
            }
        };
        let record = inner.lock().record();
        inner.apply(WatchEvent::NodePut(record.clone()));
        let mut incarnation = uuid::Uuid::new_v4().simple().to_string();
        incarnation.truncate(16);
        inner.engine.resume(&format!("{}/{incarnation}", record.id));
        inner.reconcile().await;

        let (shutdown, stop_rx) = watch::channel(false);
        let loops = loops::spawn(inner, watch, stop_rx);
        *lifecycle = Some(Running { shutdown, loops });
        tracing::info!(node = %self.node_id(), ns = %inner.ns, "node working");
        Ok(())
    }

    /// Publishes `leaving` (others take over at once), stops firing, waits
    /// for running tasks (up to the drain timeout), and unregisters.
    pub async fn stop(&self) -> Result<()> {
        let inner = &self.inner;
        let Some(running) = inner.lifecycle.lock().await.take() else {
            return Err(Error::NotRunning);
        };
        let record = {
            let mut st = inner.lock();
            st.me.status = NodeStatus::Leaving;
            st.record()
        };
        if let Err(err) = inner
            .call(
                "update node",
                inner.registry.update_node(&inner.ns, &record),
            )
            .await
        {
            tracing::warn!(%err, "could not publish `leaving`; others take over after the TTL");
        }
        inner.engine.stop();
        let _ = running.shutdown.send(true);
        if !inner.engine.drain(inner.drain_timeout).await {
            tracing::warn!(
                running = inner.engine.running(),
                "drain timeout: leaving tasks running"
            );
        }
        let unregistered = inner
            .call(
                "unregister",
                inner.registry.unregister(&inner.ns, &record.id),
            )
            .await;
        for handle in running.loops {
            handle.abort();
        }
        inner.engine.reset();
        {
            let mut st = inner.lock();
            st.me.status = NodeStatus::Starting;
            st.view.nodes.remove(&record.id);
            // Not watched any more: re-read before trusting it again.
            st.tombstones_known = false;
        }
        tracing::info!(node = %record.id, "node stopped");
        unregistered
    }

    /// Simulates a crash, for tests of code that uses dcron: stops firing
    /// and every background loop at once, without publishing `leaving` and
    /// without unregistering, so the registration is left to expire (after
    /// the node TTL) and the other nodes take over then, as after
    /// `kill -9`. Runs in flight are not awaited. `dcron/examples/testing.rs`
    /// in the repository shows it in a test.
    pub async fn kill(&self) {
        if let Some(running) = self.inner.lifecycle.lock().await.take() {
            self.inner.engine.stop();
            for handle in running.loops {
                handle.abort();
            }
            self.inner.engine.reset();
        }
    }

    /// Whether the node is started.
    pub async fn is_running(&self) -> bool {
        self.inner.lifecycle.lock().await.is_some()
    }
}

impl Inner {
    /// Another live process holds this node's id: stops firing and every
    /// background loop, as `stop` does, but writes nothing (the record
    /// under the id is the other process's). The node is stopped after
    /// this (`is_running` is false; `start` it again once the id is free).
    pub(super) async fn stand_down(&self) {
        let Some(running) = self.lifecycle.lock().await.take() else {
            return; // `stop` got there first
        };
        self.engine.stop();
        let _ = running.shutdown.send(true);
        if !self.engine.drain(self.drain_timeout).await {
            tracing::warn!(
                running = self.engine.running(),
                "drain timeout: leaving tasks running"
            );
        }
        // Every loop but this one (the caller, which returns right after).
        let me = tokio::task::try_id();
        for handle in running.loops {
            if Some(handle.id()) != me {
                handle.abort();
            }
        }
        self.engine.reset();
        let id = {
            let mut st = self.lock();
            st.me.status = NodeStatus::Starting;
            let id = st.me.id.clone();
            st.view.nodes.remove(&id);
            st.tombstones_known = false;
            id
        };
        tracing::warn!(node = %id, ns = %self.ns, "node stood down: another process holds its id");
    }

    /// After registering: starts the watch, loads the cluster state and
    /// turns `working`.
    async fn join(&self) -> Result<Option<WatchReceiver>> {
        let watch = match self.call("watch", self.registry.watch(&self.ns)).await {
            Ok(rx) => Some(rx),
            Err(err) => {
                tracing::warn!(%err, "watch unavailable at start; relying on reloads until it comes back");
                None
            }
        };
        self.reload_view().await?;
        let record = {
            let mut st = self.lock();
            st.me.status = NodeStatus::Working;
            st.record()
        };
        let updated = self.call("update node", self.registry.update_node(&self.ns, &record));
        if !updated.await? {
            self.call(
                "register",
                self.registry.register(&self.ns, &record, self.ttl),
            )
            .await?;
        }
        Ok(watch)
    }
}

/// `now` (epoch ms), or later if needed to be above every create time
/// handed out before in this process, so no two starts of a node in one
/// process share one (it tells their records apart).
fn unique_create_time(now: i64) -> i64 {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(i64::MIN);
    let prev = LAST
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
            Some(now.max(last.saturating_add(1)))
        })
        .unwrap_or(i64::MIN);
    now.max(prev.saturating_add(1))
}
