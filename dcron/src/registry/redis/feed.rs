//! The watch feed: one task per watch turning the pub/sub messages of a
//! namespace into [`WatchEvent`]s (fetching the values of puts), sweeping
//! expired nodes, and resubscribing after a lost connection.

use std::time::Duration;

use redis::{Msg, PushInfo, PushKind};
use tokio::time::Instant;

use super::conn::Req;
use super::keys::Keys;
use super::message::{self, Pending};
use super::scripts::SWEEP;
use super::subscription::{self, ping, Subscription};
use super::{RedisRegistry, BACKEND};
use crate::backoff::Backoff;
use crate::registry::codec;
use crate::registry::kit::feed::FeedSender;
use crate::registry::WatchEvent;

/// Messages handled (and values fetched) per batch.
const WATCH_BATCH: usize = 512;
/// Backoff between resubscribe attempts.
const RESUBSCRIBE_FIRST: Duration = Duration::from_millis(100);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);
/// How often the feed pings its connection (detects half-open sockets).
const PING_EVERY: Duration = Duration::from_secs(5);
/// Shortest pause between two sweeps.
const SWEEP_FLOOR: Duration = Duration::from_millis(20);
/// Pause before sweeping again after a failed sweep.
const SWEEP_RETRY: Duration = Duration::from_secs(1);

/// Whether the feed goes on: `false` once the receiver is gone.
type Go = bool;

/// What woke the feed.
enum Step {
    /// The receiver is gone.
    Stop,
    /// The owed Resync went out.
    Served,
    /// Pushes, and whether the connection was lost after them.
    Pushes(Vec<PushInfo>, bool),
    Lost,
    Sweep,
    Ping,
    Resubscribe,
}

pub(super) struct Feed {
    registry: RedisRegistry,
    keys: Keys,
    out: FeedSender,
    /// Longest pause between two sweeps.
    sweep_cap: Duration,
    conn: Option<Subscription>,
    backoff: Backoff,
    resubscribe_at: Instant,
    sweep_at: Instant,
    ping_at: Instant,
}

impl Feed {
    pub(super) fn new(
        registry: RedisRegistry,
        keys: Keys,
        out: FeedSender,
        first: Subscription,
    ) -> Feed {
        let ttl = registry.inner.options.timing.node_ttl;
        let now = Instant::now();
        Feed {
            registry,
            keys,
            out,
            sweep_cap: (ttl / 4).max(Duration::from_millis(100)),
            conn: Some(first),
            backoff: Backoff::new(RESUBSCRIBE_FIRST, RESUBSCRIBE_MAX),
            resubscribe_at: now,
            sweep_at: now,
            ping_at: now + PING_EVERY,
        }
    }

    /// Runs until the receiver is gone.
    pub(super) async fn run(mut self) {
        loop {
            let step = self.next_step().await;
            if !self.take(step).await {
                return;
            }
        }
    }

    async fn next_step(&mut self) -> Step {
        let served = |served: bool| if served { Step::Served } else { Step::Stop };
        match self.conn.as_mut() {
            Some((_, pushes)) => tokio::select! {
                biased;
                s = self.out.serve() => served(s),
                push = pushes.recv() => match push {
                    Some(push) if push.kind != PushKind::Disconnection => {
                        let mut batch = vec![push];
                        let lost = drain(pushes, &mut batch);
                        Step::Pushes(batch, lost)
                    }
                    _ => Step::Lost,
                },
                _ = tokio::time::sleep_until(self.sweep_at) => Step::Sweep,
                _ = tokio::time::sleep_until(self.ping_at) => Step::Ping,
            },
            None => tokio::select! {
                biased;
                s = self.out.serve() => served(s),
                _ = tokio::time::sleep_until(self.resubscribe_at) => Step::Resubscribe,
            },
        }
    }

    async fn take(&mut self, step: Step) -> Go {
        match step {
            Step::Stop => return false,
            Step::Served => {}
            Step::Pushes(batch, lost) => {
                if !self.handle(batch).await {
                    return false;
                }
                if lost {
                    self.lost();
                }
            }
            Step::Lost => self.lost(),
            Step::Sweep => self.sweep_at = Instant::now() + self.sweep().await,
            Step::Ping => {
                self.ping_at = Instant::now() + PING_EVERY;
                let bound = self.registry.inner.options.request_timeout;
                if let Some((con, _)) = self.conn.as_mut() {
                    if let Err(err) = ping(con, bound).await {
                        tracing::warn!(backend = BACKEND, channel = %self.keys.events, %err, "watch connection does not answer; reconnecting");
                        self.reconnect();
                    }
                }
            }
            Step::Resubscribe => return self.resubscribe().await,
        }
        true
    }

    fn lost(&mut self) {
        tracing::warn!(backend = BACKEND, channel = %self.keys.events, "watch connection lost; reconnecting");
        self.reconnect();
    }

    /// Drops the connection and resubscribes at once.
    fn reconnect(&mut self) {
        self.conn = None;
        self.resubscribe_at = Instant::now();
    }

    /// Subscribes again; events may have been missed meanwhile, so the
    /// receiver is told to reload. A failure that retrying cannot cure
    /// ends the feed.
    async fn resubscribe(&mut self) -> Go {
        match subscription::subscribe(&self.registry.inner, &self.keys.events).await {
            Ok(sub) => {
                tracing::info!(backend = BACKEND, channel = %self.keys.events, "watch feed resubscribed; sending Resync");
                self.conn = Some(sub);
                self.backoff.reset();
                self.sweep_at = Instant::now();
                self.ping_at = Instant::now() + PING_EVERY;
                self.out.resync()
            }
            Err(err) if !err.is_retryable() => {
                // Closing the feed tells the node to watch again (with
                // its own backoff), which reports the error.
                tracing::warn!(backend = BACKEND, %err, "watch feed cannot resubscribe; ending it");
                false
            }
            Err(err) => {
                let pause = self.backoff.fail();
                tracing::warn!(backend = BACKEND, %err, retry_in = ?pause, "watch feed cannot resubscribe");
                self.resubscribe_at = Instant::now() + pause;
                true
            }
        }
    }

    /// Turns a batch of pushes into events, fetching the values of puts in
    /// one pipeline.
    async fn handle(&mut self, batch: Vec<PushInfo>) -> Go {
        if self.out.owes_resync() {
            // The receiver lags: these events are covered by the owed
            // Resync, so don't even fetch their values.
            return !self.out.is_closed();
        }
        let pending = self.parse(batch);
        let Some(values) = self.fetch(&pending).await else {
            return self.out.resync();
        };
        let mut values = values.into_iter();
        for p in pending {
            let event = match p {
                Pending::Ready(event) => Some(event),
                Pending::Task(name) => values
                    .next()
                    .flatten()
                    .and_then(|raw| codec::decode_task(BACKEND, &name, &raw))
                    .map(WatchEvent::TaskPut),
                Pending::Node(id) => values
                    .next()
                    .flatten()
                    .and_then(|raw| codec::decode_node(BACKEND, &id, &raw))
                    .map(WatchEvent::NodePut),
            };
            // A value gone by now is followed by its delete message.
            if let Some(event) = event {
                if !self.out.send(event) {
                    return false;
                }
            }
        }
        true
    }

    /// The messages of this feed's channel in `batch`; others are skipped.
    fn parse(&self, batch: Vec<PushInfo>) -> Vec<Pending> {
        let mut pending = Vec::with_capacity(batch.len());
        for push in batch {
            if push.kind != PushKind::Message {
                continue; // subscription confirmations and the like
            }
            let Some(msg) = Msg::from_push_info(push) else {
                continue;
            };
            if msg.get_channel_name() != self.keys.events {
                continue;
            }
            match message::parse(msg.get_payload_bytes()) {
                Some(p) => pending.push(p),
                None => tracing::warn!(
                    backend = BACKEND,
                    channel = %self.keys.events,
                    payload = %String::from_utf8_lossy(msg.get_payload_bytes()),
                    "skipping an unknown message on the events channel"
                ),
            }
        }
        pending
    }

    /// The values of the puts in `pending`, in order (one pipeline), or
    /// `None` when they cannot be read: the caller resyncs instead. A node
    /// put also makes the feed sweep at once: the new node may have a
    /// shorter TTL than any before.
    async fn fetch(&mut self, pending: &[Pending]) -> Option<Vec<Option<Vec<u8>>>> {
        let mut pipe = redis::pipe();
        let mut fetches = 0;
        for p in pending {
            match p {
                Pending::Task(name) => {
                    pipe.cmd("HGET").arg(&self.keys.tasks).arg(name);
                }
                Pending::Node(id) => {
                    pipe.cmd("GET").arg(self.keys.node(id));
                    self.sweep_at = Instant::now();
                }
                Pending::Ready(_) => continue,
            }
            fetches += 1;
        }
        if fetches == 0 {
            return Some(Vec::new());
        }
        let fetched = self
            .registry
            .query::<Vec<Option<Vec<u8>>>>("fetch changed values", true, Req::Pipe(pipe))
            .await;
        match fetched {
            Ok(values) if values.len() == fetches => Some(values),
            Ok(values) => {
                tracing::warn!(
                    backend = BACKEND,
                    got = values.len(),
                    fetches,
                    "pipeline answered a wrong count; resyncing"
                );
                None
            }
            Err(err) => {
                tracing::warn!(backend = BACKEND, %err, "cannot fetch changed values; resyncing");
                None
            }
        }
    }

    /// Reaps expired nodes; returns how long to wait until the next sweep.
    async fn sweep(&self) -> Duration {
        let inv = self.keys.node_script(&SWEEP);
        match self
            .registry
            .query::<i64>("sweep expired nodes", true, Req::Script(inv))
            .await
        {
            Ok(left) if left < 0 => self.sweep_cap,
            Ok(left) => {
                let left = Duration::from_millis(left.unsigned_abs().saturating_add(1));
                left.clamp(SWEEP_FLOOR, self.sweep_cap)
            }
            Err(err) => {
                tracing::debug!(backend = BACKEND, %err, "sweep failed");
                SWEEP_RETRY.min(self.sweep_cap)
            }
        }
    }
}

/// Moves the pushes already waiting into `batch` (up to a batch); `true`
/// if the connection was lost after them.
fn drain(
    pushes: &mut tokio::sync::mpsc::UnboundedReceiver<PushInfo>,
    batch: &mut Vec<PushInfo>,
) -> bool {
    while batch.len() < WATCH_BATCH {
        match pushes.try_recv() {
            Ok(p) if p.kind == PushKind::Disconnection => return true,
            Ok(p) => batch.push(p),
            Err(_) => break,
        }
    }
    false
}
