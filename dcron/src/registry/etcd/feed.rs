//! The watch feed: one range watch over a namespace's tombstones, nodes and
//! tasks, resumed by revision after a disconnect.

use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchResponse};

use super::cluster::Handles;
use super::kv::prefix_end;
use super::{codec, layout, EtcdRegistry, BACKEND};
use crate::backoff::Backoff;
use crate::error::Result;
use crate::registry::kit::feed::{self, FeedSender};
use crate::registry::kit::keys::{check_segment, Kind, Layout};
use crate::registry::{WatchEvent, WatchReceiver};

/// First pause of the feed between reconnects, doubling up to the next.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(5);

impl EtcdRegistry {
    /// Starts a change feed like [`Registry::watch`](super::Registry::watch),
    /// but from the events after `revision` (an etcd store revision). If
    /// that revision was compacted, the feed sends [`WatchEvent::Resync`]
    /// and continues from the current revision.
    pub async fn watch_from(&self, ns: &str, revision: i64) -> Result<WatchReceiver> {
        let layout = layout(ns)?;
        let (tx, rx) = feed::channel(BACKEND, ns);
        let feed = Feed {
            registry: self.clone(),
            // Claims sort before `deleted`: they are outside the range.
            start: layout.prefix(Kind::Tombstone),
            end: prefix_end(&layout.prefix(Kind::Task)),
            layout,
            tx,
            backoff: Backoff::new(FIRST_PAUSE, MAX_PAUSE),
        };
        tokio::spawn(feed.run(revision.max(0) + 1));
        Ok(rx)
    }
}

/// The background task behind a watch.
struct Feed {
    registry: EtcdRegistry,
    layout: Layout,
    start: String,
    end: Vec<u8>,
    tx: FeedSender,
    backoff: Backoff,
}

/// How a watch stream ended.
enum Ended {
    /// The receiver is gone: stop.
    Closed,
    /// Disconnected or cancelled: reconnect from the next revision.
    Broken,
    /// The next revision was compacted: resync and restart from now.
    Compacted,
}

impl Feed {
    async fn run(mut self, mut next: i64) {
        let mut gap = false;
        loop {
            if self.tx.is_closed() {
                return;
            }
            match self.stream(&mut next, &mut gap).await {
                Ended::Closed => return,
                Ended::Broken => gap = true,
                Ended::Compacted => match self.registry.revision().await {
                    // Restart from now; the receiver reloads everything.
                    Ok(revision) => {
                        next = revision + 1;
                        if !self.tx.resync() {
                            return;
                        }
                        gap = false;
                        continue;
                    }
                    Err(err) => {
                        tracing::warn!(backend = BACKEND, ns = %self.layout.base(), %err, "watch: cannot read the current revision");
                    }
                },
            }
            let pause = self.backoff.fail();
            tokio::select! {
                _ = self.tx.closed() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Runs one watch stream from `next` until it ends.
    async fn stream(&mut self, next: &mut i64, gap: &mut bool) -> Ended {
        let options = WatchOptions::new()
            .with_range(self.end.clone())
            .with_start_revision(*next);
        let registry = self.registry.clone();
        let member = registry.current();
        let start = self.start.as_str();
        let mut open_stream = |h: Handles| {
            let options = options.clone();
            async move {
                let mut client = h.client.watch_client();
                client.watch(start, Some(options)).await
            }
        };
        let timeout = registry.options.request_timeout;
        let open = registry.attempt("open a watch stream", timeout, &mut open_stream);
        let opened = tokio::select! {
            _ = self.tx.closed() => return Ended::Closed,
            opened = open => opened,
        };
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(failure) => {
                tracing::warn!(backend = BACKEND, ns = %self.layout.base(), err = %failure.error, "watch: cannot open the stream; retrying");
                return Ended::Broken;
            }
        };
        loop {
            let message = tokio::select! {
                // Delivers an owed Resync, or notices the receiver is gone.
                served = self.tx.serve() => if served { continue } else { return Ended::Closed },
                message = stream.message() => message,
            };
            let resp = match message {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    tracing::warn!(backend = BACKEND, ns = %self.layout.base(), "watch: stream ended; reconnecting");
                    registry.rotate(member);
                    return Ended::Broken;
                }
                Err(err) => {
                    tracing::warn!(backend = BACKEND, ns = %self.layout.base(), %err, "watch: stream failed; reconnecting");
                    registry.rotate(member);
                    return Ended::Broken;
                }
            };
            if resp.compact_revision() > 0 {
                tracing::warn!(backend = BACKEND, ns = %self.layout.base(), from = *next, compacted = resp.compact_revision(), "watch: revision compacted; resyncing");
                return Ended::Compacted;
            }
            if resp.canceled() {
                tracing::warn!(backend = BACKEND, ns = %self.layout.base(), reason = resp.cancel_reason(), "watch: cancelled by the server; reconnecting");
                registry.rotate(member);
                return Ended::Broken;
            }
            if resp.created() {
                self.backoff.reset();
                // Resumed by revision, so nothing should be lost; the
                // receiver reloads anyway, cheaply, after a reconnect.
                if std::mem::take(gap) && !self.tx.resync() {
                    return Ended::Closed;
                }
            }
            if !self.deliver(&resp, next) {
                return Ended::Closed;
            }
        }
    }

    /// Turns the events of `resp` into watch events; false if the receiver
    /// is gone.
    fn deliver(&mut self, resp: &WatchResponse, next: &mut i64) -> bool {
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            *next = (*next).max(kv.mod_revision() + 1);
            if self.tx.owes_resync() {
                // Dropped anyway: the receiver reloads everything.
                continue;
            }
            let Some((kind, name)) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|key| self.layout.parse(key))
            else {
                continue;
            };
            let ev = match (kind, event.event_type() == EventType::Put) {
                (Kind::Node, true) => match codec::decode_node(BACKEND, name, kv.value()) {
                    Some(node) => WatchEvent::NodePut(node),
                    None => continue,
                },
                (Kind::Node, false) => WatchEvent::NodeDelete(name.to_string()),
                (Kind::Task, true) => match codec::decode_task(BACKEND, name, kv.value()) {
                    Some(meta) => WatchEvent::TaskPut(meta),
                    None => continue,
                },
                (Kind::Task, false) => WatchEvent::TaskDelete(name.to_string()),
                (Kind::Tombstone, _) if check_segment("task name", name).is_err() => continue,
                (Kind::Tombstone, true) => WatchEvent::TombstonePut(name.to_string()),
                (Kind::Tombstone, false) => WatchEvent::TombstoneDelete(name.to_string()),
                // Outside the watched range.
                (Kind::Claim, _) => continue,
            };
            if !self.tx.send(ev) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_range_skips_claims_only() {
        let l = layout("ns").expect("valid");
        let (start, end) = (l.prefix(Kind::Tombstone), prefix_end(&l.prefix(Kind::Task)));
        let inside = |k: &str| k.as_bytes() >= start.as_bytes() && k.as_bytes() < end.as_slice();
        assert!(inside("/ns/deleted/a"));
        assert!(inside("/ns/nodes/n1"));
        assert!(inside("/ns/tasks/t"));
        assert!(!inside("/ns/claims/t"));
        assert!(!inside("/ns2/tasks/t"));
        assert!(!inside("/ns-x/nodes/n"));
    }
}
