//! The watch feed: one blocking query (`?recurse&index=&wait=`) per watched
//! prefix (nodes, tasks, tombstones), successive snapshots diffed into put
//! and delete events, all three served by one task into one
//! [`FeedSender`].
//!
//! After an error (agent down, restarted) a prefix is polled again after a
//! [`Backoff`] pause, without blocking; that read is diffed against the last
//! snapshot and followed by a [`WatchEvent::Resync`]. An index going
//! backwards (data reset) does the same.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use super::http::{describe, Http};
use super::kv::KvEntry;
use super::BACKEND;
use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::registry::codec;
use crate::registry::kit::feed::{self, FeedSender};
use crate::registry::kit::keys::{Kind, Layout};
use crate::registry::{WatchEvent, WatchReceiver};

/// Pauses between polls of a prefix that fails: doubling up to the cap.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A blocking query on an *empty* prefix answers with the index of the
/// whole KV store and wakes on writes next to it (claims included), so each
/// watched prefix is kept non-empty with a folder key (`ns/tasks/`, the way
/// Consul's UI makes folders). If that key cannot be written (ACL), polls
/// that return early with nothing new pause this long instead.
const SPURIOUS_WAKE_PAUSE: Duration = Duration::from_millis(500);
/// Shortest interval between two polls of one prefix.
const MIN_POLL_SPACING: Duration = Duration::from_millis(20);

/// Starts the feed of namespace `ns`. The baselines are read before it
/// returns: every change after that is reported, nothing before it is.
pub(super) async fn start(http: &Arc<Http>, ns: &str) -> Result<WatchReceiver> {
    let layout = Layout::new("", ns)?;
    let mut pollers = Vec::with_capacity(3);
    for kind in [Kind::Node, Kind::Task, Kind::Tombstone] {
        let prefix = layout.prefix(kind);
        if let Err(err) = http.ensure_folder(&prefix).await {
            tracing::debug!(backend = BACKEND, err = %describe(&err), "cannot create a watched folder key; pacing polls instead");
        }
        let what = "watch: initial read";
        let (index, entries) = http.kv_list(&prefix, None, what).await?;
        pollers.push(Poller {
            http: http.clone(),
            kind,
            snapshot: snapshot(kind, &layout, &entries),
            prefix,
            layout: layout.clone(),
            index: index.unwrap_or(1).max(1),
            backoff: Backoff::new(RETRY_FIRST, RETRY_MAX),
            gap: false,
            pause: Duration::ZERO,
        });
    }
    let (sender, rx) = feed::channel(BACKEND, ns);
    tokio::spawn(serve(sender, pollers));
    Ok(rx)
}

/// Runs the pollers until the receiver is gone (their requests in flight
/// are dropped with them).
async fn serve(mut sender: FeedSender, pollers: Vec<Poller>) {
    let mut polls: Vec<_> = pollers.into_iter().map(|p| Box::pin(p.poll())).collect();
    loop {
        tokio::select! {
            (i, (poller, polled)) = first_ready(&mut polls) => {
                for event in polled.events {
                    if !sender.send(event) {
                        return;
                    }
                }
                if polled.resync && !sender.resync() {
                    return;
                }
                polls[i] = Box::pin(poller.poll());
            }
            open = sender.serve() => if !open {
                return;
            },
        }
    }
}

/// The first of `polls` to finish, and its position (the others go on).
async fn first_ready<F: Future>(polls: &mut [Pin<Box<F>>]) -> (usize, F::Output) {
    std::future::poll_fn(|cx| {
        for (i, poll) in polls.iter_mut().enumerate() {
            if let Poll::Ready(out) = poll.as_mut().poll(cx) {
                return Poll::Ready((i, out));
            }
        }
        Poll::Pending
    })
    .await
}

/// What a watch poll last saw of the entries that count (node keys only
/// while a session holds them): name → (ModifyIndex, hash of the value).
/// The hash catches a changed value behind a reused index (a restarted dev
/// agent counts from 1 again).
type Snapshot = HashMap<String, (u64, u64)>;

/// What one poll found.
struct Polled {
    events: Vec<WatchEvent>,
    /// Events may have been missed: the receiver must reload.
    resync: bool,
}

/// The long-poll state of one prefix.
struct Poller {
    http: Arc<Http>,
    kind: Kind,
    layout: Layout,
    prefix: String,
    snapshot: Snapshot,
    index: u64,
    backoff: Backoff,
    /// After an error the next read does not block and ends in a Resync.
    gap: bool,
    /// Wait before the next poll.
    pause: Duration,
}

impl Poller {
    /// Waits its pause, polls once, and answers itself for the next poll.
    async fn poll(mut self) -> (Poller, Polled) {
        if !self.pause.is_zero() {
            tokio::time::sleep(self.pause).await;
        }
        let block = (!self.gap).then_some(self.index);
        let started = Instant::now();
        let fetched = self.http.kv_list(&self.prefix, block, "watch").await;
        // Without X-Consul-Index a blocking query cannot block: treat it as
        // an error (backoff) rather than polling in a tight loop.
        let fetched = fetched.and_then(|(index, entries)| match index {
            Some(index) => Ok((index, entries)),
            None => Err(Error::registry_msg(
                BACKEND,
                "watch: consul answered without X-Consul-Index",
            )),
        });
        let (index, entries) = match fetched {
            Ok(ok) => ok,
            Err(err) => return self.failed(&err),
        };
        let (polled, changed) = self.absorb(index, &entries);
        let unfoldered = !self.keep_folder(&entries).await;
        let elapsed = started.elapsed();
        let early = block.is_some() && elapsed < self.http.watch_wait / 2;
        self.pause = if unfoldered && early && !changed {
            SPURIOUS_WAKE_PAUSE
        } else {
            MIN_POLL_SPACING.saturating_sub(elapsed)
        };
        (self, polled)
    }

    /// A failed poll: pause with backoff, then read without blocking.
    fn failed(mut self, err: &Error) -> (Poller, Polled) {
        self.gap = true;
        self.pause = self.backoff.fail();
        let failures = self.backoff.failures();
        // First failure, then every doubling: bounded log volume.
        if failures.is_power_of_two() {
            tracing::warn!(backend = BACKEND, prefix = %self.prefix, err = %describe(err), failures, pause = ?self.pause, "watch failed; retrying with backoff");
        }
        let polled = Polled {
            events: Vec::new(),
            resync: false,
        };
        (self, polled)
    }

    /// Takes in a successful read at `index`: the events since the last
    /// snapshot, whether a Resync must follow them, and whether anything
    /// changed at all.
    fn absorb(&mut self, index: u64, entries: &[KvEntry]) -> (Polled, bool) {
        if self.backoff.failures() > 0 {
            tracing::info!(backend = BACKEND, prefix = %self.prefix, failures = self.backoff.failures(), "watch reconnected; resyncing");
            self.backoff.reset();
        }
        // An index going backwards means the data was reset (restored
        // snapshot, agent lost its state): start over from this read.
        let reset = index < self.index && !self.gap;
        if reset {
            tracing::info!(backend = BACKEND, prefix = %self.prefix, from = self.index, to = index, "consul index went backwards; resyncing");
        }
        let new = snapshot(self.kind, &self.layout, entries);
        let events = diff(self.kind, &self.layout, &self.snapshot, &new, entries);
        let changed = !events.is_empty() || new != self.snapshot;
        let resync = self.gap || reset;
        self.gap = false;
        self.snapshot = new;
        // Consul: an index of 0 must be treated as 1.
        self.index = index.max(1);
        (Polled { events, resync }, changed)
    }

    /// Keeps the prefix non-empty so that its blocking query wakes only
    /// for its own keys (see [`SPURIOUS_WAKE_PAUSE`]); `false` if the
    /// folder key is missing and cannot be written.
    async fn keep_folder(&self, entries: &[KvEntry]) -> bool {
        if entries.iter().any(|e| e.key == self.prefix) {
            return true;
        }
        match self.http.ensure_folder(&self.prefix).await {
            Ok(()) => true,
            Err(err) => {
                tracing::debug!(backend = BACKEND, prefix = %self.prefix, err = %describe(&err), "cannot create the folder key");
                false
            }
        }
    }
}

fn snapshot(kind: Kind, layout: &Layout, entries: &[KvEntry]) -> Snapshot {
    entries
        .iter()
        .filter(|e| kind != Kind::Node || e.held())
        .filter_map(|e| {
            let name = layout.name_of(kind, &e.key)?.to_string();
            let hash = xxhash_rust::xxh3::xxh3_64(e.value.as_deref().unwrap_or("").as_bytes());
            Some((name, (e.modify_index, hash)))
        })
        .collect()
}

/// Events turning `old` into the state of `entries` (`new` is its snapshot).
fn diff(
    kind: Kind,
    layout: &Layout,
    old: &Snapshot,
    new: &Snapshot,
    entries: &[KvEntry],
) -> Vec<WatchEvent> {
    let mut events = Vec::new();
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        events.push(match kind {
            Kind::Node => WatchEvent::NodeDelete(name.clone()),
            Kind::Task => WatchEvent::TaskDelete(name.clone()),
            Kind::Tombstone | Kind::Claim => WatchEvent::TombstoneDelete(name.clone()),
        });
    }
    for entry in entries {
        let Some(name) = layout.name_of(kind, &entry.key) else {
            continue;
        };
        let Some(&index) = new.get(name) else {
            continue;
        };
        if old.get(name) == Some(&index) {
            continue;
        }
        let event = match kind {
            Kind::Node => {
                codec::decode_node(BACKEND, name, &entry.bytes()).map(WatchEvent::NodePut)
            }
            Kind::Task => {
                codec::decode_task(BACKEND, name, &entry.bytes()).map(WatchEvent::TaskPut)
            }
            // A tombstone counts whatever its value. (Claims are never watched.)
            Kind::Tombstone | Kind::Claim => {
                (!old.contains_key(name)).then(|| WatchEvent::TombstonePut(name.to_string()))
            }
        };
        events.extend(event);
    }
    events
}

#[cfg(test)]
mod tests {
    use super::super::base64;
    use super::*;

    fn entry(key: &str, index: u64, session: Option<&str>, value: &[u8]) -> KvEntry {
        KvEntry {
            key: key.into(),
            value: Some(base64::encode(value)),
            session: session.map(str::to_string),
            modify_index: index,
        }
    }

    #[test]
    fn diff_reports_puts_and_deletes() {
        let l = Layout::new("", "ns").expect("valid");
        let old = snapshot(
            Kind::Tombstone,
            &l,
            &[
                entry("ns/deleted/a", 5, None, b"x"),
                entry("ns/deleted/b", 6, None, b""),
            ],
        );
        let entries = [
            entry("ns/deleted/a", 9, None, b"y"),
            entry("ns/deleted/c", 10, None, b"\x00"),
        ];
        let new = snapshot(Kind::Tombstone, &l, &entries);
        let mut events = diff(Kind::Tombstone, &l, &old, &new, &entries);
        events.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(
            events,
            vec![
                WatchEvent::TombstoneDelete("b".into()),
                WatchEvent::TombstonePut("c".into()),
            ]
        );
        // Node keys count only while a session holds them.
        let raw = br#"{"id":"n","ip":"","hostname":"","last_alive":0,"create_time":0,"status":"working","weight":1}"#;
        let old = snapshot(Kind::Node, &l, &[entry("ns/nodes/n", 3, Some("s"), raw)]);
        let entries = [entry("ns/nodes/n", 4, None, raw)];
        let new = snapshot(Kind::Node, &l, &entries);
        assert_eq!(
            diff(Kind::Node, &l, &old, &new, &entries),
            vec![WatchEvent::NodeDelete("n".into())]
        );
    }
}
