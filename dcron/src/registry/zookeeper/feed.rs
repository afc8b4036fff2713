//! The watch feed: three persistent recursive watches (on `/ns/nodes`,
//! `/ns/tasks` and `/ns/deleted`), their notifications turned into
//! [`WatchEvent`]s with the new values fetched in one pipeline per batch,
//! and the move to a new session once the current one ends.

use std::time::Duration;

use tokio::sync::watch;
use zookeeper_client as zk;
use zookeeper_client::{
    AddWatchMode, Client, EventType, PersistentWatcher, SessionState, WatchedEvent,
};

use super::errors::zk_err;
use super::session::{is_connected, Inner};
use super::{ZookeeperRegistry, BACKEND};
use crate::backoff::Backoff;
use crate::error::Result;
use crate::registry::codec;
use crate::registry::kit::feed::FeedSender;
use crate::registry::kit::keys::{Kind, Layout};
use crate::registry::{WatchEvent, WatchReceiver};

/// Watch events handled per batch (their data fetched in one pipeline).
const WATCH_BATCH: usize = 512;
/// The watched directories, in the order of the feed's watchers.
const WATCHED: [Kind; 3] = [Kind::Node, Kind::Task, Kind::Tombstone];

/// Starts the feed of `layout`'s namespace on `registry`'s session.
pub(super) async fn start(registry: &ZookeeperRegistry, layout: Layout) -> Result<WatchReceiver> {
    let inner = &*registry.inner;
    let epoch = inner.epoch.subscribe();
    let (client, watchers) = watch_on(inner, &layout, "starting a watch").await?;
    let ns = layout.base().trim_start_matches('/').to_string();
    let (tx, rx) = crate::registry::kit::feed::channel(BACKEND, &ns);
    let feed = Feed {
        registry: registry.clone(),
        layout,
        tx,
        epoch,
        gap: false,
    };
    tokio::spawn(feed.run(client, watchers));
    Ok(rx)
}

/// A connected session and the feed's watches on it, within the request
/// timeout.
async fn watch_on(
    inner: &Inner,
    layout: &Layout,
    what: &str,
) -> Result<(Client, Vec<PersistentWatcher>)> {
    let watching = |client: Client| async move {
        let watchers = add_watches(&client, layout).await?;
        Ok((client, watchers))
    };
    inner.call(what, watching).await
}

async fn add_watches(client: &Client, layout: &Layout) -> Result<Vec<PersistentWatcher>> {
    let dirs = WATCHED.map(|kind| layout.dir(kind));
    // Sent together (pipelined), awaited in order.
    let pending: Vec<_> = dirs
        .iter()
        .map(|dir| client.watch(dir, AddWatchMode::PersistentRecursive))
        .collect();
    let mut watchers = Vec::with_capacity(dirs.len());
    for (dir, fut) in dirs.iter().zip(pending) {
        watchers.push(
            fut.await
                .map_err(|e| zk_err(format!("watching {dir}"), e))?,
        );
    }
    Ok(watchers)
}

/// Why [`Feed::pump`] returned.
enum Pumped {
    /// The receiver is gone.
    Closed,
    /// The session ended or was abandoned: watch again on a new one.
    Lost,
}

/// One step of a batch of watch events, in arrival order.
enum Step<F> {
    Emit(WatchEvent),
    Fetch(Kind, String, F),
    Lost,
}

/// The background task behind [`ZookeeperRegistry::watch`].
struct Feed {
    registry: ZookeeperRegistry,
    layout: Layout,
    tx: FeedSender,
    epoch: watch::Receiver<u64>,
    /// The connection dropped: send `Resync` once it is back.
    gap: bool,
}

impl Feed {
    async fn run(mut self, client: Client, watchers: Vec<PersistentWatcher>) {
        let (mut client, mut watchers) = (client, watchers);
        loop {
            match self.pump(&client, &mut watchers).await {
                Pumped::Closed => return,
                Pumped::Lost => {}
            }
            drop(watchers);
            drop(client);
            match self.rewatch().await {
                Some((c, w)) => (client, watchers) = (c, w),
                None => return,
            }
            self.gap = false;
            if !self.tx.resync() {
                return;
            }
        }
    }

    /// Watches again on the registry's current (or a new) session, pausing
    /// with backoff between tries; `None` once the receiver is gone or the
    /// failure cannot pass (the feed then ends, and the node watches again).
    async fn rewatch(&mut self) -> Option<(Client, Vec<PersistentWatcher>)> {
        let inner = &*self.registry.inner;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            if self.tx.is_closed() {
                return None;
            }
            self.epoch.borrow_and_update();
            let err = match watch_on(inner, &self.layout, "re-establishing a watch").await {
                Ok(found) => return Some(found),
                Err(err) => err,
            };
            let ns = self.layout.base();
            if !err.is_retryable() {
                tracing::warn!(backend = BACKEND, ns, %err, "watch lost for good; ending the feed");
                return None;
            }
            let pause = backoff.fail();
            tracing::warn!(backend = BACKEND, ns, %err, ?pause, "watch lost; retrying");
            tokio::select! {
                _ = self.tx.closed() => return None,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    async fn pump(&mut self, client: &Client, watchers: &mut [PersistentWatcher]) -> Pumped {
        let [w_nodes, w_tasks, w_deleted] = watchers else {
            return Pumped::Lost;
        };
        loop {
            let first = tokio::select! {
                biased;
                alive = self.tx.serve() => {
                    if alive {
                        continue;
                    }
                    return Pumped::Closed;
                }
                _ = self.epoch.changed() => return Pumped::Lost,
                ev = w_nodes.changed() => (0, ev),
                ev = w_tasks.changed() => (1, ev),
                ev = w_deleted.changed() => (2, ev),
            };
            let mut batch = vec![first];
            drain_ready(
                &mut [&mut *w_nodes, &mut *w_tasks, &mut *w_deleted],
                &mut batch,
            )
            .await;
            if let Some(done) = self.handle(client, batch).await {
                return done;
            }
        }
    }

    /// Turns a batch of notifications into watch events, fetching the new
    /// values of created and changed znodes in one pipeline. `Some` ends
    /// the pump.
    async fn handle(
        &mut self,
        client: &Client,
        batch: Vec<(usize, WatchedEvent)>,
    ) -> Option<Pumped> {
        let mut steps = Vec::with_capacity(batch.len());
        for (i, event) in batch {
            if let Some(step) = self.step(client, WATCHED[i], event) {
                steps.push(step);
            }
        }
        for step in steps {
            let event = match step {
                Step::Emit(event) => Some(event),
                Step::Lost => return Some(Pumped::Lost),
                Step::Fetch(kind, name, fetch) => {
                    let fetched = fetch.await;
                    if fetched.is_err() && !is_connected(client.state()) {
                        self.gap = true;
                    }
                    decode(kind, &name, fetched)
                }
            };
            if let Some(event) = event {
                if !self.tx.send(event) {
                    return Some(Pumped::Closed);
                }
            }
        }
        None
    }

    /// What one notification of a watcher on `kind`'s directory asks for.
    fn step<'c>(
        &mut self,
        client: &'c Client,
        kind: Kind,
        event: WatchedEvent,
    ) -> Option<Step<impl std::future::Future<Output = FetchResult> + Send + 'c>> {
        if event.event_type == EventType::Session {
            return match event.session_state {
                SessionState::Disconnected => {
                    self.gap = true;
                    None
                }
                // Persistent watches may lose events across a reconnection
                // (ZOOKEEPER-4698).
                SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                    std::mem::take(&mut self.gap).then_some(Step::Emit(WatchEvent::Resync))
                }
                _ => Some(Step::Lost),
            };
        }
        // While a Resync is owed, changes are dropped unread: the receiver
        // reloads everything anyway.
        if self.tx.owes_resync() {
            return None;
        }
        let name = self.layout.name_of(kind, &event.path)?.to_string();
        match (event.event_type, kind) {
            // A tombstone counts whatever its value: no fetch.
            (EventType::NodeCreated, Kind::Tombstone) => {
                Some(Step::Emit(WatchEvent::TombstonePut(name)))
            }
            (EventType::NodeCreated | EventType::NodeDataChanged, Kind::Node | Kind::Task) => {
                Some(Step::Fetch(kind, name, client.get_data(&event.path)))
            }
            (EventType::NodeDeleted, _) => Some(Step::Emit(match kind {
                Kind::Node => WatchEvent::NodeDelete(name),
                Kind::Task => WatchEvent::TaskDelete(name),
                _ => WatchEvent::TombstoneDelete(name),
            })),
            _ => None,
        }
    }
}

type FetchResult = std::result::Result<(Vec<u8>, zk::Stat), zk::Error>;

/// The event for a fetched value; corrupt values are logged and skipped.
fn decode(kind: Kind, name: &str, fetched: FetchResult) -> Option<WatchEvent> {
    match fetched {
        Ok((_, stat)) if kind == Kind::Node && stat.ephemeral_owner == 0 => {
            tracing::warn!(backend = BACKEND, key = %name, "skipping a node record that is not an ephemeral znode");
            None
        }
        Ok((raw, _)) if kind == Kind::Node => {
            codec::decode_node(BACKEND, name, &raw).map(WatchEvent::NodePut)
        }
        Ok((raw, _)) => codec::decode_task(BACKEND, name, &raw).map(WatchEvent::TaskPut),
        // Deleted since: its delete event follows.
        Err(zk::Error::NoNode) => None,
        Err(err) => {
            tracing::warn!(backend = BACKEND, key = %name, %err, "could not fetch a changed value; asking for a reload");
            Some(WatchEvent::Resync)
        }
    }
}

fn is_terminal(event: &WatchedEvent) -> bool {
    event.event_type == EventType::Session && event.session_state.is_terminated()
}

/// Adds to `batch` whatever the watchers have queued already, without
/// waiting. No watcher is polled again once one reported a terminal state.
async fn drain_ready(
    watchers: &mut [&mut PersistentWatcher; 3],
    batch: &mut Vec<(usize, WatchedEvent)>,
) {
    let mut ended = batch.iter().any(|(_, e)| is_terminal(e));
    for (i, w) in watchers.iter_mut().enumerate() {
        while !ended && batch.len() < WATCH_BATCH {
            let queued = tokio::select! {
                biased;
                ev = w.changed() => ev,
                _ = std::future::ready(()) => break,
            };
            ended = is_terminal(&queued);
            batch.push((i, queued));
        }
    }
}
