//! The sending side of a watch feed, written once for every backend.
//!
//! A backend's feed task turns its protocol's notifications into
//! [`WatchEvent`]s and hands them to a [`FeedSender`]. The sender never
//! blocks the protocol: when the receiver lags and the channel is full, the
//! event is dropped and a [`WatchEvent::Resync`] is owed, delivered as soon
//! as there is room (the receiver then reloads everything, so nothing is
//! lost). While a Resync is owed, further events are dropped unread, and a
//! backend may skip fetching their values.

use tokio::sync::mpsc;

use crate::registry::{WatchEvent, WatchReceiver, WATCH_CHANNEL_CAPACITY};

/// The sending side of a watch feed (see the [module docs](self)).
#[derive(Debug)]
pub(crate) struct FeedSender {
    tx: mpsc::Sender<WatchEvent>,
    owes_resync: bool,
    backend: &'static str,
    ns: String,
}

/// A new feed for namespace `ns` of `backend`, with the standard capacity.
pub(crate) fn channel(backend: &'static str, ns: &str) -> (FeedSender, WatchReceiver) {
    channel_with_capacity(backend, ns, WATCH_CHANNEL_CAPACITY)
}

/// [`channel`] with another capacity (tests of overflow).
pub(crate) fn channel_with_capacity(
    backend: &'static str,
    ns: &str,
    capacity: usize,
) -> (FeedSender, WatchReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let sender = FeedSender {
        tx,
        owes_resync: false,
        backend,
        ns: ns.to_string(),
    };
    (sender, rx)
}

impl FeedSender {
    /// Queues `event`, or drops it and owes a Resync when the channel is
    /// full (or one is owed already). `false` once the receiver is gone:
    /// the feed should end.
    pub(crate) fn send(&mut self, event: WatchEvent) -> bool {
        if self.owes_resync {
            return !self.tx.is_closed();
        }
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    backend = self.backend,
                    ns = %self.ns,
                    "watch channel full; events dropped, Resync will follow"
                );
                self.owes_resync = true;
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Tells the receiver to reload (after a reconnect or a gap), owing it
    /// if the channel is full. `false` once the receiver is gone.
    pub(crate) fn resync(&mut self) -> bool {
        if self.owes_resync {
            return !self.tx.is_closed();
        }
        self.send(WatchEvent::Resync)
    }

    /// Whether a Resync is owed: events are being dropped until it is sent.
    pub(crate) fn owes_resync(&self) -> bool {
        self.owes_resync
    }

    /// Whether the receiver is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves when the receiver is gone.
    pub(crate) async fn closed(&self) {
        self.tx.closed().await
    }

    /// Waits for what the feed owes its receiver: with a Resync owed, until
    /// there is room and it is sent (`true`); otherwise, or if the receiver
    /// goes first, until the receiver is gone (`false`). Meant as one arm of
    /// the feed task's `select!`, beside the protocol's own notifications.
    pub(crate) async fn serve(&mut self) -> bool {
        if !self.owes_resync {
            self.tx.closed().await;
            return false;
        }
        match self.tx.reserve().await {
            Ok(permit) => {
                permit.send(WatchEvent::Resync);
                self.owes_resync = false;
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn del(n: usize) -> WatchEvent {
        WatchEvent::TaskDelete(format!("t{n}"))
    }

    #[tokio::test]
    async fn overflow_owes_one_resync_delivered_when_there_is_room() {
        let (mut feed, mut rx) = channel_with_capacity("test", "ns", 2);
        assert!(feed.send(del(0)) && feed.send(del(1)));
        assert!(!feed.owes_resync());
        // Full: dropped, Resync owed; later events dropped too.
        assert!(feed.send(del(2)) && feed.send(del(3)));
        assert!(feed.owes_resync());
        assert_eq!(rx.recv().await, Some(del(0)));
        assert!(feed.serve().await, "room again: the Resync goes out");
        assert!(!feed.owes_resync());
        assert_eq!(rx.recv().await, Some(del(1)));
        assert_eq!(rx.recv().await, Some(WatchEvent::Resync));
        assert!(feed.send(del(4)));
        assert_eq!(rx.recv().await, Some(del(4)));
    }

    #[tokio::test]
    async fn a_dropped_receiver_ends_the_feed() {
        let (mut feed, rx) = channel_with_capacity("test", "ns", 1);
        drop(rx);
        assert!(!feed.send(del(0)));
        assert!(!feed.resync());
        assert!(feed.is_closed());
        assert!(!feed.serve().await);
    }

    #[tokio::test]
    async fn serve_with_nothing_owed_waits_for_the_receiver_to_go() {
        let (mut feed, rx) = channel_with_capacity("test", "ns", 1);
        let serving = tokio::spawn(async move { feed.serve().await });
        drop(rx);
        assert!(!serving.await.expect("join"));
    }
}
