//! The node's background loops: heartbeat, watch, periodic reload and the
//! ownership reconcile; each pauses with backoff while its registry calls
//! fail, and ends when the node stops.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::identity::Beat;
use super::Inner;
use crate::backoff::Backoff;
use crate::registry::{WatchEvent, WatchReceiver};

/// Longest pause between retries of a failing background operation.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A loop's pause grows to at most this many times its base.
const MAX_DOUBLINGS: u32 = 64;
/// Pause before re-watching after the feed ended (doubles while it fails).
const REWATCH_PAUSE: Duration = Duration::from_millis(200);
/// Base pause of a failing reload.
const RELOAD_RETRY_BASE: Duration = Duration::from_millis(500);

/// Starts the engine and every loop of a started node.
pub(super) fn spawn(
    inner: &Arc<Inner>,
    watch: Option<WatchReceiver>,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(inner.engine.clone().run()),
        tokio::spawn(heartbeat_loop(inner.clone(), stop.clone())),
        tokio::spawn(watch_loop(inner.clone(), watch, stop.clone())),
        tokio::spawn(reload_loop(inner.clone(), stop.clone())),
        tokio::spawn(reconcile_loop(inner.clone(), stop)),
    ]
}

/// Pauses of a loop whose `n`-th failure in a row waits `base × 2^n`, up
/// to [`MAX_DOUBLINGS`] × `base` and [`MAX_BACKOFF`].
fn after_failures(base: Duration) -> Backoff {
    let max = base.saturating_mul(MAX_DOUBLINGS).min(MAX_BACKOFF);
    Backoff::new(base.saturating_mul(2).min(max), max)
}

/// Sleeps `pause` unless shutdown is signalled first; returns whether to go on.
async fn pause_or_stop(pause: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(pause) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

async fn heartbeat_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    // The first retry comes after one period, then the pause doubles.
    let mut backoff = after_failures(inner.heartbeat / 2);
    let mut pause = inner.heartbeat;
    let mut reported = false;
    loop {
        if !pause_or_stop(pause, &mut stop).await {
            return;
        }
        match inner.beat(&mut reported).await {
            Ok(Beat::Alive) => {
                backoff.reset();
                pause = inner.heartbeat;
            }
            Ok(Beat::StandDown) => {
                inner.stand_down().await;
                return;
            }
            Err(err) => {
                pause = backoff.fail();
                let failures = backoff.failures();
                tracing::warn!(%err, failures, "heartbeat failed; retrying with backoff");
            }
        }
    }
}

async fn watch_loop(
    inner: Arc<Inner>,
    mut rx: Option<WatchReceiver>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(
        REWATCH_PAUSE,
        REWATCH_PAUSE.saturating_mul(MAX_DOUBLINGS).min(MAX_BACKOFF),
    );
    loop {
        let Some(feed) = rx.as_mut() else {
            if !pause_or_stop(backoff.peek(), &mut stop).await {
                return;
            }
            rx = rewatch(&inner, &mut backoff).await;
            continue;
        };
        let event = tokio::select! {
            ev = feed.recv() => ev,
            _ = stop.changed() => return,
        };
        match event {
            Some(WatchEvent::Resync) => {
                if let Err(err) = inner.reload_view().await {
                    tracing::warn!(%err, "reload after resync failed; the periodic reload will retry");
                }
            }
            Some(event) => inner.apply(event),
            None => {
                tracing::warn!("watch feed ended; re-watching");
                rx = None;
            }
        }
    }
}

/// Opens a new watch (then reloads: changes may have been missed meanwhile).
async fn rewatch(inner: &Inner, backoff: &mut Backoff) -> Option<WatchReceiver> {
    match inner.call("watch", inner.registry.watch(&inner.ns)).await {
        Ok(new) => {
            backoff.reset();
            if let Err(err) = inner.reload_view().await {
                tracing::warn!(%err, "reload after re-watch failed");
            }
            Some(new)
        }
        Err(err) => {
            backoff.fail();
            let failures = backoff.failures();
            tracing::warn!(%err, failures, "watch failed; retrying with backoff");
            None
        }
    }
}

async fn reload_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut backoff = after_failures(RELOAD_RETRY_BASE);
    let mut pause = inner.reload;
    loop {
        if !pause_or_stop(pause, &mut stop).await {
            return;
        }
        match inner.reload_view().await {
            Ok(()) => {
                backoff.reset();
                pause = inner.reload;
            }
            Err(err) => {
                pause = backoff.fail();
                let failures = backoff.failures();
                tracing::warn!(%err, failures, "reload failed; keeping the last known state");
            }
        }
    }
}

async fn reconcile_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = inner.dirty.notified() => {}
            _ = stop.changed() => return,
        }
        inner.reconcile().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pauses are those of the loops' former `base × 2^failures`
    /// (at most 64 × base, at most 10 s).
    #[test]
    fn loop_pauses_double_from_twice_the_base_up_to_the_caps() {
        let ms = Duration::from_millis;
        let mut b = after_failures(ms(500));
        let pauses: Vec<_> = (0..6).map(|_| b.fail()).collect();
        assert_eq!(
            pauses,
            [
                ms(1_000),
                ms(2_000),
                ms(4_000),
                ms(8_000),
                MAX_BACKOFF,
                MAX_BACKOFF
            ]
        );
        let mut b = after_failures(ms(10));
        let pauses: Vec<_> = (0..7).map(|_| b.fail()).collect();
        assert_eq!(
            pauses,
            [ms(20), ms(40), ms(80), ms(160), ms(320), ms(640), ms(640)]
        );
    }
}
