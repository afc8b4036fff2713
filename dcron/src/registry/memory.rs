//! The in-process registry: zero set-up, shared by the nodes of one process.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use rustc_hash::FxHashMap;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::codec;
use super::{
    Claim, ClaimOutcome, Registry, Timing, WatchEvent, WatchReceiver, WATCH_CHANNEL_CAPACITY,
};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::task::TaskMeta;

const BACKEND: &str = "memory";

/// For tests: which collection [`MemoryRegistry::write_raw`] writes raw bytes
/// to, to see how nodes treat foreign or corrupt data in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawKind {
    /// Node records.
    Node,
    /// Dynamic task definitions.
    Task,
    /// Tombstones.
    Tombstone,
    /// Claim watermarks.
    Claim,
}

/// An in-process registry with the semantics of the real ones: node entries
/// expire after their TTL (on tokio's clock, so paused-time tests work),
/// watches deliver events, claims are atomic. Clones share the same data, so
/// several nodes in one process form a cluster.
///
/// It also injects faults for tests: failing calls, dropped watch events,
/// instant node expiry, and raw (corrupt) values.
///
/// ```
/// let registry = dcron::MemoryRegistry::new();
/// let same_cluster = registry.clone();
/// # drop(same_cluster);
/// ```
#[derive(Clone, Default)]
pub struct MemoryRegistry {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    fail_next: AtomicUsize,
    drop_events: AtomicUsize,
    reaper_started: AtomicBool,
}

#[derive(Default)]
struct State {
    spaces: HashMap<String, Space>,
}

#[derive(Default)]
struct Space {
    nodes: BTreeMap<String, NodeSlot>,
    tasks: BTreeMap<String, Vec<u8>>,
    tombstones: BTreeMap<String, Vec<u8>>,
    claims: FxHashMap<String, ClaimSlot>,
    /// Claimers (node id, token), interned so a claim copies no string.
    claimers: Vec<(Arc<str>, Arc<str>)>,
    watchers: Vec<Watcher>,
}

/// One watch feed. Events go straight into its channel (nothing is kept
/// once received); a full channel drops the event and owes a `Resync`.
struct Watcher {
    tx: mpsc::Sender<WatchEvent>,
    owes_resync: bool,
}

struct NodeSlot {
    raw: Vec<u8>,
    expires: Instant,
    /// Last registration or heartbeat, reported as `last_alive`.
    beat: Instant,
}

enum ClaimSlot {
    Valid {
        fire_time: i64,
        node: u32,
        claimed_at: i64,
    },
    Corrupt(Vec<u8>),
}

impl MemoryRegistry {
    /// A new, empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next `n` calls fail with a registry error.
    pub fn fail_next_calls(&self, n: usize) {
        self.shared.fail_next.store(n, Ordering::SeqCst);
    }

    /// Drops the next `n` watch events (as a lossy feed would).
    pub fn drop_next_events(&self, n: usize) {
        self.shared.drop_events.store(n, Ordering::SeqCst);
    }

    /// Expires node `id` of `ns` now, as if its TTL had run out.
    pub fn expire_node(&self, ns: &str, id: &str) {
        let mut state = self.shared.lock();
        let space = state.space(ns);
        if space.nodes.remove(id).is_some() {
            self.shared
                .publish(space, WatchEvent::NodeDelete(id.to_string()));
        }
    }

    /// Stores `raw` as-is, as another program might (corrupt data tests).
    /// Node entries written this way live for one hour.
    pub fn write_raw(&self, ns: &str, kind: RawKind, name: &str, raw: &[u8]) {
        let mut state = self.shared.lock();
        let space = state.space(ns);
        let raw = raw.to_vec();
        match kind {
            RawKind::Node => {
                let beat = Instant::now();
                let expires = beat + Duration::from_secs(3600);
                space
                    .nodes
                    .insert(name.to_string(), NodeSlot { raw, expires, beat });
            }
            RawKind::Task => {
                space.tasks.insert(name.to_string(), raw);
            }
            RawKind::Tombstone => {
                space.tombstones.insert(name.to_string(), raw);
            }
            // A value that decodes is a watermark like any other (written
            // by an older version, say); anything else stays corrupt.
            RawKind::Claim => {
                let slot = match serde_json::from_slice::<Claim>(&raw) {
                    Ok(claim) => ClaimSlot::Valid {
                        fire_time: claim.fire_time,
                        node: space.claimer(&claim),
                        claimed_at: claim.claimed_at,
                    },
                    Err(_) => ClaimSlot::Corrupt(raw),
                };
                space.claims.insert(name.to_string(), slot);
            }
        }
    }

    fn start_reaper(&self) {
        if self.shared.reaper_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(&self.shared);
        tokio::spawn(reap(weak));
    }
}

/// Expires nodes in the background so watchers see `NodeDelete` promptly;
/// reads expire lazily too, so this only affects event latency.
async fn reap(weak: Weak<Shared>) {
    // Bounded sleep: a registration with a shorter TTL may arrive meanwhile.
    const MAX_SLEEP: Duration = Duration::from_millis(200);
    loop {
        let next = {
            let Some(shared) = weak.upgrade() else { return };
            let mut state = shared.lock();
            let now = Instant::now();
            let mut next = now + MAX_SLEEP;
            for space in state.spaces.values_mut() {
                shared.expire_due(space, now);
                if let Some(e) = space.nodes.values().map(|n| n.expires).min() {
                    next = next.min(e);
                }
            }
            next
        };
        tokio::time::sleep_until(next).await;
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps half-updated
        // (every mutation is a single insert/remove), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fault(&self) -> Result<()> {
        let taken = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match taken {
            Ok(_) => Err(Error::registry_msg(BACKEND, "injected failure")),
            Err(_) => Ok(()),
        }
    }

    fn publish(&self, space: &mut Space, event: WatchEvent) {
        let dropped = self
            .drop_events
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if dropped.is_ok() {
            return;
        }
        space.watchers.retain_mut(|w| {
            if w.owes_resync {
                match w.tx.try_send(WatchEvent::Resync) {
                    Ok(()) => w.owes_resync = false,
                    Err(mpsc::error::TrySendError::Full(_)) => return true,
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            match w.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    w.owes_resync = true;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    fn expire_due(&self, space: &mut Space, now: Instant) {
        let expired: Vec<String> = space
            .nodes
            .iter()
            .filter(|(_, slot)| slot.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            space.nodes.remove(&id);
            self.publish(space, WatchEvent::NodeDelete(id));
        }
    }
}

impl State {
    fn space(&mut self, ns: &str) -> &mut Space {
        if !self.spaces.contains_key(ns) {
            self.spaces.insert(ns.to_string(), Space::default());
        }
        // Just inserted if it was missing.
        self.spaces.get_mut(ns).expect("namespace present")
    }
}

impl Space {
    fn claimer(&mut self, claim: &Claim) -> u32 {
        let found = self
            .claimers
            .iter()
            .position(|(n, t)| **n == *claim.node && **t == *claim.token);
        match found {
            Some(i) => i as u32,
            None => {
                self.claimers
                    .push((claim.node.as_str().into(), claim.token.as_str().into()));
                (self.claimers.len() - 1) as u32
            }
        }
    }

    /// Whether claimer `node` has a token (claims without one are never
    /// found to be "ours").
    fn has_token(&self, node: u32) -> bool {
        self.claimers
            .get(node as usize)
            .is_some_and(|(_, t)| !t.is_empty())
    }

    fn try_claim(&mut self, task: &str, fire_time: i64, node: u32, claimed_at: i64) -> bool {
        let tokened = self.has_token(node);
        let new = || ClaimSlot::Valid {
            fire_time,
            node,
            claimed_at,
        };
        match self.claims.get_mut(task) {
            Some(slot) => {
                let older = match slot {
                    ClaimSlot::Valid {
                        fire_time: f,
                        node: n,
                        ..
                    } => {
                        if *f == fire_time && *n == node && tokened {
                            return true; // ours already: a retry after a lost answer
                        }
                        *f < fire_time
                    }
                    ClaimSlot::Corrupt(_) => true,
                };
                if older {
                    *slot = new();
                }
                older
            }
            None => {
                self.claims.insert(task.to_string(), new());
                true
            }
        }
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn timing(&self) -> Timing {
        Timing {
            node_ttl: Duration::from_secs(3),
            heartbeat: Duration::from_millis(500),
            reload: Duration::from_secs(5),
        }
    }

    async fn register(&self, ns: &str, node: &Node, ttl: Duration) -> Result<()> {
        self.shared.fault()?;
        self.start_reaper();
        let mut state = self.shared.lock();
        let space = state.space(ns);
        let beat = Instant::now();
        let slot = NodeSlot {
            raw: codec::encode(node),
            expires: beat + ttl,
            beat,
        };
        space.nodes.insert(node.id.clone(), slot);
        self.shared
            .publish(space, WatchEvent::NodePut(node.clone()));
        Ok(())
    }

    async fn heartbeat(&self, ns: &str, node_id: &str, ttl: Duration) -> Result<bool> {
        self.shared.fault()?;
        let mut state = self.shared.lock();
        let space = state.space(ns);
        let now = Instant::now();
        self.shared.expire_due(space, now);
        Ok(match space.nodes.get_mut(node_id) {
            Some(slot) => {
                slot.expires = now + ttl;
                slot.beat = now;
                true
            }
            None => false,
        })
    }

    async fn update_node(&self, ns: &str, node: &Node) -> Result<bool> {
        self.shared.fault()?;
        let mut state = self.shared.lock();
        let space = state.space(ns);
        self.shared.expire_due(space, Instant::now());
        let Some(slot) = space.nodes.get_mut(&node.id) else {
            return Ok(false);
        };
        slot.raw = codec::encode(node);
        self.shared
            .publish(space, WatchEvent::NodePut(node.clone()));
        Ok(true)
    }

    async fn unregister(&self, ns: &str, node_id: &str) -> Result<()> {
        self.shared.fault()?;
        let mut state = self.shared.lock();
        let space = state.space(ns);
        if space.nodes.remove(node_id).is_some() {
            self.shared
                .publish(space, WatchEvent::NodeDelete(node_id.to_string()));
        }
        Ok(())
    }

    async fn nodes(&self, ns: &str) -> Result<Vec<Node>> {
        self.shared.fault()?;
        let mut state = self.shared.lock();
        let space = state.space(ns);
        let now = Instant::now();
        self.shared.expire_due(space, now);
        let wall = chrono::Utc::now().timestamp_millis();
        Ok(space
            .nodes
            .iter()
            .filter_map(|(id, slot)| {
                let mut node = codec::decode_node(BACKEND, id, &slot.raw)?;
                let ago = i64::try_from((now - slot.beat).as_millis()).unwrap_or(i64::MAX);
                node.last_alive = wall.saturating_sub(ago);
                Some(node)
            })
            .collect())
    }

    async fn put_task(&self, ns: &str, meta: &TaskMeta, overwrite: bool) -> Result<()> {
        self.shared.fault()?;
        let mut state = self.shared.lock();
        let space = state.space(ns);
        if !overwrite && space.tasks.contains_key(&meta.name) {
            return Err(Error::TaskExists(meta.name.clone()));
        }
        space.tasks.insert(meta.name.clone(), codec::encode(meta));
        self.shared
            .publish(space, WatchEvent::TaskPut(meta.clone()));
        Ok(())
    }

    async fn delete_task(&self, ns: &str, name: &str) -> Result<()> {
        self.shared.fault()?;
        let mut state = self.shared.lock();
        let space = state.space(ns);
        if space.tasks.remove(name).is_some() {
            self.shared
                .publish(space, WatchEvent::TaskDelete(name.to_string()));
        }
        Ok(())
    }

    async fn tasks(&self, ns: &str) -> Result<Vec<TaskMeta>> {
        self.shared.fault()?;
        let mut state = self.shared.lock();
        Ok(state
            .space(ns)
            .tasks
            .iter()
            .filter_map(|(name, raw)| codec::decode_task(BACKEND, name, raw))
            .collect())
    }

    async fn put_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        self.shared.fault()?;
        let mut state = self.shared.lock();
        let space = state.space(ns);
        let value = codec::encode(&serde_json::json!({ "deleted": true }));
        if space.tombstones.insert(name.to_string(), value).is_none() {
            self.shared
                .publish(space, WatchEvent::TombstonePut(name.to_string()));
        }
        Ok(())
    }

    async fn delete_tombstone(&self, ns: &str, name: &str) -> Result<()> {
        self.shared.fault()?;
        let mut state = self.shared.lock();
        let space = state.space(ns);
        if space.tombstones.remove(name).is_some() {
            self.shared
                .publish(space, WatchEvent::TombstoneDelete(name.to_string()));
        }
        Ok(())
    }

    async fn tombstones(&self, ns: &str) -> Result<Vec<String>> {
        self.shared.fault()?;
        let mut state = self.shared.lock();
        Ok(state.space(ns).tombstones.keys().cloned().collect())
    }

    async fn claim(&self, ns: &str, task: &str, claim: &Claim) -> Result<bool> {
        self.shared.fault()?;
        let mut state = self.shared.lock();
        let space = state.space(ns);
        let node = space.claimer(claim);
        Ok(space.try_claim(task, claim.fire_time, node, claim.claimed_at))
    }

    async fn claim_many(&self, ns: &str, tasks: &[&str], claim: &Claim) -> Vec<ClaimOutcome> {
        if let Err(err) = self.shared.fault() {
            return ClaimOutcome::fail_all(tasks.len(), err);
        }
        let mut state = self.shared.lock();
        let space = state.space(ns);
        let node = space.claimer(claim);
        tasks
            .iter()
            .map(|task| {
                ClaimOutcome::from_result(Ok(space.try_claim(
                    task,
                    claim.fire_time,
                    node,
                    claim.claimed_at,
                )))
            })
            .collect()
    }

    async fn claims(&self, ns: &str) -> Result<Vec<(String, Claim)>> {
        self.shared.fault()?;
        let mut state = self.shared.lock();
        let space = state.space(ns);
        let claimers = &space.claimers;
        let mut out: Vec<(String, Claim)> = space
            .claims
            .iter()
            .filter_map(|(name, slot)| match slot {
                ClaimSlot::Valid {
                    fire_time,
                    node,
                    claimed_at,
                } => Some((name.clone(), {
                    let (n, t) = claimers
                        .get(*node as usize)
                        .map(|(n, t)| (n.to_string(), t.to_string()))
                        .unwrap_or_default();
                    Claim {
                        fire_time: *fire_time,
                        node: n,
                        claimed_at: *claimed_at,
                        token: t,
                    }
                })),
                ClaimSlot::Corrupt(raw) => {
                    codec::decode_claim(BACKEND, name, raw).map(|claim| (name.clone(), claim))
                }
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn delete_claim(&self, ns: &str, task: &str) -> Result<()> {
        self.shared.fault()?;
        let mut state = self.shared.lock();
        state.space(ns).claims.remove(task);
        Ok(())
    }

    async fn clear(&self, ns: &str) -> Result<()> {
        self.shared.fault()?;
        let mut state = self.shared.lock();
        let space = state.space(ns);
        let tasks = std::mem::take(&mut space.tasks);
        let tombstones = std::mem::take(&mut space.tombstones);
        space.claims.clear();
        for name in tasks.into_keys() {
            self.shared.publish(space, WatchEvent::TaskDelete(name));
        }
        for name in tombstones.into_keys() {
            self.shared
                .publish(space, WatchEvent::TombstoneDelete(name));
        }
        Ok(())
    }

    async fn watch(&self, ns: &str) -> Result<WatchReceiver> {
        self.shared.fault()?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        let mut state = self.shared.lock();
        state.space(ns).watchers.push(Watcher {
            tx,
            owes_resync: false,
        });
        Ok(rx)
    }
}
